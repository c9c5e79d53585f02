"""The transformations matrix (issue 11, docs/transformations.md): one small local_map
composed with each JAX transformation, with and without ``in_grad_placements``, with
a Replicate (psum in the body) or a Partial (no psum) output, on 1-, 2- and 3-axis
meshes. Every cell is checked against the same transformation of the same math run
unsharded in float32 on random data: values, and derivatives where the
transformation takes them.

The layer, on a mesh ``(*others, last)``: ``x`` (batch, d) is sharded by rows over
the last axis (the data axis) and replicated over the others; ``w`` (d, h) is
column-sharded over the others (tensor parallel) and replicated over the last axis.
Each device computes ``tanh(x @ w).sum(0)`` for its rows and columns; a Replicate
output all-reduces the rows' sums over the last axis (``psum``), a Partial output
leaves them unreduced. The declared gradients are the true ones: ``x``'s is
``Partial()`` over the other axes (where it meets column-sharded ``w``), ``w``'s is
``Partial()`` over the last axis (where it meets row-sharded ``x``).

The whole product runs on the 2-axis mesh, the 1- and 3-axis meshes for the rows in
EVERY_MESH_ROWS (the file stays under a minute). A cell that JAX's own shard_map
refuses (probed on the installed JAX: ``jax_refuses``) must raise a clear error
instead, or give the right values; docs/transformations.md explains each.
"""

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jlocalmap as jlm
from helpers import assert_close, need
from jlocalmap import Partial, Replicate, Shard

BATCH, D, H, STEPS = 4, 6, 8, 2


@cache
def data() -> dict:
    """One random draw for every cell, so that each reference is computed once."""
    rng = np.random.default_rng(11)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return dict(x=draw(BATCH, D), w=draw(D, H), tx=draw(BATCH, D), tw=draw(D, H),
                xs=draw(STEPS, BATCH, D), c=draw(H), cw=draw(D, H))


# -- the layer's bodies: the same math, written with different JAX features -------------
@jax.custom_vjp
def tanh_vjp(u):
    return jnp.tanh(u)


tanh_vjp.defvjp(lambda u: (jnp.tanh(u), jnp.tanh(u)), lambda t, g: ((1 - t * t) * g,))


@jax.custom_jvp
def tanh_jvp(u):
    return jnp.tanh(u)


@tanh_jvp.defjvp
def _tanh_jvp_rule(primals, tangents):
    t = jnp.tanh(primals[0])
    return t, (1 - t * t) * tangents[0]


def all_reducing_matmul(others: tuple, last: str) -> Callable:
    """x @ w whose custom backward all-reduces each input's gradient itself, as
    PyTorch's local_map test does (the declared gradients are then Replicate())."""
    @jax.custom_vjp
    def mm(x, w):
        return x @ w

    def bwd(res, g):
        x, w = res
        return jax.lax.psum(g @ w.T, others), jax.lax.psum(x.T @ g, last)

    mm.defvjp(lambda x, w: (x @ w, (x, w)), bwd)
    return mm


def python_branching_tanh(seen: list) -> Callable:
    """tanh written with a Python ``if`` on a local value: runs only on concrete arrays."""
    def act(u):
        total = float(u.sum())
        seen.append(total)
        return jnp.tanh(u) if total > 0 else -jnp.tanh(-u)
    return act


def printing_tanh(seen: list) -> Callable:
    """tanh that prints its input first, as one debugs a body: ``str`` of a local value."""
    def act(u):
        seen.append(str(u))
        return jnp.tanh(u)
    return act


def make_body(kind: str, others: tuple, last: str, partial: bool, seen: list) -> Callable:
    act = {"custom_vjp": tanh_vjp, "custom_jvp": tanh_jvp, "printing": printing_tanh(seen),
           "python_if": python_branching_tanh(seen)}.get(kind, jnp.tanh)
    mm = all_reducing_matmul(others, last) if kind == "all_reducing_vjp" else jnp.matmul

    def layer(x, w):
        rows = act(mm(x, w)).sum(0)
        return rows if partial else jax.lax.psum(rows, last)
    return layer


