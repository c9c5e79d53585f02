"""The JAX programs the harness compares, each written twice from one body:
once with ``jlocalmap.local_map`` and once by hand with ``jax.shard_map``.

* ``mlp``: the tensor-parallel MLP step ``psum(gelu(x @ w1) @ w2)``, gradients
  of both weights; ``x`` replicated, ``w1`` column- and ``w2`` row-sharded.
* ``mlp-sp``: the same MLP sequence-parallel (tokens sharded): all-gather, then
  reduce-scatter; also with jlocalmap's collective matmuls (communication behind
  compute) and as plain ``jax.jit`` with shardings, where XLA's SPMD partitioner
  places the collectives (and its windowed einsum may rewrite them).
* ``block``: a transformer block step: tensor-parallel projections (heads
  sharded), context-parallel causal attention (k and v gathered over ``cp``),
  the TP MLP, RMSNorm and residuals outside the regions; gradients of all weights.
* ``eager``: a tiny ``psum(x @ w)`` called eagerly (dispatch cost).
* ``depth``: the block stacked 1..64 times: trace, lower and compile times.

Every builder returns a :class:`Workload`: timing rows (``benchmarks.timing.Row``)
and the compiled programs' collective counts, jlocalmap's against hand-written.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jlocalmap as jlm
from jlocalmap import Replicate as R, Shard as S, collectives as C
from jlocalmap.strategies.cost_model import program_cost

from benchmarks.timing import Row


@dataclasses.dataclass(frozen=True)
class MlpSize:
    tokens: int
    d_model: int
    d_ff: int
    dtype: str


@dataclasses.dataclass(frozen=True)
class BlockSize:
    batch: int
    seq: int
    d_model: int
    heads: int
    d_ff: int
    dtype: str

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


@dataclasses.dataclass
class Workload:
    rows: list
    # (program, jlocalmap's collective counts, the hand-written program's)
    collectives: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)
    outputs: dict = dataclasses.field(default_factory=dict)  # row name -> first result
    inputs: dict = dataclasses.field(default_factory=dict)   # group -> the steps' arguments


# -- helpers ------------------------------------------------------------------------
def gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def put(mesh: jax.sharding.Mesh, array: np.ndarray, spec: P) -> jax.Array:
    return jax.device_put(array, NamedSharding(mesh, spec))


def random(rng: np.random.Generator, shape: Sequence[int], dtype: str,
           scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape, np.float32) * scale).astype(jnp.dtype(dtype))


def hlo_collectives(lowered: jax.stages.Lowered) -> dict:
    """Collective kinds and counts in the compiled program."""
    return jlm.inspect.collectives_in_hlo(lowered.compile().as_text()).counts


def compiled_flops(lowered: jax.stages.Lowered) -> float:
    """XLA's count of floating-point operations of one device's program (the
    strategy cost model's reading: the lowered program's, else the compiled one's)."""
    return float(program_cost(lowered).get("flops", 0.0))


def grad_step(forward: Callable, argnums: Any = (0, 1)) -> Callable:
    """``jax.jit`` of the loss ``sum(forward(params..., x) * dy)`` and its
    gradients. The loss value keeps the forward collectives (with only the
    gradients of a linear loss, XLA drops the forward all-reduce: nothing needs it)."""
    def loss(*args):
        *params, x, dy = args
        return jnp.sum(forward(*params, x).astype(jnp.float32) * dy)
    return jax.jit(jax.value_and_grad(loss, argnums=argnums))


def make_mesh(devices: Sequence[Any], shape: Sequence[int], names: Sequence[str],
              auto: bool = False) -> jax.sharding.Mesh:
    kind = AxisType.Auto if auto else AxisType.Explicit
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=(kind,) * len(shape),
                         devices=list(devices)[:int(np.prod(shape))])


def in_mesh(mesh: jax.sharding.Mesh, call: Callable, *args: Any) -> Callable[[], Any]:
    """A call of ``call(*args)`` with ``mesh`` as the context mesh."""
    def run():
        with jax.set_mesh(mesh):
            return call(*args)
    return run


