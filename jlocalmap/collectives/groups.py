"""Process groups for collectives: torch's ``group`` argument, as JAX mesh axes.

A group is the set of devices a collective runs among. In torch it is a process
group or ``(device_mesh, mesh_dim)``; inside ``jax.shard_map`` it is a tuple of
manual mesh axis names, and the devices that share coordinates on every other
axis form one group. The tuple's order is the rank order: the first axis is the
major one, as in ``jax.lax`` (a mesh's own axes are in mesh order, which is
torch's rank order on a ``DeviceMesh``).

Example:
    >>> import jax
    >>> from jlocalmap.collectives.groups import group_axes
    >>> mesh = jax.make_mesh((2, 4), ("dp", "tp"))
    >>> group_axes(mesh), group_axes((mesh, 1)), group_axes("dp")
    (('dp', 'tp'), ('tp',), ('dp',))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import jax
from jax.sharding import AbstractMesh, Mesh

from jlocalmap._jax_compat import manual_axes
from jlocalmap.errors import LocalMapTypeError, LocalMapValueError
from jlocalmap.layouts.specs import AnyMesh, axis_sizes

GroupLike = Union[AnyMesh, str, Sequence[str], "tuple[AnyMesh, Union[int, str]]"]

_FORMS = ("a Mesh (all its axes), an axis name 'tp', a tuple of axis names "
          "('dp', 'tp'), or (mesh, mesh_dim) with mesh_dim an int or axis name")


def _mesh_dim(mesh: AnyMesh, dim: object, what: str) -> str:
    names = tuple(mesh.axis_names)
    if isinstance(dim, str) and dim in names:
        return dim
    if isinstance(dim, int) and not isinstance(dim, bool) and -len(names) <= dim < len(names):
        return names[dim]
    raise LocalMapValueError(
        f"{what}: (mesh, mesh_dim) expected mesh_dim to be an index in "
        f"{-len(names)}..{len(names) - 1} or one of the axis names {names}, found "
        f"{dim!r}; write e.g. (mesh, {names[-1]!r}).")


def group_axes(group: GroupLike, what: str = "group") -> tuple[str, ...]:
    """The mesh axis names, major first, that ``group`` names: every axis of a
    ``Mesh``/``AbstractMesh``, one axis name, a tuple of them, or torch's
    ``(device_mesh, mesh_dim)`` with an axis index or name.

    Example:
        >>> import jax
        >>> from jlocalmap.collectives.groups import group_axes
        >>> mesh = jax.make_mesh((2, 2, 2), ("dp", "tp", "cp"))
        >>> group_axes((mesh, "cp")), group_axes(("cp", "dp"))
        (('cp',), ('cp', 'dp'))
    """
    if isinstance(group, (Mesh, AbstractMesh)):
        return tuple(group.axis_names)
    if isinstance(group, str):
        return (group,)
    if isinstance(group, tuple) and len(group) == 2 and isinstance(group[0], (Mesh, AbstractMesh)):
        return (_mesh_dim(group[0], group[1], what),)
    if isinstance(group, (tuple, list)) and group and all(isinstance(a, str) for a in group):
        if len(set(group)) != len(group):
            raise LocalMapValueError(
                f"{what}: expected distinct mesh axis names, found {tuple(group)}; "
                f"name each axis once.")
        return tuple(group)
    raise LocalMapTypeError(
        f"{what}: expected {_FORMS}; found {group!r} of type {type(group).__name__}. "
        f"Lists of ranks are not groups here: name the mesh axes instead.")


def manual_group_axes(group: GroupLike, what: str = "group") -> tuple[str, ...]:
    """:func:`group_axes`, checked where a collective is traced: every axis must
    be manual here (inside a ``local_map`` body or ``jax.shard_map``), and a
    mesh given as the group must have the sizes of the mesh being mapped over.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jlocalmap.collectives.groups import manual_group_axes
        >>> mesh = jax.make_mesh((2, 4), ("dp", "tp"))
        >>> def body(x):
        ...     print(manual_group_axes((mesh, 1)))
        ...     return x
        >>> _ = jax.eval_shape(jax.shard_map(body, mesh=mesh, in_specs=jax.P(),
        ...                                  out_specs=jax.P()), jnp.zeros(2))
        ('tp',)
    """
    axes = group_axes(group, what)
    manual = manual_axes()
    unbound = [a for a in axes if a not in manual]
    if unbound:
        where = (f"the manual axes here are {tuple(sorted(manual))}" if manual else
                 "no mesh axis is manual here (this is not inside a local_map body)")
        raise LocalMapValueError(
            f"{what}: collectives run over manual mesh axes, found axes {unbound} "
            f"that are not, and {where}; call the collective inside the body of a "
            f"jlocalmap.local_map (or jax.shard_map) over a mesh with those axes.")
    if isinstance(group, tuple) and isinstance(group[0], (Mesh, AbstractMesh)):
        group = group[0]
    if isinstance(group, (Mesh, AbstractMesh)):
        here = axis_sizes(jax.sharding.get_abstract_mesh())
        given = axis_sizes(group)
        if any(given[a] != here[a] for a in axes):
            raise LocalMapValueError(
                f"{what}: the mesh given has axis sizes {given}, but the body runs on "
                f"a mesh with sizes {here}; pass the local_map's own mesh.")
    return axes
