"""Llama training steps as jlocalmap programs, at published shapes and meshes,
for ``jlm.estimate`` (examples/estimate.py, benchmarks/estimate_validation.py) and
for running for real (tests on 8 simulated CPU devices, one GPU). Run as a
script, it trains a tiny one on 8 simulated CPU devices against the same model
unsharded on one device:

    python examples/llama_programs.py [--mesh fsdp=2,cp=2,tp=2] [--steps 3]

A step is a whole training step: forward, backward and an AdamW update of float32
master weights (bfloat16 compute). The mesh has four axes, ``(dp, fsdp, cp, tp)``,
the last varying fastest over devices (tensor parallelism inside a node):

* ``dp`` and ``fsdp`` split the batch; ``fsdp`` also splits every weight (ZeRO-3,
  torchtitan's FSDP2, MaxText's ``fsdp``): a layer's weights are cast to the
  compute dtype and enter the regions that use them as their fsdp shards, which
  the region all-gathers; the gather's transpose reduce-scatters their gradients
  over fsdp, as FSDP does, and the rest of the sum (over dp and cp) is an
  all-reduce at the region's boundary (see ``COLUMN_GRAD``);
* ``cp`` splits the sequence (context parallelism: k and v gathered over cp);
* ``tp`` is Megatron tensor parallelism with sequence parallelism: column-parallel
  wq/wk/wv/w1/w3 and LM head, row-parallel wo/w2, the vocabulary of the embedding
  split, the residual stream's sequence split over ``tp`` between the halves.

``local_map`` regions stand where torchtitan and MaxText put per-device code: the
vocab-parallel embedding (a ``Partial`` lookup), the RMSNorm under sequence
parallelism (its weight gradient ``Partial``), the inner attention (RoPE and
causal GQA softmax attention on local heads, k and v gathered over cp), the
row-parallel matmuls (a ``Partial`` product reduce-scattered onto the sequence),
the column projections (the stream gathered over tp, outputs split over tp) and
the vocab-parallel cross-entropy. Each weight enters its region as its
fsdp shard, which the body all-gathers. Layers are a ``jax.lax.scan`` over
stacked weights.

Options (:class:`Plan`): activation checkpointing ``none`` (save everything but
the gathered weights), ``selective`` (save the outputs of the projection
matmuls: ``dots_with_no_batch_dims_saveable``, torchtitan's SAC in spirit),
``qkv`` (save q, k and v only: MaxText's ``save_qkv_proj``) or ``full`` (save
each layer's input); attention ``dense`` (the scores
materialised) or ``blocked`` (queries in blocks of ``attention_block``, each
block checkpointed and, without cp, against its causal keys only: a
flash-attention stand-in whose memory is one block's scores and whose FLOPs
skip most masked blocks) or ``none`` (q, k and v added, no attention: not a
model, a stand-in for pricing a fused attention kernel apart, see
benchmarks/estimate_validation.py); precision ``bf16`` or ``fp8``: the
projection matmuls (not attention, not the LM head, as Transformer Engine)
take float8 operands,
e4m3 forward and e5m2 gradients, with no scaling factors modelled; microbatches:
gradient accumulation, a scan over slices of the batch (Megatron's and NeMo's
microbatches: the activations of one slice at a time).

    >>> import jax
    >>> mesh = make_abstract_mesh({"fsdp": 64, "tp": 8})
    >>> step, args, flops, tokens = build(PRESETS["llama3-70b"], mesh, batch=64, seq=8192,
    ...                                   plan=Plan(remat="full", attention="blocked"))
    >>> tokens, round(flops / tokens / 1e9)
    (524288, 449)
    >>> jax.make_jaxpr(step)(*args) is not None
    True
"""

from __future__ import annotations

import os

# Simulate 8 devices on the host platform; has no effect when JAX runs on GPUs.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, NamedSharding

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard

