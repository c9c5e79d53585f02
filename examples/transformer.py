"""Decoder-only transformer trained with data, context and tensor parallelism.

A mesh ``(dp, cp, tp)``: the batch is split over ``dp``, the sequence over ``cp``
(context parallelism) and attention heads, MLP hidden units and the vocabulary
over ``tp`` (Megatron tensor parallelism). The model is a small Llama: a
vocab-parallel token embedding, blocks of RMSNorm -> causal self-attention ->
RMSNorm -> gated (SwiGLU) MLP with residuals, a final RMSNorm, an LM head split
over the vocabulary and a vocab-parallel cross-entropy. Full logits are never
gathered.

Where torchtitan uses ``local_map``, so does this program:

* the embedding lookup of the local vocabulary rows returns a ``Partial()``
  value over ``tp`` (each device holds the rows of its vocabulary shard, zeros
  elsewhere), reduced with ``jlm.redistribute``;
* the inner attention takes q, k, v as (batch, seq, heads, head_dim) with
  ``[Shard(0), Shard(1), Shard(2)]`` on (dp, cp, tp). ``--attention allgather``
  declares torchtitan's placements: k and v ``Replicate()`` on cp (local_map
  all-gathers them at the boundary) with ``in_grad_placements`` ``Partial()`` on
  cp, which jlocalmap verifies against JAX's typing. ``--attention ring`` keeps
  k and v sharded and passes their blocks around the cp ring with
  ``jax.lax.ppermute``, combining them with an online softmax;
* the cross-entropy of the vocab-parallel logits: max, sum of exponentials and
  target logit are reduced over ``tp`` inside the body;
* with ``--overlap``, the tensor-parallel projections (sequence parallelism:
  the residual stream's sequence split over ``cp`` and then ``tp``): each
  column-parallel matmul gathers its input over ``tp`` with
  ``jlm.collectives.all_gather_matmul`` and each row-parallel one
  reduce-scatters its ``Partial`` sum with ``matmul_reduce_scatter``, rings of
  ``ppermute`` steps whose transfers can hide behind the matmuls.

Without ``--overlap`` the projections, norms and MLP between them are plain JAX
on Explicit-axis shardings (the JAX counterpart of DTensor ops). Five
``optax.adamw`` steps are compared, step by step, with the same model run
unsharded in float32 on one device; the script exits with status 1 if loss,
parameters or gradients differ by more than 1e-4. See docs/transformer.md.

Run:  python examples/transformer.py [--attention ring] [--overlap] [--steps 5]
(uses the GPUs if there are any, else 8 simulated CPU devices).
"""
import os

# Simulate 8 devices on the host platform; has no effect when JAX runs on GPUs.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard

jax.config.update("jax_default_matmul_precision", "highest")  # exact f32 on GPUs too
TOL = 1e-4
MASKED = -1e30  # finite, so that a fully masked block gives exp(MASKED - max) = 0, not NaN

# Placement lists, one entry per mesh axis (dp, cp, tp).
R, S0, S1, S2 = Replicate(), Shard(0), Shard(1), Shard(2)
TOKENS = [S0, S1, R]        # (batch, seq) ids and labels
ACTIVATION = [S0, S1, R]    # (batch, seq, dim) residual stream
QKV = [S0, S1, S2]          # (batch, seq, heads, head_dim): torchtitan's CP layout
KV_GATHERED = [S0, R, S2]   # k, v with the whole sequence on every cp rank
KV_GRAD = [S0, Partial(), S2]  # each cp rank's gradient of the gathered k, v is a summand
COLUMN, ROW = [R, R, S1], [R, R, S0]  # (in, out) weights split on their outputs / inputs
# --overlap (sequence parallelism): the residual stream's sequence split over cp,
# then over tp within each cp chunk (DTensor's mesh-order nesting).
SEQUENCE_PARALLEL = [S0, S1, S1]
COLUMN_OUT = [S0, S1, S2]   # (batch, seq, n) output of a column-parallel matmul
# A weight's local cotangent in a region sums this (dp, cp) rank's tokens only.
COLUMN_GRAD, ROW_GRAD = [Partial(), Partial(), S1], [Partial(), Partial(), S0]


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 64
    dim: int = 32
    heads: int = 4
    head_dim: int = 8
    ffn: int = 64
    layers: int = 2
    batch: int = 4
    seq: int = 16