# -- the tensor-parallel MLP ----------------------------------------------------------
def mlp_body(x, w1, w2):
    return jax.lax.psum(gelu(x @ w1) @ w2, "tp")


def sp_mlp_body(x, w1, w2):
    h = gelu(jax.lax.all_gather(x, "tp", axis=0, tiled=True) @ w1)
    return jax.lax.psum_scatter(h @ w2, "tp", scatter_dimension=0, tiled=True)


def sp_mlp_ring_body(x, w1, w2):
    h = gelu(C.all_gather_matmul(x, w1, 0, "tp"))
    return C.matmul_reduce_scatter(h, w2, 0, "tp")


def step_matmuls(x, w1, w2, dy):
    """The five matmuls of one device's MLP step (forward two, backward three, at
    the same shapes) and nothing else: no communication, no elementwise work.
    Their rate is the matmul rate the steps are measured against."""
    dy = dy.astype(x.dtype)  # as the step's cotangent of y
    h = x @ w1
    dh = dy @ w2.T
    return h @ w2, h.T @ dy, x.T @ dh


MLP_SPECS = {"mlp": (P(), P(None, "tp"), P("tp")), "mlp-sp": (P("tp"), P(None, "tp"), P("tp"))}
MLP_OUT = {"mlp": P(), "mlp-sp": P("tp")}
MLP_PLACEMENTS = {"mlp": (([R()], [S(1)], [S(0)]), [R()]),
                  "mlp-sp": (([S(0)], [S(1)], [S(0)]), [S(0)])}


def hand_written(body: Callable, mesh, in_specs, out_spec) -> Callable:
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec)


def with_local_map(body: Callable, mesh, in_placements, out_placements) -> Callable:
    return jlm.local_map(body, out_placements, in_placements, device_mesh=mesh)


def xla_auto_mlp(mesh: jax.sharding.Mesh) -> Callable:
    """The sequence-parallel MLP as plain jnp with sharding constraints: XLA's
    SPMD partitioner inserts the all-gather and reduce-scatter (and, with the
    windowed-einsum flags on GPUs, decomposes them itself)."""
    hidden, out = NamedSharding(mesh, P(None, "tp")), NamedSharding(mesh, P("tp"))

    def forward(x, w1, w2):
        h = jax.lax.with_sharding_constraint(gelu(x @ w1), hidden)
        return jax.lax.with_sharding_constraint(h @ w2, out)
    return forward


def _mlp_arrays(mesh, size: MlpSize, kind: str, rng) -> tuple:
    t, d, f = size.tokens, size.d_model, size.d_ff
    x_spec, w1_spec, w2_spec = MLP_SPECS[kind]
    return (put(mesh, random(rng, (d, f), size.dtype, d ** -0.5), w1_spec),
            put(mesh, random(rng, (f, d), size.dtype, f ** -0.5), w2_spec),
            put(mesh, random(rng, (t, d), size.dtype), x_spec),
            put(mesh, random(rng, (t, d), "float32"), MLP_OUT[kind]))


def _mlp_pair(mesh, kind: str, body: Callable, ring_body: Callable = None) -> dict:
    """Steps of one MLP kind: hand-written, jlocalmap, and jlocalmap with the ring body."""
    in_pl, out_pl = MLP_PLACEMENTS[kind]
    steps = {"shard_map": grad_step(lambda w1, w2, x: hand_written(
                 body, mesh, MLP_SPECS[kind], MLP_OUT[kind])(x, w1, w2)),
             "jlocalmap": grad_step(lambda w1, w2, x: with_local_map(
                 body, mesh, in_pl, out_pl)(x, w1, w2))}
    if ring_body is not None:
        steps["jlocalmap+overlap"] = grad_step(lambda w1, w2, x: with_local_map(
            ring_body, mesh, in_pl, out_pl)(x, w1, w2))
    return steps