# -- a cell's model: the sharded layer and its inputs (or the unsharded reference) -----
@dataclass(frozen=True)
class Model:
    local: Callable                 # the layer as called: local_map, or the plain math
    readout: Callable               # output -> global value (full_tensor of a Partial)
    x: Any
    w: Any
    tx: Any
    tw: Any
    xs: Any                         # STEPS stacked x's, laid out like x
    host_xs: np.ndarray             # the same, on the host (vmap's input)
    mesh: Optional[jax.sharding.Mesh] = None
    placements: Optional[dict] = None
    seen: Optional[list] = None

    def apply(self, x, w):
        return self.readout(self.local(x, w))

    def loss(self, x, w):
        return jnp.sum(self.apply(x, w) * data()["c"])


def reference() -> Model:
    d = data()
    return Model(local=lambda x, w: jnp.tanh(x @ w).sum(0), readout=lambda y: y,
                 x=d["x"], w=d["w"], tx=d["tx"], tw=d["tw"], xs=d["xs"], host_xs=d["xs"])


def layer_placements(mesh, partial: bool, kind: str) -> dict:
    k = len(mesh.axis_names) - 1
    reduced_in_body = kind == "all_reducing_vjp"
    return dict(
        x=[Replicate()] * k + [Shard(0)], w=[Shard(1)] * k + [Replicate()],
        x_grad=[Replicate() if reduced_in_body else Partial()] * k + [Shard(0)],
        w_grad=[Shard(1)] * k + [Replicate() if reduced_in_body else Partial()],
        out=[Shard(0)] * k + [Partial() if partial else Replicate()])


def stacked(placements: list) -> list:
    """Placements of a value stacked along a new leading dim."""
    return [Shard(p.dim + 1) if isinstance(p, Shard) else p for p in placements]


def sharded_model(mesh, declared: bool, partial: bool, kind: str = "plain",
                  **settings) -> Model:
    *others, last = mesh.axis_names
    pl, seen = layer_placements(mesh, partial, kind), []
    grads = (pl["x_grad"], pl["w_grad"]) if declared else None
    local = jlm.local_map(make_body(kind, tuple(others), last, partial, seen), [pl["out"]],
                          (pl["x"], pl["w"]), grads, mesh, **settings)
    d = data()
    place = lambda name, key: jlm.distribute_tensor(d[name], mesh, pl[key])
    return Model(local=local, readout=jlm.full_tensor if partial else (lambda y: y),
                 x=place("x", "x"), w=place("w", "w"), tx=place("tx", "x"), tw=place("tw", "w"),
                 xs=jlm.distribute_tensor(d["xs"], mesh, stacked(pl["x"])), host_xs=d["xs"],
                 mesh=mesh, placements=pl, seen=seen)


# -- the transformations: each runs on a Model, the sharded one and the reference -------
BOTH = (0, 1)


def t_jit(m):
    return m.readout(jax.jit(m.local)(m.x, m.w))        # a Partial output leaves jit as such


def t_grad(m):
    return jax.grad(m.loss, argnums=BOTH)(m.x, m.w)


def t_value_and_grad(m):
    return jax.value_and_grad(m.loss, argnums=BOTH)(m.x, m.w)


def t_jvp(m):
    return jax.jvp(m.apply, (m.x, m.w), (m.tx, m.tw))


def t_jit_jvp(m):
    return jax.jit(lambda *a: jax.jvp(m.apply, a[:2], a[2:]))(m.x, m.w, m.tx, m.tw)


def t_linearize(m):
    y, f_jvp = jax.linearize(m.apply, m.x, m.w)
    return y, f_jvp(m.tx, m.tw)


# The jacobians jitted: eagerly, each of their many small ops compiles for each layout.
def t_jacfwd(m):
    return jax.jit(jax.jacfwd(m.apply, argnums=BOTH))(m.x, m.w)


