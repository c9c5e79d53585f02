"""``in_grad_placements``: how the gradient of each local input is laid out.

jlocalmap differentiates the body with JAX's varying-axes typing
(``check_vma``), so gradients equal the unsharded computation by default: a
replicated input used with sharded data gets its all-reduce from JAX itself.
A declared gradient placement changes how the cotangent is reduced and
nothing else: on an axis where the input is ``Replicate()`` and the gradient
is declared ``Partial()``, the input is cast to varying there
(``jax.lax.pcast``), whose transpose is the all-reduce of its cotangent, so
forward-mode differentiation (jvp, jacfwd, hessian) works as without the
declaration. In unchecked bodies (``check_vma=False``), where JAX's transpose
all-reduces every replicated input's cotangent, a ``Replicate()`` declaration
(the body's own rule reduced it already) divides that sum back. Declarations
that cannot describe a cotangent of the input's local shape are refused. See
docs/gradients.md.

The adapters themselves are in this module; which axes a declaration sums over is
:mod:`jlocalmap.layouts.grad_axes` (planning needs it before any tracing).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jlocalmap._jax_compat import (
    aligned_sub_jaxprs,
    loop_carry,
    primitive_name,
    scalar_like,
    varying_of,
)
from jlocalmap.errors import PlacementValueError
from jlocalmap.layouts.meshes import AnyMesh, axis_sizes
from jlocalmap.layouts.placements import Placement


def with_grad_reductions(x: jax.Array, reductions: tuple[str, ...]) -> jax.Array:
    """Inside a checked body: ``x`` unchanged in value, varying over the reduced
    axes, so its cotangent is all-reduced over them on the way back."""
    return jax.lax.pcast(x, reductions, to="varying") if reductions else x


def with_scaled_cotangent(x: jax.Array, axes: tuple[str, ...], power: int) -> jax.Array:
    """Inside an unchecked body: ``x`` unchanged, its cotangent scaled by the size
    of ``axes`` to the ``power``. JAX's transpose of an unchecked body sums every
    replicated input's cotangent (a declared Replicate() one is divided back,
    ``power=-1``) and splits an unreduced output's over the devices (multiplied
    back, ``power=1``)."""
    if not axes or not jnp.issubdtype(x.dtype, jnp.inexact):
        return x
    return _scale_cotangent(axes, power, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scale_cotangent(axes, power, x):
    return x


def _scale_cotangent_fwd(axes, power, x):
    return x, None


def _scale_cotangent_bwd(axes, power, _, ct):
    n = 1
    for axis in axes:
        n *= jax.lax.axis_size(axis)
    return (ct * scalar_like(float(n) ** power, ct),)


_scale_cotangent.defvjp(_scale_cotangent_fwd, _scale_cotangent_bwd)


# -- verification against JAX's varying-axes typing ---------------------------
def _is_var(v) -> bool:
    return type(v).__name__ != "Literal"


_NO_GRADIENT = {"stop_gradient"}  # outputs that carry no cotangent back
_CUSTOM_RULES = ("custom_vjp_call", "custom_jvp_call", "custom_vjp_call_jaxpr",
                 "custom_jvp_call_jaxpr", "custom_lin")
_CALLBACKS = ("pure_callback", "io_callback", "callback")


@dataclasses.dataclass
class _Flow:
    """What following an input through a body found, for one mesh axis."""
    hit: bool = False          # it meets values varying over the axis: Partial cotangent
    custom: bool = False       # it enters a custom differentiation rule (opaque)
    callback: bool = False     # it enters a host callback (opaque to the typing)


def _differentiable(var) -> bool:
    dtype = getattr(getattr(var, "aval", None), "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _taint_hits(jaxpr, tainted: set, axis: str, flow: _Flow) -> set:
    """Forward dataflow from ``tainted`` vars along differentiable paths: values
    derived from the input that are still invariant over ``axis``. A hit is an
    equation that turns such a value into one varying over ``axis`` (an explicit
    or implicit ``pvary``), whose transpose is the all-reduce of the input's
    cotangent. Custom rules are not looked into (their backward defines the
    cotangent). Returns the tainted vars."""
    tainted = set(tainted)
    for eqn in jaxpr.eqns:
        ins = [v for v in eqn.invars if _is_var(v) and v in tainted]
        name = primitive_name(eqn)
        if not ins or name in _NO_GRADIENT:
            continue
        flow.custom |= name in _CUSTOM_RULES
        flow.callback |= name in _CALLBACKS
        subs = [] if name in _CUSTOM_RULES else aligned_sub_jaxprs(eqn)
        new = _sub_taint(eqn, subs, tainted, axis, flow) if subs else set(eqn.outvars)
        for out in eqn.outvars:
            if axis in varying_of(out.aval):
                flow.hit |= not subs and name not in _CUSTOM_RULES
            elif out in new and _differentiable(out):
                tainted.add(out)
    return tainted


def _sub_taint(eqn, subs, tainted: set, axis: str, flow: _Flow) -> set:
    """The outputs of a higher-order equation (jit, scan, cond...) that carry taint."""
    outs_tainted = set()
    for sub, positions in subs:
        sub_taint = _map_in(eqn, sub, positions, tainted)
        for _ in range(2):  # loops feed their carry back once more
            sub_out = _taint_hits(sub, sub_taint, axis, flow)
            back = _carry_feedback(eqn, sub, sub_out)
            if back <= sub_taint:
                break
            sub_taint |= back
        outs_tainted |= {o for o, so in zip(eqn.outvars, sub.outvars, strict=True) if so in sub_out}
    return outs_tainted


def _map_in(eqn, sub, positions, tainted: set) -> set:
    if positions is None:  # an unusual signature: taint every input conservatively
        return set(sub.invars) if any(_is_var(v) and v in tainted for v in eqn.invars) else set()
    return {s for s, k in zip(sub.invars, positions, strict=True)
            if _is_var(eqn.invars[k]) and eqn.invars[k] in tainted}


def _carry_feedback(eqn, sub, sub_out: set) -> set:
    """Taint that a loop body's carry outputs feed back into its carry inputs."""
    carry = loop_carry(eqn, sub)
    if carry is None:
        return set()
    start, count = carry
    return {sub.invars[start + k] for k in range(count) if sub.outvars[k] in sub_out}