AXES = ("dp", "fsdp", "cp", "tp")
R, S0, S1, S2, P = Replicate(), Shard(0), Shard(1), Shard(2), Partial()
TOKENS = [S0, S0, S1, R]            # (batch, seq): batch over dp then fsdp, seq over cp
STREAM = [S0, S0, S1, S1]           # (batch, seq, dim): seq over cp, then tp (sequence parallel)
GATHERED = [S0, S0, S1, R]          # the same with each cp chunk whole on every tp rank
HEADS = [S0, S0, S1, S2]            # (batch, seq, heads, head_dim): heads over tp
KV_GATHERED = [S0, S0, R, S2]       # k, v with the whole sequence on every cp rank
KV_GRAD = [S0, S0, P, S2]           # a cp rank's cotangent of the gathered k, v: a summand
HIDDEN = [S0, S0, S1, S2]           # (batch, seq, n): a column-parallel output
SUMMED = [P, P, P, P]               # a replicated weight's gradient from sharded data


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama's shapes (published configurations: see ``PRESETS``)."""
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_params(self) -> int:
        """Parameters, embedding and LM head included (8.03e9 for Llama 3 8B)."""
        d, kv = self.dim, self.n_kv_heads * self.head_dim
        layer = 2 * d * d + 2 * d * kv + 3 * d * self.ffn_dim + 2 * d
        return self.n_layers * layer + 2 * self.vocab * d + d


PRESETS: dict[str, LlamaConfig] = {
    "llama3-8b": LlamaConfig(4096, 32, 32, 8, 14336, 128256),
    "llama3-70b": LlamaConfig(8192, 80, 64, 8, 28672, 128256),
    "llama3-405b": LlamaConfig(16384, 126, 128, 8, 53248, 128256),
    "llama2-7b": LlamaConfig(4096, 32, 32, 32, 11008, 32000, 1e-5, 10000.0),
    "llama2-70b": LlamaConfig(8192, 80, 64, 8, 28672, 32000, 1e-5, 10000.0),
    "tiny": LlamaConfig(16, 2, 4, 2, 32, 64),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a step is trained: checkpointing, attention, precision, optimizer."""
    remat: str = "selective"        # none | selective | qkv | full
    attention: str = "blocked"      # dense | blocked | none
    attention_block: int = 1024
    precision: str = "bf16"         # bf16 | fp8 (projection matmuls)
    microbatches: int = 1           # gradient accumulation: a scan over batch slices
    compute_dtype: str = "bfloat16"
    lr: float = 3e-4

    def __post_init__(self):
        for name, allowed in (("remat", tuple(REMAT_POLICIES)),
                              ("attention", ("dense", "blocked", "none")),
                              ("precision", ("bf16", "fp8"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Plan.{name}: expected one of {allowed}, "
                                 f"found {getattr(self, name)!r}")


# -- meshes ---------------------------------------------------------------------
def mesh_sizes(sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The four axis sizes of ``{"fsdp": 8, "tp": 8}`` (absent axes have size 1)."""
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f"mesh: axes must be among {AXES}, found {sorted(unknown)}")
    return tuple(int(sizes.get(a, 1)) for a in AXES)


def make_abstract_mesh(sizes: Mapping[str, int]) -> jax.sharding.AbstractMesh:
    """An abstract (dp, fsdp, cp, tp) mesh with Explicit axes: any size, no devices."""
    return jax.sharding.AbstractMesh(mesh_sizes(sizes), AXES,
                                     axis_types=(AxisType.Explicit,) * len(AXES))


def make_mesh(sizes: Mapping[str, int], devices=None) -> jax.sharding.Mesh:
    """A (dp, fsdp, cp, tp) mesh of real devices with Explicit axes."""
    shape = mesh_sizes(sizes)
    devices = list(devices or jax.devices())[:int(np.prod(shape))]
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Explicit,) * len(AXES),
                         devices=devices)


def axis_size(mesh, name: str) -> int:
    return mesh.shape[name]


# -- weights ----------------------------------------------------------------------
COLUMN, ROW = [R, S0, R, S1], [R, S1, R, S0]   # (in, out): fsdp on dim, tp on the other
LAYER_PLACEMENTS = {"attention_norm": [R] * 4, "wq": COLUMN, "wk": COLUMN, "wv": COLUMN,
                    "wo": ROW, "ffn_norm": [R] * 4, "w1": COLUMN, "w3": COLUMN, "w2": ROW}