def t_jacrev(m):
    return jax.jit(jax.jacrev(m.apply, argnums=BOTH))(m.x, m.w)


def t_hessian(m):
    return jax.jit(jax.hessian(m.loss, argnums=BOTH))(m.x, m.w)


def t_grad_of_grad(m):
    """d/d(x, w) of <grad_w loss, cw>: the mixed second derivatives, in reverse mode."""
    inner = lambda x, w: jnp.sum(jax.grad(m.loss, argnums=1)(x, w) * data()["cw"])
    return jax.jit(jax.grad(inner, argnums=BOTH))(m.x, m.w)


def t_vmap(m):
    return jax.vmap(m.apply, in_axes=(0, None))(m.host_xs, m.w)


def t_vmap_axis_name(m):
    def centred(x, w):                                   # uses the vmapped axis' name
        y = m.apply(x, w)
        return y - jax.lax.pmean(y, "steps")
    return jax.vmap(centred, in_axes=(0, None), axis_name="steps")(m.host_xs, m.w)


def scanned_loss(m, xs, w):
    def step(total, x):
        return total + m.apply(x, w), None
    # the first step starts the carry: a carry keeps the output's layout (its type)
    total, _ = jax.lax.scan(step, m.apply(xs[0], w), xs[1:])
    return jnp.sum(total * data()["c"])


def t_scan(m):
    return jax.jit(jax.value_and_grad(lambda xs, w: scanned_loss(m, xs, w), argnums=BOTH))(m.xs, m.w)


def t_cond(m):
    def chosen(x, w):                                    # a traced predicate: both branches staged
        y = jax.lax.cond(jnp.sum(x) > 0, m.apply, lambda x, w: -m.apply(x, w), x, w)
        return jnp.sum(y * data()["c"])
    return jax.jit(jax.value_and_grad(chosen, argnums=BOTH))(m.x, m.w)


def t_while_loop(m):
    def repeated(x, w):                                  # reverse mode cannot cross a while
        def body(carry):
            i, total = carry
            return i + 1, total + m.apply(x, w)
        return jax.lax.while_loop(lambda c: c[0] < STEPS, body, (1, m.apply(x, w)))[1]
    return jax.jit(repeated)(m.x, m.w)


def checkpointed(policy):
    def t_checkpoint(m):
        loss = jax.checkpoint(m.loss, policy=policy)
        return jax.jit(jax.value_and_grad(loss, argnums=BOTH))(m.x, m.w)
    return t_checkpoint


def t_disable_jit(m):
    with jax.disable_jit():
        return m.apply(m.x, m.w), jax.value_and_grad(m.loss, argnums=BOTH)(m.x, m.w)


def t_export(m):
    """Round trip through serialized artifacts: the values and the gradients."""
    need("flatbuffers")   # jax.export's serialization
    def round_trip(fn):
        blob = jax.export.export(jax.jit(fn))(m.x, m.w).serialize()
        return jax.export.deserialize(blob).call(m.x, m.w)
    return round_trip(m.apply), round_trip(jax.grad(m.loss, argnums=BOTH))


def t_enclosing_shard_map(m):
    """The layer called on local values inside the user's own shard_map over the mesh:
    the body runs as a plain function (DTensor's plain-tensor rule)."""
    *others, last = m.mesh.axis_names
    specs = [jlm.placements_to_spec(m.placements[k], m.mesh, 2) for k in ("x", "w")]

    def local_loss(x, w):
        rows = m.local(x, w)
        if isinstance(m.placements["out"][-1], Partial):
            rows = jax.lax.psum(rows, last)             # the Partial summands, reduced here
        c = jax.lax.dynamic_slice_in_dim(data()["c"], local_offset(others, rows.shape[0]),
                                         rows.shape[0])
        return jax.lax.psum(jnp.sum(rows * c), tuple(others))

    sm = jax.shard_map(local_loss, mesh=m.mesh, in_specs=tuple(specs), out_specs=P())
    return jax.jit(jax.value_and_grad(sm, argnums=BOTH))(m.x, m.w)


