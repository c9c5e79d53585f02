"""Property tests: local_map agrees with the unsharded computation on random
meshes, shapes and placements, forward and backward.

Each example draws a mesh over the 8 simulated CPU devices (1 to 3 axes), a
global shape that the sharding axes divide, placements per mesh axis (Shard(d)
or Replicate, several axes may shard the same dim) and random float32 data
(``np.random.default_rng(seed)``, seed drawn by hypothesis). Three families of
bodies:

1. elementwise: ``sin(x) * 2 + x * b`` with a broadcast bias ``b``, out = x's
   placements;
2. matmuls: per mesh axis a role -- data parallel (X Shard(0), W Replicate, out
   Shard(0)), contraction (X Shard(1), W Shard(0), out Replicate after ``psum``
   in the body, or out Partial() without it), column parallel (X Replicate,
   W Shard(1), out Shard(1)) or replicated;
3. reductions: ``sum``/``mean`` of ``sin(x) * w + x`` over a sharded dim, then
   ``psum``/``pmean`` over the axes sharding it (out Replicate), or out
   Partial() / Partial('avg') and ``jlm.full_tensor``; ``w`` is a replicated scalar.

Properties (every example of the three families checks the first three):

- the forward (eager call, then ``jlm.full_tensor``) equals numpy on the global arrays;
- ``jax.grad`` of ``sum(full_tensor(out) ** 2)`` under ``jax.jit`` equals
  ``jax.grad`` of the unsharded loss, with ``in_grad_placements=None`` and with
  the correct placements declared (docs/gradients.md: Shard(d) -> Shard(d);
  Replicate used with data varying over the axis -> Partial(); Replicate used
  only invariantly -> Replicate());
- the output and the gradients are laid out as declared / as the inputs;
- a wrong declaration (one replicated input's gradient flipped on one axis:
  Replicate() for a Partial gradient, Partial() for a reduced one) is refused
  while tracing (all three families).

Shard dims written from the end (Shard(-1)) are a separate property.

Budget: each example compiles a few XLA programs (about 1 s on 2 CPU cores),
so the counts are moderate and the runs deterministic (``derandomize=True``);
``JLOCALMAP_PROPERTY_EXAMPLES=N`` sets every property's count (a long run).
Case counts (default, generated + explicit @example): elementwise 25 + 2,
matmul 30 + 3, reduction 25 + 3, mis-declaration 60 (traced only), negative
Shard dims 10: 158 in all,
about 90 s.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import need

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard

need("hypothesis")
from hypothesis import HealthCheck, assume, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# -- settings --------------------------------------------------------------------
_SCALE = os.environ.get("JLOCALMAP_PROPERTY_EXAMPLES")


def property_settings(max_examples: int) -> settings:
    """Deterministic (CI-stable) settings; XLA compiles make examples slow."""
    return settings(max_examples=int(_SCALE) if _SCALE else max_examples,
                    deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


RTOL = ATOL = 1e-5

# -- meshes (each shape built once) ------------------------------------------------
MESH_SHAPES = [(8,), (4,), (2,), (2, 4), (4, 2), (2, 2), (2, 2, 2)]
AXIS_NAMES = ("a", "b", "c")
_MESHES: dict[tuple[int, ...], jax.sharding.Mesh] = {}


def get_mesh(shape: tuple[int, ...]) -> jax.sharding.Mesh:
    if shape not in _MESHES:
        _MESHES[shape] = jax.make_mesh(shape, AXIS_NAMES[:len(shape)],
                                       devices=jax.devices()[:math.prod(shape)])
    return _MESHES[shape]


def split_size(mesh_shape, placements, dim: int, rank: int) -> int:
    """How many ways the mesh axes placed Shard(dim) split that dim."""
    return math.prod(n for n, p in zip(mesh_shape, placements, strict=True)
                     if isinstance(p, Shard) and p.dim % rank == dim)


def even_shape(mesh_shape, placements, pieces) -> tuple[int, ...]:
    """The global shape with ``pieces[d]`` elements of dim d per device split."""
    rank = len(pieces)
    return tuple(split_size(mesh_shape, placements, d, rank) * k for d, k in enumerate(pieces))


def axes_where(mesh_shape, items, wanted) -> tuple[str, ...]:
    return tuple(a for a, item in zip(AXIS_NAMES[:len(mesh_shape)], items, strict=True) if item == wanted)


# -- cases -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One local_map call: everything hypothesis prints when it falsifies."""
    family: str
    mesh_shape: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]           # global shapes of the inputs
    in_placements: tuple[tuple, ...]               # per input, one entry per mesh axis
    out_placements: tuple
    grad_placements: tuple[tuple, ...]             # the correct in_grad_placements
    detail: tuple = ()                             # matmul: (roles, mode); reduction: (r, op, mode)

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return get_mesh(self.mesh_shape)