# -- parameters -----------------------------------------------------------------
def init_params(cfg: Config, rng: np.random.Generator) -> dict:
    """Random float32 host parameters (norm weights near 1)."""
    def dense(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    def norm():
        return (1 + 0.1 * rng.standard_normal(cfg.dim)).astype(np.float32)

    inner = cfg.heads * cfg.head_dim
    layers = [{"attn_norm": norm(), "wq": dense(cfg.dim, inner), "wk": dense(cfg.dim, inner),
               "wv": dense(cfg.dim, inner), "wo": dense(inner, cfg.dim), "mlp_norm": norm(),
               "w1": dense(cfg.dim, cfg.ffn), "w3": dense(cfg.dim, cfg.ffn),
               "w2": dense(cfg.ffn, cfg.dim)} for _ in range(cfg.layers)]
    return {"embed": rng.standard_normal((cfg.vocab, cfg.dim)).astype(np.float32),
            "layers": layers, "norm": norm(), "head": dense(cfg.dim, cfg.vocab)}


def param_placements(params: dict) -> dict:
    """Megatron layout: column-parallel wq/wk/wv/w1/w3 and the LM head (split
    outputs), row-parallel wo/w2 (split inputs), the embedding split over the
    vocabulary; norms replicated. Nothing is split over dp or cp."""
    layer = {"attn_norm": [R, R, R], "wq": COLUMN, "wk": COLUMN, "wv": COLUMN, "wo": ROW,
             "mlp_norm": [R, R, R], "w1": COLUMN, "w3": COLUMN, "w2": ROW}
    return {"embed": ROW, "layers": [layer] * len(params["layers"]), "norm": [R, R, R],
            "head": COLUMN}


# -- the model, shared by the sharded and the unsharded run ---------------------
@dataclasses.dataclass(frozen=True)
class Ops:
    """The pieces that differ between the sharded program and the reference."""
    embed: Callable          # (table, tokens) -> (batch, seq, dim)
    attention: Callable      # (q, k, v) -> (batch, seq, heads, head_dim), causal
    loss: Callable           # (h, head, labels) -> mean cross-entropy
    column: Callable         # (h, *weights) -> tuple of h @ w: column-parallel projections
    row: Callable            # (x, w) -> x @ w: row-parallel, a sum over tp


def projections(h, *weights):
    """``h @ w`` for each weight (column parallel on Explicit axes: no communication)."""
    return tuple(h @ w for w in weights)


def rms_norm(x, weight, eps=1e-6):
    """x / rms(x) * weight over the last dim (whole on every tp rank)."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def attention_block(layer, h, ops: Ops, head_dim: int):
    """Column-parallel q/k/v projections (heads split over tp), the attention,
    and the row-parallel output projection."""
    b, t, _ = h.shape
    q, k, v = (y.reshape(b, t, -1, head_dim)
               for y in ops.column(h, layer["wq"], layer["wk"], layer["wv"]))
    o = ops.attention(q, k, v).reshape(b, t, -1)
    return ops.row(o, layer["wo"])


def mlp_block(layer, h, ops: Ops):
    """SwiGLU: column-parallel w1 and w3 (hidden units split over tp), row-parallel w2."""
    gate, up = ops.column(h, layer["w1"], layer["w3"])
    return ops.row(jax.nn.silu(gate) * up, layer["w2"])


def loss_fn(params, tokens, labels, ops: Ops, head_dim: int):
    """Mean next-token cross-entropy of the model."""
    x = ops.embed(params["embed"], tokens)
    for layer in params["layers"]:
        x = x + attention_block(layer, rms_norm(x, layer["attn_norm"]), ops, head_dim)
        x = x + mlp_block(layer, rms_norm(x, layer["mlp_norm"]), ops)
    return ops.loss(rms_norm(x, params["norm"]), params["head"], labels)


# -- the unsharded reference ----------------------------------------------------
def causal_softmax_attention(q, k, v, q_offset=0):
    """softmax(q k^T / sqrt(d)) v over keys at or before each query's position;
    q's positions start at ``q_offset``, k's at 0."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    rows = q_offset + jnp.arange(q.shape[1])
    scores = jnp.where(rows[:, None] >= jnp.arange(k.shape[1])[None, :], scores, MASKED)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def dense_loss(h, head, labels):
    """Mean cross-entropy of the full logits (the reference)."""
    logits = h @ head
    return jnp.mean(jax.nn.logsumexp(logits, -1)
                    - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0])