def layer_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    d, kv = cfg.dim, cfg.n_kv_heads * cfg.head_dim
    return {"attention_norm": (d,), "wq": (d, d), "wk": (d, kv), "wv": (d, kv), "wo": (d, d),
            "ffn_norm": (d,), "w1": (d, cfg.ffn_dim), "w3": (d, cfg.ffn_dim),
            "w2": (cfg.ffn_dim, d)}


def stacked(placements: list) -> list:
    """A layer weight's placements once the layers are stacked on a new dim 0."""
    return [Shard(p.dim + 1) if isinstance(p, Shard) else p for p in placements]


def param_layout(cfg: LlamaConfig) -> tuple[dict, dict]:
    """(shapes, placements) of the whole model: layers stacked on dim 0."""
    shapes = {"tok_embeddings": (cfg.vocab, cfg.dim), "norm": (cfg.dim,),
              "output": (cfg.dim, cfg.vocab),
              "layers": {k: (cfg.n_layers, *s) for k, s in layer_shapes(cfg).items()}}
    placements = {"tok_embeddings": ROW, "norm": [R] * 4, "output": COLUMN,
                  "layers": {k: stacked(p) for k, p in LAYER_PLACEMENTS.items()}}
    return shapes, placements


def sharding(mesh, placements: list, ndim: int) -> NamedSharding:
    """The NamedSharding of a placement list on the (dp, fsdp, cp, tp) mesh."""
    dims: list[list[str]] = [[] for _ in range(ndim)]
    for axis, p in zip(AXES, placements, strict=True):
        if isinstance(p, Shard):
            dims[p.dim].append(axis)
    spec = [None if not d else d[0] if len(d) == 1 else tuple(d) for d in dims]
    return NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def abstract(mesh, shapes, placements, dtype=jnp.float32):
    """ShapeDtypeStructs with NamedShardings for a tree of shapes."""
    return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(
        s, jnp.dtype(dtype), sharding=sharding(mesh, p, len(s))), shapes, placements,
        is_leaf=lambda x: isinstance(x, tuple))


# -- the model, shared by the sharded program and the unsharded reference -----------
@dataclasses.dataclass(frozen=True)
class Ops:
    """The pieces that differ between the sharded program and the reference."""
    embed: Callable       # (table, tokens) -> the stream
    norm: Callable        # (x, weight) -> the stream
    attention: Callable   # (q, k, v) -> (batch, seq, heads, head_dim): RoPE, causal, GQA
    column: Callable      # (h, *weights) -> h @ w for each weight, outputs split over tp
    row: Callable         # (x, w) -> x @ w onto the stream (a sum over tp)
    loss: Callable        # (h, head, labels) -> the mean cross-entropy


