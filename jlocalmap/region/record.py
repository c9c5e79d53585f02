"""What a region is: its settings (:class:`RegionSettings`, one
:class:`RegionArray` per array operand), which ``local_map`` puts into the
program with the region (``region.marker``) and :func:`region_settings`
reads back from an equation.

Example:
    >>> import jax, jax.numpy as jnp, jlocalmap as jlm
    >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
    >>> f = jlm.local_map(jnp.cos, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
    >>> jaxpr = jax.make_jaxpr(f)(jax.ShapeDtypeStruct((8,), jnp.float32)).jaxpr
    >>> [str(s.inputs[0]) for s in map(jlm.inspect.region_settings, jaxpr.eqns) if s is not None]
    ['[0] f32[8] S(0) -> local f32[2]']
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np

from jlocalmap._jax_compat import shard_map_parts
from jlocalmap.layouts.meshes import AnyMesh
from jlocalmap.layouts.placements import PlacementList, compact
from jlocalmap.region.marker import marker_of


@dataclasses.dataclass(frozen=True)
class RegionArray:
    """One array input or output of a region.

    ``index`` is the leaf's position among the call's flattened arguments (or
    the body's flattened outputs); ``global_shape`` is the value's logical shape
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
    index: int
    placements: PlacementList
    global_shape: tuple
    local_shape: tuple
    dtype: np.dtype
    grad_placements: Optional[PlacementList] = None

    def __str__(self) -> str:
        grad = "" if self.grad_placements is None else f"  grad {compact(self.grad_placements)}"
        return (f"[{self.index}] {aval_text(self.global_shape, self.dtype)} "
                f"{compact(self.placements)} -> local {aval_text(self.local_shape, self.dtype)}{grad}")


@dataclasses.dataclass(frozen=True)
class RegionSettings:
    """A region's settings, as ``local_map`` puts them into the program with
    the region (read back by :func:`region_settings` and
    :func:`~jlocalmap.inspect.regions`).

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


def region_settings(eqn: Any) -> Optional[RegionSettings]:
    """The settings of the ``local_map`` call a jaxpr equation stages (name,
    function, mesh, operands with placements and shapes), or None for any other
    equation: how tools walking their own jaxprs find every region.

    The settings are read from the equation itself (the marker ``local_map``
    puts in every region body, see ``region.marker``), so the answer does not
    depend on what was traced before. JAX's backward and recomputed equations
    of a region are not calls: None.

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
        >>> f = jlm.local_map(jnp.cos, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> jaxpr = jax.make_jaxpr(f)(jax.ShapeDtypeStruct((8,), jnp.float32)).jaxpr
        >>> [(s.func_name, s.inputs[0].placements, s.inputs[0].local_shape)
        ...  for s in map(jlm.inspect.region_settings, jaxpr.eqns) if s is not None]
        [('cos', (Shard(dim=0),), (2,))]
    """
    marker = marker_of(eqn)
    return marker.settings if marker is not None and marker.role == "forward" else None


def body_of(eqn) -> Any:
    """A region equation's body (open jaxpr, local shapes)."""
    return shard_map_parts(eqn)[1]


def aval_text(shape: tuple, dtype) -> str:
    return jax.core.ShapedArray(tuple(shape), dtype).str_short(short_dtypes=True)
