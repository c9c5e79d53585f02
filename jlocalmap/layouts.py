"""Where a value lives: reading a value's mesh and placements, and moving it
between layouts (``distribute_tensor``, ``redistribute``, ``full_tensor``).

Partial values are stored the way JAX stores them: as *unreduced* arrays whose
true value is the sum of the per-device values. ``Partial('avg')`` is a view of
the same storage (see docs/placements.md), so sum and avg convert for free.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> mesh = jax.make_mesh((1,), ("dp",))
    >>> x = jlm.distribute_tensor(np.arange(4.0), mesh, [jlm.Shard(0)])
    >>> jlm.placements_of(x)
    (Shard(dim=0),)
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from jlocalmap.errors import PlacementTypeError, PlacementValueError
from jlocalmap.placements import Partial, Placement, PlacementList, Replicate, Shard
from jlocalmap.uneven import UnevenArray, pad, uneven_dims, unpad
from jlocalmap.specs import (AnyMesh, as_placement_list, axis_sizes, check_mesh,
                             normalize_placements,
                             is_explicit, local_shape, placements_to_spec,
                             spec_entries, spec_to_placements)


def abstract(mesh: AnyMesh) -> AbstractMesh:
    """The abstract mesh (names, sizes, axis types) of a Mesh or AbstractMesh."""
    return mesh.abstract_mesh if isinstance(mesh, Mesh) else mesh


def same_mesh(a: AnyMesh, b: AnyMesh) -> bool:
    """Meshes are the same when their axes match and, where both are concrete,
    their devices too."""
    if isinstance(a, Mesh) and isinstance(b, Mesh):
        return a == b
    return abstract(a) == abstract(b)


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


def describe_mesh(mesh: AnyMesh) -> str:
    """A mesh's repr, with its device ids where it has devices (two meshes with
    the same axes differ only there)."""
    if isinstance(mesh, Mesh):
        return f"{mesh} over devices {mesh.device_ids.tolist()}"
    return str(mesh)


def mesh_of(x: Any) -> Optional[AnyMesh]:
    """The mesh a distributed value lives on, or None for a host or single-device
    value. Tracers report the abstract mesh of their type."""
    if isinstance(x, UnevenArray):
        return x.mesh
    if isinstance(x, jax.core.Tracer):
        sharding = getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        return None if mesh is None or mesh.empty else mesh
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding):
        return x.sharding.mesh
    return None


def reexpress(x: Any, mesh: AnyMesh,
              preferred: Optional[PlacementList] = None) -> Optional[jax.Array]:
    """``x``, committed on another mesh over the same devices, as an array on
    ``mesh`` with the same device-to-index map (no data moves), or None when no
    placement list of ``mesh`` gives that map. ``preferred`` is tried first.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> from jlocalmap.layouts import reexpress
        >>> line = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
        >>> grid = jax.make_mesh((2, 2), ("a", "b"), devices=jax.devices()[:4])
        >>> x = jlm.distribute_tensor(np.ones((8, 32)), line, [jlm.Shard(1)])
        >>> jlm.placements_of(reexpress(x, grid))
        (Shard(dim=1), Shard(dim=1))
    """
    if isinstance(x, (jax.core.Tracer, UnevenArray)) or not isinstance(mesh, Mesh):
        return None  # tracers carry no devices to compare; uneven values move whole
    if set(x.sharding.device_set) != set(mesh.devices.flat) or x.sharding.spec.unreduced:
        return None
    options = [Replicate()] + [Shard(d) for d in range(x.ndim)]
    candidates = itertools.product(options, repeat=len(mesh.axis_names))
    for placements in itertools.chain([preferred] if preferred else [], candidates):
        try:
            local_shape(x.shape, placements, mesh)
            sharding = NamedSharding(mesh, placements_to_spec(placements, mesh, x.ndim))
        except PlacementValueError:
            continue
        if sharding.is_equivalent_to(x.sharding, x.ndim):
            return jax.device_put(x, sharding)
    return None


def known_placements(x: Any, mesh: AnyMesh) -> Optional[PlacementList]:
    """The placements of distributed ``x`` where JAX knows them: committed arrays,
    and tracers on Explicit axes. None on Auto axes under ``jax.jit``."""
    if isinstance(x, UnevenArray):
        return x.placements
    if isinstance(x, jax.core.Tracer):
        if not all(is_explicit(mesh, a) for a in mesh.axis_names):
            return None
        return spec_to_placements(jax.typeof(x).sharding.spec, mesh)
    return spec_to_placements(x.sharding.spec, mesh)


def placements_of(x: Any, device_mesh: Optional[AnyMesh] = None) -> PlacementList:
    """The placement list of a distributed value (one entry per mesh axis).

    Unreduced axes read as ``Partial('sum')``. Raises for host values, for values
    on another mesh than ``device_mesh``, and under ``jax.jit`` on Auto axes
    (where JAX does not track shardings in types).

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((1, 1), ("dp", "tp"))
        >>> x = jlm.distribute_tensor(np.ones((2, 2)), mesh, [jlm.Replicate(), jlm.Shard(1)])
        >>> jlm.placements_of(x)
        (Replicate(), Shard(dim=1))
    """
    mesh = mesh_of(x)
    if mesh is None:
        raise PlacementValueError(
            f"x: expected a value distributed on a mesh (a jax.Array with a "
            f"NamedSharding), found {type(x).__name__} with no mesh; place it "
            f"first with jlocalmap.distribute_tensor(x, mesh, placements).")
    if device_mesh is not None and not same_mesh(mesh, check_mesh(device_mesh)):
        raise PlacementValueError(
            f"device_mesh: x lives on {mesh}, not on the given {device_mesh}; "
            f"pass x's own mesh or move x with jax.device_put.")
    placements = known_placements(x, mesh)
    if placements is None:
        raise PlacementValueError(
            f"x: its placements on Auto-axis mesh {mesh} are not known under "
            f"jax.jit; use a mesh with Explicit axes (the default of jax.make_mesh).")
    return placements


def canonical(placements: Sequence[Placement], mesh: AnyMesh,
              shape: Optional[Sequence[int]] = None) -> PlacementList:
    """Placements as stored: ``Partial('avg')`` is stored as ``Partial('sum')``,
    and a Partial on an axis of size 1, or of a value of ``shape`` with no
    elements, is the replicated value (newer JAX cannot hold empty unreduced
    arrays, and an empty value has no summands)."""
    sizes = axis_sizes(mesh)
    empty = shape is not None and is_empty(shape)
    return tuple(Replicate() if p.is_partial() and (sizes[a] == 1 or empty)
                 else Partial("sum") if p == Partial("avg") else p
                 for a, p in zip(mesh.axis_names, placements))


def is_empty(shape: Sequence[int]) -> bool:
    """Whether a value of ``shape`` has no elements (symbolic dims are not 0)."""
    return any(isinstance(n, (int, np.integer)) and n == 0 for n in shape)


def partial_axes(placements: Sequence[Placement], mesh: AnyMesh) -> tuple[str, ...]:
    """The mesh axes on which ``placements`` is stored as Partial, in mesh order."""
    return tuple(a for a, p in zip(mesh.axis_names, canonical(placements, mesh))
                 if p.is_partial())


def avg_scale(placements: Sequence[Placement], mesh: AnyMesh) -> int:
    """How many devices an avg-partial value is averaged over: its stored sums
    times this number are the per-device values of the avg view."""
    sizes = axis_sizes(mesh)
    return math.prod(sizes[a] for a, p in zip(mesh.axis_names, placements)
                     if p == Partial("avg"))


def _constrain(x: jax.Array, mesh: AnyMesh, spec: PartitionSpec,
               carry_devices: bool = True) -> jax.Array:
    sharding = NamedSharding(mesh, spec)
    if any(is_explicit(mesh, a) for a in mesh.axis_names):
        if isinstance(mesh, Mesh) and mesh_of(x) is None and (
                carry_devices or not isinstance(x, jax.core.Tracer) or is_empty(x.shape)):
            # A host value: device_put carries the devices, so a jax.jit with no
            # other distributed value still knows where the program runs. Its
            # transpose leaves a traced value's cotangent in the target layout
            # (not the value's type), so where a region already carries the
            # devices (carry_devices=False), traced values take reshard.
            return jax.device_put(x, sharding)
        return jax.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def stack_summands(x: jax.Array, mesh: AnyMesh, spec: PartitionSpec,
                    axes: tuple[str, ...]) -> tuple[jax.Array, PartitionSpec]:
    """Re-express an unreduced value as its per-device summands, stacked on a new
    leading dim over the Partial axes (no data moves), so a body can take them.

    The cotangent of an unreduced value is a replicated ("reduced") one: each
    summand's cotangent is the cotangent of the sum. They are equal for bodies
    linear in the partial input; their mean is taken, so the result is exact then
    and well defined otherwise."""
    entries = spec_entries(spec)
    stacked_spec = PartitionSpec(axes if len(axes) > 1 else axes[0], *entries)
    reduced = NamedSharding(mesh, PartitionSpec(*entries, reduced=frozenset(axes)))
    stack = jax.shard_map(lambda u: u[None], mesh=mesh, in_specs=spec,
                          out_specs=stacked_spec, check_vma=False)

    @jax.custom_vjp
    def stack_summands(u):
        return stack(u)

    def backward(_, ct):
        return (jax.reshard(jnp.mean(ct, 0), reduced),)

    stack_summands.defvjp(lambda u: (stack(u), None), backward)
    return stack_summands(x), stacked_spec


def _partition(x: jax.Array, mesh: AnyMesh, spec: PartitionSpec,
               axes: tuple[str, ...]) -> jax.Array:
    """Replicate -> Partial('sum') on ``axes``: each device keeps value / n, so the
    sum is the value (DTensor's ``_partition_value``); integer and bool values stay
    whole on the first device of each group and are zero on the others. Axes that are Partial
    already are taken as summands first (JAX has no division of unreduced values)."""
    n = math.prod(axis_sizes(mesh)[a] for a in axes)
    partial_already = tuple(a for a in mesh.axis_names if a in set(spec.unreduced) - set(axes))
    in_spec = PartitionSpec(*spec_entries(spec), unreduced=frozenset(partial_already))
    if partial_already:
        x, in_spec = stack_summands(x, mesh, in_spec, partial_already)

    def split(v):
        v = jax.lax.pcast(v[0] if partial_already else v, axes, to="varying")
        if jnp.issubdtype(v.dtype, jnp.inexact):
            summand = v / jnp.asarray(n, v.dtype)
        else:  # integers cannot be split evenly: the first device keeps the value
            summand = jnp.where(jax.lax.axis_index(axes) == 0, v, jnp.zeros_like(v))
        all_partial = tuple(a for a in mesh.axis_names if a in set(axes) | set(partial_already))
        return jax.lax.pcast(summand, all_partial, to="unreduced")

    return jax.shard_map(split, mesh=mesh, in_specs=in_spec, out_specs=spec)(x)


def relayout(x: Any, mesh: AnyMesh, src: Optional[Sequence[Placement]],
             dst: Sequence[Placement], *, what: str = "placements",
             carry_devices: bool = True) -> jax.Array:
    """Move ``x`` from placements ``src`` (None: a global host value) to ``dst``;
    traceable. Partial -> Shard is one reduce-scatter, Partial -> Replicate one
    all-reduce; Partial targets are reached through Replicate. With
    ``carry_devices=False`` (the value feeds a region on the mesh, which tells
    the program its devices) a traced host value is resharded, so its
    cotangent comes back in its own type."""
    x = jnp.asarray(x)
    dst = as_placement_list(dst, mesh, what)
    local_shape(x.shape, dst, mesh, what=what)
    src = None if src is None else canonical(src, mesh, x.shape)
    target = canonical(dst, mesh, x.shape)
    if src == target:
        return x
    new_partials = tuple(a for a, p, q in zip(
        mesh.axis_names, target, src or [Replicate()] * len(target))
        if p.is_partial() and not q.is_partial())
    staged = tuple(Replicate() if a in new_partials else p
                   for a, p in zip(mesh.axis_names, target))
    staged_spec = placements_to_spec(staged, mesh, x.ndim, what=what)
    if src is not None:
        x = _scatter_partials(x, mesh, src, staged_spec)
    x = _constrain(x, mesh, staged_spec, carry_devices)
    if new_partials:
        x = _partition(x, mesh, placements_to_spec(dst, mesh, x.ndim, what=what),
                       new_partials)
    return x


def _scatter_partials(x: jax.Array, mesh: AnyMesh, src: PlacementList,
                      target: PartitionSpec) -> jax.Array:
    """Partial -> Shard(d) as a reduce-scatter (``psum_scatter``) where ``target``
    splits dim d by the axes that already split it followed by the scattered
    ones; other layouts are left for ``_constrain`` (an all-reduce, then a slice)."""
    spec = placements_to_spec(src, mesh, x.ndim)
    per_dim = [() if e is None else (e,) if isinstance(e, str) else tuple(e)
               for e in spec_entries(spec)]
    wanted = [() if e is None else (e,) if isinstance(e, str) else tuple(e)
              for e in spec_entries(target)]
    scatter = [(a, d) for d, axes in enumerate(wanted) for a in axes
               if a in spec.unreduced and axes[:len(per_dim[d])] == per_dim[d]
               and all(b in spec.unreduced for b in axes[len(per_dim[d]):])]
    if not scatter:
        return x
    for a, d in scatter:
        per_dim[d] = per_dim[d] + (a,)
    scattered = {a for a, _ in scatter}
    out_spec = PartitionSpec(*[None if not e else e[0] if len(e) == 1 else e for e in per_dim],
                             unreduced=frozenset(spec.unreduced) - scattered)

    by_dim: dict[int, tuple[str, ...]] = {}
    for a, d in scatter:
        by_dim[d] = by_dim.get(d, ()) + (a,)

    def reduce_scatter(u):
        for d, axes in by_dim.items():  # one collective per dim, axes in mesh order
            u = jax.lax.psum_scatter(u, axes, scatter_dimension=d, tiled=True)
        return u

    return jax.shard_map(reduce_scatter, mesh=mesh, in_specs=spec, out_specs=out_spec)(x)


@functools.lru_cache(maxsize=256)
def _jitted_relayout(mesh: AnyMesh, src: Optional[PlacementList],
                     dst: PlacementList, what: str):
    return jax.jit(functools.partial(relayout, mesh=mesh, src=src, dst=dst, what=what))


def run_relayout(x, mesh, src, dst, what):
    """``relayout`` eagerly (compiled once per layout change) or inline in a trace."""
    if isinstance(x, jax.core.Tracer):
        return relayout(x, mesh, src, dst, what=what)
    with mesh_context(mesh):
        return _jitted_relayout(mesh, src, tuple(dst), what)(x)


def distribute_tensor(x: Any, device_mesh: AnyMesh,
                      placements: Sequence[Placement]) -> jax.Array:
    """Lay the global value ``x`` (host array, number or jax.Array) out on
    ``device_mesh`` with ``placements``; works eagerly and under ``jax.jit``.

    ``Partial('sum')`` splits the value (each device holds ``x / n``), as DTensor does.
    Shards that do not divide evenly give an :class:`~jlocalmap.uneven.UnevenArray`
    with DTensor's chunk sizes (see docs/uneven.md).

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((1,), ("dp",))
        >>> x = jlm.distribute_tensor(np.arange(6.0).reshape(3, 2), mesh, [jlm.Shard(1)])
        >>> x.shape, x.sharding.spec
        ((3, 2), P(None, 'dp'))
    """
    mesh = check_mesh(device_mesh)
    dst = as_placement_list(placements, mesh, "placements")
    placements_to_spec(dst, mesh, np.ndim(x))
    dst = normalize_placements(dst, np.ndim(x))
    if mesh_of(x) is not None:
        x = full_tensor(x)
    dims = uneven_dims(np.shape(x), dst, mesh)
    if dims:
        padded = pad(jnp.asarray(x), dims)
        return UnevenArray(run_relayout(padded, mesh, None, dst, "placements"),
                           tuple(np.shape(x)), dst, mesh)
    return run_relayout(x, mesh, None, dst, "placements")


def redistribute(x: Any, device_mesh: Optional[AnyMesh],
                 placements: Sequence[Placement]) -> jax.Array:
    """Change the layout of distributed ``x`` to ``placements`` on its mesh:
    Partial -> Replicate is an all-reduce, Partial -> Shard a reduce-scatter,
    Shard -> Replicate an all-gather, Replicate -> Shard a local slice.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((1,), ("dp",))
        >>> x = jlm.distribute_tensor(np.ones((2, 2)), mesh, [jlm.Shard(0)])
        >>> jlm.placements_of(jlm.redistribute(x, mesh, [jlm.Replicate()]))
        (Replicate(),)
    """
    src = placements_of(x, device_mesh)
    mesh = mesh_of(x) if device_mesh is None else device_mesh
    dst = as_placement_list(placements, mesh, "placements")
    placements_to_spec(dst, mesh, len(x.shape))
    dst = normalize_placements(dst, len(x.shape))
    if isinstance(x, UnevenArray) or uneven_dims(x.shape, dst, mesh):
        if isinstance(x, UnevenArray) and canonical(src, mesh, x.shape) == \
                canonical(dst, mesh, x.shape):
            return x
        return distribute_tensor(full_tensor(x), mesh, dst)
    return run_relayout(x, mesh, src, dst, "placements")


def full_tensor(x: Any) -> jax.Array:
    """The global value of ``x``, replicated on its mesh: Partial axes are reduced,
    shards gathered. Host values are returned as jax arrays unchanged.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((1,), ("dp",))
        >>> x = jlm.distribute_tensor(np.arange(4.0), mesh, [jlm.Partial()])
        >>> np.asarray(jlm.full_tensor(x)).tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    mesh = mesh_of(x)
    if mesh is None:
        if not isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex, bool)):
            raise PlacementTypeError(
                f"x: expected an array, found {type(x).__name__}; full_tensor takes "
                f"what local_map or distribute_tensor returned.")
        return jnp.asarray(x)
    replicated = [Replicate()] * len(mesh.axis_names)
    if isinstance(x, UnevenArray):
        return unpad(run_relayout(x.padded, mesh, x.placements, replicated, "placements"),
                     x.dims)
    return redistribute(x, mesh, replicated)