def local_offset(axes, size):
    """First global row of this device's block of a dim sharded over ``axes``, in order."""
    index = 0
    for axis in axes:
        index = index * jax.lax.axis_size(axis) + jax.lax.axis_index(axis)
    return index * size


def t_reference_value_and_grad(m):
    return jax.value_and_grad(m.loss, argnums=BOTH)(m.x, m.w)


@dataclass(frozen=True)
class Row:
    run: Callable
    body: str = "plain"
    reference: Optional[Callable] = None     # the unsharded counterpart, if not run itself
    settings: tuple = ()                     # extra local_map keywords
    declared: tuple = (False, True)          # the declaration variants that have one answer
    limit: Optional[str] = None              # a use JAX's own shard_map may refuse (LIMITS)
    partial_limit: Optional[str] = None      # the same, for the Partial-output variant only
    check: Optional[Callable] = None         # what else a passing cell must show


def shows_concrete_blocks(m: Model):
    """The body ran eagerly: printing a local value showed every device's block."""
    assert any(text.count("mesh coordinates") == m.mesh.size for text in m.seen), m.seen[:2]


def branched_on_local_values(m: Model):
    """The body's Python ``if`` saw every device's own block of x @ w, concretely."""
    assert_same_values(m.seen, local_block_sums(m.mesh))


ROWS = {
    "jit": Row(t_jit),
    "grad": Row(t_grad),
    "value_and_grad": Row(t_value_and_grad),
    "jvp": Row(t_jvp),
    "jit_jvp": Row(t_jit_jvp),
    "linearize": Row(t_linearize),
    "jacfwd": Row(t_jacfwd, partial_limit="batching"),
    "jacrev": Row(t_jacrev, partial_limit="jacrev"),
    "hessian": Row(t_hessian, partial_limit="batching"),
    "grad_of_grad": Row(t_grad_of_grad),
    "vmap": Row(t_vmap, partial_limit="batching"),
    "vmap_axis_name": Row(t_vmap_axis_name, partial_limit="batching"),
    "scan": Row(t_scan),
    "cond": Row(t_cond),
    "while_loop": Row(t_while_loop),
    "checkpoint_dots_saveable": Row(checkpointed(jax.checkpoint_policies.dots_saveable)),
    "checkpoint_nothing_saveable": Row(checkpointed(jax.checkpoint_policies.nothing_saveable)),
    "custom_vjp": Row(t_value_and_grad, body="custom_vjp"),
    "custom_vjp_all_reducing": Row(t_value_and_grad, body="all_reducing_vjp"),
    "custom_jvp": Row(t_jvp, body="custom_jvp"),
    "custom_jvp_grad": Row(t_value_and_grad, body="custom_jvp"),
    "disable_jit": Row(t_disable_jit, body="printing", check=shows_concrete_blocks),
    "disable_jit_python_if": Row(t_disable_jit, body="python_if", limit="python_if",
                                 check=branched_on_local_values),
    "export": Row(t_export),
    "enclosing_shard_map": Row(t_enclosing_shard_map, reference=t_reference_value_and_grad),
    "check_vma_false": Row(t_value_and_grad, settings=(("check_vma", False),)),
    # An unchecked body whose backward all-reduces: only its declaration (Replicate()) tells
    # that its cotangents are already reduced; JAX's unchecked transpose would sum them again.
    "check_vma_false_all_reducing": Row(t_value_and_grad, body="all_reducing_vjp",
                                        settings=(("check_vma", False),),
                                        declared=(True,)),
}


# -- what JAX's own shard_map refuses (jax 0.10.2), probed on the installed JAX ------------
def raw_partial_sum(mesh, check_vma: bool = True) -> Callable:
    """The Partial-output layer in JAX's own terms: an unreduced shard_map output, resharded
    (an unchecked body has no varying type to cast: its local value is returned as it is)."""
    def body(x):
        rows = jnp.tanh(x).sum(0)
        return jax.lax.pcast(rows, "a", to="unreduced") if check_vma else rows
    sm = jax.shard_map(body, mesh=mesh, in_specs=P("a"), out_specs=P(None, unreduced={"a"}),
                       check_vma=check_vma)
    return lambda x: jax.sharding.reshard(sm(x), P())


