"""Recording regions while tracing: the settings of each region local_map
stages (:class:`RegionSettings`, :class:`RegionArray`), kept by name, mesh and operand
types so that :func:`region_settings` and :func:`~jlocalmap.inspect.regions` can report
them; where no record fits, the settings are read from the equation and its name.

Example:
    >>> import jax, jax.numpy as jnp, jlocalmap as jlm
    >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
    >>> f = jlm.local_map(jnp.cos, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
    >>> jaxpr = jax.make_jaxpr(f)(jax.ShapeDtypeStruct((8,), jnp.float32)).jaxpr
    >>> [str(s.inputs[0]) for s in map(jlm.inspect.region_settings, jaxpr.eqns) if s is not None]
    ['[0] f32[8] S(0) -> local f32[2]']
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np
from jax.extend import core as jcore

from jlocalmap._jax_compat import name_stack, transposed
from jlocalmap.layouts.meshes import AnyMesh
from jlocalmap.layouts.placements import PlacementList, Shard, compact
from jlocalmap.region.names import PREFIX, name_in, parse_name

_REGISTRY_SIZE = 4096  # recorded region calls kept for regions() to look up


_AMBIGUOUS = object()  # registry entry of a key recorded with different settings


@dataclasses.dataclass(frozen=True)
class RegionArray:
    """One array input or output of a region.

    ``index`` is the leaf's position among the call's flattened arguments (or
    the body's flattened outputs), or None where the equation alone cannot tell
    (see :func:`region_settings`); ``global_shape`` is the value's logical shape
    outside, ``local_shape`` what one device's body sees (padded chunk length
    along uneven dims; a Partial input's body value, without the summand dim).

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
        >>> f = jlm.local_map(jnp.tanh, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> [r] = jlm.inspect.regions(jax.grad(lambda x: f(x).sum()), jax.ShapeDtypeStruct((8,), jnp.float32))
        >>> r.inputs[0].global_shape, r.inputs[0].local_shape, r.inputs[0].placements
        ((8,), (2,), (Shard(dim=0),))
    """
    index: Optional[int]
    placements: PlacementList
    global_shape: tuple
    local_shape: tuple
    dtype: np.dtype
    grad_placements: Optional[PlacementList] = None

    def __str__(self) -> str:
        grad = "" if self.grad_placements is None else f"  grad {compact(self.grad_placements)}"
        index = "?" if self.index is None else self.index
        return (f"[{index}] {aval_text(self.global_shape, self.dtype)} "
                f"{compact(self.placements)} -> local {aval_text(self.local_shape, self.dtype)}{grad}")


@dataclasses.dataclass(frozen=True)
class RegionSettings:
    """A region's settings: what ``local_map`` records when it stages one, or
    what the equation itself says (see :func:`region_settings`).

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
        >>> f = jlm.local_map(jnp.tanh, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> [r] = jlm.inspect.regions(jax.grad(lambda x: f(x).sum()), jax.ShapeDtypeStruct((8,), jnp.float32))
        >>> r.settings.func_name, dict(r.settings.mesh.shape)
        ('tanh', {'tp': 4})
    """
    name: str
    func_name: str
    mesh: AnyMesh      # a Mesh, or the AbstractMesh the program was traced on

    inputs: tuple[RegionArray, ...]
    outputs: tuple[RegionArray, ...]


_REGISTRY: collections.OrderedDict = collections.OrderedDict()
# The regions staged while regions() traces: (name, mesh, avals) keys.


_STAGED: contextvars.ContextVar = contextvars.ContextVar("jlocalmap_staged", default=None)


def record(call: RegionSettings, staged_avals: Sequence[Any]) -> None:
    """Remember a staged region by its name, mesh and the avals of the arrays it
    was staged with, so :func:`regions` and :func:`region_settings` can report
    its settings (a key recorded with different settings is ambiguous)."""
    key = (call.name, _mesh_key(call.mesh), _avals_key(staged_avals))
    known = _REGISTRY.get(key)
    _REGISTRY[key] = call if known is None or known == call else _AMBIGUOUS
    _REGISTRY.move_to_end(key)
    while len(_REGISTRY) > _REGISTRY_SIZE:
        _REGISTRY.popitem(last=False)
    staged = _STAGED.get()
    if staged is not None:
        staged.append(key)


def _avals_key(avals: Sequence[Any]) -> tuple:
    return tuple((tuple(a.shape), str(a.dtype)) for a in avals)


def _mesh_key(mesh) -> tuple:
    return tuple(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def eqn_key(name: str, eqn) -> tuple:
    return (name, _mesh_key(eqn.params["mesh"]), _avals_key([v.aval for v in eqn.invars]))


@contextlib.contextmanager
def staging():
    """Collect the keys of the regions staged inside the ``with`` block."""
    staged: list = []
    token = _STAGED.set(staged)
    try:
        yield staged
    finally:
        _STAGED.reset(token)


def lookup(key: tuple) -> Any:
    """The recorded settings of a key, or None (or an ambiguity marker)."""
    return _REGISTRY.get(key)


def recorded(name: str, eqn) -> Optional[RegionSettings]:
    """The settings recorded for a region equation, where one record fits."""
    call = _REGISTRY.get(eqn_key(name, eqn))
    return call if isinstance(call, RegionSettings) else None


def region_settings(eqn: Any) -> Optional[RegionSettings]:
    """The settings of the ``local_map`` region a jaxpr equation stages (name,
    function, mesh, operands with placements and shapes), or None for any other
    equation: how tools walking their own jaxprs find every region.

    Settings come from what ``local_map`` recorded when it staged the region,
    else from the equation and its name (leaf indices are then None). JAX's
    backward equations of a region are not regions: None where their name
    stack says ``transpose(...)`` or their operands do not fit the placements
    (inside ``jax.jit`` the name stack is relative, and a backward equation
    whose operands match the forward's, e.g. of ``-x``, cannot be told apart).

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
        >>> f = jlm.local_map(jnp.cos, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> jaxpr = jax.make_jaxpr(f)(jax.ShapeDtypeStruct((8,), jnp.float32)).jaxpr
        >>> [(s.func_name, s.inputs[0].placements, s.inputs[0].local_shape)
        ...  for s in map(jlm.inspect.region_settings, jaxpr.eqns) if s is not None]
        [('cos', (Shard(dim=0),), (2,))]
    """
    if getattr(getattr(eqn, "primitive", None), "name", None) != "shard_map":
        return None
    stack = name_stack(eqn)
    name = name_in(stack)
    if name is None or transposed(stack):
        return None
    return recorded(name, eqn) or settings_from_equation(name, eqn)


def settings_from_equation(name: str, eqn) -> Optional[RegionSettings]:
    """Settings from the equation and its name, where local_map's record is
    missing or ambiguous (a call staged by another trace with other static
    arguments, a region JAX rewrote under vmap or scan): None when the
    operands do not fit the name's placements."""
    parsed = parse_name(name)
    if parsed is None:
        return None
    func_name, ins, outs, grads = parsed
    body = body_of(eqn)
    mesh = eqn.params["mesh"]
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    if len(eqn.invars) != len(ins) or len(eqn.outvars) < len(outs) or len(grads) != len(ins):
        return None

    def operand(placements, logical, outer, inner, grad=None, spec=None):
        shape, local = tuple(outer.aval.shape), tuple(inner.aval.shape)
        summed = tuple(a for a, p in zip(mesh.axis_names, placements, strict=True)
                       if p.is_partial() and sizes[a] > 1)
        entries = tuple(spec) if spec is not None else ()
        if summed and entries and entries[0] in (summed, summed[0] if len(summed) == 1 else None):
            shape, local = shape[1:], local[1:]  # a Partial input's stacked summands
        return RegionArray(None, placements, logical or shape, local, outer.aval.dtype, grad)

    inputs = []
    for (placements, logical), grad, outer, inner, spec in zip(
            ins, grads, eqn.invars, body.invars, eqn.params["in_specs"], strict=True):
        if len(placements) != len(mesh.axis_names):
            return None
        op = operand(placements, logical, outer, inner, grad, spec)
        if not _fits(placements, logical or op.global_shape, op.local_shape, mesh):
            return None
        inputs.append(op)
    # A forward pass of a differentiated region adds residual outputs (before
    # the region's own, or after them): the ones whose local shapes fit.
    n = len(outs)
    for first in (len(eqn.outvars) - n, 0):
        picked = list(zip(outs, eqn.outvars[first:first + n], body.outvars[first:first + n], strict=True))
        if all(_fits(p, o.aval.shape, i.aval.shape, mesh) for (p, _), o, i in picked):
            outputs = [operand(p, logical, o, i) for (p, logical), o, i in picked]
            return RegionSettings(name, func_name, mesh, tuple(inputs),
                              tuple(outputs))
    return None


def _fits(placements: PlacementList, global_shape: tuple, local: tuple, mesh) -> bool:
    """Whether ``local`` is the (padded) shard of ``global_shape`` under ``placements``."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    if len(placements) != len(mesh.axis_names) or len(global_shape) != len(local):
        return False
    expected = list(global_shape)
    for axis, p in zip(mesh.axis_names, placements, strict=True):
        if isinstance(p, Shard):
            if not -len(expected) <= p.dim < len(expected):
                return False
            d = p.dim % len(expected)
            if not jax.export.is_symbolic_dim(expected[d]):
                expected[d] = -(-expected[d] // sizes[axis])  # padded chunk length
    return all(jax.export.is_symbolic_dim(e) or jax.export.is_symbolic_dim(n) or e == n
               for e, n in zip(expected, local, strict=True))


def unknown_settings(name: str, eqn) -> RegionSettings:
    """Shapes only, for an equation whose name and operands say no more (a
    digest name recorded by another process)."""
    mesh = eqn.params["mesh"]
    body = body_of(eqn)

    def ops(outer, inner):
        return tuple(RegionArray(None, (), tuple(o.aval.shape), tuple(i.aval.shape), o.aval.dtype)
                     for o, i in zip(outer, inner, strict=True))
    return RegionSettings(name, name[len(PREFIX):name.index("]")], mesh,
                      ops(eqn.invars, body.invars), ops(eqn.outvars, body.outvars))


def body_of(eqn):
    body = eqn.params["jaxpr"]
    return body.jaxpr if isinstance(body, jcore.ClosedJaxpr) else body


def aval_text(shape: tuple, dtype) -> str:
    return jax.core.ShapedArray(tuple(shape), dtype).str_short(short_dtypes=True)
