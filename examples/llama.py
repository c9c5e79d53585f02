"""A torchtitan-style llama in Flax NNX, tensor + sequence parallel with jlocalmap,
trained with optax AdamW and checkpointed with Orbax.

The model is torchtitan's llama3: a vocabulary-parallel embedding, blocks of
RMSNorm -> grouped-query attention with RoPE (``--kv-heads`` < ``--heads``: each
key/value head serves heads / kv-heads query heads) -> RMSNorm -> SwiGLU, a final
RMSNorm, an output projection split over the vocabulary and a vocabulary-parallel
cross-entropy. The mesh is ``(dp, tp)``, or ``(dp, cp, tp)`` with ``--cp``: the
batch over dp, the sequence over cp, heads, hidden units and the vocabulary over
tp, and between the blocks' halves the residual stream's sequence over tp as well
(sequence parallelism).

``local_map`` regions stand where torchtitan has them (docs/parity.md):

* the embedding: each tp rank looks up its vocabulary rows, a ``Partial()`` sum
  over tp, reduce-scattered onto the sequence;
* RMSNorm under sequence parallelism, its weight's gradient declared ``Partial()``;
* the inner attention on (batch, seq, heads, head_dim), heads on tp; with cp the
  keys and values are all-gathered over cp at the boundary, their gradients
  declared ``Partial()`` on cp.

Everything else is plain JAX on placements (Explicit-axis shardings, the
counterpart of DTensor ops): the column-parallel projections, RoPE, the
row-parallel projections (a matmul whose ``out_sharding`` is ``Partial()`` on tp,
then ``jlm.redistribute`` onto the sequence: one reduce-scatter) and the
cross-entropy of the vocabulary-split logits (torchtitan's ``loss_parallel``).

Parameters carry their placements as NNX sharding metadata. ``optax.adamw`` is
created once per setting (a new transform is a new program to compile). Every
``--ckpt-every`` steps the model and optimizer state go to ``--ckpt-dir`` with
Orbax; ``--stop-at N`` stops after step N, as an interrupted job, and
``--resume`` continues from the latest checkpoint, restored into a model built
abstractly (``nnx.eval_shape``). Every step is compared with the same model
trained unsharded on one device from the start (loss, gradients, parameters);
the last line is the largest difference, and the exit status is 1 above 1e-5.
See docs/nnx_orbax.md.

Run:  python examples/llama.py [--steps 6] [--ckpt-every 3] [--cp 2 --dp 1]
      python examples/llama.py --ckpt-dir /tmp/llama --stop-at 3
      python examples/llama.py --ckpt-dir /tmp/llama --resume
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
import math
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard

jax.config.update("jax_default_matmul_precision", "highest")  # exact f32 on GPUs too
TOL = 1e-5
R, S0, S1, S2 = Replicate(), Shard(0), Shard(1), Shard(2)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes (torchtitan's llama3 names); ``ffn`` as torchtitan rounds it."""
    dim: int = 64
    layers: int = 2
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 512
    seq: int = 32
    batch: int = 4
    multiple_of: int = 64
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def ffn(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# -- layouts: one placement per mesh axis, named by axis -------------------------
def on(mesh, dp=R, cp=R, tp=R) -> list:
    """The placement list on ``mesh`` from one entry per axis name (an axis the
    mesh does not have is dropped: the same code serves (dp, tp) and (dp, cp, tp))."""
    return [{"dp": dp, "cp": cp, "tp": tp}[axis] for axis in mesh.axis_names]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where the sharded model and the unsharded reference differ: ``mesh`` None
    is the reference (plain JAX on one device). Hashable, so NNX keeps it in
    the graph definition and jit caches by it."""
    mesh: jax.sharding.Mesh | None

    def on(self, dp=R, cp=R, tp=R) -> list | None:
        """:func:`on` the mesh; None for the reference (which has no placements)."""
        return None if self.mesh is None else on(self.mesh, dp, cp, tp)

    def param(self, value: np.ndarray, **placements) -> nnx.Param:
        """A parameter with ``placements`` (by axis name) as NNX sharding metadata."""
        if self.mesh is None:
            return nnx.Param(value)
        spec = jlm.placements_to_spec(on(self.mesh, **placements), self.mesh, value.ndim)
        return nnx.Param(value, out_sharding=spec)

    def layout(self, x, *, dp=S0, cp=S1, tp=R):
        """``x`` redistributed to these placements (default: the batch over dp, the
        sequence over cp, whole on tp)."""
        return x if self.mesh is None else jlm.redistribute(x, self.mesh, on(self.mesh, dp, cp, tp))

    def gather(self, x):
        """The sequence-parallel stream with its whole cp chunk on every tp rank
        (torchtitan's PrepareModuleInput: an all-gather over tp)."""
        return self.layout(x)

    def row(self, x, w):
        """Row-parallel ``x @ w`` onto the sequence-parallel stream: the local
        products are a Partial() sum over tp, reduce-scattered (RowwiseParallel)."""
        if self.mesh is None:
            return x @ w
        partial = jlm.placements_to_spec(on(self.mesh, S0, S1, Partial()), self.mesh, x.ndim)
        return self.layout(jnp.matmul(x, w, out_sharding=partial), tp=S1)

    def region(self, body, out, ins, grads=None, **kwargs):
        """``body`` as a local_map region on the mesh (the body itself unsharded)."""
        if self.mesh is None:
            return body
        return jlm.local_map(body, out_placements=out, in_placements=ins,
                             in_grad_placements=grads, device_mesh=self.mesh, **kwargs)


# -- the model ---------------------------------------------------------------------
def normal(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    # Host initial values: compiling jax.random initializers for every parameter
    # took longer than the training on a 2-core CPU; the layout comes from metadata.
    return (std * np.clip(rng.standard_normal(shape), -3, 3)).astype(np.float32)


def rms_norm(x, weight, eps: float):
    """x / rms(x) * weight over the last dim."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


class RMSNorm(nnx.Module):
    """A local_map region under sequence parallelism (torchtitan's fused RMSNorm):
    the weight replicated, its gradient a Partial() sum over every axis's tokens."""

    def __init__(self, cfg: Config, plan: Plan, rng: np.random.Generator):
        self.weight = plan.param(1 + normal(rng, (cfg.dim,), 0.1))  # not ones: a wrong
        self.plan, self.eps = plan, cfg.norm_eps                    # gradient must show

    def __call__(self, x):
        stream, summed = self.plan.on(S0, S1, S1), self.plan.on(Partial(), Partial(), Partial())
        norm = self.plan.region(functools.partial(rms_norm, eps=self.eps), out=stream,
                                ins=(stream, self.plan.on()), grads=(stream, summed))
        return norm(x, self.weight[...])


def rank(axis: str):
    """This device's index along mesh ``axis`` in a region; 0 where the mesh has
    no such axis or outside any region (the unsharded reference runs the same bodies)."""
    return jax.lax.axis_index(axis) if axis in jax.sharding.get_abstract_mesh().manual_axes else 0


def rotate(x, cos, sin):
    """RoPE on (batch, seq, heads, head_dim), torchtitan's complex pairs."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    return jnp.stack((re * cos - im * sin, re * sin + im * cos), -1).reshape(x.shape)


def causal_attention(q, k, v):
    """softmax(q k^T / sqrt(d), causal) v on (batch, seq, heads, head_dim); k and
    v have fewer heads (GQA: repeated, as torchtitan's repeat_kv); q's positions
    start at this cp rank's chunk when the sequence is split over cp."""
    k, v = (jnp.repeat(t, q.shape[2] // t.shape[2], axis=2) for t in (k, v))
    offset = rank("cp") * q.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    future = offset + jnp.arange(q.shape[1])[:, None] < jnp.arange(k.shape[1])[None, :]
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.where(future, -jnp.inf, scores)), v)


class Attention(nnx.Module):
    """Column-parallel q/k/v (heads over tp), RoPE, the inner attention as a
    local_map region, the row-parallel output projection."""

    def __init__(self, cfg: Config, plan: Plan, rng: np.random.Generator, depth_std: float):
        qd, kvd = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.wq = plan.param(normal(rng, (cfg.dim, qd), 0.02), tp=S1)
        self.wk = plan.param(normal(rng, (cfg.dim, kvd), 0.02), tp=S1)
        self.wv = plan.param(normal(rng, (cfg.dim, kvd), 0.02), tp=S1)
        self.wo = plan.param(normal(rng, (qd, cfg.dim), depth_std), tp=S0)
        self.plan, self.head_dim = plan, cfg.head_dim

    def inner(self):
        """torchtitan's placements: q by (batch, seq, heads) on (dp, cp, tp); k and v
        whole over cp (all-gathered at the boundary), their gradients summands on cp."""
        heads, kv, kv_grad = (self.plan.on(S0, cp, S2) for cp in (S1, R, Partial()))
        return self.plan.region(causal_attention, out=heads, ins=(heads, kv, kv),
                                grads=(heads, kv_grad, kv_grad), redistribute_inputs=True)

    def __call__(self, x, cos, sin):
        b, s, _ = x.shape
        h = self.plan.gather(x)
        q, k, v = ((h @ w[...]).reshape(b, s, -1, self.head_dim)
                   for w in (self.wq, self.wk, self.wv))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return self.plan.row(self.inner()(q, k, v).reshape(b, s, -1), self.wo[...])


class FeedForward(nnx.Module):
    """SwiGLU: column-parallel w1 and w3, row-parallel w2."""

    def __init__(self, cfg: Config, plan: Plan, rng: np.random.Generator, depth_std: float):
        self.w1 = plan.param(normal(rng, (cfg.dim, cfg.ffn), 0.02), tp=S1)
        self.w3 = plan.param(normal(rng, (cfg.dim, cfg.ffn), depth_std), tp=S1)
        self.w2 = plan.param(normal(rng, (cfg.ffn, cfg.dim), depth_std), tp=S0)
        self.plan = plan

    def __call__(self, x):
        h = self.plan.gather(x)
        return self.plan.row(jax.nn.silu(h @ self.w1[...]) * (h @ self.w3[...]), self.w2[...])


class Block(nnx.Module):
    """x + attention(norm(x)), then + feed_forward(norm(.)); depth-scaled init."""

    def __init__(self, cfg: Config, plan: Plan, rng: np.random.Generator, layer_id: int):
        depth_std = 0.02 / math.sqrt(2 * (layer_id + 1))
        self.attention_norm, self.ffn_norm = RMSNorm(cfg, plan, rng), RMSNorm(cfg, plan, rng)
        self.attention = Attention(cfg, plan, rng, depth_std)
        self.feed_forward = FeedForward(cfg, plan, rng, depth_std)

    def __call__(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Rope(nnx.Variable):
    """RoPE's cos / sin tables: state (checkpointed), not trained (torchtitan's buffer)."""


def rope_tables(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (seq, head_dim / 2), of the RoPE angles, in float64 then float32."""
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    angles = np.outer(np.arange(cfg.seq), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def vocab_parallel_lookup(table, tokens):
    """This tp rank's vocabulary rows looked up; zeros for tokens of other ranks'
    rows (the lookup is one summand of the embedding: Partial() over tp)."""
    local = tokens - rank("tp") * table.shape[0]
    here = (local >= 0) & (local < table.shape[0])
    return jnp.where(here[..., None], table[jnp.clip(local, 0, table.shape[0] - 1)], 0.0)


def cross_entropy(logits, labels):
    """Mean next-token cross-entropy. Plain JAX on vocabulary-split logits:
    the max, the sum of exponentials and the target logit reduce over tp, as
    torchtitan's loss_parallel; whole logits are never gathered."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    total = jnp.sum(jnp.exp(logits - top[..., None]), axis=-1)
    ids = jnp.arange(logits.shape[-1])
    target = jnp.sum(jnp.where(labels[..., None] == ids, logits, 0.0), axis=-1)
    return jnp.mean(jnp.log(total) + top - target)


class Llama(nnx.Module):
    """torchtitan's llama3: embedding, blocks, norm, output and the loss."""

    def __init__(self, cfg: Config, plan: Plan, seed: int):
        rng = np.random.default_rng(seed)
        self.tok_embeddings = plan.param(normal(rng, (cfg.vocab, cfg.dim), 1.0), tp=S0)
        self.layers = nnx.List([Block(cfg, plan, rng, i) for i in range(cfg.layers)])
        self.norm = RMSNorm(cfg, plan, rng)
        self.output = plan.param(normal(rng, (cfg.dim, cfg.vocab), cfg.dim ** -0.5), tp=S1)
        cos_sin = rope_tables(cfg)
        if plan.mesh is None:
            self.cos, self.sin = (Rope(t) for t in cos_sin)
        else:  # (seq, head_dim / 2): positions over cp, as the stream's
            spec = jlm.placements_to_spec(plan.on(cp=S0), plan.mesh, 2)
            self.cos, self.sin = (Rope(t, out_sharding=spec) for t in cos_sin)
        self.plan = plan

    def __call__(self, tokens, labels):
        on = self.plan.on
        embed = self.plan.region(vocab_parallel_lookup, out=on(S0, S1, Partial()),
                                 ins=(on(tp=S0), on(S0, S1)))
        x = self.plan.layout(embed(self.tok_embeddings[...], tokens), tp=S1)
        cos, sin = (t[...][:, None, :] for t in (self.cos, self.sin))   # over heads
        for layer in self.layers:
            x = layer(x, cos, sin)
        return cross_entropy(self.plan.gather(self.norm(x)) @ self.output[...], labels)


@functools.cache
def adamw(lr: float, eps: float) -> optax.GradientTransformation:
    """One transform per setting: nnx.Optimizer keeps it in the graph definition,
    so a new ``optax.adamw(...)`` object would compile the train step again."""
    return optax.adamw(lr, b1=0.9, b2=0.95, eps=eps, weight_decay=0.1)


def build(cfg: Config, plan: Plan, lr: float, eps: float, seed: int):
    """The model and its optimizer (Adam's moments in the parameters' layouts)."""
    model = Llama(cfg, plan, seed)
    return model, nnx.Optimizer(model, adamw(lr, eps), wrt=nnx.Param)


@nnx.jit
def train_step(model: Llama, optimizer: nnx.Optimizer, tokens, labels):
    loss, grads = nnx.value_and_grad(lambda m: m(tokens, labels))(model)
    optimizer.update(model, grads)
    return loss, grads


def batch(cfg: Config, step: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Step ``step``'s (tokens, labels), (batch, seq) each, the same whichever
    step a run starts from. Learnable: a token's successor is fixed with
    probability 3/4, else uniform."""
    successor = np.random.default_rng(seed).permutation(cfg.vocab)
    rng = np.random.default_rng([seed, step])
    ids = [rng.integers(0, cfg.vocab, cfg.batch)]
    for _ in range(cfg.seq):
        noise = rng.integers(0, cfg.vocab, cfg.batch)
        ids.append(np.where(rng.random(cfg.batch) < 0.75, successor[ids[-1]], noise))
    ids = np.stack(ids, axis=1).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


# -- checkpoints -------------------------------------------------------------------
def on_devices(abstract, mesh):
    """``nnx.eval_shape``'s shardings are on an AbstractMesh, which Orbax cannot
    restore onto (``_device_assignment is not implemented``): the same specs on
    the real ``mesh``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, x.sharding.spec)), abstract)


def restore(manager: ocp.CheckpointManager, cfg: Config, plan: Plan, args):
    """(step, model, optimizer) from the latest checkpoint, restored into a model
    built abstractly: no parameter is created before its checkpointed value."""
    with jax.set_mesh(plan.mesh):
        abstract = nnx.eval_shape(lambda: build(cfg, plan, args.lr, args.eps, args.seed))
    graphdef, state = nnx.split(abstract)
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.StandardRestore(on_devices(state, plan.mesh)))
    return (step, *nnx.merge(graphdef, state))


def checkpoints(parser: argparse.ArgumentParser, args) -> ocp.CheckpointManager:
    """The Orbax manager of ``--ckpt-dir`` (a new temporary directory by default)."""
    if args.resume and args.ckpt_dir is None:
        parser.error("--resume needs the --ckpt-dir of the run to continue")
    path = pathlib.Path(args.ckpt_dir or tempfile.mkdtemp(prefix="jlocalmap_llama_")).resolve()
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False))
    if args.resume and manager.latest_step() is None:
        parser.error(f"--resume: no checkpoint in {path}")
    if not args.resume and manager.latest_step() is not None:
        parser.error(f"{path} has checkpoints: pass --resume, or another --ckpt-dir")
    return manager


# -- training and the comparison ---------------------------------------------------
def whole(tree) -> list[np.ndarray]:
    """Every array of ``tree`` as its global numpy value."""
    return [np.asarray(jlm.full_tensor(x)) for x in jax.tree.leaves(tree)]


def max_diff(tree, ref_tree) -> float:
    """Largest |sharded - unsharded| over two trees of the same arrays."""
    return max(float(np.max(np.abs(a - b)))
               for a, b in zip(whole(tree), whole(ref_tree), strict=True))


def train(args, cfg: Config, mesh, manager: ocp.CheckpointManager) -> dict:
    """Steps up to ``--stop-at`` of the sharded model (restored with ``--resume``)
    beside the unsharded one trained from step 1; per step the loss and the
    largest loss, gradient and parameter differences."""
    plan = Plan(mesh)
    if args.resume:
        start, model, optimizer = restore(manager, cfg, plan, args)
        print(f"resumed from the checkpoint of step {start} in {manager.directory}")
    else:
        start = 0
        with jax.set_mesh(mesh):
            model, optimizer = build(cfg, plan, args.lr, args.eps, args.seed)
    reference = build(cfg, Plan(None), args.lr, args.eps, args.seed)
    for step in range(1, start + 1):       # the reference is never interrupted
        train_step(*reference, *batch(cfg, step, args.seed))
    history = {}
    for step in range(start + 1, args.stop_at + 1):
        data = batch(cfg, step, args.seed)
        began = time.perf_counter()
        with jax.set_mesh(mesh):
            loss, grads = train_step(model, optimizer,
                                     *(jlm.distribute_tensor(a, mesh, on(mesh, S0, S1)) for a in data))
            loss = float(loss)
        seconds = time.perf_counter() - began
        ref_loss, ref_grads = train_step(*reference, *data)
        history[step] = {"loss": loss, "loss diff": abs(loss - float(ref_loss)),
                         "grad diff": max_diff(grads, ref_grads),
                         "param diff": max_diff(nnx.state(model, nnx.Param),
                                                nnx.state(reference[0], nnx.Param))}
        saved = step % args.ckpt_every == 0
        if saved:
            manager.save(step, args=ocp.args.StandardSave(nnx.state((model, optimizer))))
        print(f"step {step}/{args.steps}: " + "  ".join(
            f"{k} {v:.6f}" if k == "loss" else f"max |{k}| {v:.2e}"
            for k, v in history[step].items()) + f"  {seconds:.2f} s"
            + ("  (checkpoint saved)" if saved else ""))
    return {"history": history, "params": whole(nnx.state(model, nnx.Param))}


def parse(argv) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Config):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=field.type,
                            default=field.default)
    for flag, default in (("steps", 6), ("stop-at", None), ("ckpt-every", 3), ("seed", 0),
                          ("dp", 2), ("cp", 1), ("tp", 4)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eps", type=float, default=1e-8, help="AdamW's eps (optax's default)")
    parser.add_argument("--ckpt-dir", help="Orbax checkpoints (default: a new temporary directory)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args(argv)
    args.stop_at = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    return parser, args


def check_sizes(parser: argparse.ArgumentParser, cfg: Config, dp: int, cp: int, tp: int) -> None:
    """Every split the layouts make must be even (uneven ones would be UnevenArrays)."""
    for what, size, by in (("--heads", cfg.heads, tp), ("--kv-heads", cfg.kv_heads, tp),
                           ("--heads", cfg.heads, cfg.kv_heads), ("--vocab", cfg.vocab, tp),
                           ("ffn (from --dim, --multiple-of)", cfg.ffn, tp),
                           ("--seq", cfg.seq, cp * tp), ("--batch", cfg.batch, dp),
                           ("--dim", cfg.dim, 2 * cfg.heads)):
        if size % by:
            parser.error(f"{what} = {size} must be a multiple of {by} (mesh dp={dp}, cp={cp}, "
                         f"tp={tp}; GQA groups heads by kv-heads; RoPE pairs head_dim)")


def main(argv=None) -> dict:
    """Train from command-line flags; return the history, the final parameters
    and ``worst``, the largest difference from the unsharded run."""
    parser, args = parse(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    devices, shape = jax.devices(), (args.dp, args.cp, args.tp)
    if math.prod(shape) > len(devices):
        parser.error(f"--dp * --cp * --tp = {math.prod(shape)} devices, found {len(devices)}")
    check_sizes(parser, cfg, *shape)
    axes = {name: size for name, size in zip(("dp", "cp", "tp"), shape, strict=True)
            if name != "cp" or size > 1}
    mesh = jax.make_mesh(tuple(axes.values()), tuple(axes), devices=devices[:math.prod(shape)])
    print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform}); "
          f"mesh: {axes}; llama: {cfg.layers} layers, "
          f"dim {cfg.dim}, {cfg.heads} heads, {cfg.kv_heads} kv heads, ffn {cfg.ffn}, "
          f"vocab {cfg.vocab}, batch {cfg.batch} x seq {cfg.seq}; AdamW lr {args.lr}, eps {args.eps}")
    began = time.perf_counter()
    with checkpoints(parser, args) as manager:
        result = train(args, cfg, mesh, manager)
    result["worst"] = max(v for h in result["history"].values()
                          for k, v in h.items() if k != "loss")
    print(f"{len(result['history'])} steps in {time.perf_counter() - began:.1f} s")
    print(f"max |sharded - unsharded| = {result['worst']:.2e}")
    return result


if __name__ == "__main__":
    if main()["worst"] > TOL:
        print(f"FAILED: above the tolerance {TOL}", file=sys.stderr)
        sys.exit(1)