REFERENCE_OPS = Ops(embed=lambda table, tokens: table[tokens],
                    attention=causal_softmax_attention, loss=dense_loss,
                    column=projections, row=jnp.matmul)


# -- the sharded pieces: local_map regions --------------------------------------
def vocab_shard(ids, local_size):
    """This tp rank's local index of each id, and whether its vocabulary shard holds it."""
    local = ids - jax.lax.axis_index("tp") * local_size
    return jnp.clip(local, 0, local_size - 1), (local >= 0) & (local < local_size)


def make_embedding(mesh, stream=ACTIVATION):
    """Vocab-parallel lookup: (table, tokens) -> activations placed ``stream``."""
    # A tp rank finds only the tokens of its vocabulary rows: its lookup is one
    # summand of the embedding (Partial over tp), as in torchtitan.
    @jlm.local_map(out_placements=[S0, S1, Partial()], in_placements=([R, R, S0], TOKENS),
                   device_mesh=mesh)
    def vocab_parallel_embedding(table, tokens):
        local, here = vocab_shard(tokens, table.shape[0])
        return jnp.where(here[..., None], table[local], 0.0)

    # Into the sequence-parallel stream: a reduce-scatter over tp, as torchtitan's.
    return lambda table, tokens: jlm.redistribute(
        vocab_parallel_embedding(table, tokens), mesh, stream)


def gathered_matmul(x, w, gather_dim: int):
    """Body: ``all_gather(x over tp) @ w`` as a ring of ppermutes (see --overlap)."""
    return jlm.collectives.all_gather_matmul(x, w, gather_dim, "tp")


def make_loss(mesh, n_tokens: int, overlap: bool = False):
    """Vocab-parallel cross-entropy: (h, head, labels) -> the replicated mean loss.
    With ``overlap`` h is sequence parallel, gathered over tp by the LM head's ring."""
    if overlap:
        project, stream = functools.partial(gathered_matmul, gather_dim=1), SEQUENCE_PARALLEL
        grads = (SEQUENCE_PARALLEL, COLUMN_GRAD, None)   # labels: integers, no gradient
    else:
        project, stream, grads = jnp.matmul, ACTIVATION, None

    @jlm.local_map(out_placements=[Partial(), Partial(), R],
                   in_placements=(stream, COLUMN, TOKENS), in_grad_placements=grads,
                   device_mesh=mesh)
    def vocab_parallel_cross_entropy(h, head, labels):
        logits = project(h, head)              # (b, t, vocab / tp): this rank's columns
        top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, -1)), "tp")
        total = jax.lax.psum(jnp.sum(jnp.exp(logits - top[..., None]), -1), "tp")
        local, here = vocab_shard(labels, logits.shape[-1])
        picked = jnp.take_along_axis(logits, local[..., None], -1)[..., 0]
        target = jax.lax.psum(jnp.where(here, picked, 0.0), "tp")
        # This (dp, cp) rank's tokens' share of the mean: a summand over dp and cp.
        return jnp.sum(jnp.log(total) + top - target) / n_tokens

    return lambda h, head, labels: jlm.redistribute(
        vocab_parallel_cross_entropy(h, head, labels), mesh, [R, R, R])


def gathered_attention(q, k, v):
    """Local queries (b, t/cp, h/tp, d) against the whole sequence of keys."""
    return causal_softmax_attention(q, k, v, q_offset=jax.lax.axis_index("cp") * q.shape[1])