def rms_norm(x, weight, *, eps: float):
    """x / rms(x) * weight over the last dim, in float32."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotary position embedding of (batch, seq, heads, head_dim) at ``positions``
    (the two halves of head_dim are the real and imaginary parts)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * freqs
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    re, im = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([re * cos - im * sin, re * sin + im * cos], -1).astype(x.dtype)


def causal_attention(q, k, v, q_offset):
    """softmax(q k^T / sqrt(d), causal) v; q's positions start at ``q_offset``, k's
    at 0; q has ``group`` heads per k/v head (grouped-query attention)."""
    b, sq, hq, d = q.shape
    group = hq // k.shape[2]
    q = q.reshape(b, sq, k.shape[2], group, d)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    rows = q_offset + jnp.arange(sq)
    scores = jnp.where(rows[:, None] >= jnp.arange(k.shape[1])[None, :], scores * d ** -0.5,
                       -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, sq, hq, d)


def attend(q, k, v, q_offset, *, theta: float, block: int | None, causal_keys: bool):
    """RoPE, then causal attention, whole (``block`` None) or by query blocks, each
    checkpointed; with ``causal_keys`` (q_offset 0) a block sees only its keys."""
    if block == 0:   # attention "none": q, k and v mixed without attention
        return q + jnp.repeat(k + v, q.shape[2] // k.shape[2], axis=2)[:, :q.shape[1]]
    q = rope(q, q_offset + jnp.arange(q.shape[1]), theta)
    k = rope(k, jnp.arange(k.shape[1]), theta)
    if block is None or block >= q.shape[1]:
        return causal_attention(q, k, v, q_offset)
    outs = []
    for start in range(0, q.shape[1], block):
        keys = start + block if causal_keys else k.shape[1]
        outs.append(jax.checkpoint(causal_attention)(
            q[:, start:start + block], k[:, :keys], v[:, :keys], q_offset + start))
    return jnp.concatenate(outs, axis=1)


def block_forward(layer: dict, x, ops: Ops, cfg: LlamaConfig):
    """One transformer block: x + attention(norm(x)), then + SwiGLU(norm(.)).
    Matrices are cast to the stream's dtype where they are used."""
    def w(name):
        return layer[name].astype(x.dtype)
    b, s = x.shape[:2]
    projected = ops.column(ops.norm(x, layer["attention_norm"]), w("wq"), w("wk"), w("wv"))
    q, k, v = (checkpoint_name(y.reshape(b, s, -1, cfg.head_dim), "qkv_proj") for y in projected)
    x = x + ops.row(ops.attention(q, k, v).reshape(b, s, -1), w("wo"))
    gate, up = ops.column(ops.norm(x, layer["ffn_norm"]), w("w1"), w("w3"))
    return x + ops.row(jax.nn.silu(gate) * up, w("w2"))