def raw_eager_body(mesh, branch: bool) -> Callable:
    """A shard_map body run under disable_jit, with or without a Python ``if`` on a local value."""
    def body(x):
        return jnp.tanh(x) if not branch or float(x.sum()) > 0 else -jnp.tanh(-x)
    sm = jax.shard_map(body, mesh=mesh, in_specs=P("a"), out_specs=P("a"))

    def run(x):
        with jax.disable_jit():
            return sm(x)
    return run


def raw_uses(mesh) -> dict:
    """Each limit's use of raw shard_map: x -> (what it gives, what is right); "sound" is
    the same programs without the limits."""
    X = data()["x"]
    sums, slopes = np.tanh(X).sum(0), 1 - np.tanh(X) ** 2
    checked, unchecked = raw_partial_sum(mesh), raw_partial_sum(mesh, check_vma=False)
    grad_of = lambda f: jax.grad(lambda x: f(x).sum())
    return {"sound": lambda x: ((checked(x), grad_of(checked)(x),
                                 raw_eager_body(mesh, branch=False)(x)), (sums, slopes, np.tanh(X))),
            "batching": lambda x: (jax.vmap(checked)(jnp.stack([x, x])), np.stack([sums, sums])),
            "jacrev": lambda x: (jax.jacrev(checked)(x),
                                 np.einsum("jk,ik->jik", np.eye(X.shape[1]), slopes)),
            "unchecked": lambda x: ((unchecked(x), grad_of(unchecked)(x)), (sums, slopes)),
            "python_if": lambda x: (raw_eager_body(mesh, branch=True)(x), np.tanh(X))}


@cache
def jax_refuses(limit: str) -> Optional[str]:
    """What JAX's own shard_map does wrong with the use ``limit`` names (None: it works).
    jax 0.10.2: no batching rule for the cast to unreduced (vmap, jacfwd); jacrev's batched
    transpose reads the spec of an unreduced value; an unchecked body's unreduced output
    gets 1/n of its cotangent; a local value under disable_jit has no Python float."""
    mesh = jax.make_mesh((2,), ("a",))
    x = jax.device_put(data()["x"], jax.NamedSharding(mesh, P("a")))
    try:
        with jax.set_mesh(mesh):
            got, want = raw_uses(mesh)[limit](x)
    except Exception as e:  # noqa: BLE001 -- whatever JAX raises is its refusal
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if not np.allclose(np.asarray(g), w, rtol=1e-4, atol=2e-5):
            return f"wrong values: {np.asarray(g).ravel()[:3]} where {w.ravel()[:3]} is right"
    return None


# What a cell that JAX refuses must raise instead: a jlocalmap error naming the cause (for
# the Python ``if``, JAX's own error, raised at the body's line, names it too).
CLEAR_ERRORS = {"batching": ((jlm.LocalMapError,), "Partial"),
                # raised by JAX in the batched backward pass, after local_map returned:
                # JAX's own error (docs/transformations.md explains it and the way around)
                "jacrev": ((jlm.LocalMapError, ValueError), "unreduced"),
                "unchecked": ((jlm.LocalMapError,), "Partial"),
                "python_if": ((jlm.LocalMapError, jax.errors.ConcretizationTypeError), "concrete")}


def test_raw_jax_probes_are_sound():
    """The probes fail only for their limit: the same raw programs without it are right."""
    assert jax_refuses("sound") is None


# -- the matrix ----------------------------------------------------------------------
@cache
def expected(row: str):
    spec = ROWS[row]
    return jax.tree.map(np.asarray, (spec.reference or spec.run)(reference()))