def ring_attention(q, k, v):
    """Local queries against the cp ring's key/value blocks, one block per step
    (``ppermute`` to the next rank), combined with an online softmax."""
    n, rank, chunk = jax.lax.axis_size("cp"), jax.lax.axis_index("cp"), q.shape[1]
    rows = rank * chunk + jnp.arange(chunk)
    b, t, h, d = q.shape
    top = jnp.full((b, h, t), MASKED, q.dtype)
    total = jnp.zeros((b, h, t), q.dtype)
    out = jnp.zeros((b, h, t, d), q.dtype)
    for step in range(n):
        owner = (rank - step) % n            # whose block this rank holds now
        cols = owner * chunk + jnp.arange(chunk)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
        scores = jnp.where(rows[:, None] >= cols[None, :], scores, MASKED)
        # The running max only keeps exp() in range; the result does not depend on it.
        new_top = jax.lax.stop_gradient(jnp.maximum(top, jnp.max(scores, -1)))
        weights = jnp.exp(scores - new_top[..., None])
        scale = jnp.exp(top - new_top)
        total = total * scale + jnp.sum(weights, -1)
        out = out * scale[..., None] + jnp.einsum("bhqk,bkhd->bhqd", weights, v)
        top = new_top
        if step < n - 1:
            k, v = jax.lax.ppermute((k, v), "cp", [(i, (i + 1) % n) for i in range(n)])
    return jnp.transpose(out / total[..., None], (0, 2, 1, 3))


def make_attention(mesh, variant: str, kv_grad_placements=KV_GRAD):
    """The inner attention as one local_map region, with torchtitan's placements."""
    if variant == "allgather":
        return jlm.local_map(gathered_attention, out_placements=QKV,
                             in_placements=(QKV, KV_GATHERED, KV_GATHERED),
                             in_grad_placements=(QKV, kv_grad_placements, kv_grad_placements),
                             device_mesh=mesh, redistribute_inputs=True)
    if variant == "ring":
        return jlm.local_map(ring_attention, out_placements=QKV, in_placements=(QKV,) * 3,
                             in_grad_placements=(QKV,) * 3, device_mesh=mesh)
    raise ValueError(f"attention: expected 'allgather' or 'ring', found {variant!r}")


def fused_column_projections(h, *weights):
    """Body: the sequence-parallel h gathered over tp times each weight's local
    columns, with one ring for them all (the columns side by side, a fused QKV:
    h's chunks travel once, not once per weight)."""
    y = gathered_matmul(h, jnp.concatenate(weights, axis=1), gather_dim=1)
    return tuple(jnp.split(y, np.cumsum([w.shape[1] for w in weights])[:-1], axis=-1))


def make_overlapped_column(mesh) -> Callable:
    """(h, *weights) -> h @ w for each weight: column-parallel projections of the
    sequence-parallel stream, as one all_gather_matmul region per call."""
    @functools.cache
    def region(n_weights: int):
        return jlm.local_map(fused_column_projections, out_placements=(COLUMN_OUT,) * n_weights,
                             in_placements=(SEQUENCE_PARALLEL,) + (COLUMN,) * n_weights,
                             in_grad_placements=(SEQUENCE_PARALLEL,) + (COLUMN_GRAD,) * n_weights,
                             device_mesh=mesh)
    return lambda h, *weights: region(len(weights))(h, *weights)


def make_overlapped_row(mesh) -> Callable:
    """(x, w) -> x @ w: the row-parallel matmul whose Partial sum over tp is
    reduce-scattered onto the sequence, as one matmul_reduce_scatter ring."""
    return jlm.local_map(lambda x, w: jlm.collectives.matmul_reduce_scatter(x, w, 1, "tp"),
                         out_placements=SEQUENCE_PARALLEL, in_placements=(COLUMN_OUT, ROW),
                         in_grad_placements=(COLUMN_OUT, ROW_GRAD), device_mesh=mesh)