def mlp_workload(devices: Sequence[Any], tp: int, size: MlpSize, overlap: bool,
                 seed: int = 0) -> Workload:
    """The matmul-rate reference, the TP MLP step, and (``overlap``) the
    sequence-parallel steps with plain collectives, collective matmuls and XLA's
    own partitioning."""
    mesh = make_mesh(devices, (tp,), ("tp",))
    rng = np.random.default_rng(seed)
    t, d, f = size.tokens, size.d_model, size.d_ff
    step_flops = 5 * 2 * t * d * f / tp  # fwd 2 matmuls, bwd 3 (dW2, dh, dW1), per device
    work = Workload(rows=[], info={"mesh": {"tp": tp}, "size": dataclasses.asdict(size),
                                   "flops_per_device": step_flops})
    args = _mlp_arrays(mesh, size, "mlp", rng)
    w1, w2, x, dy = args
    # Each device's results differ (partial sums, weight-gradient shards): stacked.
    rate = jax.jit(hand_written(step_matmuls, mesh, (P(), P(None, "tp"), P("tp"), P()),
                                (P("tp"), P("tp"), P(None, "tp"))))
    work.rows.append(Row("matmul/local", in_mesh(mesh, rate, x, w1, w2, dy),
                         flops=step_flops, note="the step's five matmuls on every device, "
                         "nothing else: the matmul rate"))
    _add_steps(work, mesh, "mlp", _mlp_pair(mesh, "mlp", mlp_body), args, step_flops)
    if overlap and t % (2 * tp) == 0:
        sp_args = _mlp_arrays(mesh, size, "mlp-sp", rng)
        steps = _mlp_pair(mesh, "mlp-sp", sp_mlp_body, sp_mlp_ring_body)
        _add_steps(work, mesh, "mlp-sp", steps, sp_args, step_flops)
        with jax.set_mesh(mesh):
            work.info["overlap_collectives"] = hlo_collectives(
                steps["jlocalmap+overlap"].lower(*sp_args))
        auto_mesh = make_mesh(devices, (tp,), ("tp",), auto=True)
        auto_args = tuple(jax.device_put(a, NamedSharding(auto_mesh, a.sharding.spec))
                          for a in sp_args)
        auto = grad_step(lambda w1, w2, x: xla_auto_mlp(auto_mesh)(x, w1, w2))
        work.rows.append(Row("mlp-sp/xla-auto", functools.partial(auto, *auto_args),
                             baseline="mlp-sp/shard_map", flops=step_flops,
                             note="jax.jit with shardings: XLA's partitioner places the "
                                  "collectives"))
        work.outputs["mlp-sp/xla-auto"] = auto(*auto_args)
    return work


def _add_steps(work: Workload, mesh, group: str, steps: dict, args: tuple,
               flops: float) -> None:
    """Rows and collective counts of one group's steps; ``shard_map`` is the baseline."""
    base = f"{group}/shard_map"
    work.inputs[group] = args
    with jax.set_mesh(mesh):
        hand = hlo_collectives(steps["shard_map"].lower(*args))
    for impl, step in steps.items():
        name = f"{group}/{impl}"
        work.rows.append(Row(name, in_mesh(mesh, step, *args),
                             baseline=None if impl == "shard_map" else base, flops=flops))
        with jax.set_mesh(mesh):
            work.outputs[name] = step(*args)
            if impl == "jlocalmap":
                work.collectives.append((group, hlo_collectives(step.lower(*args)), hand))


# -- the transformer block --------------------------------------------------------------
BLOCK_AXES = ("dp", "cp", "tp")
X_SPEC, COL_SPEC, ROW_SPEC = P("dp", "cp"), P(None, "tp"), P("tp")
X_PL, COL_PL, ROW_PL = [S(0), S(1), R()], [R(), R(), S(1)], [R(), R(), S(0)]


def attention_body(x, wq, wk, wv, wo, *, head_dim: int):
    """Causal attention of this device's query chunk (sequence shard ``cp``) and
    heads (shard ``tp``) against the whole sequence's keys, gathered over ``cp``."""
    b, t, _ = x.shape

    def heads(w):
        return (x @ w).reshape(b, t, -1, head_dim)
    q = heads(wq)
    k = jax.lax.all_gather(heads(wk), "cp", axis=1, tiled=True)
    v = jax.lax.all_gather(heads(wv), "cp", axis=1, tiled=True)
    rows = jax.lax.axis_index("cp") * t + jnp.arange(t)[:, None]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(head_dim)
    scores = jnp.where(rows >= jnp.arange(k.shape[1])[None, :], scores, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1).astype(v.dtype), v)
    return jax.lax.psum(o.reshape(b, t, -1) @ wo, "tp")