def elementwise_case(mesh_shape, dims, pieces, negative_dims=False) -> Case:
    """x sharded on dim ``dims[i]`` over mesh axis i (None: Replicate), written
    from the end when ``negative_dims``; a bias b of x's last-dim size, Shard(0)
    where x shards its last dim, else Replicate. Out: x's placements."""
    rank = len(pieces)
    x_pl = tuple(Replicate() if d is None else Shard(d - rank if negative_dims else d)
                 for d in dims)
    shape = even_shape(mesh_shape, x_pl, pieces)
    last = [d == rank - 1 for d in dims]
    b_pl = tuple(Shard(0) if is_last else Replicate() for is_last in last)
    # b's gradient: Shard(0) with x's last dim; Partial() where x varies over the
    # axis by another dim (b meets varying data); Replicate() where x is replicated.
    b_grad = tuple(Shard(0) if is_last else Replicate() if d is None else Partial()
                   for d, is_last in zip(dims, last, strict=True))
    return Case("elementwise", tuple(mesh_shape), (shape, (shape[-1],)), (x_pl, b_pl), x_pl,
                (x_pl, b_grad))


#           role:       X            W            out (psum)   out (partial) grad X       grad W
_ROLE = {"dp":       (Shard(0),   Replicate(), Shard(0),    Shard(0),     Shard(0),    Partial()),
         "contract": (Shard(1),   Shard(0),    Replicate(), Partial(),    Shard(1),    Shard(0)),
         "col":      (Replicate(), Shard(1),   Shard(1),    Shard(1),     Partial(),   Shard(1)),
         "rep":      (Replicate(), Replicate(), Replicate(), Replicate(), Replicate(), Replicate())}
MATMUL_ROLES = tuple(_ROLE)


def matmul_case(mesh_shape, roles, mode, pieces) -> Case:
    """Y = X @ W with a role per mesh axis (axes sharing a role nest on one dim):
    data parallel, contraction, column parallel or replicated; mode 'psum'
    reduces the contraction in the body (out Replicate), 'partial' returns
    Partial() on the contraction axes."""
    def col(i):
        return tuple(_ROLE[r][i] for r in roles)

    x_pl, w_pl = col(0), col(1)
    m, k = even_shape(mesh_shape, x_pl, pieces[:2])
    _, n = even_shape(mesh_shape, w_pl, pieces[1:])
    return Case("matmul", tuple(mesh_shape), ((m, k), (k, n)), (x_pl, w_pl),
                col(2) if mode == "psum" else col(3), (col(4), col(5)), (tuple(roles), mode))


def reduction_case(mesh_shape, dims, r, op, mode, pieces) -> Case:
    """``op`` ('sum' or 'mean') of sin(x) * w + x over dim r, with x sharded as in
    elementwise_case and w a replicated scalar; mode 'collective' reduces over the
    axes sharding r in the body (out Replicate there), 'partial' returns
    Partial() / Partial('avg') there."""
    x_pl = tuple(Replicate() if d is None else Shard(d) for d in dims)
    reduced = Replicate() if mode == "collective" else Partial("sum" if op == "sum" else "avg")
    out_pl = tuple(reduced if d == r else Replicate() if d is None else Shard(d - (d > r))
                   for d in dims)
    w_grad = tuple(Replicate() if d is None else Partial() for d in dims)
    return Case("reduction", tuple(mesh_shape), (even_shape(mesh_shape, x_pl, pieces), ()),
                (x_pl, (Replicate(),) * len(mesh_shape)), out_pl, (x_pl, w_grad), (r, op, mode))


