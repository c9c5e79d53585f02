"""The torchtitan llama3 of llama_torch.py in jlocalmap, on a (dp, tp) mesh with
the same placements: the batch split over ``dp``; tensor parallelism over ``tp``
(column-parallel wq/wk/wv/w1/w3 and output, row-parallel wo/w2, the embedding
split over the vocabulary) and sequence parallelism (the residual stream's
sequence split over ``tp`` between the blocks' halves).

The regions are ``jlm.local_map`` calls where the PyTorch model has one (and
where its embedding's DTensor op computes a ``Partial()`` value):

* ``vocab_parallel_embedding``: each tp rank looks up its vocabulary rows, a
  ``Partial()`` sum over tp, reduce-scattered onto the sequence;
* ``rms_norm`` under sequence parallelism: x ``[Shard(0), Shard(1)]``, weight
  replicated, its gradient declared ``Partial()`` on dp and tp;
* ``causal_attention``: q, k, v as (batch, heads, seq, head_dim) with
  ``[Shard(0), Shard(1)]`` (batch on dp, heads on tp), gradients the same;
* the row-parallel matmuls (wo, w2): the local product is ``Partial()`` over
  tp, reduce-scattered onto the sequence (DTensor's RowwiseParallel).

The column-parallel projections, RoPE and the output projection are plain JAX
on Explicit-axis shardings (the counterpart of DTensor ops).

    >>> import jax
    >>> from llama_common import LlamaConfig, init_weights, rope_tables
    >>> cfg = LlamaConfig(dim=32, n_layers=1, n_heads=4, vocab=64, seq=8, batch=2)
    >>> logits = forward(init_weights(cfg, seed=0), jax.numpy.zeros((2, 8), int),
    ...                  rope_tables(cfg), REFERENCE, cfg)
    >>> logits.shape
    (2, 8, 64)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard

from llama_common import (AdamWConfig, LlamaConfig, block_inputs, init_weights, rope_tables,
                          token_batches)

# Placement lists on the mesh (dp, tp).
R, S0, S1 = Replicate(), Shard(0), Shard(1)
STREAM = [S0, S1]           # (batch, seq, dim): sequence parallel between the halves
GATHERED = [S0, R]          # (batch, seq, ...): whole sequence (torchtitan's PrepareModuleInput)
HEADS = [S0, S1]            # (batch, heads, seq, head_dim)
COLUMN, ROW = [R, S1], [R, S0]  # (in, out) weights split on their outputs / inputs
SUMMED = [Partial(), Partial()]  # a replicated weight's gradient in a region of sharded data


# -- the model, shared by the sharded and the unsharded run ---------------------
@dataclasses.dataclass(frozen=True)
class Ops:
    """The pieces that differ between the sharded program and the reference."""
    embed: Callable          # (table, tokens) -> stream
    norm: Callable           # (x, weight, eps=) -> stream
    gather: Callable         # stream -> the whole sequence
    row: Callable            # (x, w) -> x @ w onto the stream (a sum over tp)
    attention: Callable      # (q, k, v) -> (batch, heads, seq, head_dim)
    logits: Callable         # (h, w) -> whole logits


def rms_norm(x, weight, *, eps: float):
    """x / rms(x) * weight over the last dim (whole on every rank)."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def causal_attention(q, k, v):
    """softmax(q k^T / sqrt(d), causal) v on (batch, heads, seq, head_dim), in
    llama_torch.causal_attention's order."""
    scores = q @ jnp.swapaxes(k, -1, -2) * q.shape[-1] ** -0.5
    seq = q.shape[-2]
    future = jnp.triu(jnp.ones((seq, seq), bool), 1)
    return jax.nn.softmax(jnp.where(future, -jnp.inf, scores), axis=-1) @ v