def rms_norm(x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype)


def block_regions(impl: str, mesh, head_dim: int) -> tuple[Callable, Callable]:
    """(attention, mlp) of one implementation, over the (dp, cp, tp) mesh."""
    attention = functools.partial(attention_body, head_dim=head_dim)
    if impl == "shard_map":
        return (hand_written(attention, mesh, (X_SPEC,) + (COL_SPEC,) * 3 + (ROW_SPEC,), X_SPEC),
                hand_written(mlp_body, mesh, (X_SPEC, COL_SPEC, ROW_SPEC), X_SPEC))
    return (with_local_map(attention, mesh, (X_PL,) + (COL_PL,) * 3 + (ROW_PL,), X_PL),
            with_local_map(mlp_body, mesh, (X_PL, COL_PL, ROW_PL), X_PL))


def block_forward(regions: tuple[Callable, Callable], layers: int = 1) -> Callable:
    attention, mlp = regions

    def forward(params, x):
        for p in params[:layers]:
            x = x + attention(rms_norm(x), p["wq"], p["wk"], p["wv"], p["wo"])
            x = x + mlp(rms_norm(x), p["w1"], p["w2"])
        return x
    return forward


def block_params(size: BlockSize, make: Callable) -> dict:
    """One layer's weights; ``make(shape, spec, scale)`` builds each."""
    e, f = size.d_model, size.d_ff
    return {"wq": make((e, e), COL_SPEC, e ** -0.5), "wk": make((e, e), COL_SPEC, e ** -0.5),
            "wv": make((e, e), COL_SPEC, e ** -0.5), "wo": make((e, e), ROW_SPEC, e ** -0.5),
            "w1": make((e, f), COL_SPEC, e ** -0.5), "w2": make((f, e), ROW_SPEC, f ** -0.5)}


def check_block_mesh(size: BlockSize, shape: Sequence[int]) -> None:
    dp, cp, tp = shape
    if size.batch % dp or size.seq % cp or size.heads % tp or size.d_ff % tp:
        raise ValueError(
            f"--block-mesh: dp={dp}, cp={cp}, tp={tp} must divide batch {size.batch}, "
            f"sequence {size.seq}, heads {size.heads} and d_ff {size.d_ff}; pick another mesh.")


def block_workload(devices: Sequence[Any], shape: Sequence[int], size: BlockSize,
                   seed: int = 0) -> Workload:
    check_block_mesh(size, shape)
    mesh = make_mesh(devices, shape, BLOCK_AXES)
    rng = np.random.default_rng(seed)
    params = [block_params(size, lambda s, spec, scale: put(
        mesh, random(rng, s, size.dtype, scale), spec))]
    x_shape = (size.batch, size.seq, size.d_model)
    x = put(mesh, random(rng, x_shape, size.dtype), X_SPEC)
    dy = put(mesh, random(rng, x_shape, "float32"), X_SPEC)
    steps = {impl: grad_step(block_forward(block_regions(impl, mesh, size.head_dim)),
                             argnums=0) for impl in ("shard_map", "jlocalmap")}
    with jax.set_mesh(mesh):
        flops = compiled_flops(steps["shard_map"].lower(params, x, dy))
    work = Workload(rows=[], info={"mesh": dict(zip(BLOCK_AXES, shape, strict=True)),
                                   "size": dataclasses.asdict(size), "flops_per_device": flops,
                                   "flops_source": "XLA cost analysis of the hand-written step"})
    _add_steps(work, mesh, "block", steps, (params, x, dy), flops)
    return work