# -- strategies ----------------------------------------------------------------------
mesh_shapes = st.sampled_from(MESH_SHAPES)
seeds = st.integers(0, 2**32 - 1)
pieces = st.integers(1, 3)  # elements per device along a dim (1: a dim of the split size)


def shard_dims(rank: int):
    """One mesh axis' placement: the tensor dim it shards, or None (Replicate).
    Sharding comes first so that hypothesis' simplest examples shard."""
    return st.sampled_from([*range(rank), None])


@st.composite
def elementwise_cases(draw, negative_dims: bool = False) -> Case:
    mesh_shape = draw(mesh_shapes)
    rank = draw(st.integers(1, 3))
    dims = [draw(shard_dims(rank)) for _ in mesh_shape]
    if negative_dims and all(d is None for d in dims):
        dims[0] = rank - 1
    return elementwise_case(mesh_shape, dims, [draw(pieces) for _ in range(rank)], negative_dims)


@st.composite
def matmul_cases(draw) -> Case:
    mesh_shape = draw(mesh_shapes)
    roles = [draw(st.sampled_from(MATMUL_ROLES)) for _ in mesh_shape]
    mode = draw(st.sampled_from(["psum", "partial"])) if "contract" in roles else "psum"
    return matmul_case(mesh_shape, roles, mode, [draw(pieces) for _ in range(3)])


@st.composite
def reduction_cases(draw) -> Case:
    """At least one mesh axis shards the reduced dim."""
    mesh_shape = draw(mesh_shapes)
    rank = draw(st.integers(1, 3))
    r = draw(st.integers(0, rank - 1))
    dims = [draw(shard_dims(rank)) for _ in mesh_shape]
    dims[draw(st.integers(0, len(mesh_shape) - 1))] = r
    return reduction_case(mesh_shape, dims, r, draw(st.sampled_from(["sum", "mean"])),
                          draw(st.sampled_from(["collective", "partial"])),
                          [draw(pieces) for _ in range(rank)])


# -- bodies and references ---------------------------------------------------------
def elementwise(x, b):
    return jnp.sin(x) * 2 + x * b


def matmul_body(case: Case):
    roles, mode = case.detail
    contract = axes_where(case.mesh_shape, roles, "contract")

    def body(x, w):
        y = x @ w
        return jax.lax.psum(y, contract) if mode == "psum" and contract else y
    return body, lambda x, w: x @ w


def reduction_body(case: Case):
    r, op, mode = case.detail
    sharding_r = axes_where(case.mesh_shape, case.in_placements[0], Shard(r))
    reduce = jnp.sum if op == "sum" else jnp.mean
    collective = jax.lax.psum if op == "sum" else jax.lax.pmean

    def ref(x, w):
        return reduce(jnp.sin(x) * w + x, axis=r)

    def body(x, w):
        y = ref(x, w)  # the local reduction
        return collective(y, sharding_r) if mode == "collective" else y
    return body, ref


def body_and_reference(case: Case):
    if case.family == "elementwise":
        return elementwise, elementwise
    return (matmul_body if case.family == "matmul" else reduction_body)(case)


# -- the checks --------------------------------------------------------------------
def assert_close(actual, expected, what: str):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL,
                               atol=ATOL, err_msg=what)


def stored(placements, ndim: int) -> tuple:
    """Placements as placements_of reads them: Partial('avg') is stored as a sum,
    Shard dims count from the start."""
    return tuple(Partial() if isinstance(p, Partial) else Shard(p.dim % ndim)
                 if isinstance(p, Shard) else p for p in placements)


def global_inputs(case: Case, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in case.shapes]


