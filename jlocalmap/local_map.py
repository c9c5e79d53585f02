"""``local_map``: run a function written for local shards on distributed values.

The public callable. A call goes through the stages, each in its module:
``arguments`` (flatten the call, assign placement entries to leaves),
``other_mesh`` (inputs on another mesh), ``plan`` / ``call`` (a static plan of
every leaf's layouts), ``padding`` (uneven inputs and outputs around the
region), ``region`` (the named ``jax.shard_map`` program, gradient adapters,
recording) and ``outputs`` (the body's results laid out). Eager calls compile
once per (plan, shapes, dtypes, shardings) and are reused; a repeated call
with the same argument types skips planning. See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Sequence
from typing import Any, Optional, overload

import jax

from jlocalmap._caches import LRU
from jlocalmap._jax_compat import manual_axes, under_jit
from jlocalmap.call import padding
from jlocalmap.call.arguments import (
    Leaf,
    call_signature,
    is_input_leaf,
    traced_signature,
)
from jlocalmap.call.call_plan import CallPlan
from jlocalmap.call.other_mesh import to_mesh
from jlocalmap.call.settings import Settings
from jlocalmap.errors import LocalMapError, LocalMapValueError
from jlocalmap.layouts.entries import assign_placements
from jlocalmap.layouts.meshes import AnyMesh, mesh_context, same_mesh
from jlocalmap.layouts.placements import PlacementTree
from jlocalmap.layouts.uneven import UnevenArray
from jlocalmap.movement.distribute import full_tensor
from jlocalmap.region.outputs import OutputFacts, assemble
from jlocalmap.region.program import Region, check_batchable

_CACHE_SIZE = 64


def _jit_named_after(settings: Settings, fn: Callable) -> jax.stages.Wrapped:
    """``jax.jit(fn)``, named after the region: HLO metadata reads
    ``jit(name)/local_map[name](...)/...``."""
    fn.__name__ = fn.__qualname__ = settings.func_name
    return jax.jit(fn)


class _Compiled:
    """A jitted region for one eager signature, and the output facts its trace found."""

    def __init__(self, region: Region, plan: CallPlan):
        self.facts: Optional[OutputFacts] = None

        def run(*dyn):
            arrays, self.facts = region(plan, *dyn)
            return arrays
        self.jitted = _jit_named_after(region.settings, run)

    def __call__(self, *dyn: Any) -> tuple[tuple, OutputFacts]:
        try:
            arrays = self.jitted(*dyn)
        except NotImplementedError:  # JAX batching what it cannot: say what and why
            if self.facts is not None:
                check_batchable(self.facts)
            raise
        assert self.facts is not None, "the first trace of run sets them"
        return arrays, self.facts


@dataclasses.dataclass
class _Prepared:
    plan: CallPlan
    program: Callable   # (*dyn) -> (arrays, facts)
    dyn: list
    traced: bool


class _NotWhole(Exception):
    """A call the whole-call fast path does not cover (it falls back, for good)."""


class LocalMapped:
    """The function ``local_map`` returns: ``func`` run on local shards.

    It behaves as a function: it carries ``func``'s ``__name__``, ``__doc__``
    and ``__wrapped__`` (names and docs only: its own settings are never taken
    from ``func``, so a ``LocalMapped`` of a ``LocalMapped`` keeps both levels'
    settings), and as a class attribute it binds like a method: ``obj.f(x)``
    calls it with ``(obj, x)``, so ``in_placements`` counts ``self`` (give it
    ``None``). Its settings are ``settings`` (also readable as
    ``out_placements``, ``in_placements``, ..., ``name``); :meth:`lower` gives
    the program an eager call runs.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((2,), ("tp",))
        >>> class Scale:
        ...     factor = 3.0
        ...     @jlm.local_map(out_placements=[jlm.Shard(0)],
        ...                    in_placements=(None, [jlm.Shard(0)]), device_mesh=mesh)
        ...     def __call__(self, x):
        ...         "Scale the local rows."
        ...         return x * self.factor
        >>> Scale.__call__.__doc__, np.asarray(Scale()(np.ones(4, np.float32))).tolist()
        ('Scale the local rows.', [3.0, 3.0, 3.0, 3.0])
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.func = settings.func
        self._region = Region(settings)
        self._cache: LRU = LRU(_CACHE_SIZE)
        self._padding_checked: LRU = LRU(_CACHE_SIZE)
        self._whole: Optional[Callable] = None   # see _enable_whole
        self._whole_off = False
        # Names and docs, not state: func's __dict__ (a LocalMapped's settings) stays its own.
        functools.update_wrapper(self, settings.func, updated=())

    def __get__(self, instance: Any, owner: Optional[type] = None) -> Callable:
        """A method: bound to ``instance`` as its first argument (as Equinox's
        ``filter_jit`` wrappers bind)."""
        if instance is None:
            return self
        return types.MethodType(self, instance)

    out_placements = property(lambda self: self.settings.out_placements)
    in_placements = property(lambda self: self.settings.in_placements)
    in_grad_placements = property(lambda self: self.settings.in_grad_placements)
    device_mesh = property(lambda self: self.settings.device_mesh)
    redistribute_inputs = property(lambda self: self.settings.redistribute_inputs)
    check_vma = property(lambda self: self.settings.check_vma)
    name = property(lambda self: self.settings.func_name)

    def __repr__(self) -> str:
        s = self.settings
        return (f"local_map({s.func_name!r}, "
                f"out_placements={s.out_placements!r}, in_placements={s.in_placements!r})")

    def __call__(self, *args, **kwargs):
        if self._whole is not None and not kwargs:
            try:
                return self._whole(*args)
            except (_NotWhole, LocalMapError):  # the general path decides (and explains)
                self._whole, self._whole_off = None, True
        try:
            return self._call(args, kwargs)
        except LocalMapError as e:  # models have many regions: say which
            where = f"local_map[{self.settings.func_name}]"
            if where not in str(e):
                e.args = (f"{e} (in {where})", *e.args[1:])
            raise

    def _call(self, args: tuple, kwargs: dict, *, whole: bool = False) -> Any:
        prepared = self._prepare(args, kwargs)
        if whole and (prepared is None or not prepared.plan.arrived_on_mesh):
            raise _NotWhole()
        if prepared is None:
            # No distributed input, or already inside a shard_map over these axes:
            # the values are local already (DTensor's plain-tensor rule).
            return self.func(*args, **kwargs)
        if prepared.traced or all(isinstance(x, jax.Array) for x in prepared.dyn):
            arrays, facts = prepared.program(*prepared.dyn)
        else:  # host values: the program needs the mesh's devices in context
            with mesh_context(prepared.plan.mesh):
                arrays, facts = prepared.program(*prepared.dyn)
        if not prepared.traced and not kwargs:
            self._enable_whole(args, prepared, facts)
        return assemble(facts, arrays)

    def _enable_whole(self, args: tuple, prepared: _Prepared, facts: OutputFacts) -> None:
        """Repeated eager calls on distributed arrays cost a Python signature check
        and cache lookup before the dispatch; ``jax.jit`` of the whole call does
        both in C++. Taken where a call's arguments are flat distributed arrays on
        the mesh and its outputs all arrays; anything else falls back."""
        if self._whole is not None or self._whole_off or facts.statics or \
                not prepared.plan.arrived_on_mesh or not all(isinstance(a, jax.Array) for a in args):
            return

        def whole(*traced):
            out = self._call(traced, {}, whole=True)
            leaves = jax.tree_util.tree_leaves(out, is_leaf=lambda x: isinstance(x, UnevenArray))
            if not all(isinstance(x, (jax.Array, UnevenArray)) for x in leaves):
                raise _NotWhole()
            return out
        self._whole = _jit_named_after(self.settings, whole)

    def lower(self, *args, **kwargs) -> jax.stages.Lowered:
        """The program an eager call with these arguments runs, lowered (like
        ``jax.jit(f).lower``): read its HLO, compile it, count its collectives.

        Example:
            >>> import jax, numpy as np, jlocalmap as jlm
            >>> mesh = jax.make_mesh((2,), ("tp",))
            >>> f = jlm.local_map(lambda x: jax.lax.psum(x, "tp"), [jlm.Replicate()],
            ...                   ([jlm.Shard(0)],), device_mesh=mesh)
            >>> "all-reduce" in f.lower(np.ones(4, np.float32)).compile().as_text()
            True
        """
        prepared = self._prepare(args, kwargs)
        if prepared is None or prepared.traced:
            raise LocalMapValueError(
                "lower: expected concrete arguments with a mesh (distributed arrays, or "
                "host values with device_mesh set), found tracers or no mesh; call it "
                "outside jax.jit, or use jax.jit(f).lower(...) there.")
        assert isinstance(prepared.program, _Compiled), "eager calls run a compiled region"
        with mesh_context(prepared.plan.mesh):
            return prepared.program.jitted.lower(*prepared.dyn)

    def _prepare(self, args, kwargs) -> Optional[_Prepared]:
        """Check and plan a call, or None when ``func`` runs as a plain function."""
        leaves, in_tree = jax.tree_util.tree_flatten(args, is_leaf=is_input_leaf)
        signature = call_signature(leaves, in_tree, kwargs)
        fast = self._cache.get(signature) if signature is not None else None
        if fast is not None:  # a repeated eager call: the plan and program are known
            plan, program = fast
            return _Prepared(plan, program, _values(plan, leaves), False)
        traced = traced_signature(leaves, in_tree, kwargs) if signature is None else None
        known = self._cache.get(traced) if traced is not None else None
        if known is not None:  # a call traced before with these types: its plan holds
            plan, moved = dataclasses.replace(known, kwargs=kwargs), leaves
        else:
            records = [Leaf.read(leaf) for leaf in leaves]
            mesh = self._mesh(records)
            if mesh is None or set(mesh.axis_names) <= manual_axes():
                return None
            plan, moved = self._plan(args, records, in_tree, kwargs, mesh)
            if traced is not None and all(a is b for a, b in zip(moved, leaves, strict=True)):
                self._remember(traced, plan)
        mesh = plan.mesh
        dyn = _values(plan, moved)
        if plan.uneven and self.settings.check_padding and isinstance(mesh, jax.sharding.Mesh):
            padding.check(self._region, plan, dyn, self._padding_checked)
        if any(isinstance(x, jax.core.Tracer) for x in dyn):
            if under_jit():
                return _Prepared(plan, functools.partial(self._region, plan), dyn, True)
            # Eager transformations (vmap, grad, jvp) bind each primitive eagerly;
            # JAX's eager reshard refuses a named vmap axis, a compiled region does not.
            return _Prepared(plan, self._program(plan, dyn), dyn, True)
        program = self._program(plan, dyn)
        if signature is not None and all(a is b for a, b in zip(moved, leaves, strict=True)) and \
                not any(isinstance(leaves[p.index], UnevenArray) and not p.padded
                        for p in plan.inputs):
            self._cache.put(signature, (plan, program))
        return _Prepared(plan, program, dyn, False)

    def _plan(self, args, leaves: list[Leaf], in_tree, kwargs, mesh) -> tuple[CallPlan, list]:
        """The call's plan, and its leaves' values once on ``mesh``."""
        s = self.settings
        n = len(leaves)
        entries = (assign_placements(s.in_placements, args, n, mesh, "in_placements", "inputs")
                   if s.in_placements is not None else [None] * n)
        grads = (assign_placements(s.in_grad_placements, args, n, mesh, "in_grad_placements",
                                   "inputs") if s.in_grad_placements is not None else [None] * n)
        arrived = all(isinstance(leaf.value, jax.Array) and leaf.mesh is not None and
                      same_mesh(leaf.mesh, mesh) for leaf in leaves)
        moved, entries = list(leaves), list(entries)
        for i, leaf in enumerate(leaves):
            if leaf.mesh is not None and not same_mesh(leaf.mesh, mesh) and not (
                    s.in_placements is not None and entries[i] is None):
                moved[i], entries[i] = to_mesh(leaf, entries[i], mesh, i,
                                               redistribute=s.redistribute_inputs)
        plan = CallPlan.of(mesh, moved, entries, grads, in_tree, kwargs,
                           explicit=s.in_placements is not None,
                           redistribute=s.redistribute_inputs, arrived_on_mesh=arrived)
        return plan, [leaf.value for leaf in moved]

    def _program(self, plan: CallPlan, dyn: Sequence[Any]) -> _Compiled:
        key = plan.key(dyn, shardings=True)
        program = self._cache.get(key)
        if program is None:
            program = self._remember(key, _Compiled(self._region, plan))
        return program

    def _remember(self, key: Any, value: Any) -> Any:
        return self._cache.put(key, value)

    def _mesh(self, leaves: Sequence[Leaf]) -> Optional[AnyMesh]:
        if self.settings.device_mesh is not None:
            return self.settings.device_mesh
        return next((leaf.mesh for leaf in leaves if leaf.mesh is not None), None)