def sharded_ops(mesh, cfg: Config, variant: str, overlap: bool = False, **attention_kw) -> Ops:
    """The model's sharded pieces on ``mesh``; ``attention_kw`` go to make_attention.
    ``overlap``: sequence parallelism with the tp collectives as matmul rings."""
    if overlap:
        stream, column, row = SEQUENCE_PARALLEL, make_overlapped_column(mesh), \
            make_overlapped_row(mesh)
    else:  # a row-parallel output's sharding on Explicit axes is its all-reduce over tp
        stream, column = ACTIVATION, projections
        row = functools.partial(jnp.matmul,
                                out_sharding=jax.sharding.NamedSharding(mesh, P("dp", "cp", None)))
    return Ops(embed=make_embedding(mesh, stream),
               attention=make_attention(mesh, variant, **attention_kw),
               loss=make_loss(mesh, cfg.batch * cfg.seq, overlap), column=column, row=row)


# -- training ------------------------------------------------------------------
def make_optimizer(lr: float):
    # eps = 1e-5 (Llama 2's): Adam divides each gradient by its own magnitude, so
    # with the usual 1e-8 a gradient entry at float32 rounding level (~1e-8) gets a
    # step of about lr whose sign is rounding noise. Two correct float32 programs
    # that sum in different orders then differ by ~lr in that entry.
    return optax.adamw(lr, eps=1e-5)


def make_train_step(ops: Ops, optimizer, head_dim: int):
    """The jitted step: (params, opt_state, tokens, labels) -> (params, opt_state, loss, grads)."""
    def train_step(params, opt_state, tokens, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, labels, ops, head_dim)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads
    return jax.jit(train_step)