def rotate(x, cos, sin):
    """RoPE on (batch, seq, heads, head_dim): neighbouring entries are the real and
    imaginary parts of complex numbers (torchtitan's freqs_cis convention)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    return jnp.stack((re * cos - im * sin, re * sin + im * cos), -1).reshape(x.shape)


def attention(layer: dict, h, rope, ops: Ops, cfg: LlamaConfig):
    """Column-parallel q/k/v (heads split over tp), RoPE, the inner attention,
    the row-parallel output projection."""
    b, s, _ = h.shape
    cos, sin = (t[:, None, :] for t in rope)           # broadcast over heads
    q, k, v = (ops.gather(h) @ layer[n] for n in ("wq", "wk", "wv"))
    q, k, v = (t.reshape(b, s, cfg.n_heads, cfg.head_dim) for t in (q, k, v))
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    out = ops.attention(*(jnp.swapaxes(t, 1, 2) for t in (q, k, v)))
    return ops.row(jnp.swapaxes(out, 1, 2).reshape(b, s, -1), layer["wo"])


def feed_forward(layer: dict, h, ops: Ops):
    """SwiGLU: column-parallel w1 and w3, row-parallel w2."""
    h = ops.gather(h)
    return ops.row(jax.nn.silu(h @ layer["w1"]) * (h @ layer["w3"]), layer["w2"])


def block(layer: dict, x, rope, ops: Ops, cfg: LlamaConfig):
    """x + attention(norm(x)), then + feed_forward(norm(.))."""
    h = x + attention(layer, ops.norm(x, layer["attention_norm"], eps=cfg.norm_eps), rope, ops, cfg)
    return h + feed_forward(layer, ops.norm(h, layer["ffn_norm"], eps=cfg.norm_eps), ops)


def forward(weights: dict, tokens, rope, ops: Ops, cfg: LlamaConfig):
    """(batch, seq) token ids -> (batch, seq, vocab) logits."""
    h = ops.embed(weights["tok_embeddings"], tokens)
    for layer in weights["layers"]:
        h = block(layer, h, rope, ops, cfg)
    return ops.logits(ops.norm(h, weights["norm"], eps=cfg.norm_eps), weights["output"])


def loss_fn(weights: dict, batch, rope, ops: Ops, cfg: LlamaConfig):
    """Mean next-token cross-entropy, as torch's F.cross_entropy (log_softmax, pick)."""
    logits = forward(weights, batch[:, :-1], rope, ops, cfg)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch[:, 1:, None], -1)
    return -jnp.mean(picked)


REFERENCE = Ops(embed=lambda table, tokens: table[tokens], norm=rms_norm,
                gather=lambda x: x, row=jnp.matmul, attention=causal_attention,
                logits=jnp.matmul)


# -- the sharded pieces ---------------------------------------------------------
def make_embedding(mesh) -> Callable:
    """Vocab-parallel lookup, reduce-scattered onto the sequence (torchtitan's
    RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)))."""
    @jlm.local_map(out_placements=[S0, Partial()], in_placements=(ROW, GATHERED),
                   device_mesh=mesh)
    def vocab_parallel_embedding(table, tokens):
        local = tokens - jax.lax.axis_index("tp") * table.shape[0]
        here = (local >= 0) & (local < table.shape[0])
        return jnp.where(here[..., None], table[jnp.clip(local, 0, table.shape[0] - 1)], 0.0)

    return lambda table, tokens: jlm.redistribute(vocab_parallel_embedding(table, tokens),
                                                  mesh, STREAM)


def make_row(mesh) -> Callable:
    """Row-parallel x @ w onto the stream, as DTensor's RowwiseParallel: the local
    product is a Partial() sum over tp, reduce-scattered onto the sequence."""
    local_product = jlm.local_map(jnp.matmul, out_placements=[S0, Partial()],
                                  in_placements=([S0, Shard(2)], ROW), device_mesh=mesh)
    return lambda x, w: jlm.redistribute(local_product(x, w), mesh, STREAM)


def sharded_ops(mesh) -> Ops:
    """The model's pieces on the (dp, tp) ``mesh``."""
    norm = jlm.local_map(rms_norm, out_placements=STREAM, in_placements=(STREAM, [R, R]),
                         in_grad_placements=(STREAM, SUMMED), device_mesh=mesh)
    whole_logits = NamedSharding(mesh, P("dp", None, None))
    return Ops(embed=make_embedding(mesh), norm=norm,
               gather=lambda x: jlm.redistribute(x, mesh, GATHERED), row=make_row(mesh),
               attention=jlm.local_map(causal_attention, out_placements=HEADS,
                                       in_placements=(HEADS,) * 3,
                                       in_grad_placements=(HEADS,) * 3, device_mesh=mesh),
               logits=functools.partial(jnp.matmul, out_sharding=whole_logits))


def layer_placements() -> dict:
    """Megatron layout of a block's weights; norms replicated."""
    return {"attention_norm": [R, R], "wq": COLUMN, "wk": COLUMN, "wv": COLUMN, "wo": ROW,
            "ffn_norm": [R, R], "w1": COLUMN, "w3": COLUMN, "w2": ROW}