def _values(plan: CallPlan, leaves: Sequence[Any]) -> list:
    """The values the region takes, one per input plan."""
    def value(p):
        leaf = leaves[p.index]
        if isinstance(leaf, UnevenArray):
            return leaf.padded if p.padded else full_tensor(leaf)
        return leaf
    return [value(p) for p in plan.inputs]


@overload
def local_map(func: None = None, out_placements: PlacementTree = None, in_placements: PlacementTree = None,
              in_grad_placements: PlacementTree = None, device_mesh: Optional[AnyMesh] = None, *,
              redistribute_inputs: bool = False, check_vma: bool = True,
              name: Optional[str] = None, check_padding: bool = False
              ) -> Callable[[Callable[..., Any]], LocalMapped]: ...


@overload
def local_map(func: Callable[..., Any], out_placements: PlacementTree = None, in_placements: PlacementTree = None,
              in_grad_placements: PlacementTree = None, device_mesh: Optional[AnyMesh] = None, *,
              redistribute_inputs: bool = False, check_vma: bool = True,
              name: Optional[str] = None, check_padding: bool = False) -> LocalMapped: ...


def local_map(func: Optional[Callable[..., Any]] = None, out_placements: Any = None,
              in_placements: PlacementTree = None, in_grad_placements: PlacementTree = None,
              device_mesh: Optional[AnyMesh] = None, *,
              redistribute_inputs: bool = False, check_vma: bool = True,
              name: Optional[str] = None, check_padding: bool = False
              ) -> LocalMapped | Callable[[Callable[..., Any]], LocalMapped]:
    """Run ``func``, written for local shards, on values distributed over a mesh.

    Each input leaf with placements is checked (or, with
    ``redistribute_inputs=True``, moved) to ``in_placements``, ``func`` receives
    its local shard inside ``jax.shard_map`` (so ``jax.lax`` collectives over the
    mesh axis names work), and each output becomes a distributed ``jax.Array``
    laid out by ``out_placements``. Placement arguments take one entry per
    flattened leaf (a placement list, or None for non-array leaves), a single
    placement list for a single output, or a pytree prefix of the arguments or
    outputs. ``in_grad_placements`` declares each input's gradient layout (see
    docs/gradients.md), verified against JAX's varying-axes typing of the body;
    ``check_vma=False`` opts out for bodies the typing cannot see (custom calls,
    callbacks): declarations are then trusted as PyTorch trusts them. ``name``
    names the region in errors, HLO metadata, :func:`regions` and
    :func:`describe` (default: ``func``'s ``__name__``). Uneven inputs are
    padded; the body's jaxpr shows whether its outputs can hold padding content
    (a sum over the padded rows, say), and such a body is refused without
    running it. Where the jaxpr holds operations that reading does not follow
    (loops, custom calls), ``check_padding=True`` also runs the region on two
    random paddings at the first call of each signature and compares: two more
    compiles and runs of the region, on random data (its callbacks too). Called with
    ``func=None`` it returns a decorator. The result is a :class:`LocalMapped`.

    A ``local_map`` called inside another's body, on the same mesh axes, runs
    its function as it is: the values are local already (DTensor's rule for
    plain tensors), and its own placements are not applied.

    Example:
        >>> import jax, numpy as np, jlocalmap as jlm
        >>> mesh = jax.make_mesh((1,), ("tp",))
        >>> @jlm.local_map(out_placements=[jlm.Replicate()],
        ...                in_placements=([jlm.Shard(1)], [jlm.Shard(0)]), device_mesh=mesh)
        ... def matmul(x, w):
        ...     return jax.lax.psum(x @ w, "tp")
        >>> y = matmul(np.ones((2, 4), np.float32), np.ones((4, 3), np.float32))
        >>> np.asarray(y).tolist()
        [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
    """
    if func is None:
        def decorate(f: Callable[..., Any]) -> LocalMapped:
            return local_map(f, out_placements, in_placements, in_grad_placements,
                             device_mesh, redistribute_inputs=redistribute_inputs,
                             check_vma=check_vma, name=name, check_padding=check_padding)
        return decorate
    return LocalMapped(Settings.of(func, out_placements, in_placements, in_grad_placements,
                                   device_mesh, redistribute_inputs, check_vma, name,
                                   check_padding))
