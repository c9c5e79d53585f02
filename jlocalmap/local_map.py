"""``local_map``: run a function written for local shards on distributed values.

The layering follows ``jax/_src/shard_map.py``: ``arguments`` flattens the call
and assigns placements to leaves; this module plans each leaf, caches the
compiled call and builds the region; ``layouts`` checks and moves inputs;
``specs`` translates placements to ``PartitionSpec``\\ s; ``gradients`` adapts and
verifies cotangents; ``outputs`` lays the body's results out; ``uneven`` pads
uneven shards; and ``jax.shard_map`` runs the body. Eager calls compile once per
(settings, argument structure, shapes, dtypes, shardings) and are reused.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jlocalmap import layouts, region_inspection
from jlocalmap.arguments import (assign_placements, call_signature, is_array, is_input_leaf,
                                 is_none, is_number)
from jlocalmap._jax_compat import manual_axes
from jlocalmap.errors import PlacementTypeError, PlacementValueError
from jlocalmap.gradients import grad_reductions, verify_grad_placements, with_grad_reductions
from jlocalmap.placements import PlacementList, Replicate
from jlocalmap.specs import (AnyMesh, as_placement_list, axis_sizes, check_mesh,
                             local_shape, normalize_placements, placements_to_spec)
from jlocalmap.outputs import to_out_layout, uneven_output_dims
from jlocalmap.uneven import (UnevenArray, dim_splits, pad, padded_shape,
                              uneven_dims, unpad)

_CACHE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class _Input:
    """How one dynamic leaf reaches the body (all static, hashable)."""
    index: int
    src: Optional[PlacementList]      # None: a global value to lay out
    dst: PlacementList                # the layout the body's local value has
    relayout: bool
    grad: tuple                       # (axis, op) cotangent reductions
    declared_grad: Optional[PlacementList]
    uneven: tuple = ()                # uneven.uneven_dims of dst
    padded: bool = False              # the leaf is an UnevenArray's padded data
    chunks: tuple = ()                # (axes, local length, logical size if uneven)
    empty: Optional[tuple] = None     # (local shape, dtype) of a value with no elements

    def stacked_axes(self, mesh: AnyMesh) -> tuple[str, ...]:
        return layouts.partial_axes(self.dst, mesh)


@dataclasses.dataclass
class _Trace:
    """What tracing the body found out about its outputs."""
    out_tree: Any = None
    statics: dict = dataclasses.field(default_factory=dict)
    array_positions: list = dataclasses.field(default_factory=list)
    out_specs: list = dataclasses.field(default_factory=list)
    out_placements: list = dataclasses.field(default_factory=list)   # of region outputs
    region_positions: list = dataclasses.field(default_factory=list)  # outputs j it returns
    out_avals: list = dataclasses.field(default_factory=list)         # their (local, dtype)
    empty_outputs: dict = dataclasses.field(default_factory=dict)     # j -> (local, dtype, pl.)
    uneven_outputs: dict = dataclasses.field(default_factory=dict)  # j -> (dims, placements)


class _LocalMapped:
    """The callable that ``local_map`` returns."""

    def __init__(self, func: Callable, out_placements, in_placements,
                 in_grad_placements, device_mesh, redistribute_inputs: bool,
                 check_vma: bool = True):
        if not callable(func):
            raise PlacementTypeError(
                f"func: expected a callable to run on local shards, found "
                f"{type(func).__name__}; pass a function, or call local_map without "
                f"func to get a decorator.")
        if device_mesh is not None:
            check_mesh(device_mesh)
        for name, flag in (("redistribute_inputs", redistribute_inputs), ("check_vma", check_vma)):
            if not isinstance(flag, (bool, np.bool_)):
                raise PlacementTypeError(
                    f"{name}: expected True or False, found {flag!r} of type "
                    f"{type(flag).__name__}; pass a bool.")
        self.func = func
        self.out_placements = out_placements
        self.in_placements = in_placements
        self.in_grad_placements = in_grad_placements
        self.device_mesh = device_mesh
        self.redistribute_inputs = bool(redistribute_inputs)
        self.check_vma = bool(check_vma)
        self._cache: OrderedDict = OrderedDict()
        functools.update_wrapper(self, func)

    def __repr__(self) -> str:
        return (f"local_map({getattr(self.func, '__name__', self.func)!r}, "
                f"out_placements={self.out_placements!r}, "
                f"in_placements={self.in_placements!r})")

    # -- the call -----------------------------------------------------------
    def __call__(self, *args, **kwargs):
        prepared = self._prepare(args, kwargs)
        if prepared is None:
            # No distributed input, or already inside a shard_map over these axes:
            # the values are local already (DTensor's plain-tensor rule).
            return self.func(*args, **kwargs)
        mesh, fn, trace, dyn, traced = prepared
        if traced or all(isinstance(x, jax.Array) for x in dyn):
            arrays = fn(*dyn)
        else:  # host values: the program needs the mesh's devices in context
            with layouts.mesh_context(mesh):
                arrays = fn(*dyn)
        out_leaves = dict(trace.statics)
        out_leaves.update(zip(trace.array_positions, arrays))
        for j, (dims, placements) in trace.uneven_outputs.items():
            shape = list(out_leaves[j].shape)
            for d, size, _, _ in dims:
                shape[d] = size
            out_leaves[j] = UnevenArray(out_leaves[j], tuple(shape), placements, mesh)
        return jax.tree_util.tree_unflatten(
            trace.out_tree, [out_leaves[j] for j in range(len(out_leaves))])

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
        if prepared is None or prepared[-1]:
            raise PlacementValueError(
                "lower: expected concrete arguments with a mesh (distributed arrays, or "
                "host values with device_mesh set), found tracers or no mesh; call it "
                "outside jax.jit, or use jax.jit(f).lower(...) there.")
        mesh, fn, _, dyn, _ = prepared
        with layouts.mesh_context(mesh):
            return fn.lower(*dyn)

    def _prepare(self, args, kwargs):
        """Check and plan a call: (mesh, program, trace, dynamic leaves, traced),
        or None when ``func`` runs as a plain function."""
        leaves, in_tree = jax.tree_util.tree_flatten(args, is_leaf=is_input_leaf)
        signature = call_signature(leaves, in_tree, kwargs)
        fast = self._cache.get(signature) if signature is not None else None
        if fast is not None:  # a repeated eager call: the plan and program are known
            mesh, fn, trace, picks = fast
            return mesh, fn, trace, [leaves[i].padded if padded else leaves[i]
                                     for i, padded in picks], False
        originals = list(leaves)
        mesh = self._mesh(leaves)
        if mesh is None or set(mesh.axis_names) <= manual_axes():
            return None
        entries = (assign_placements(self.in_placements, args, len(leaves), mesh,
                                     "in_placements", "inputs")
                   if self.in_placements is not None else [None] * len(leaves))
        grads = (assign_placements(self.in_grad_placements, args, len(leaves), mesh,
                                   "in_grad_placements", "inputs")
                 if self.in_grad_placements is not None else [None] * len(leaves))
        leaves = list(leaves)
        inputs, statics = [], {}
        for i, (leaf, entry, grad) in enumerate(zip(leaves, entries, grads)):
            plan = self._plan_input(i, leaf, entry, grad, mesh, leaves)
            if plan is None:
                statics[i] = leaf
            else:
                inputs.append(plan)
        dyn = [leaves[p.index] for p in inputs]
        if any(p.uneven for p in inputs) and isinstance(mesh, jax.sharding.Mesh):
            check = functools.partial(self._check_padding, mesh, in_tree, tuple(inputs),
                                      statics, kwargs, dyn)
            if any(isinstance(x, jax.core.Tracer) for x in dyn):
                # Trace state is per thread: a fresh thread runs the check concretely.
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    pool.submit(check).result()
            else:
                check()
        if any(isinstance(x, jax.core.Tracer) for x in dyn):
            trace = _Trace()
            return mesh, functools.partial(self._impl, mesh, in_tree, tuple(inputs),
                                           statics, kwargs, trace), trace, dyn, True
        key = self._key(in_tree, inputs, statics, kwargs, dyn)
        hit = self._cache.get(key)
        if hit is None:
            trace = _Trace()
            impl = functools.partial(self._impl, mesh, in_tree, tuple(inputs), statics,
                                     kwargs, trace)
            # Named after func, so HLO metadata reads jit(func)/local_map[func](...)/...
            fn = jax.jit(functools.wraps(self.func, assigned=("__name__", "__qualname__"))(
                lambda *dyn: impl(*dyn)))
            hit = self._cache[key] = (fn, trace, (statics, kwargs))
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        fn, trace, _ = hit
        picks = [(p.index, p.padded) for p in inputs]
        unchanged = all(leaves[i] is (originals[i].padded if padded else originals[i])
                        for i, padded in picks)
        if signature is not None and unchanged:
            self._cache[signature] = (mesh, fn, trace, picks)
        return mesh, fn, trace, dyn, False

    def _mesh(self, leaves: Sequence[Any]) -> Optional[AnyMesh]:
        if self.device_mesh is not None:
            return self.device_mesh
        for leaf in leaves:
            mesh = layouts.mesh_of(leaf)
            if mesh is not None:
                return mesh
        return None

    def _plan_input(self, i, leaf, entry, grad, mesh, leaves) -> Optional[_Input]:
        """Check leaf ``i`` against its entry; None when it passes through as is."""
        what = f"in_placements[{i}]"
        leaf_mesh = layouts.mesh_of(leaf)
        if leaf_mesh is not None:
            if self.in_placements is not None and entry is None:
                raise PlacementValueError(
                    f"{what}: input {i} is distributed on {leaf_mesh}, so local_map "
                    f"expects placements for it, found None; give its placement "
                    f"list, e.g. {[Replicate()] * len(mesh.axis_names)}.")
            src = None
            if not layouts.same_mesh(leaf_mesh, mesh):
                moved = layouts.reexpress(leaf, mesh, None if entry is None else
                                          as_placement_list(entry, mesh, what))
                if moved is not None:
                    leaves[i] = leaf = moved
                elif self.redistribute_inputs and not isinstance(leaf, jax.core.Tracer) \
                        and isinstance(mesh, jax.sharding.Mesh):
                    leaves[i] = leaf = jax.device_put(
                        layouts.full_tensor(leaf),
                        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
                else:
                    raise PlacementValueError(
                        f"{what}: input {i} lives on {layouts.describe_mesh(leaf_mesh)}, "
                        f"but this local_map runs on {layouts.describe_mesh(mesh)}, and its "
                        f"layout is no layout of that mesh's devices (no data can stay "
                        f"put); move it with jlocalmap.distribute_tensor(x, mesh, "
                        f"placements) or set redistribute_inputs=True.")
            if leaf is not None and layouts.mesh_of(leaf) is not None:
                src = layouts.known_placements(leaf, mesh)
            dst = (src if entry is None else as_placement_list(entry, mesh, what))
            if dst is not None:
                # Layouts that cannot exist are refused before any advice to move.
                placements_to_spec(dst, mesh, len(leaf.shape), what=what)
                dst = normalize_placements(dst, len(leaf.shape), what)
                local_shape(padded_shape(leaf.shape, dst, mesh, what), dst, mesh, what=what)
            if dst is None:
                raise PlacementValueError(
                    f"{what}: input {i} is on Auto-axis mesh {mesh}, whose placements "
                    f"JAX does not track under jax.jit; give in_placements explicitly.")
            if src is not None and layouts.canonical(src, mesh, leaf.shape) != \
                    layouts.canonical(dst, mesh, leaf.shape) and not self.redistribute_inputs:
                raise PlacementValueError(
                    f"{what}: input {i} has placements {list(src)}, but the local_map "
                    f"requires {list(dst)}; set redistribute_inputs=True to "
                    f"redistribute it, or call jlocalmap.redistribute(x, mesh, "
                    f"{list(dst)}) first.")
            if isinstance(leaf, UnevenArray) and layouts.canonical(src, mesh, leaf.shape) != \
                    layouts.canonical(dst, mesh, leaf.shape):
                leaves[i] = leaf = layouts.full_tensor(leaf)  # re-laid out from whole
                src = None
        elif is_array(leaf) or (is_number(leaf) and entry is not None):
            src = None
            dst = (tuple([Replicate()] * len(mesh.axis_names)) if entry is None
                   else as_placement_list(entry, mesh, what))
            placements_to_spec(dst, mesh, np.ndim(leaf), what=what)
            dst = normalize_placements(dst, np.ndim(leaf), what)
        else:
            if entry is not None:
                raise PlacementValueError(
                    f"{what}: input {i} is a {type(leaf).__name__}, not an array, so "
                    f"its entry must be None (it is passed to func unchanged); found "
                    f"{entry!r}.")
            if grad is not None:
                raise PlacementValueError(
                    f"in_grad_placements[{i}]: input {i} is a {type(leaf).__name__}, "
                    f"which has no gradient; its entry must be None.")
            return None
        shape = tuple(leaf.shape) if isinstance(leaf, UnevenArray) else np.shape(leaf)
        empty = layouts.is_empty(shape)
        if empty:  # no summands: a Partial of it is stored replicated
            dst = layouts.canonical(dst, mesh, shape)
        relayout = src is None or layouts.canonical(src, mesh, shape) != \
            layouts.canonical(dst, mesh, shape)
        placements_to_spec(dst, mesh, len(shape), what=what)
        declared = None if grad is None else normalize_placements(as_placement_list(
            grad, mesh, f"in_grad_placements[{i}]"), len(shape), f"in_grad_placements[{i}]")
        reductions = () if grad is None else grad_reductions(
            dst, declared, mesh, f"in_grad_placements[{i}]")
        padded = isinstance(leaf, UnevenArray)
        if padded:
            leaves[i] = leaf.padded
        uneven = uneven_dims(shape, dst, mesh, what)
        sizes = {d: size for d, size, _, _ in uneven}
        full = padded_shape(shape, dst, mesh, what)
        chunks = tuple((axes, full[d] // math.prod(ns), sizes.get(d))
                       for d, (axes, ns) in dim_splits(dst, mesh, len(shape)).items())
        if empty:
            dtype = leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)
            empty = (local_shape(full, dst, mesh), np.dtype(dtype))
        return _Input(i, src, tuple(dst), relayout, reductions, declared, uneven, padded,
                      chunks, empty or None)

    @staticmethod
    def _key(in_tree, inputs, statics, kwargs, dyn):
        def hashable(x):
            try:
                hash(x)
                return (type(x), x)
            except TypeError:
                return ("id", id(x))  # the cache entry holds x, so the id stays unique
        kw_leaves, kw_tree = jax.tree_util.tree_flatten(kwargs, is_leaf=is_none)
        avals = tuple((np.shape(x), getattr(x, "dtype", type(x)),
                       getattr(x, "sharding", None) if isinstance(x, jax.Array) else None)
                      for x in dyn)
        return (in_tree, tuple(inputs), tuple((i, hashable(v)) for i, v in statics.items()),
                kw_tree, tuple(hashable(v) for v in kw_leaves), avals)

    # -- the traced implementation -------------------------------------------
    def _impl(self, mesh, in_tree, inputs, statics, kwargs, trace, *dyn, pad_fill=0.0):
        # Values with no elements carry no data: they are made, not passed, on
        # either side of the region (jax 0.11's CPU runtime crashes on empty
        # shard_map results next to others).
        operands = tuple(p for p in inputs if p.empty is None)
        in_specs, laid_out, global_shapes = [], [], []
        for plan, x in zip(inputs, dyn):
            if plan.empty is not None:
                continue
            x = jnp.asarray(x)
            if plan.uneven and not plan.padded:
                if plan.src is not None:  # gather the whole value, then pad it
                    x = layouts.relayout(x, mesh, plan.src, [Replicate()] * len(mesh.axis_names),
                                         carry_devices=False)
                x = pad(x, plan.uneven, pad_fill)  # fill != 0 only in _check_padding
                plan = dataclasses.replace(plan, src=None)
            if plan.relayout:
                x = layouts.relayout(x, mesh, plan.src, plan.dst,
                                     what=f"in_placements[{plan.index}]", carry_devices=False)
            spec = placements_to_spec(plan.dst, mesh, x.ndim,
                                      what=f"in_placements[{plan.index}]")
            global_shapes.append(x.shape)
            stacked = plan.stacked_axes(mesh)
            if stacked:
                x, spec = layouts.stack_summands(x, mesh, spec, stacked)
            in_specs.append(spec)
            laid_out.append(x)

        def body(*local, adapt=True):
            leaves = dict(statics)
            for plan in inputs:
                if plan.empty is not None:
                    leaves[plan.index] = jnp.zeros(*plan.empty)
            for plan, v in zip(operands, local):
                if plan.stacked_axes(mesh):
                    v = v[0] * layouts.avg_scale(plan.dst, mesh)
                # Unchecked bodies (check_vma=False) need no adapter: JAX's own
                # transpose there sums every device's cotangent of a replicated input.
                leaves[plan.index] = (with_grad_reductions(v, plan.grad)
                                      if adapt and self.check_vma else v)
            args = jax.tree_util.tree_unflatten(in_tree, [leaves[i] for i in range(len(leaves))])
            return self._finish_outputs(self.func(*args, **kwargs), mesh, trace, inputs)

        func_name = getattr(self.func, "__name__", type(self.func).__name__)
        body.__name__ = f"local_map[{func_name}]"
        # Trace once without gradient adapters: the output structure fixes
        # out_specs, and the jaxpr shows what JAX's typing proves about gradients.
        probe = jax.shard_map(lambda *a: (body(*a, adapt=False), ())[1], mesh=mesh,
                              in_specs=tuple(in_specs), out_specs=(),
                              check_vma=self.check_vma)
        verify = self.check_vma and any(p.declared_grad for p in operands)
        if verify:
            self._verify_grads(jax.make_jaxpr(probe)(*laid_out), operands, mesh)
        else:
            jax.eval_shape(probe, *laid_out)
        region = jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs),
                               out_specs=tuple(trace.out_specs), check_vma=self.check_vma)
        call = self._region_call(func_name, mesh, operands, global_shapes, laid_out, trace)
        with jax.named_scope(call.name):  # the region's name, in jaxprs and HLO metadata
            out = region(*laid_out)
        region_inspection.record(call, laid_out)
        results = dict(zip(trace.region_positions, out))
        for j, (local, dtype, placements) in trace.empty_outputs.items():
            results[j] = layouts.relayout(jnp.zeros(_padded_global(local, placements, mesh),
                                                    dtype), mesh, None, placements)
        return tuple(results[j] for j in trace.array_positions)

    @staticmethod
    def _region_call(func_name, mesh, operands, global_shapes, laid_out,
                     trace) -> region_inspection.RegionCall:
        """The region's settings, and its name from them."""
        def operand(index, placements, padded, local, dtype, uneven, grad=None):
            logical = list(padded)
            for d, size, _, _ in uneven:
                logical[d] = size
            return region_inspection.Operand(index, tuple(placements), tuple(logical),
                                             tuple(local), np.dtype(dtype), grad)

        ins = tuple(operand(p.index, p.dst, shape, local_shape(shape, p.dst, mesh), x.dtype,
                            p.uneven, p.declared_grad)
                    for p, shape, x in zip(operands, global_shapes, laid_out))
        outs = tuple(operand(j, placements, _padded_global(local, placements, mesh), local,
                             dtype, trace.uneven_outputs.get(j, ((), None))[0])
                     for j, placements, (local, dtype) in zip(
                         trace.region_positions, trace.out_placements, trace.out_avals))
        name = region_inspection.region_name(
            func_name, [op.placements for op in ins], [op.placements for op in outs],
            [op.grad_placements for op in ins],
            in_sizes=[op.global_shape if p.uneven else None for op, p in zip(ins, operands)],
            out_sizes=[op.global_shape if op.index in trace.uneven_outputs else None
                       for op in outs])
        return region_inspection.RegionCall(name, func_name,
                                            tuple(axis_sizes(mesh).items()), ins, outs)

    def _check_padding(self, mesh, in_tree, inputs, statics, kwargs, dyn) -> None:
        """Run the region on random data with zero and with nonzero padding (once
        per signature): the logical outputs must not change."""
        key = ("padding-checked", self._key(in_tree, inputs, statics, kwargs, dyn))
        if key in self._cache:
            return
        rng = np.random.default_rng(0)
        logical = []
        for plan, x in zip(inputs, dyn):
            shape = list(np.shape(x))
            dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.result_type(x))
            for d, size, _, _ in plan.uneven if plan.padded else ():
                shape[d] = size  # the logical shape, laid out anew below
            logical.append((rng.standard_normal(shape) if np.issubdtype(dtype, np.inexact)
                            else rng.integers(0, 2, shape)).astype(dtype))
        results = []
        for fill in (0.0, 1.0):
            samples = []
            for plan, data in zip(inputs, logical):
                if plan.padded:
                    padded = pad(jnp.asarray(data), plan.uneven, fill)
                    samples.append(layouts.run_relayout(padded, mesh, None, plan.dst, "placements"))
                else:
                    placements = plan.src or [Replicate()] * len(mesh.axis_names)
                    samples.append(layouts.distribute_tensor(data, mesh, placements))
            trace = _Trace()
            fn = jax.jit(functools.partial(self._impl, mesh, in_tree, inputs, statics,
                                           kwargs, trace, pad_fill=fill))
            with layouts.mesh_context(mesh):
                arrays = fn(*samples)
            results.append([np.asarray(unpad(layouts.full_tensor(a), trace.uneven_outputs[j][0]))
                            if j in trace.uneven_outputs else np.asarray(layouts.full_tensor(a))
                            for j, a in zip(trace.array_positions, arrays)])
        for j, (a, b) in enumerate(zip(*results)):
            if not np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True):
                raise PlacementValueError(
                    f"out_placements[{trace.array_positions[j]}]: output "
                    f"{trace.array_positions[j]} changes with the padding of the uneven "
                    f"inputs {[p.index for p in inputs if p.uneven]}: the body mixes rows "
                    f"along an uneven dim (a sum, mean or shift over it). Mask the padding "
                    f"rows with jlocalmap.uneven.local_valid_size(size, axes), or give "
                    f"that input Replicate() along the dim.")
        self._cache[key] = None

    @staticmethod
    def _verify_grads(probe_jaxpr, inputs, mesh) -> None:
        region_eqn = probe_jaxpr.jaxpr.eqns[-1]
        body_jaxpr = region_eqn.params["jaxpr"]
        body_jaxpr = body_jaxpr if hasattr(body_jaxpr, "eqns") else body_jaxpr.jaxpr
        for k, plan in enumerate(inputs):
            if plan.declared_grad is not None:
                verify_grad_placements(body_jaxpr, k, plan.dst, plan.declared_grad, mesh,
                                       f"in_grad_placements[{plan.index}]")

    def _finish_outputs(self, out, mesh, trace: _Trace, inputs):
        leaves, trace.out_tree = jax.tree_util.tree_flatten(out, is_leaf=is_none)
        if self.out_placements is None:
            entries = [None] * len(leaves)
        else:
            entries = assign_placements(self.out_placements, out, len(leaves), mesh,
                                        "out_placements", "outputs")
        trace.statics, trace.array_positions, trace.out_specs = {}, [], []
        trace.out_placements, trace.region_positions, trace.out_avals = [], [], []
        trace.uneven_outputs, trace.empty_outputs = {}, {}
        marked: dict = {}  # axis -> inputs the gradient adapter marks varying over it
        for plan in inputs:
            for axis, _ in plan.grad:
                marked.setdefault(axis, []).append(plan.index)
        arrays = []
        for j, (leaf, entry) in enumerate(zip(leaves, entries)):
            what = f"out_placements[{j}]"
            if entry is None:
                if isinstance(leaf, jax.Array):
                    raise PlacementValueError(
                        f"{what}: output {j} is an array, so it needs placements to "
                        f"become a distributed value, found None; give e.g. "
                        f"{[Replicate()] * len(mesh.axis_names)}.")
                trace.statics[j] = leaf
                continue
            if not is_array(leaf):
                raise PlacementValueError(
                    f"{what}: output {j} is a {type(leaf).__name__}, not an array, so "
                    f"its entry must be None; found {entry!r}.")
            placements = as_placement_list(entry, mesh, what)
            placements = normalize_placements(placements, jnp.ndim(leaf), what)
            value = jnp.asarray(leaf)
            trace.array_positions.append(j)
            if layouts.is_empty(value.shape):  # made outside the region
                placements = layouts.canonical(placements, mesh, value.shape)
                placements_to_spec(placements, mesh, value.ndim, what=what)
                dims = uneven_output_dims(value.shape, placements, mesh, inputs, j)
                trace.empty_outputs[j] = (value.shape, value.dtype, placements)
            else:
                value, placements = to_out_layout(value, placements, mesh, j, marked)
                trace.out_specs.append(placements_to_spec(placements, mesh, value.ndim,
                                                          what=what))
                dims = uneven_output_dims(value.shape, placements, mesh, inputs, j)
                trace.region_positions.append(j)
                trace.out_placements.append(placements)
                trace.out_avals.append((value.shape, value.dtype))
                arrays.append(value)
            if dims:
                trace.uneven_outputs[j] = (dims, placements)
        return tuple(arrays)


def _padded_global(local: Sequence[int], placements, mesh: AnyMesh) -> tuple:
    """The padded global shape whose shards under ``placements`` are ``local``."""
    shape = list(local)
    for d, (_, splits) in dim_splits(placements, mesh, len(shape)).items():
        shape[d] *= math.prod(splits)
    return tuple(shape)


def local_map(func: Optional[Callable] = None, out_placements: Any = None,
              in_placements: Any = None, in_grad_placements: Any = None,
              device_mesh: Optional[AnyMesh] = None, *,
              redistribute_inputs: bool = False, check_vma: bool = True) -> Callable:
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
    callbacks): declarations are then trusted as PyTorch trusts them. Called with
    ``func=None`` it returns a decorator.

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
        return functools.partial(local_map, out_placements=out_placements,
                                 in_placements=in_placements,
                                 in_grad_placements=in_grad_placements,
                                 device_mesh=device_mesh,
                                 redistribute_inputs=redistribute_inputs,
                                 check_vma=check_vma)
    return _LocalMapped(func, out_placements, in_placements, in_grad_placements,
                        device_mesh, redistribute_inputs, check_vma)
