"""Mesh facts jlocalmap reads everywhere: axis sizes and types, whether two
meshes are the same, and entering a mesh for an eager call.

Example:
    >>> import jax
    >>> from jlocalmap.layouts.meshes import axis_sizes
    >>> axis_sizes(jax.sharding.AbstractMesh((2, 4), ("dp", "tp")))
    {'dp': 2, 'tp': 4}
"""

from __future__ import annotations

import contextlib
from typing import Any, Union

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh

from jlocalmap.errors import PlacementTypeError

AnyMesh = Union[Mesh, AbstractMesh]


def check_mesh(mesh: Any, what: str = "device_mesh") -> AnyMesh:
    """Return ``mesh`` if it is a ``jax.sharding.Mesh`` or ``AbstractMesh``; else raise.

    Example:
        >>> import jax
        >>> from jlocalmap.layouts.meshes import check_mesh
        >>> check_mesh(jax.sharding.AbstractMesh((2,), ("dp",))).axis_names
        ('dp',)
    """
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise PlacementTypeError(
            f"{what}: expected a jax.sharding.Mesh or AbstractMesh, found "
            f"{type(mesh).__name__}; build one with jax.make_mesh((2, 4), ('dp', 'tp')).")
    return mesh


def axis_sizes(mesh: AnyMesh) -> dict[str, int]:
    """Mesh axis name -> size, in mesh order."""
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def is_explicit(mesh: AnyMesh, axis: str) -> bool:
    """Whether ``axis`` of ``mesh`` is an Explicit axis (the only kind that carries
    unreduced, i.e. Partial, values)."""
    return axis_type(mesh, axis) == AxisType.Explicit


def axis_type(mesh: AnyMesh, axis: str) -> AxisType:
    """The type (Explicit, Auto, Manual) of ``axis`` of ``mesh``."""
    return dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[axis]


def abstract(mesh: AnyMesh) -> AbstractMesh:
    """The abstract mesh (names, sizes, axis types) of a Mesh or AbstractMesh."""
    return mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh


def same_mesh(a: AnyMesh, b: AnyMesh) -> bool:
    """Meshes are the same when their axes match and, where both are concrete,
    their devices too."""
    if isinstance(a, Mesh) and isinstance(b, Mesh):
        return a == b
    return abstract(a) == abstract(b)


def describe_mesh(mesh: AnyMesh) -> str:
    """A mesh's repr, with its device ids where it has devices (two meshes with
    the same axes differ only there)."""
    if isinstance(mesh, Mesh):
        return f"{mesh} over devices {mesh.device_ids.tolist()}"
    return str(mesh)


@contextlib.contextmanager
def mesh_context(mesh: AnyMesh):
    """Enter ``mesh`` for an eager call: jitted code that reshards host values
    onto Explicit axes needs the concrete mesh in context. Inside a trace the
    caller's context applies (JAX refuses ``set_mesh`` there)."""
    if not isinstance(mesh, Mesh) or jax.sharding.get_abstract_mesh() == mesh.abstract_mesh:
        yield
        return
    try:
        context = jax.set_mesh(mesh)
    except ValueError:
        yield
        return
    with context:
        yield