def check_case(case: Case, seed: int) -> None:
    """Forward and gradients of the local_map equal the unsharded ones, with the
    default and with the correct declared in_grad_placements."""
    mesh = case.mesh
    body, ref = body_and_reference(case)
    arrays = global_inputs(case, seed)
    dist = [jlm.distribute_tensor(a, mesh, pl) for a, pl in zip(arrays, case.in_placements, strict=True)]
    argnums = tuple(range(len(arrays)))

    expected = ref(*arrays)
    expected_grads = jax.grad(lambda *a: (ref(*a) ** 2).sum(), argnums)(*arrays)

    for in_grad in (None, case.grad_placements):
        tag = "default" if in_grad is None else "declared"
        f = jlm.local_map(body, case.out_placements, case.in_placements, in_grad, mesh)
        out = f(*dist)  # eager: the cached, jitted path
        assert jlm.placements_of(out) == stored(case.out_placements, np.ndim(expected))
        assert_close(jlm.full_tensor(out), expected, f"forward ({tag})")

        def loss(*args, f=f):
            return (jlm.full_tensor(f(*args)) ** 2).sum()

        with jax.set_mesh(mesh):
            grads = jax.jit(jax.grad(loss, argnums))(*dist)
        for i, (g, r, x) in enumerate(zip(grads, expected_grads, dist, strict=True)):
            assert_close(g, r, f"gradient of input {i} ({tag})")
            assert jlm.placements_of(g) == jlm.placements_of(x), f"layout of gradient {i} ({tag})"


# -- properties --------------------------------------------------------------------
# Explicit examples pin the layouts that matter most, whatever hypothesis draws.
@pytest.mark.slow
@property_settings(25)
@given(case=elementwise_cases(), seed=seeds)
@example(case=elementwise_case((2, 2, 2), [0, 0, 2], [1, 3, 2]), seed=1)  # nested dim 0
@example(case=elementwise_case((2, 4), [1, 1], [3, 1]), seed=2)  # both axes on the last dim
def test_elementwise(case, seed):
    check_case(case, seed)


@settings(property_settings(10))
@given(case=elementwise_cases(negative_dims=True), seed=seeds)
def test_elementwise_negative_shard_dims(case, seed):
    check_case(case, seed)


@pytest.mark.slow
@property_settings(30)
@given(case=matmul_cases(), seed=seeds)
@example(case=matmul_case((2, 4), ["dp", "contract"], "psum", [1, 2, 3]), seed=1)  # Megatron row
@example(case=matmul_case((2, 2, 2), ["contract", "dp", "col"], "partial", [2, 1, 2]), seed=2)
@example(case=matmul_case((2, 2, 2), ["dp", "col", "dp"], "psum", [1, 3, 1]), seed=3)
def test_matmul(case, seed):
    check_case(case, seed)


@pytest.mark.slow
@property_settings(25)
@given(case=reduction_cases(), seed=seeds)
@example(case=reduction_case((2, 4), [1, 1], 1, "mean", "partial", [3, 1]), seed=1)
@example(case=reduction_case((2, 2, 2), [0, 2, 0], 0, "sum", "partial", [1, 2, 2]), seed=2)
@example(case=reduction_case((4, 2), [1, 0], 0, "mean", "collective", [2, 3]), seed=3)
def test_reduction(case, seed):
    check_case(case, seed)


@property_settings(60)
@given(case=st.one_of(elementwise_cases(), matmul_cases(), reduction_cases()), data=st.data())
def test_misdeclared_gradient_is_refused(case, data):
    """Flip the correct gradient placement of one replicated input on one axis:
    Partial() -> Replicate() (a skipped all-reduce) or Replicate() -> Partial()
    (a duplicated one); local_map refuses it while tracing (nothing is compiled)."""
    flips = [(i, j) for i, (pl, gl) in enumerate(zip(case.in_placements, case.grad_placements, strict=True))
             for j, (p, g) in enumerate(zip(pl, gl, strict=True)) if p == Replicate()]
    assume(flips)
    i, j = data.draw(st.sampled_from(flips), label="input, axis")
    wrong = [list(g) for g in case.grad_placements]
    was_partial = wrong[i][j] == Partial()
    wrong[i][j] = Replicate() if was_partial else Partial()
    mesh = case.mesh
    body, _ = body_and_reference(case)
    args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=jax.NamedSharding(
        mesh, jlm.placements_to_spec(pl, mesh, len(s))))
        for s, pl in zip(case.shapes, case.in_placements, strict=True)]
    f = jlm.local_map(body, case.out_placements, case.in_placements, wrong, mesh)
    match = "skip the all-reduce" if was_partial else "already reduced"
    expected = rf"in_grad_placements\[{i}\]: declares .* mesh axis '{AXIS_NAMES[j]}'.*{match}"
    with pytest.raises(jlm.PlacementValueError, match=expected), jax.set_mesh(mesh):
        jax.eval_shape(f, *args)