REMAT_POLICIES = {
    "none": jax.checkpoint_policies.save_anything_except_these_names("gathered_weight"),
    "selective": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def loss_fn(params: dict, tokens, labels, ops: Ops, cfg: LlamaConfig, plan: Plan):
    """Mean next-token cross-entropy; the layers a scan over the stacked weights."""
    dtype = jnp.dtype(plan.compute_dtype)
    x = ops.embed(params["tok_embeddings"].astype(dtype), tokens)
    layer = jax.checkpoint(functools.partial(block_forward, ops=ops, cfg=cfg),
                           policy=REMAT_POLICIES[plan.remat])
    x, _ = jax.lax.scan(lambda x, weights: (layer(weights, x), None), x, params["layers"])
    head = params["output"].astype(dtype)
    return ops.loss(ops.norm(x, params["norm"]), head, labels)


# -- float8 projections ---------------------------------------------------------------
@jax.custom_vjp
def fp8_matmul(x, w):
    """x @ w with float8 e4m3 operands, the result in x's dtype (Transformer
    Engine's forward); the backward's two matmuls take the e5m2 gradient."""
    return _fp8_forward(x, w)[0]


def _fp8_forward(x, w):
    x8, w8 = x.astype(jnp.float8_e4m3fn), w.astype(jnp.float8_e4m3fn)
    return jnp.matmul(x8, w8, preferred_element_type=x.dtype), (x8, w8)


def _fp8_backward(saved, g):
    x8, w8 = saved
    g8 = g.astype(jnp.float8_e5m2)
    dx = jax.lax.dot_general(g8, w8, (((g.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=g.dtype)
    batch = tuple(range(g.ndim - 1))
    dw = jax.lax.dot_general(x8, g8, ((batch, batch), ((), ())),
                             preferred_element_type=g.dtype)
    return dx, dw


fp8_matmul.defvjp(_fp8_forward, _fp8_backward)


# -- the unsharded reference ----------------------------------------------------------
def dense_loss(h, head, labels):
    """Mean cross-entropy of the whole logits."""
    logits = jnp.matmul(h, head, preferred_element_type=jnp.float32)
    picked = jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - picked)


def reference_ops(cfg: LlamaConfig, plan: Plan) -> Ops:
    """The model on one device, plain JAX."""
    return Ops(embed=lambda table, tokens: table[tokens],
               norm=functools.partial(rms_norm, eps=cfg.norm_eps),
               attention=functools.partial(attend, q_offset=0, theta=cfg.rope_theta,
                                           block=_block(plan), causal_keys=True),
               column=lambda h, *ws: tuple(_matmul(plan)(h, w) for w in ws),
               row=_matmul(plan), loss=dense_loss)


def _matmul(plan: Plan) -> Callable:
    return fp8_matmul if plan.precision == "fp8" else jnp.matmul


def _block(plan: Plan) -> int | None:
    return {"blocked": plan.attention_block, "dense": None, "none": 0}[plan.attention]


# -- the sharded pieces: local_map regions ------------------------------------------
# A weight enters a region as its fsdp shard, split over tp, and the body
# all-gathers it over fsdp (FSDP2's pre-forward gather; MaxText's, which XLA
# places). Its cotangent in the body sums this (dp, fsdp, cp) rank's tokens: the
# gather's transpose reduce-scatters it over fsdp (FSDP's gradient
# reduce-scatter), and the rest is Partial over dp and cp, which jlocalmap
# all-reduces at the region's boundary (HSDP's all-reduce across replicas).
COLUMN_GRAD, ROW_GRAD = [P, S0, P, S1], [P, S1, P, S0]


def gather_weight(w, dim: int):
    """Body: a weight's fsdp shard all-gathered on ``dim``; named, so that no
    checkpoint policy saves it (the backward gathers it again)."""
    return checkpoint_name(jax.lax.all_gather(w, "fsdp", axis=dim, tiled=True),
                           "gathered_weight")


def gather_stream(x):
    """Body: the sequence-parallel stream's chunk all-gathered over tp."""
    return jax.lax.all_gather(x, "tp", axis=1, tiled=True)


def make_column(mesh, matmul: Callable) -> Callable:
    """(h, *weights) -> h @ w for each weight: the stream gathered over tp once,
    each weight over fsdp, outputs split over tp (Megatron's column parallelism
    under sequence parallelism: the backward reduce-scatters h's gradient)."""
    @functools.cache
    def region(n: int):
        def body(h, *weights):
            h = gather_stream(h)
            return tuple(matmul(h, gather_weight(w, 0)) for w in weights)
        return jlm.local_map(body, out_placements=(HIDDEN,) * n,
                             in_placements=(STREAM,) + (COLUMN,) * n,
                             in_grad_placements=(STREAM,) + (COLUMN_GRAD,) * n,
                             device_mesh=mesh)
    return lambda h, *weights: region(len(weights))(h, *weights)


def make_row(mesh, matmul: Callable) -> Callable:
    """Row-parallel x @ w: a ``Partial`` sum over tp, reduce-scattered onto the stream."""
    local_product = jlm.local_map(lambda x, w: matmul(x, gather_weight(w, 1)),
                                  out_placements=[S0, S0, S1, P],
                                  in_placements=(HIDDEN, ROW),
                                  in_grad_placements=(HIDDEN, ROW_GRAD), device_mesh=mesh)
    return lambda x, w: jlm.redistribute(local_product(x, w), mesh, STREAM)


def make_embedding(mesh) -> Callable:
    """Vocab-parallel lookup: a ``Partial`` sum over tp, reduce-scattered onto the stream."""
    @jlm.local_map(out_placements=[S0, S0, S1, P], in_placements=(ROW, TOKENS),
                   in_grad_placements=(ROW_GRAD, None), device_mesh=mesh)
    def vocab_parallel_embedding(table, tokens):
        table = gather_weight(table, 1)
        local = tokens - jax.lax.axis_index("tp") * table.shape[0]
        here = (local >= 0) & (local < table.shape[0])
        rows = table[jnp.clip(local, 0, table.shape[0] - 1)]
        return jnp.where(here[..., None], rows, jnp.zeros((), table.dtype))

    return lambda table, tokens: jlm.redistribute(vocab_parallel_embedding(table, tokens),
                                                  mesh, STREAM)


def make_loss(mesh, n_tokens: int) -> Callable:
    """Vocab-parallel cross-entropy of the stream gathered over tp: max, sum of
    exponentials and target logit reduced over tp in the body; the mean a sum
    over dp, fsdp and cp."""
    @jlm.local_map(out_placements=[P, P, P, R], in_placements=(STREAM, COLUMN, TOKENS),
                   in_grad_placements=(STREAM, COLUMN_GRAD, None), device_mesh=mesh)
    def vocab_parallel_cross_entropy(h, head, labels):
        logits = jnp.matmul(gather_stream(h), gather_weight(head, 0),
                            preferred_element_type=jnp.float32)
        top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, -1)), "tp")
        total = jax.lax.psum(jnp.sum(jnp.exp(logits - top[..., None]), -1), "tp")
        local = labels - jax.lax.axis_index("tp") * logits.shape[-1]
        here = (local >= 0) & (local < logits.shape[-1])
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, logits.shape[-1] - 1)[..., None],
                                     -1)[..., 0]
        target = jax.lax.psum(jnp.where(here, picked, 0.0), "tp")
        return jnp.sum(jnp.log(total) + top - target) / n_tokens

    return lambda h, head, labels: jlm.redistribute(
        vocab_parallel_cross_entropy(h, head, labels), mesh, [R] * 4)