def cotangent_flows(body_jaxpr, index: int, axes: Sequence[str]) -> dict:
    """Axis -> what following input ``index`` of the body found (see ``_Flow``)."""
    invar = body_jaxpr.invars[index]
    flows = {}
    for a in axes:
        flows[a] = _Flow()
        if _differentiable(invar):
            _taint_hits(body_jaxpr, {invar}, a, flows[a])
    return flows


def cotangent_partial_axes(body_jaxpr, index: int, axes: Sequence[str]) -> frozenset:
    """The mesh axes (among ``axes``, over which input ``index`` is invariant) on
    which the body's local cotangent for that input is Partial: JAX sums it with
    an all-reduce because the input meets values varying over that axis.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import PartitionSpec as P
        >>> from jlocalmap.region.gradients import cotangent_partial_axes
        >>> mesh = jax.make_mesh((2,), ("dp",))
        >>> f = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("dp"), P()), out_specs=P("dp"))
        >>> x = jax.ShapeDtypeStruct((4, 3), jnp.float32, sharding=jax.NamedSharding(mesh, P("dp")))
        >>> w = jax.ShapeDtypeStruct((3, 3), jnp.float32, sharding=jax.NamedSharding(mesh, P()))
        >>> outer = jax.make_jaxpr(f)(x, w)
        >>> body = outer.jaxpr.eqns[-1].params["jaxpr"]
        >>> sorted(cotangent_partial_axes(body, 1, ["dp"]))
        ['dp']
    """
    return frozenset(a for a, flow in cotangent_flows(body_jaxpr, index, axes).items()
                     if flow.hit)


def verify_grad_placements(body_jaxpr, index: int, input_placements: Sequence[Placement],
                           grad_placements: Sequence[Placement], mesh: AnyMesh,
                           what: str) -> None:
    """Raise when a declared gradient placement contradicts what JAX's typing proves
    about the body: Replicate() where the local cotangent is Partial (a missing
    all-reduce), or Partial() where it is already reduced (a duplicated one).
    Inputs with no differentiable path have no cotangent to check; where the
    input reaches a custom differentiation rule, whose backward defines the
    cotangent, a declaration the rest of the body does not contradict is trusted."""
    if not _differentiable(body_jaxpr.invars[index]):
        return  # no cotangent: any declaration is vacuous
    replicated = [a for a, p in zip(mesh.axis_names, input_placements, strict=True) if p.is_replicate()]
    flows = cotangent_flows(body_jaxpr, index, replicated)
    sizes = axis_sizes(mesh)
    for axis, g in zip(mesh.axis_names, grad_placements, strict=True):
        flow = flows.get(axis)
        if flow is None:
            continue
        if g.is_replicate() and flow.hit:
            raise PlacementValueError(
                f"{what}: declares the gradient Replicate() on mesh axis {axis!r}, but "
                f"the body combines this replicated input with values that vary over "
                f"{axis!r}, so its local cotangents differ per device and the true "
                f"gradient is Partial() (their sum): Replicate() would skip the "
                f"all-reduce. Declare Partial() on {axis!r}, or leave the entry None "
                f"and let JAX reduce it." + _opaque_advice(flow))
        if g.is_partial() and not flow.hit and not flow.custom:
            raise PlacementValueError(
                f"{what}: declares the gradient {g} on mesh axis {axis!r}, but the body "
                f"uses this replicated input only with values that are the same on "
                f"every device of {axis!r}, so its local cotangent is already reduced: "
                f"Partial() would all-reduce it again (an {sizes[axis]}x gradient). "
                f"Declare Replicate() on {axis!r}, or leave the entry None."
                + _opaque_advice(flow))


def _opaque_advice(flow: _Flow) -> str:
    if flow.callback:
        return (" The body passes this input through a host callback, which JAX's "
                "varying-axes typing cannot see through: if the callback's result "
                "varies per device, run the body unchecked (check_vma=False), where "
                "declarations are trusted.")
    return ""
