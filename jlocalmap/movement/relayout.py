"""Moving a stored value from one layout to another, traceably: the
collectives DTensor's redistribute uses (Partial -> Replicate one all-reduce,
Partial -> Shard one reduce-scatter, Shard -> Replicate an all-gather,
Replicate -> Shard a local slice, Replicate -> Partial a local split).

Partial values are stored the way JAX stores them: as *unreduced* arrays whose
true value is the sum of the per-device values. ``Partial('avg')`` is a view of
the same storage (see docs/placements.md), so sum and avg convert for free.
Both layouts describe the value as stored (even: uneven values move padded).

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap.movement.relayout import run_relayout
    >>> mesh = jax.make_mesh((2,), ("dp",))
    >>> dst = jlm.Layout.of(mesh, [jlm.Shard(0)], (4,), "float32")
    >>> run_relayout(np.arange(4.0, dtype=np.float32), None, dst).sharding.spec
    P('dp',)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlocalmap._caches import cached
from jlocalmap._jax_compat import scalar_like
from jlocalmap.layouts.layout import Layout, is_empty
from jlocalmap.layouts.meshes import AnyMesh, axis_sizes, is_explicit, mesh_context
from jlocalmap.layouts.placements import Replicate
from jlocalmap.layouts.specs import placements_to_spec, spec_entries
from jlocalmap.layouts.value_layout import mesh_of


def relayout(x: Any, src: Optional[Layout], dst: Layout, *,
             carry_devices: bool = True) -> jax.Array:
    """Move stored ``x`` from ``src`` (None: a global host value) to ``dst``.
    With ``carry_devices=False`` (the value feeds a region on the mesh, which
    tells the program its devices) a traced host value is resharded, so its
    cotangent comes back in its own type."""
    x = jnp.asarray(x)
    mesh, target = dst.mesh, dst.stored
    source = None if src is None else src.stored
    if source == target:
        return x
    new_partials = tuple(a for a, p, q in zip(
        mesh.axis_names, target, source or [Replicate()] * len(target), strict=True)
        if p.is_partial() and not q.is_partial())
    staged = tuple(Replicate() if a in new_partials else p
                   for a, p in zip(mesh.axis_names, target, strict=True))
    staged_spec = placements_to_spec(staged, mesh, x.ndim)
    if src is not None:
        x = _scatter_partials(x, mesh, src.spec, staged_spec)
    x = _constrain(x, mesh, staged_spec, carry_devices)
    if new_partials:
        x = _partition(x, mesh, dst.spec, new_partials)
    return x


@cached(256)
def _jitted_relayout(src: Optional[Layout], dst: Layout):
    return jax.jit(functools.partial(relayout, src=src, dst=dst))


def run_relayout(x: Any, src: Optional[Layout], dst: Layout) -> jax.Array:
    """:func:`relayout` eagerly (compiled once per layout change) or inline in a trace."""
    if isinstance(x, jax.core.Tracer):
        return relayout(x, src, dst)
    with mesh_context(dst.mesh):
        return _jitted_relayout(src, dst)(x)


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
            summand = v / scalar_like(n, v)
        else:  # integers cannot be split evenly: the first device keeps the value
            summand = jnp.where(jax.lax.axis_index(axes) == 0, v, jnp.zeros_like(v))
        all_partial = tuple(a for a in mesh.axis_names if a in set(axes) | set(partial_already))
        return jax.lax.pcast(summand, all_partial, to="unreduced")

    return jax.shard_map(split, mesh=mesh, in_specs=in_spec, out_specs=spec)(x)


def _scatter_partials(x: jax.Array, mesh: AnyMesh, spec: PartitionSpec,
                      target: PartitionSpec) -> jax.Array:
    """Partial -> Shard(d) as a reduce-scatter (``psum_scatter``) where ``target``
    splits dim d by the axes that already split it followed by the scattered
    ones; other layouts are left for ``_constrain`` (an all-reduce, then a slice)."""
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
