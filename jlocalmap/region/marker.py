"""Region markers: each region's settings carried in the program itself.

``local_map`` ends every region body with one ``local_map_region`` equation:
an identity on the body's outputs whose parameters hold the region's
:class:`~jlocalmap.inspect.RegionSettings` and a role. JAX's transformations
carry it like any other primitive, and its rules set the role:

* ``forward``: the call as staged, and the primal part of ``jax.jvp``;
* ``tangent``: the tangents of its outputs (``jax.jvp``, ``jax.linearize``);
* ``backward``: those tangents transposed, in the backward pass;
* ``recompute``: the copy ``jax.checkpoint`` reruns in the backward pass.

So a region is read from the equation that stages it, whatever the process
traced before. The marker lowers to nothing: the region's name stays as HLO
metadata (``jax.named_scope``) for profilers.

Example:
    >>> import jax, jax.numpy as jnp, jlocalmap as jlm
    >>> from jlocalmap.region.marker import marker_of
    >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
    >>> f = jlm.local_map(jnp.sin, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
    >>> x = jax.ShapeDtypeStruct((8,), jnp.float32)
    >>> eqns = jax.make_jaxpr(jax.grad(lambda x: f(x).sum()))(x).jaxpr.eqns
    >>> [m.role for m in map(marker_of, eqns) if m is not None]
    ['forward', 'backward']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from jax.extend import core as jcore

from jlocalmap._jax_compat import (
    is_high,
    is_zero_tangent,
    register_identity_rules,
    saved_by_policy,
    shard_map_parts,
    sub_jaxprs,
)

if TYPE_CHECKING:
    from jlocalmap.region.record import RegionSettings

# Which role a transformation gives a marked value: tangents and cotangents
# alternate under transpose; a JVP of any role is a tangent.
_TRANSPOSED = {"tangent": "backward", "backward": "tangent"}
_PRECEDENCE = ("forward", "backward", "recompute", "tangent")


@dataclasses.dataclass(frozen=True)
class RegionTag:
    """The region's settings as an equation parameter (compared by value,
    printed in jaxprs as the region's name)."""
    settings: RegionSettings

    def __repr__(self) -> str:
        return self.settings.name

    __str__ = __repr__


@dataclasses.dataclass(frozen=True)
class Marker:
    """What a region equation's marker says: the settings, the role of the
    equation (see the module doc), and for each marked value its position
    among ``settings.outputs``."""
    settings: RegionSettings
    role: str
    positions: tuple[int, ...]


region_p = jcore.Primitive("local_map_region")


def mark(values: Sequence[Any], settings: RegionSettings) -> list:
    """``values`` (a region body's outputs, one per ``settings.outputs``), marked
    as the region's: call inside the body, last. Values of JAX's hijax types
    (jax 0.12's unreduced Partial outputs) pass unmarked."""
    positions = tuple(k for k, v in enumerate(values) if not is_high(v))
    out = list(values)
    marked = region_p.bind(*[values[k] for k in positions], tag=RegionTag(settings),
                           role="forward", positions=positions)
    for k, v in zip(positions, marked, strict=True):
        out[k] = v
    return out


def _bind_live(values: Sequence[Any], role: str, tag: RegionTag,
               positions: tuple[int, ...]) -> list:
    """Mark the values that are not symbolic zeros (tangents, cotangents)."""
    live = [k for k, v in enumerate(values) if not is_zero_tangent(v)]
    out = list(values)
    if live:
        marked = region_p.bind(*[values[k] for k in live], tag=tag, role=role,
                               positions=tuple(positions[k] for k in live))
        for k, v in zip(live, marked, strict=True):
            out[k] = v
    return out


def _jvp(primals, tangents, *, tag, role, positions):
    out = region_p.bind(*primals, tag=tag, role=role, positions=positions)
    return out, _bind_live(tangents, "tangent", tag, positions)


def _transpose(cts, *operands, tag, role, positions):
    return _bind_live(cts, _TRANSPOSED.get(role, "backward"), tag, positions)


def _dce(used_outputs: list[bool], eqn):
    """Drop unused marked values; a forward or recompute marker stays even
    with none used (the forward pass of ``jax.grad`` often drops the primal
    outputs, a recomputation always), so the region keeps its identity."""
    keep = [k for k, used in enumerate(used_outputs) if used]
    if not keep and eqn.params["role"] not in ("forward", "recompute"):
        return [False] * len(eqn.invars), None
    positions = tuple(eqn.params["positions"][k] for k in keep)
    return list(used_outputs), eqn.replace(
        invars=[eqn.invars[k] for k in keep], outvars=[eqn.outvars[k] for k in keep],
        params=dict(eqn.params, positions=positions))


def _partial_eval(saveable, unknown_in, instantiated_in, eqn):
    """``jax.checkpoint``'s split: a known forward marker stays in the forward
    pass, and a copy marked ``recompute`` goes with the recomputation unless
    the policy saves the outputs."""
    n = len(eqn.invars)
    needed = [v for v, inst in zip(eqn.invars, instantiated_in, strict=True)
              if not inst and isinstance(v, jcore.Var)]
    if any(unknown_in):
        return None, eqn, [True] * n, [True] * n, needed
    if eqn.params["role"] != "forward" or saved_by_policy(saveable, eqn):
        return eqn, None, [False] * n, [False] * n, []
    recompute = eqn.replace(params=dict(eqn.params, role="recompute"))
    return eqn, recompute, [False] * n, [True] * n, needed


register_identity_rules(region_p, _jvp, _transpose, _dce, _partial_eval)


def _markers(jaxpr) -> list:
    """The marker equations of a region body (looking into calls, not into
    nested regions)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is region_p:
            found.append(eqn)
        elif eqn.primitive.name != "shard_map":
            for sub in sub_jaxprs(eqn):
                found += _markers(sub)
    return found


def marker_of(eqn: Any) -> Optional[Marker]:
    """The marker of a region equation (a ``shard_map`` whose body ``local_map``
    marked), or None for any other equation. A body with several markers (a
    JVP has forward and tangent ones) takes the role that comes first in
    forward, backward, recompute, tangent.

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> from jlocalmap.region.marker import marker_of
        >>> mesh = jax.sharding.AbstractMesh((2,), ("tp",))
        >>> f = jlm.local_map(jnp.cos, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> eqns = jax.make_jaxpr(f)(jax.ShapeDtypeStruct((4,), jnp.float32)).jaxpr.eqns
        >>> [m] = [m for m in map(marker_of, eqns) if m is not None]
        >>> m.role, m.settings.func_name, m.positions
        ('forward', 'cos', (0,))
    """
    if getattr(getattr(eqn, "primitive", None), "name", None) != "shard_map":
        return None
    found = _markers(shard_map_parts(eqn)[1])
    if not found:
        return None
    best = min(found, key=lambda e: _PRECEDENCE.index(e.params["role"]))
    return Marker(best.params["tag"].settings, best.params["role"], best.params["positions"])
