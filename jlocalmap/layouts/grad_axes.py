"""Gradient declarations as axes: over which mesh axes a local cotangent laid out
by ``in_grad_placements`` is summed into one laid out like the input (a replicated
input with a ``Partial()`` gradient: its axis). Pairs that cannot describe a
cotangent of the local input's shape are refused here, before any tracing.

Example:
    >>> import jax, jlocalmap as jlm
    >>> from jlocalmap.layouts.grad_axes import grad_reductions
    >>> mesh = jax.sharding.AbstractMesh((2,), ("dp",))
    >>> grad_reductions((jlm.Replicate(),), (jlm.Partial(),), mesh, "in_grad_placements[1]")
    ('dp',)
"""

from __future__ import annotations

from collections.abc import Sequence

from jlocalmap.errors import PlacementValueError
from jlocalmap.layouts.meshes import AnyMesh
from jlocalmap.layouts.placements import Partial, Placement


def grad_reductions(input_placements: Sequence[Placement],
                    grad_placements: Sequence[Placement], mesh: AnyMesh,
                    what: str) -> tuple[str, ...]:
    """The mesh axes over which a local cotangent laid out by ``grad_placements``
    is summed into one laid out like the input; raises for pairs that do not
    describe a cotangent of the local input's shape."""
    reductions = []
    for axis, p, g in zip(mesh.axis_names, input_placements, grad_placements, strict=True):
        if g == p or (g.is_partial() and p.is_partial()):
            continue
        if p.is_replicate() and isinstance(g, Partial):
            if g.reduce_op in ("max", "min"):
                raise PlacementValueError(
                    f"{what}: Partial({g.reduce_op}) on mesh axis {axis!r} is not a "
                    f"gradient reduction (gradients add up); use Partial('sum').")
            if g.reduce_op == "avg":
                raise PlacementValueError(
                    f"{what}: Partial(avg) on mesh axis {axis!r}: the gradient of a "
                    f"replicated input is the sum of its local cotangents (the chain rule "
                    f"across devices), so it is Partial('sum'); Partial('avg') would "
                    f"divide it by the axis size. Declare Partial() (or leave the entry None).")
            reductions.append(axis)
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


def reduced_axes(input_placements: Sequence[Placement],
                 grad_placements: Sequence[Placement], mesh: AnyMesh) -> tuple[str, ...]:
    """Axes where a replicated input's gradient is declared ``Replicate()``: the
    body reduced it itself (an unchecked body's transpose sums it once more)."""
    return tuple(a for a, p, g in zip(mesh.axis_names, input_placements, grad_placements, strict=True)
                 if p.is_replicate() and g.is_replicate())
