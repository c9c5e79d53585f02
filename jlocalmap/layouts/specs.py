"""Translation between DTensor placement lists and JAX ``PartitionSpec``\\ s.

A placement list is per *mesh axis*; a ``PartitionSpec`` is per *tensor dim*.
``[Shard(0), Shard(0)]`` on mesh ``(a, b)`` is ``P(('a', 'b'))`` (the earlier mesh
axis is the outer split), ``Partial('sum')`` on axis ``a`` is JAX's
``unreduced={'a'}`` (Explicit axes only). See docs/placements.md.

Example:
    >>> import jax, jlocalmap as jlm
    >>> mesh = jax.sharding.AbstractMesh((2, 4), ("a", "b"))
    >>> jlm.placements_to_spec([jlm.Shard(1), jlm.Shard(0)], mesh, ndim=2)
    P('b', 'a')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.sharding import PartitionSpec

from jlocalmap.errors import PlacementTypeError, PlacementValueError
from jlocalmap.layouts.meshes import (
    AnyMesh,
    axis_sizes,
    axis_type,
    check_mesh,
    is_explicit,
)
from jlocalmap.layouts.placements import (
    Partial,
    Placement,
    PlacementList,
    Placements,
    Replicate,
    Shard,
)


def as_placement_list(placements: Any, mesh: AnyMesh, what: str) -> PlacementList:
    """Validate one placement list for ``mesh``: a list or tuple of Placement
    objects, one per mesh axis. ``what`` names the argument in errors.

    Example:
        >>> import jax, jlocalmap as jlm
        >>> from jlocalmap.layouts.specs import as_placement_list
        >>> mesh = jax.sharding.AbstractMesh((2,), ("a",))
        >>> as_placement_list([jlm.Replicate()], mesh, "in_placements[0]")
        (Replicate(),)
    """
    if isinstance(placements, Placement):
        placements = (placements,)
    if not isinstance(placements, (list, tuple)) or not all(
            isinstance(p, Placement) for p in placements):
        raise PlacementTypeError(
            f"{what}: expected a list or tuple of jlocalmap placements (Shard(d), "
            f"Replicate(), Partial(op)), one per mesh axis {tuple(mesh.axis_names)}, "
            f"found {placements!r}; write e.g. {[Replicate()] * len(mesh.axis_names)}.")
    if len(placements) != len(mesh.axis_names):
        raise PlacementValueError(
            f"{what}: expected {len(mesh.axis_names)} placements, one per mesh axis "
            f"{tuple(mesh.axis_names)}, found {len(placements)}: {list(placements)}; "
            f"give one Shard(d), Replicate() or Partial() per mesh axis.")
    return tuple(placements)


def normalize_dim(dim: int, ndim: int, what: str) -> int:
    """Resolve a possibly negative tensor dim against ``ndim``; raise when out of range."""
    if not -ndim <= dim < ndim:
        valid = (f"valid dims are {-ndim}..{ndim - 1}" if ndim else
                 "a scalar has no dims to shard")
        raise PlacementValueError(
            f"{what}: Shard(dim={dim}) is out of range for a value of rank {ndim} "
            f"({valid}); shard an existing dim or use Replicate().")
    return dim % ndim


def normalize_placements(placements: Sequence[Placement], ndim: int,
                         what: str = "placements") -> PlacementList:
    """``placements`` with negative Shard dims counted from the end of a value of
    rank ``ndim``, so equal layouts compare equal.

    Example:
        >>> import jlocalmap as jlm
        >>> from jlocalmap.layouts.specs import normalize_placements
        >>> normalize_placements([jlm.Shard(-1), jlm.Replicate()], 3)
        (Shard(dim=2), Replicate())
    """
    return tuple(Shard(normalize_dim(p.dim, ndim, what)) if isinstance(p, Shard) else p
                 for p in placements)


def placements_to_spec(placements: Placements, device_mesh: AnyMesh,
                       ndim: int, *, what: str = "placements") -> PartitionSpec:
    """The ``PartitionSpec`` of a value of rank ``ndim`` laid out by ``placements``.

    ``Partial('sum')`` and ``Partial('avg')`` become unreduced axes (both store the
    partial *sums*; see docs/placements.md); ``Partial('max'|'min')`` has no JAX
    layout and is refused here. On a mesh axis of size 1 every Partial is the
    replicated value.

    Example:
        >>> import jax, jlocalmap as jlm
        >>> mesh = jax.sharding.AbstractMesh((2, 2), ("a", "b"))
        >>> jlm.placements_to_spec([jlm.Shard(0), jlm.Shard(0)], mesh, ndim=1)
        P(('a', 'b'),)
    """
    mesh = check_mesh(device_mesh)
    placements = as_placement_list(placements, mesh, what)
    per_dim: list[list[str]] = [[] for _ in range(ndim)]
    unreduced = []
    for axis, p in zip(mesh.axis_names, placements, strict=True):
        if isinstance(p, Shard):
            per_dim[normalize_dim(p.dim, ndim, what)].append(axis)
        elif isinstance(p, Partial) and axis_sizes(mesh)[axis] > 1:
            # On an axis of size 1 the one partial value is the value: Replicate.
            if p.reduce_op not in ("sum", "avg"):
                raise PlacementValueError(
                    f"{what}: Partial({p.reduce_op}) on mesh axis {axis!r} has no JAX "
                    f"layout (JAX's unreduced values are sums); reduce it first "
                    f"(redistribute to Replicate()) or use Partial('sum').")
            if not is_explicit(mesh, axis):
                raise PlacementValueError(
                    f"{what}: Partial() on mesh axis {axis!r} needs an Explicit axis, "
                    f"found {axis_type(mesh, axis)}; JAX "
                    f"holds partial values only as unreduced arrays on Explicit axes. "
                    f"Build the mesh with jax.make_mesh(..., axis_types=(AxisType.Explicit, ...)) "
                    f"or redistribute to Replicate() inside the body (jax.lax.psum).")
            unreduced.append(axis)
    entries = [None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
               for axes in per_dim]
    return PartitionSpec(*entries, unreduced=frozenset(unreduced))


def spec_entries(spec: PartitionSpec) -> tuple:
    """The per-dim entries of ``spec`` (without its unreduced set)."""
    return tuple(spec.partitions)


def format_spec(spec: PartitionSpec) -> str:
    """``spec`` as text that reads the same on every jax version (newer ones add
    an ``unreduced_kind`` to the repr).

    Example:
        >>> import jax
        >>> from jlocalmap.inspect import format_spec
        >>> format_spec(jax.P("tp", None, unreduced={"dp"}))
        "P('tp', None, unreduced={'dp'})"
    """
    parts = [repr(e) for e in spec_entries(spec)]
    if spec.unreduced:
        parts.append("unreduced={" + ", ".join(repr(a) for a in sorted(spec.unreduced)) + "}")
    return f"P({', '.join(parts)}{',' if len(parts) == 1 and not spec.unreduced else ''})"


def spec_to_placements(spec: PartitionSpec, device_mesh: AnyMesh) -> PlacementList:
    """The placement list of a value laid out by ``spec`` (the inverse of
    :func:`placements_to_spec`; unreduced axes read as ``Partial('sum')``).

    Example:
        >>> import jax, jlocalmap as jlm
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.sharding.AbstractMesh((2, 2), ("a", "b"))
        >>> jlm.spec_to_placements(P(None, "b"), mesh)
        (Replicate(), Shard(dim=1))
    """
    mesh = check_mesh(device_mesh)
    if not isinstance(spec, PartitionSpec):
        raise PlacementTypeError(
            f"spec: expected a jax.sharding.PartitionSpec, found {type(spec).__name__}; "
            f"write e.g. PartitionSpec('dp', None).")
    placements: dict[str, Placement] = {a: Replicate() for a in mesh.axis_names}
    seen: set[str] = set()
    for dim, entry in enumerate(spec_entries(spec)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        order = [mesh.axis_names.index(a) for a in axes if a in mesh.axis_names]
        if order != sorted(order):
            raise PlacementValueError(
                f"spec: dim {dim} is split by mesh axes {axes} in an order other than "
                f"the mesh's {tuple(mesh.axis_names)}; DTensor placements express only "
                f"mesh-order splits. Reshard to PartitionSpec({tuple(sorted(axes, key=mesh.axis_names.index))}).")
        for a in axes:
            if a in seen:
                raise PlacementValueError(
                    f"spec: mesh axis {a!r} appears twice in {format_spec(spec)}; a mesh "
                    f"axis splits at most one dim, once. Name each axis once.")
            seen.add(a)
            if a not in placements:
                raise PlacementValueError(
                    f"spec: names mesh axis {a!r}, which mesh {tuple(mesh.axis_names)} "
                    f"does not have; use the mesh the value lives on.")
            placements[a] = Shard(dim)
    for a in getattr(spec, "unreduced", ()):
        placements[a] = Partial("sum")
    return tuple(placements[a] for a in mesh.axis_names)


def local_shape(global_shape: Sequence[int], placements: Sequence[Placement],
                mesh: AnyMesh, *, what: str = "placements") -> tuple[int, ...]:
    """The per-device shape of a value of ``global_shape`` laid out by
    ``placements``; raises when a sharded dim is not divisible.

    Example:
        >>> import jax, jlocalmap as jlm
        >>> from jlocalmap.layouts.specs import local_shape
        >>> mesh = jax.sharding.AbstractMesh((2, 4), ("a", "b"))
        >>> local_shape((8, 8), [jlm.Shard(0), jlm.Shard(1)], mesh)
        (4, 2)
    """
    shape = list(global_shape)
    for axis, p in zip(mesh.axis_names, placements, strict=True):
        if isinstance(p, Shard):
            d = normalize_dim(p.dim, len(shape), what)
            n = axis_sizes(mesh)[axis]
            if shape[d] % n:
                raise PlacementValueError(
                    f"{what}: dim {d} of size {global_shape[d]} (global shape "
                    f"{tuple(global_shape)}) does not divide evenly over mesh axis "
                    f"{axis!r} of size {n} after the earlier splits, so it has no even "
                    f"layout; jlocalmap.layouts.uneven.padded_shape gives the padded shape of "
                    f"this uneven layout.")
            shape[d] //= n
    return tuple(shape)