def max_diff(tree, ref_tree) -> float:
    """Largest |sharded - unsharded| over every entry of two trees of arrays."""
    return max(float(np.max(np.abs(np.asarray(jlm.full_tensor(a)) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree), strict=True))


def starting_point(mesh, cfg: Config, seed: int):
    """Random parameters and batch, laid out on ``mesh``, and the same on one device."""
    rng = np.random.default_rng(seed)
    host = init_params(cfg, rng)
    tokens, labels = random_batch(cfg, rng)
    params = jax.tree.map(lambda x, p: jlm.distribute_tensor(x, mesh, p), host,
                          param_placements(host), is_leaf=lambda x: isinstance(x, np.ndarray))
    batch = [jlm.distribute_tensor(a, mesh, TOKENS) for a in (tokens, labels)]
    return params, batch, jax.device_put((host, tokens, labels), jax.devices()[0])


def train_and_compare(mesh, cfg: Config, ops: Ops, *, steps: int = 5, lr: float = 1e-2,
                      seed: int = 0, log=print) -> list[dict]:
    """Train the sharded model (``ops`` on ``mesh``) and the unsharded reference
    from the same random start on the same random batch. Per step, return the
    loss and the largest differences of loss, parameters and gradients (Adam's
    update is blind to a gradient's scale, so the gradients are compared too).
    Logs the collectives of the compiled step first."""
    params, batch, ref = starting_point(mesh, cfg, seed)
    optimizer = make_optimizer(lr)
    # Workaround (jax 0.10.2, Explicit axes): differentiate under the mesh context.
    # Without it JAX compiles some backward-pass broadcasts for one device and
    # fails ("Please enter your `jit` into a mesh context via `jax.set_mesh`"):
    # eagerly always, under jit where a gradient does not depend on the inputs.
    # See docs/transformer.md, "Explicit axes".
    with jax.set_mesh(mesh):
        opt_state = optimizer.init(params)
        # Compile once: the collectives are read from the program that then runs.
        step = make_train_step(ops, optimizer, cfg.head_dim).lower(
            params, opt_state, *batch).compile()
    log(f"collectives per training step:\n{jlm.inspect.collectives_in_hlo(step.as_text())}")
    ref_step = make_train_step(REFERENCE_OPS, optimizer, cfg.head_dim)
    ref_params, ref_state = ref[0], optimizer.init(ref[0])
    history = []
    for i in range(1, steps + 1):
        with jax.set_mesh(mesh):
            params, opt_state, loss, grads = step(params, opt_state, *batch)
        ref_params, ref_state, ref_loss, ref_grads = ref_step(ref_params, ref_state, *ref[1:])
        history.append({"loss": float(loss),
                        "loss_diff": abs(float(loss) - float(ref_loss)),
                        "param_diff": max_diff(params, ref_params),
                        "grad_diff": max_diff(grads, ref_grads)})
        log("step {}: loss {loss:.6f}  max |loss diff| {loss_diff:.2e}  max |param diff| "
            "{param_diff:.2e}  max |grad diff| {grad_diff:.2e}".format(i, **history[-1]))
    return history


def random_batch(cfg: Config, rng: np.random.Generator):
    """Random token sequences and their next tokens, (batch, seq) int32 each."""
    seqs = rng.integers(0, cfg.vocab, (cfg.batch, cfg.seq + 1), dtype=np.int32)
    return seqs[:, :-1], seqs[:, 1:]  # next-token prediction


def mesh_shape(n: int) -> tuple[int, int, int]:
    """(dp, cp, tp) for n devices: tp = 2 and cp = 2 where n allows, dp the rest."""
    tp = 2 if n % 2 == 0 else 1
    cp = 2 if (n // tp) % 2 == 0 else 1
    return n // (tp * cp), cp, tp


def check_sizes(parser, cfg: Config, dp: int, cp: int, tp: int, overlap: bool = False) -> None:
    """Refuse sizes the mesh does not divide, naming the flag."""
    # --overlap splits the sequence over cp and then tp (sequence parallelism).
    seq = ("seq", cfg.seq, "cp*tp", cp * tp) if overlap else ("seq", cfg.seq, "cp", cp)
    for name, size, axis, n in (("batch", cfg.batch, "dp", dp), seq,
                                ("heads", cfg.heads, "tp", tp), ("ffn", cfg.ffn, "tp", tp),
                                ("vocab", cfg.vocab, "tp", tp)):
        if size % n:
            parser.error(f"--{name} {size} must be a multiple of {axis}={n}")


def main(argv=None) -> float:
    """Run the comparison from command-line flags; return the largest difference."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attention", choices=("allgather", "ring"), default="allgather")
    parser.add_argument("--overlap", action="store_true",
                        help="sequence parallelism with the tp all-gathers and reduce-scatters "
                             "as all_gather_matmul / matmul_reduce_scatter rings of ppermutes")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-2)
    for field in dataclasses.fields(Config):
        parser.add_argument(f"--{field.name}", type=int, default=field.default)
    parser.add_argument("--mesh", type=int, nargs=3, metavar=("DP", "CP", "TP"),
                        help="mesh shape (default: 2 2 2 on 8 devices)")
    args = parser.parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    devices = jax.devices()
    shape = tuple(args.mesh) if args.mesh else mesh_shape(len(devices))
    if np.prod(shape) > len(devices):
        parser.error(f"--mesh {shape} needs {np.prod(shape)} devices, found {len(devices)}")
    check_sizes(parser, cfg, *shape, overlap=args.overlap)
    mesh = jax.make_mesh(shape, ("dp", "cp", "tp"), devices=devices[:int(np.prod(shape))])
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}); "
          f"mesh: {dict(mesh.shape)} ({mesh.axis_types[0].name} "
          f"axes); attention: {args.attention}"
          + ("; tp projections: all_gather_matmul / matmul_reduce_scatter rings (--overlap)"
             if args.overlap else ""))
    ops = sharded_ops(mesh, cfg, args.attention, overlap=args.overlap)
    history = train_and_compare(mesh, cfg, ops, steps=args.steps, lr=args.lr)
    worst = max(max(h["loss_diff"], h["param_diff"], h["grad_diff"]) for h in history)
    print(f"max |sharded - unsharded| = {worst:.2e}")
    return worst


if __name__ == "__main__":
    if main() > TOL:
        print(f"FAILED: above the tolerance {TOL}", file=sys.stderr)
        sys.exit(1)
