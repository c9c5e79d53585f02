"""``CallPlan``: one call of a local_map, planned: the mesh, the argument
structure, each array leaf's :class:`~jlocalmap.call.input_plan.InputPlan`, the leaves
passed through as they are, and the keyword arguments.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap.call.call_plan import CallPlan, Leaf   # Leaf: the call stage's leaf record
    >>> mesh = jax.sharding.AbstractMesh((2,), ("dp",))
    >>> leaves = [Leaf.read(np.ones(4, np.float32)), Leaf.read("mode")]
    >>> plan = CallPlan.of(mesh, leaves, [[jlm.Shard(0)], None],
    ...                    [None, None], jax.tree_util.tree_structure((0, 0)), {},
    ...                    explicit=True, redistribute=False)
    >>> [p.index for p in plan.inputs], plan.statics
    ([0], {1: 'mode'})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from jlocalmap._caches import Identity
from jlocalmap.call.arguments import Leaf
from jlocalmap.call.input_plan import InputPlan, plan_input
from jlocalmap.layouts.entries import is_none
from jlocalmap.layouts.meshes import AnyMesh


def hashable(x: Any) -> tuple:
    """``x`` as a cache-key part: itself where hashable, else an
    :class:`~jlocalmap._caches.Identity` holding it."""
    try:
        hash(x)
        return (type(x), x)
    except TypeError:
        return (type(x), Identity(x))


@dataclasses.dataclass(frozen=True, eq=False)
class CallPlan:
    """A planned call (see the module docstring)."""
    mesh: AnyMesh
    in_tree: Any
    inputs: tuple[InputPlan, ...]
    statics: dict
    kwargs: dict
    arrived_on_mesh: bool = False   # every leaf came as an array distributed on ``mesh``

    @classmethod
    def of(cls, mesh: AnyMesh, leaves: Sequence[Leaf], entries: Sequence[Any],
           grads: Sequence[Any], in_tree: Any, kwargs: dict, *, explicit: bool,
           redistribute: bool, arrived_on_mesh: bool = False) -> "CallPlan":
        """Plan every leaf (distributed leaves already on ``mesh``)."""
        inputs, statics = [], {}
        for i, (leaf, entry, grad) in enumerate(zip(leaves, entries, grads, strict=True)):
            plan = plan_input(i, leaf, entry, grad, mesh, explicit=explicit,
                              redistribute=redistribute)
            if plan is None:
                statics[i] = leaf.value
            else:
                inputs.append(plan)
        return cls(mesh, in_tree, tuple(inputs), statics, kwargs, arrived_on_mesh)

    @property
    def operands(self) -> tuple[InputPlan, ...]:
        """The inputs passed into the region."""
        return tuple(p for p in self.inputs if p.operand)

    @property
    def uneven(self) -> bool:
        return any(p.dst.is_uneven for p in self.inputs)

    @property
    def marked(self) -> dict:
        """Mesh axis -> inputs the gradient adapters make varying over it."""
        marked: dict = {}
        for plan in self.inputs:
            for axis in plan.grad:
                marked.setdefault(axis, []).append(plan.index)
        return marked

    def key(self, dyn: Sequence[Any], *, shardings: bool) -> tuple:
        """What a compiled program (``shardings=True``: of concrete values) or
        the body's output facts depend on."""
        kw_leaves, kw_tree = jax.tree_util.tree_flatten(self.kwargs, is_leaf=is_none)

        def aval(x):
            typed = jax.typeof(x) if isinstance(x, jax.Array) else None
            sharding = None
            if shardings and typed is not None:  # concrete values: their devices too
                sharding = typed.sharding if isinstance(x, jax.core.Tracer) else x.sharding
            return (jax.numpy.shape(x), getattr(x, "dtype", type(x)),
                    getattr(typed, "weak_type", False), sharding)
        return (self.mesh, self.in_tree, self.inputs,
                tuple((i, hashable(v)) for i, v in self.statics.items()),
                kw_tree, tuple(hashable(v) for v in kw_leaves), tuple(map(aval, dyn)))