# The whole product on the 2-axis mesh; the 1- and 3-axis meshes for the rows whose
# handling depends on the number of axes (layouts, psum over several axes, declarations
# over several axes, offsets of local blocks): docs/transformations.md.
EVERY_MESH_ROWS = ("jit", "grad", "jvp", "jacrev", "hessian", "vmap_axis_name", "scan",
                   "custom_vjp_all_reducing", "export", "enclosing_shard_map")
MESHES = {"1axis": "mesh1", "2axis": "mesh2x2", "3axis": "mesh3d"}


def cells():
    for row, spec in ROWS.items():
        for mesh in MESHES:
            if mesh != "2axis" and row not in EVERY_MESH_ROWS:
                continue
            for declared in spec.declared:
                for partial in (False, True):
                    yield pytest.param(row, declared, partial, mesh, id="-".join(
                        (row, "decl" if declared else "nodecl",
                         "partial" if partial else "replicate", mesh)))


@pytest.mark.parametrize("row, declared, partial, mesh_name", list(cells()))
def test_matrix(row, declared, partial, mesh_name, request):
    mesh = request.getfixturevalue(MESHES[mesh_name])
    spec = ROWS[row]
    m = sharded_model(mesh, declared, partial, spec.body, **dict(spec.settings))
    limit = spec.limit or (spec.partial_limit if partial else None)
    with jax.set_mesh(mesh):                            # explicit sharding's eager grad needs it
        got = run_or_clear_error(spec.run, m, limit) if limit and jax_refuses(limit) \
            else spec.run(m)
    if got is None:
        return
    want = expected(row)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-4, atol=2e-5), got, want)
    if spec.check:
        spec.check(m)


def run_or_clear_error(run: Callable, m: Model, limit: str):
    """A cell that JAX's own shard_map refuses: a clear error naming the cause (None), or a
    way around it (the values, checked as any cell's)."""
    errors, names = CLEAR_ERRORS[limit]
    try:
        return run(m)
    except errors as e:
        assert names in str(e), str(e)
        return None


def local_block_sums(mesh) -> list:
    """Each device's sum of its local block of x @ w: what an eager body branches on."""
    *others, last = mesh.axis_names
    n_cols = int(np.prod([mesh.shape[a] for a in others]))
    xw = data()["x"] @ data()["w"]
    return [float(block.sum()) for rows in np.split(xw, mesh.shape[last], axis=0)
            for block in np.split(rows, n_cols, axis=1)]


def assert_same_values(seen, blocks, tol=1e-4):
    """Every block was seen and nothing else was (devices holding the same block repeat it)."""
    close = lambda a, b: abs(a - b) <= tol * (1 + abs(b))
    assert seen and all(any(close(s, b) for b in blocks) for s in seen), (seen, blocks)
    assert all(any(close(s, b) for s in seen) for b in blocks), (seen, blocks)


# -- docs/transformations.md shows this matrix ---------------------------------------------
def documented_rows() -> dict:
    """The page's matrix: row id -> (its four cells, its meshes)."""
    page = (Path(__file__).parent.parent / "docs" / "transformations.md").read_text()
    rows = {}
    for line in page.splitlines():
        found = re.match(r"\| \[`(\w+)`\]\(\.\./tests/test_transformations\.py\) \|", line)
        if found:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[found.group(1)] = (cells[2:6], cells[6])
    return rows


def expected_cell(spec: Row, declared: bool, partial: bool) -> str:
    if declared not in spec.declared:
        return "—"
    return "clear error" if spec.limit or (partial and spec.partial_limit) else "tested"


def test_docs_matrix_is_the_suites():
    documented = documented_rows()
    assert list(documented) == list(ROWS)
    for row, (cells, meshes) in documented.items():
        want = [expected_cell(ROWS[row], d, p) for d in (False, True) for p in (False, True)]
        assert [("clear error" if "clear error" in c else c) for c in cells] == want, row
        assert meshes == ("1, 2, 3" if row in EVERY_MESH_ROWS else "2"), row
