"""``in_grad_placements``: how the gradient of each local input is laid out.

jlocalmap differentiates the body with JAX's varying-axes typing
(``check_vma``), so gradients equal the unsharded computation by default: a
replicated input used with sharded data gets its all-reduce from JAX itself.
A declared gradient placement is honoured through a ``jax.custom_vjp`` adapter
on the local input: on an axis where the input is ``Replicate()`` and the
gradient is declared ``Partial(op)``, the forward marks the input as varying
and the backward reduces the local cotangent (``psum``, or ``pmean`` for avg).
Declarations that cannot describe a cotangent of the input's local shape are
refused. See docs/gradients.md.

Example:
    >>> import jax, jlocalmap as jlm
    >>> from jlocalmap.gradients import grad_reductions
    >>> mesh = jax.sharding.AbstractMesh((2,), ("dp",))
    >>> grad_reductions((jlm.Replicate(),), (jlm.Partial(),), mesh, "in_grad_placements[1]")
    (('dp', 'sum'),)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax

from jlocalmap._jax_compat import sub_jaxprs
from jlocalmap.errors import PlacementValueError
from jlocalmap.placements import Placement
from jlocalmap.meshes import AnyMesh


def grad_reductions(input_placements: Sequence[Placement],
                    grad_placements: Sequence[Placement], mesh: AnyMesh,
                    what: str) -> tuple[tuple[str, str], ...]:
    """The (axis, reduce_op) reductions that turn a local cotangent laid out by
    ``grad_placements`` into one laid out like the input; raises for pairs that
    do not describe a cotangent of the local input's shape."""
    reductions = []
    for axis, p, g in zip(mesh.axis_names, input_placements, grad_placements):
        if g == p or (g.is_partial() and p.is_partial()):
            continue
        if p.is_replicate() and g.is_partial():
            if g.reduce_op not in ("sum", "avg"):
                raise PlacementValueError(
                    f"{what}: Partial({g.reduce_op}) on mesh axis {axis!r} is not a "
                    f"gradient reduction (gradients add up); use Partial('sum').")
            reductions.append((axis, g.reduce_op))
        elif p.is_partial() and g.is_replicate():
            continue  # each partial summand's cotangent is the whole cotangent
        else:
            raise PlacementValueError(
                f"{what}: gradient placement {g} on mesh axis {axis!r} does not fit "
                f"an input placed {p}: the local cotangent has the local input's "
                f"shape, so on that axis it can only be {p}"
                f"{' or Partial()' if p.is_replicate() else ''}. Fix the entry "
                f"or leave it None (the input's own placements).")
    return tuple(reductions)