def make_attention(mesh, cfg: LlamaConfig, plan: Plan) -> Callable:
    """The inner attention as one region: q, k, v with heads over tp and the
    sequence over cp, k and v gathered over cp at the boundary (torchtitan's CP)."""
    cp = axis_size(mesh, "cp")

    def inner(q, k, v):
        offset = jax.lax.axis_index("cp") * q.shape[1] if cp > 1 else 0
        return attend(q, k, v, offset, theta=cfg.rope_theta, block=_block(plan),
                      causal_keys=cp == 1)
    return jlm.local_map(inner, out_placements=HEADS,
                         in_placements=(HEADS, KV_GATHERED, KV_GATHERED),
                         in_grad_placements=(HEADS, KV_GRAD, KV_GRAD),
                         device_mesh=mesh, redistribute_inputs=True)


def sharded_ops(mesh, cfg: LlamaConfig, plan: Plan, n_tokens: int) -> Ops:
    """The model's pieces on the (dp, fsdp, cp, tp) ``mesh``."""
    norm = jlm.local_map(functools.partial(rms_norm, eps=cfg.norm_eps), out_placements=STREAM,
                         in_placements=(STREAM, [R] * 4), in_grad_placements=(STREAM, SUMMED),
                         device_mesh=mesh)
    return Ops(embed=make_embedding(mesh), norm=norm, attention=make_attention(mesh, cfg, plan),
               column=make_column(mesh, _matmul(plan)), row=make_row(mesh, _matmul(plan)),
               loss=make_loss(mesh, n_tokens))


# -- the step ------------------------------------------------------------------------------
def make_step(ops: Ops, cfg: LlamaConfig, plan: Plan) -> tuple[Callable, optax.GradientTransformation]:
    """(step, optimizer): step(params, opt_state, tokens, labels) -> (params, opt_state, loss)."""
    optimizer = optax.adamw(plan.lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)

    def step(params, opt_state, tokens, labels):
        loss, grads = accumulated_grads(params, tokens, labels, ops, cfg, plan)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step, optimizer


