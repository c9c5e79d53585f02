"""Planning a call: for each flattened input leaf, the layout it arrives in and
the layout the body's shard comes from, its gradient declaration, and whether
it moves. Plans are static and hashable (compiled programs are cached by
them) and planning traces nothing.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap.call.input_plan import plan_input
    >>> mesh = jax.sharding.AbstractMesh((2,), ("dp",))
    >>> from jlocalmap.call.arguments import Leaf
    >>> plan = plan_input(0, Leaf.read(np.ones((4, 3), np.float32)), [jlm.Shard(0)], None, mesh,
    ...                   explicit=True, redistribute=False)
    >>> print(plan.dst), plan.relayout
    f32[4,3] S(0) on (dp=2)
    (None, True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from jlocalmap.call.arguments import Leaf
from jlocalmap.errors import PlacementValueError
from jlocalmap.layouts.dtypes import dtype_of
from jlocalmap.layouts.entries import is_array, is_number
from jlocalmap.layouts.grad_axes import grad_reductions
from jlocalmap.layouts.layout import Layout
from jlocalmap.layouts.meshes import AnyMesh
from jlocalmap.layouts.placements import PlacementList, Replicate
from jlocalmap.layouts.specs import as_placement_list, normalize_placements


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """How one array leaf reaches the body (static, hashable)."""
    index: int
    src: Optional[Layout]             # None: a global (host) value to lay out
    dst: Layout                       # the layout the body's local value is a shard of
    grad: tuple = ()                  # mesh axes its cotangent is summed over
    declared_grad: Optional[PlacementList] = None
    padded: bool = False              # the leaf is an UnevenArray's padded data

    @property
    def relayout(self) -> bool:
        """Whether the value moves before the body sees it."""
        return self.src is None or self.src.stored != self.dst.stored

    @property
    def operand(self) -> bool:
        """Whether it is passed into the region (empty values are made inside)."""
        return not self.dst.is_empty


def plan_input(i: int, leaf: Leaf, entry: Any, grad: Any, mesh: AnyMesh, *,
               explicit: bool, redistribute: bool) -> Optional[InputPlan]:
    """The plan of leaf ``i`` (already on ``mesh`` if distributed) for its entry
    and gradient entry, or None when it passes through to the body as is.
    ``explicit``: the call gave in_placements."""
    what = f"in_placements[{i}]"
    value = leaf.value
    if leaf.mesh is not None:
        src = leaf.layout_on(mesh)
        dst = _distributed_target(i, leaf, entry, src, mesh, explicit, redistribute)
    elif is_array(value) or (is_number(value) and entry is not None):
        src = None
        placements = [Replicate()] * len(mesh.axis_names) if entry is None else entry
        dst = Layout.of(mesh, placements, np.shape(value), dtype_of(value), what=what)
    else:
        _check_passes_through(i, value, entry, grad)
        return None
    declared, reductions = _gradient(i, grad, dst, mesh)
    if leaf.uneven and not src.same_storage(dst):
        src = None  # re-laid out from the whole value
    return InputPlan(i, src, dst, reductions, declared, padded=leaf.uneven and src is not None)


def _distributed_target(i: int, leaf: Leaf, entry: Any, src: Optional[Layout],
                        mesh: AnyMesh, explicit: bool, redistribute: bool) -> Layout:
    what = f"in_placements[{i}]"
    if explicit and entry is None:
        raise PlacementValueError(
            f"{what}: input {i} is distributed on {leaf.mesh}, so local_map "
            f"expects placements for it, found None; give its placement "
            f"list, e.g. {[Replicate()] * len(mesh.axis_names)}.")
    if entry is None and src is None:
        raise PlacementValueError(
            f"{what}: input {i} is on Auto-axis mesh {mesh}, whose placements "
            f"JAX does not track under jax.jit; give in_placements explicitly.")
    # Layouts that cannot exist are refused before any advice to move.
    dst = src if entry is None else Layout.of(mesh, entry, np.shape(leaf.value),
                                              dtype_of(leaf.value), what=what)
    if src is not None and src.stored != dst.stored and not redistribute:
        raise PlacementValueError(
            f"{what}: input {i} has placements {list(src.placements)}, but the local_map "
            f"requires {list(dst.placements)}; set redistribute_inputs=True to "
            f"redistribute it, or call jlocalmap.redistribute(x, mesh, "
            f"{list(dst.placements)}) first.")
    return dst


def _check_passes_through(i: int, leaf: Any, entry: Any, grad: Any) -> None:
    """A non-array leaf goes to the body unchanged: it takes no placements."""
    if entry is not None:
        raise PlacementValueError(
            f"in_placements[{i}]: input {i} is a {type(leaf).__name__}, not an array, so "
            f"its entry must be None (it is passed to func unchanged); found {entry!r}.")
    if grad is not None:
        raise PlacementValueError(
            f"in_grad_placements[{i}]: input {i} is a {type(leaf).__name__}, "
            f"which has no gradient; its entry must be None.")


def _gradient(i: int, grad: Any, dst: Layout, mesh: AnyMesh) -> tuple:
    """(declared gradient placements, cotangent reductions) of input ``i``."""
    if grad is None:
        return None, ()
    what = f"in_grad_placements[{i}]"
    declared = normalize_placements(as_placement_list(grad, mesh, what), dst.ndim, what)
    placements = dst.stored if dst.is_empty else dst.placements
    return declared, grad_reductions(placements, declared, mesh, what)
