"""One alternative of a strategy region: a named ``local_map`` function whose
call moves its inputs to its ``in_placements`` (``redistribute_inputs=True``;
and, where the region states ``out_placements``, its outputs moved to them
after, entries read as ``local_map`` reads its own), and the program that
prices it: the call with the gradients of every floating-point input.

Example:
    >>> import jax, numpy as np, jlocalmap as jlm
    >>> from jlocalmap import Replicate, Shard
    >>> from jlocalmap.strategies.alternatives import Alternative
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> double = jlm.local_map(lambda x: 2 * x, [Shard(0)], ([Shard(0)],), device_mesh=mesh)
    >>> alt = Alternative.of("double", double, 0)
    >>> x = jlm.distribute_tensor(np.arange(4.0), mesh, [Replicate()])
    >>> y = alt.placed(None)(x)
    >>> jlm.placements_of(y), np.asarray(y).tolist()
    ((Shard(dim=0),), [0.0, 2.0, 4.0, 6.0])
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlocalmap.errors import LocalMapTypeError, LocalMapValueError, PlacementValueError
from jlocalmap.layouts.entries import assign_placements, is_placement_list
from jlocalmap.layouts.value_layout import placements_of
from jlocalmap.local_map import LocalMapped
from jlocalmap.movement.distribute import redistribute


@dataclasses.dataclass(frozen=True)
class Alternative:
    """A named ``local_map`` function with a ``device_mesh`` (concrete, or
    abstract for :func:`jlocalmap.estimate`) and one ``in_placements`` entry per
    positional argument."""
    name: str
    fn: LocalMapped
    mesh: Any

    @classmethod
    def of(cls, name: Any, fn: Any, index: int) -> "Alternative":
        what = f"alternatives[{index}] ({name!r})"
        missing = [a for a in ("settings", "in_placements", "out_placements", "device_mesh")
                   if not hasattr(fn, a)]
        if missing or not callable(fn):
            raise LocalMapTypeError(
                f"{what}: expected a function made by jlocalmap.local_map, found "
                f"{type(fn).__name__}; decorate each alternative with "
                f"@jlm.local_map(out_placements=..., in_placements=..., device_mesh=mesh).")
        if not isinstance(fn.device_mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
            raise LocalMapValueError(
                f"{what}: expected local_map(..., device_mesh=mesh) with a "
                f"jax.sharding.Mesh (or an AbstractMesh, chosen for under jlm.estimate), "
                f"found device_mesh={fn.device_mesh!r}; the region moves inputs to each "
                f"alternative's mesh and prices it there.")
        if not isinstance(fn.in_placements, (list, tuple)) or is_placement_list(
                fn.in_placements):
            raise PlacementValueError(
                f"{what}: expected in_placements with one entry per positional argument "
                f"(a tuple of placement lists, None for non-arrays), found "
                f"{fn.in_placements!r}; write in_placements=([Shard(0)], [Replicate()]).")
        return cls(str(name), fn, fn.device_mesh)

    def check_arity(self, count: int) -> None:
        if len(self.fn.in_placements) != count:
            raise PlacementValueError(
                f"alternative {self.name!r}: its in_placements has "
                f"{len(self.fn.in_placements)} entries, the call has {count} positional "
                f"arguments; every alternative takes the region's arguments, one "
                f"in_placements entry each.")

    @functools.cached_property
    def moving(self) -> LocalMapped:
        """``fn`` with ``redistribute_inputs=True``: the call moves each argument
        to its ``in_placements`` (arrays on no mesh are laid out there), as any
        ``local_map`` call does."""
        return LocalMapped(dataclasses.replace(self.fn.settings, redistribute_inputs=True))

    def placed(self, out_placements: Any) -> Callable:
        """The alternative on global values: :attr:`moving` called, and its array
        outputs moved to ``out_placements`` when given (entries assigned to the
        output leaves as ``local_map`` assigns its own)."""
        def call(*args):
            out = self.moving(*args)
            return out if out_placements is None else _move_outputs(out, out_placements,
                                                                    self.mesh)
        call.__name__ = self.name.replace("-", "_").replace(" ", "_")
        return call


def _move_outputs(out: Any, out_placements: Any, mesh) -> Any:
    leaves, tree = jax.tree_util.tree_flatten(out)
    entries = assign_placements(out_placements, out, len(leaves), mesh, "out_placements",
                                "outputs")
    return jax.tree_util.tree_unflatten(
        tree, [_move(x, entry, mesh) for x, entry in zip(leaves, entries, strict=True)])


def _move(x: Any, placements: Any, mesh) -> Any:
    """A distributed output ``x`` redistributed to ``placements`` (None: as it is)."""
    if placements is None or tuple(placements_of(x, mesh)) == tuple(placements):
        return x
    return redistribute(x, mesh, placements)


def on_mesh(mesh: jax.sharding.Mesh) -> contextlib.AbstractContextManager:
    """``jax.set_mesh(mesh)`` for lowering (gradients through Partial layouts
    need the mesh in context), or nothing while a ``jax.jit`` traces, where JAX
    refuses it and the caller's own ``set_mesh`` is in force."""
    try:
        return jax.set_mesh(mesh)
    except ValueError:
        return contextlib.nullcontext()


def compiled(fn: Callable, abstract: Sequence[Any], mesh: jax.sharding.Mesh) -> Any:
    """``jax.jit(fn)`` lowered for ``abstract`` and compiled: (lowered, compiled).
    A compiled program runs on concrete arrays even while an outer ``jax.jit``
    traces, which is how a region verifies and times under ``jax.jit``."""
    with on_mesh(mesh):
        lowered = jax.jit(fn).lower(*abstract)
        return lowered, lowered.compile()


def float_outputs(out: Any) -> list:
    return [o for o in jax.tree_util.tree_leaves(out)
            if hasattr(o, "dtype") and jnp.issubdtype(o.dtype, jnp.inexact)]


def training_program(call: Callable, differentiable: Sequence[int], train: bool) -> Callable:
    """What a choice prices and times: the call, and with ``train`` the
    gradients of ``sum(outputs)`` with respect to the arguments at
    ``differentiable`` (the loss value keeps the forward's collectives)."""
    if not train or not differentiable:
        return call

    def loss(*args):
        return sum(jnp.sum(o.astype(jnp.float32)) for o in float_outputs(call(*args)))
    return jax.value_and_grad(loss, argnums=tuple(differentiable))