def with_grad_reductions(x: jax.Array, reductions: tuple[tuple[str, str], ...]) -> jax.Array:
    """Inside a body: ``x`` unchanged in value, varying over the reduced axes, and
    its cotangent reduced over them on the way back."""
    if not reductions:
        return x
    axes = tuple(a for a, _ in reductions)
    return _reduce_cotangent(axes, tuple(op for _, op in reductions), x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reduce_cotangent(axes, ops, x):
    return jax.lax.pcast(x, axes, to="varying")


def _reduce_cotangent_fwd(axes, ops, x):
    return _reduce_cotangent(axes, ops, x), None


def _reduce_cotangent_bwd(axes, ops, _, ct):
    for axis, op in zip(axes, ops):
        ct = jax.lax.pmean(ct, axis) if op == "avg" else jax.lax.psum(ct, axis)
    return (ct,)


_reduce_cotangent.defvjp(_reduce_cotangent_fwd, _reduce_cotangent_bwd)


# -- verification against JAX's varying-axes typing ---------------------------
def _is_var(v) -> bool:
    return type(v).__name__ != "Literal"


def _vma(var) -> frozenset:
    aval = getattr(var, "aval", None)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _taint_hits(jaxpr, tainted: set, axis: str) -> tuple[bool, set]:
    """Forward dataflow from ``tainted`` vars: values derived from the input that
    are still invariant over ``axis``. A hit is an equation that turns such a
    value into one varying over ``axis`` (an explicit or implicit ``pvary``),
    whose transpose is the all-reduce of the input's cotangent. Returns (hit,
    tainted outvars)."""
    tainted = set(tainted)
    hit = False
    for eqn in jaxpr.eqns:
        ins = [v for v in eqn.invars if _is_var(v) and v in tainted]
        if not ins:
            continue
        subs = sub_jaxprs(eqn)
        if subs:
            outs_tainted = set()
            for sub in subs:
                sub_taint = _map_in(eqn, sub, tainted)
                for _ in range(2):  # loops feed their carry back once more
                    sub_hit, sub_out = _taint_hits(sub, sub_taint, axis)
                    hit |= sub_hit
                    back = _carry_feedback(eqn, sub, sub_out)
                    if back <= sub_taint:
                        break
                    sub_taint |= back
                outs_tainted |= {o for o, so in zip(eqn.outvars, sub.outvars)
                                 if so in sub_out}
            new = outs_tainted
        else:
            new = set(eqn.outvars)
        for out in eqn.outvars:
            if axis in _vma(out):
                if not subs:
                    hit = True
            elif out in new:
                tainted.add(out)
    return hit, tainted


def _map_in(eqn, sub, tainted: set) -> set:
    n = len(sub.invars)
    outer = eqn.invars[len(eqn.invars) - n:] if len(eqn.invars) >= n else []
    if len(outer) != n:  # an unusual signature: taint every input conservatively
        return set(sub.invars) if any(_is_var(v) and v in tainted for v in eqn.invars) else set()
    return {s for s, o in zip(sub.invars, outer) if _is_var(o) and o in tainted}


def _carry_feedback(eqn, sub, sub_out: set) -> set:
    """Taint that a loop body's carry outputs feed back into its carry inputs."""
    name = eqn.primitive.name
    if name == "while":
        start = eqn.params["body_nconsts"]
        layouts = [(start, len(sub.outvars))] if len(sub.invars) == start + len(sub.outvars) else []
    elif name == "scan" and "num_consts" in eqn.params:
        layouts = [(eqn.params["num_consts"], eqn.params["num_carry"])]
    elif name == "scan":  # read (consts, carry) from the types: jax versions differ
        layouts = _scan_layouts(eqn, sub)
    else:
        return set()
    return {sub.invars[start + k] for start, count in layouts for k in range(count)
            if sub.outvars[k] in sub_out}


def _scan_layouts(eqn, sub) -> list[tuple[int, int]]:
    """Every (number of consts, number of carries) that fits a scan's types:
    carries keep their type through the body and the loop, xs and ys gain the
    leading length dim."""
    def shape(v):
        return tuple(getattr(v.aval, "shape", ()))

    def kind(v):
        return shape(v), getattr(v.aval, "dtype", None)

    length = eqn.params.get("length")
    fits = []
    for consts in range(len(sub.invars) + 1):
        for carry in range(min(len(sub.outvars), len(sub.invars) - consts) + 1):
            same = all(kind(sub.invars[consts + k]) == kind(sub.outvars[k]) for k in range(carry))
            xs = sub.invars[consts + carry:]
            outer_xs = eqn.invars[consts + carry:]
            stacked = len(xs) == len(outer_xs) and all(
                shape(o) == (length,) + shape(x) for o, x in zip(outer_xs, xs))
            ys = sub.outvars[carry:]
            stacked_ys = all(shape(o) == (length,) + shape(y)
                             for o, y in zip(eqn.outvars[carry:], ys))
            if same and stacked and stacked_ys:
                fits.append((consts, carry))
    return fits


def cotangent_partial_axes(body_jaxpr, index: int, axes: Sequence[str]) -> frozenset:
    """The mesh axes (among ``axes``, over which input ``index`` is invariant) on
    which the body's local cotangent for that input is Partial: JAX sums it with
    an all-reduce because the input meets values varying over that axis.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import PartitionSpec as P
        >>> from jlocalmap.gradients import cotangent_partial_axes
        >>> mesh = jax.make_mesh((2,), ("dp",))
        >>> f = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("dp"), P()), out_specs=P("dp"))
        >>> x = jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=jax.NamedSharding(mesh, P("dp")))
        >>> w = jax.ShapeDtypeStruct((3, 3), jnp.float32, sharding=jax.NamedSharding(mesh, P()))
        >>> outer = jax.make_jaxpr(f)(x, w)
        >>> body = outer.jaxpr.eqns[-1].params["jaxpr"]
        >>> sorted(cotangent_partial_axes(body, 1, ["dp"]))
        ['dp']
    """
    invar = body_jaxpr.invars[index]
    return frozenset(a for a in axes if _taint_hits(body_jaxpr, {invar}, a)[0])


def verify_grad_placements(body_jaxpr, index: int, input_placements: Sequence[Placement],
                           grad_placements: Sequence[Placement], mesh: AnyMesh,
                           what: str) -> None:
    """Raise when a declared gradient placement contradicts what JAX's typing proves
    about the body: Replicate() where the local cotangent is Partial (a missing
    all-reduce), or Partial() where it is already reduced (a duplicated one)."""
    replicated = [a for a, p in zip(mesh.axis_names, input_placements) if p.is_replicate()]
    partial = cotangent_partial_axes(body_jaxpr, index, replicated)
    for axis, g in zip(mesh.axis_names, grad_placements):
        if axis not in replicated:
            continue
        if g.is_replicate() and axis in partial:
            raise PlacementValueError(
                f"{what}: declares the gradient Replicate() on mesh axis {axis!r}, but "
                f"the body combines this replicated input with values that vary over "
                f"{axis!r}, so its local cotangents differ per device and the true "
                f"gradient is Partial() (their sum): Replicate() would skip the "
                f"all-reduce. Declare Partial() on {axis!r}, or leave the entry None "
                f"and let JAX reduce it.")
        if g.is_partial() and axis not in partial:
            raise PlacementValueError(
                f"{what}: declares the gradient {g} on mesh axis {axis!r}, but the body "
                f"uses this replicated input only with values that are the same on "
                f"every device of {axis!r}, so its local cotangent is already reduced: "
                f"Partial() would all-reduce it again (an {dict(zip(mesh.axis_names, mesh.axis_sizes))[axis]}x "
                f"gradient). Declare Replicate() on {axis!r}, or leave the entry None.")