# -- eager dispatch of a tiny call --------------------------------------------------------
def eager_workload(devices: Sequence[Any], tp: int, seed: int = 0) -> Workload:
    """A tiny ``psum(x @ w)``: jlocalmap called eagerly (its cached program), the
    jitted hand-written shard_map, and ``jax.jit`` of the local_map."""
    mesh = make_mesh(devices, (tp,), ("tp",))
    rng = np.random.default_rng(seed)
    x = put(mesh, random(rng, (64, 16 * tp), "float32"), P(None, "tp"))
    w = put(mesh, random(rng, (16 * tp, 32), "float32"), P("tp"))

    def body(x, w):
        return jax.lax.psum(x @ w, "tp")
    mapped = with_local_map(body, mesh, ([S(1)], [S(0)]), [R()])
    raw = jax.jit(hand_written(body, mesh, (P(None, "tp"), P("tp")), P()))
    work = Workload(rows=[
        Row("eager/jit(shard_map)", functools.partial(raw, x, w),
            note="jax.jit of the hand-written shard_map"),
        Row("eager/jlocalmap", functools.partial(mapped, x, w), baseline="eager/jit(shard_map)",
            note="local_map called eagerly"),
        Row("eager/jit(jlocalmap)", functools.partial(jax.jit(mapped), x, w),
            baseline="eager/jit(shard_map)", note="jax.jit of the local_map")],
        info={"mesh": {"tp": tp}, "shapes": {"x": [64, 16 * tp], "w": [16 * tp, 32]}})
    work.collectives.append(("eager", hlo_collectives(mapped.lower(x, w)),
                             hlo_collectives(raw.lower(x, w))))
    for row in work.rows:
        work.outputs[row.name] = row.call()
    return work


# -- trace and compile time versus depth ------------------------------------------------
def depth_program(impl: str, mesh, layers: int, size: BlockSize) -> tuple[Callable, tuple]:
    """A fresh (never traced) gradient function of ``layers`` blocks, and abstract
    arguments: nothing runs, so the sizes only shape the program."""
    def spec(shape, p, dtype=size.dtype):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=NamedSharding(mesh, p))
    params = [block_params(size, lambda s, p, _: spec(s, p)) for _ in range(layers)]
    x_shape = (size.batch, size.seq, size.d_model)
    forward = block_forward(block_regions(impl, mesh, size.head_dim), layers)

    def step(params, x, dy):
        return jax.value_and_grad(
            lambda p: jnp.sum(forward(p, x).astype(jnp.float32) * dy))(params)
    return step, (params, spec(x_shape, X_SPEC), spec(x_shape, X_SPEC, "float32"))


def trace_lower_compile(impl: str, mesh, layers: int, size: BlockSize,
                        compile: bool = True) -> dict:
    """Seconds to trace, lower and (``compile``) compile the ``layers``-deep step."""
    step, args = depth_program(impl, mesh, layers, size)
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        traced = jax.jit(step).trace(*args)
        traced_at = time.perf_counter()
        lowered = traced.lower()
        lowered_at = time.perf_counter()
        if compile:
            lowered.compile()
        done = time.perf_counter()
    return {"trace": traced_at - start, "lower": lowered_at - traced_at,
            "compile": done - lowered_at if compile else None}


def depth_sweep(devices: Sequence[Any], shape: Sequence[int], size: BlockSize,
                depths: Sequence[int], rounds: int, compile_max: int,
                progress=None) -> dict:
    """Best-of-``rounds`` trace and lower times per depth and implementation, the
    implementations interleaved; compile times from the first round, up to
    ``compile_max`` layers."""
    check_block_mesh(size, shape)
    mesh = make_mesh(devices, shape, BLOCK_AXES)
    impls = ("shard_map", "jlocalmap")
    for impl in impls:  # JAX's own first-use costs, not timed
        trace_lower_compile(impl, mesh, 1, size)
    best: dict = {impl: {} for impl in impls}
    for layers in depths:
        for r in range(rounds):  # compiled once (the slow part), traced every round
            for impl in impls[r % 2:] + impls[:r % 2]:
                times = trace_lower_compile(impl, mesh, layers, size,
                                            r == 0 and layers <= compile_max)
                old = best[impl].get(layers, times)
                best[impl][layers] = {k: min((t for t in (v, old[k]) if t is not None),
                                             default=None) for k, v in times.items()}
                if progress is not None:
                    progress.advance(f"depth {layers} {impl} round {r + 1}/{rounds}")
    return best