def distribute(tree, placements, mesh):
    """Lay each host array of ``tree`` out on ``mesh`` with its placements."""
    return jax.tree.map(lambda x, p: jlm.distribute_tensor(x, mesh, p), tree, placements,
                        is_leaf=lambda x: isinstance(x, np.ndarray))


def weight_placements(cfg: LlamaConfig) -> dict:
    """The whole model's layout (llama_common.init_weights' tree)."""
    return {"tok_embeddings": ROW, "layers": [layer_placements()] * cfg.n_layers,
            "norm": [R, R], "output": COLUMN}


def make_mesh():
    """(dp, tp) = (2, 2) on the first 4 devices."""
    return jax.make_mesh((2, 2), ("dp", "tp"), devices=jax.devices()[:4])


def whole(tree) -> dict[str, np.ndarray]:
    """Every array of ``tree`` as a numpy global value, by its path
    (``layers.0.wq``), as llama_torch.gradients names them."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path):
            np.asarray(jlm.full_tensor(a)) for path, a in leaves}


# -- the two runs the parity test compares --------------------------------------
def placed(mesh):
    """(ops, put, context) for ``mesh``, or for the unsharded reference on one
    device when ``mesh`` is None; ``put(tree, placements)`` lays host arrays out."""
    if mesh is None:
        device = jax.devices()[0]
        return REFERENCE, lambda tree, _: jax.device_put(tree, device), contextlib.nullcontext()
    return sharded_ops(mesh), lambda tree, p: distribute(tree, p, mesh), jax.set_mesh(mesh)


def block_result(cfg: LlamaConfig, seed: int, mesh=None) -> dict:
    """One block's output, and the gradients of mean(out * cotangent) for its
    input and weights, whole, as numpy (``mesh`` None: unsharded)."""
    ops, put, context = placed(mesh)
    layer = put(init_weights(cfg, seed)["layers"][0], layer_placements())
    x, ct = put(block_inputs(cfg, seed), (STREAM, STREAM))
    rope = put(rope_tables(cfg), ([R, R],) * 2)

    def objective(layer, x):
        out = block(layer, x, rope, ops, cfg)
        return jnp.mean(out * ct), out

    with context:
        (_, out), (grads, x_grad) = jax.jit(
            jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(layer, x)
    return {"out": np.asarray(jlm.full_tensor(out)), "x_grad": np.asarray(jlm.full_tensor(x_grad)),
            "grads": whole(grads)}


def make_adamw(opt: AdamWConfig) -> optax.GradientTransformation:
    """optax.adamw with every hyper-parameter given (as torch.optim.AdamW's)."""
    return optax.adamw(opt.lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, eps_root=0.0,
                       weight_decay=opt.weight_decay, nesterov=False)


def train(cfg: LlamaConfig, opt: AdamWConfig, steps: int, seed: int, mesh=None) -> dict:
    """``steps`` AdamW steps on llama_common's batches: each step's loss (before
    its update), the first step's whole gradients, the seconds of the steps and
    of the compilation."""
    ops, put, context = placed(mesh)
    weights = put(init_weights(cfg, seed), weight_placements(cfg))
    rope = put(rope_tables(cfg), ([R, R],) * 2)
    batches = [put(b, GATHERED) for b in token_batches(cfg, steps, seed)]
    optimizer = make_adamw(opt)

    def train_step(weights, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(weights, batch, rope, ops, cfg)
        updates, state = optimizer.update(grads, state, weights)
        return optax.apply_updates(weights, updates), state, loss, grads

    with context:
        start = time.perf_counter()
        state = optimizer.init(weights)
        step = jax.jit(train_step).lower(weights, state, batches[0]).compile()
        compiled, losses, first_grads = time.perf_counter(), [], None
        for batch in batches:
            weights, state, loss, grads = step(weights, state, batch)
            first_grads = first_grads or whole(grads)
            losses.append(float(loss))
    return {"losses": losses, "first_grads": first_grads,
            "seconds": time.perf_counter() - compiled, "compile_seconds": compiled - start}


def forward_collectives(cfg: LlamaConfig, mesh) -> dict[str, int]:
    """The collectives of the compiled sharded loss (the forward pass), by kind."""
    ops, put, context = placed(mesh)
    weights = put(init_weights(cfg, seed=0), weight_placements(cfg))
    rope = put(rope_tables(cfg), ([R, R],) * 2)
    batch = put(token_batches(cfg, steps=1, seed=0)[0], GATHERED)
    with context:
        comms = jlm.inspect.count_collectives(lambda w, b: loss_fn(w, b, rope, ops, cfg), weights, batch)
    return dict(comms.counts)