def microbatched(a, n: int):
    """(batch, ...) -> (n, batch / n, ...): microbatch i takes row i of each
    device's rows, so that the split moves no data (each device keeps its rows)."""
    sharding = jax.typeof(a).sharding
    target = None if sharding.mesh.empty else NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
        sharding.spec[0], None, *sharding.spec[1:]))
    split = jnp.reshape(a, (a.shape[0] // n, n, *a.shape[1:]), out_sharding=target)
    return jnp.moveaxis(split, 1, 0)


def accumulated_grads(params, tokens, labels, ops: Ops, cfg: LlamaConfig, plan: Plan):
    """(loss, grads) of the whole batch: the mean over ``plan.microbatches``
    slices of it, each slice's mean loss and gradients summed in a scan."""
    grad_fn = jax.value_and_grad(loss_fn)
    if plan.microbatches == 1:
        return grad_fn(params, tokens, labels, ops, cfg, plan)

    def one(total, batch):
        value = grad_fn(params, *batch, ops, cfg, plan)
        return jax.tree.map(lambda t, v: t + v / plan.microbatches, total, value), None
    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    slices = (microbatched(tokens, plan.microbatches), microbatched(labels, plan.microbatches))
    return jax.lax.scan(one, zero, slices)[0]


def model_flops(cfg: LlamaConfig, batch: int, seq: int) -> float:
    """FLOPs of one step by the usual count (forward + backward = 6 per parameter
    and token, embedding lookup excluded, plus causal attention's 6 * 2 * s * d / 2
    per layer and token: torchtitan's count with the causal half)."""
    dense = 6 * (cfg.n_params - cfg.vocab * cfg.dim)
    attention = 6 * cfg.n_layers * seq * cfg.dim
    return float(batch * seq * (dense + attention))


def check_divisible(cfg: LlamaConfig, mesh, batch: int, seq: int, microbatches: int = 1) -> None:
    """Refuse sizes the mesh does not divide, naming the size and the axes."""
    size = dict(mesh.shape)
    checks = (("batch", batch, "dp*fsdp*microbatches", size["dp"] * size["fsdp"] * microbatches),
              ("seq", seq, "cp*tp", size["cp"] * size["tp"]),
              ("n_kv_heads", cfg.n_kv_heads, "tp", size["tp"]),
              ("ffn_dim", cfg.ffn_dim, "tp", size["tp"]), ("vocab", cfg.vocab, "tp", size["tp"]),
              ("dim", cfg.dim, "fsdp", size["fsdp"]))
    for name, value, axes, n in checks:
        if value % n:
            raise ValueError(f"{name} {value} must be a multiple of {axes} = {n}; "
                             "pick another mesh or size")


def build(cfg: LlamaConfig, mesh, *, batch: int, seq: int, plan: Plan = Plan()):
    """(step_fn, args, model_flops, tokens_per_step) of a training step on ``mesh``
    (a Mesh or AbstractMesh with the axes ``AXES``). ``args`` are abstract
    (ShapeDtypeStructs with NamedShardings): params and AdamW state float32."""
    check_divisible(cfg, mesh, batch, seq, plan.microbatches)
    step, optimizer = make_step(sharded_ops(mesh, cfg, plan, batch * seq // plan.microbatches),
                                cfg, plan)
    shapes, placements = param_layout(cfg)
    params = abstract(mesh, shapes, placements)
    with jax.sharding.use_abstract_mesh(abstract_of(mesh)):
        opt_state = jax.eval_shape(optimizer.init, params)
    tokens = abstract(mesh, (batch, seq), TOKENS, jnp.int32)
    return step, (params, opt_state, tokens, tokens), model_flops(cfg, batch, seq), batch * seq


def abstract_of(mesh) -> jax.sharding.AbstractMesh:
    return mesh if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.abstract_mesh


# -- real values ------------------------------------------------------------------------------
def init_params(args_params, seed: int):
    """Random parameters laid out like ``args_params``, made on the devices: norm
    weights near 1, matrices of std 1/sqrt(fan-in)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(args_params)

    def make(key):
        keys = jax.random.split(key, len(paths))
        out = []
        for k, (path, leaf) in zip(keys, paths, strict=True):
            noise = jax.random.normal(k, leaf.shape, leaf.dtype, out_sharding=leaf.sharding)
            is_norm = "norm" in jax.tree_util.keystr(path)
            out.append(1 + 0.1 * noise if is_norm else noise * leaf.shape[-2] ** -0.5)
        return jax.tree.unflatten(treedef, out)
    return jax.jit(make, out_shardings=jax.tree.map(lambda a: a.sharding, args_params))(
        jax.random.key(seed))


def random_tokens(args_tokens, vocab: int, seed: int):
    """Random token ids and their next tokens laid out like ``args_tokens``."""
    rng = np.random.default_rng(seed)
    seqs = rng.integers(0, vocab, (args_tokens.shape[0], args_tokens.shape[1] + 1), np.int32)
    return tuple(jax.device_put(a, args_tokens.sharding) for a in (seqs[:, :-1], seqs[:, 1:]))


def run_and_compare(cfg: LlamaConfig, mesh, *, batch: int, seq: int, plan: Plan,
                    steps: int = 2, seed: int = 0) -> list[dict]:
    """``steps`` training steps on ``mesh`` and of the unsharded reference (one
    device) from the same random start: per step the loss and the largest
    |sharded - unsharded| of loss and parameters."""
    step, args, _, _ = build(cfg, mesh, batch=batch, seq=seq, plan=plan)
    with jax.set_mesh(mesh):
        params = init_params(args[0], seed)
        tokens = random_tokens(args[2], cfg.vocab, seed)
        compiled = jax.jit(step).lower(params, args[1], *tokens).compile()
        opt_state = jax.jit(make_step(reference_ops(cfg, plan), cfg, plan)[1].init)(params)
    host = jax.device_put(jax.tree.map(lambda a: np.asarray(jlm.full_tensor(a)),
                                       (params, tokens)), jax.devices()[0])
    ref_step, optimizer = make_step(reference_ops(cfg, plan), cfg, plan)
    ref_params, ref_tokens = host
    ref_state, ref_step = optimizer.init(ref_params), jax.jit(ref_step)
    history = []
    for _ in range(steps):
        with jax.set_mesh(mesh):
            params, opt_state, loss = compiled(params, opt_state, *tokens)
        ref_params, ref_state, ref_loss = ref_step(ref_params, ref_state, *ref_tokens)
        history.append({"loss": float(loss), "loss_diff": abs(float(loss) - float(ref_loss)),
                        "param_diff": max_diff(params, ref_params)})
    return history


def max_diff(tree, ref_tree) -> float:
    """Largest |sharded - unsharded| over two trees of arrays."""
    return max(float(np.max(np.abs(np.asarray(jlm.full_tensor(a), np.float64)
                                   - np.asarray(b, np.float64))))
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree), strict=True))


def parse_mesh(text: str) -> dict[str, int]:
    """``"fsdp=8,tp=8"`` -> {"fsdp": 8, "tp": 8} (axes among ``AXES``)."""
    sizes = {}
    for item in filter(None, text.split(",")):
        name, _, size = item.partition("=")
        if name not in AXES or not size.isdigit() or int(size) < 1:
            raise argparse.ArgumentTypeError(
                f"--mesh: expected axis=size items with axes among {AXES}, found {item!r}; "
                "e.g. --mesh fsdp=8,tp=8")
        sizes[name] = int(size)
    return sizes


TOL = 1e-4


def main(argv=None) -> float:
    """Train the tiny model sharded and unsharded; return the largest difference."""
    parser = argparse.ArgumentParser(description="a tiny llama, sharded against unsharded")
    parser.add_argument("--mesh", type=parse_mesh, default={"fsdp": 2, "cp": 2, "tp": 2})
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--remat", choices=tuple(REMAT_POLICIES), default="selective")
    parser.add_argument("--attention", choices=("dense", "blocked"), default="blocked")
    args = parser.parse_args(argv)
    plan = Plan(remat=args.remat, attention=args.attention, attention_block=4,
                compute_dtype="float32", lr=1e-2)
    mesh = make_mesh(args.mesh)
    print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind}; mesh "
          f"{dict(mesh.shape)}; remat {args.remat}, "
          f"attention {args.attention}; float32, AdamW lr 1e-2")
    with jax.default_matmul_precision("highest"):
        history = run_and_compare(PRESETS["tiny"], mesh, batch=args.batch, seq=args.seq,
                                  plan=plan, steps=args.steps)
    for i, h in enumerate(history, 1):
        print("step {}: loss {loss:.6f}  max |loss diff| {loss_diff:.2e}  max |param diff| "
              "{param_diff:.2e}".format(i, **h))
    worst = max(max(h["loss_diff"], h["param_diff"]) for h in history)
    print(f"max |sharded - unsharded| = {worst:.2e}")
    return worst


if __name__ == "__main__":
    if main() > TOL:
        print(f"FAILED: above the tolerance {TOL}", file=sys.stderr)
        sys.exit(1)
