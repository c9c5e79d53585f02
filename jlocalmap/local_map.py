"""``local_map``: run a function written for local shards on distributed values.

The layering follows ``jax/_src/shard_map.py``: the public wrapper flattens the
arguments and assigns placements (this module), ``layouts`` checks and moves
inputs, ``specs`` translates placements to ``PartitionSpec``\\ s, ``gradients``
adapts cotangents, and ``jax.shard_map`` runs the body. Eager calls compile once
per (settings, argument structure, shapes, dtypes, shardings) and are reused.
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

from jlocalmap import layouts
from jlocalmap._jax_compat import manual_axes, varying_axes
from jlocalmap.errors import PlacementTypeError, PlacementValueError
from jlocalmap.gradients import grad_reductions, verify_grad_placements, with_grad_reductions
from jlocalmap.placements import Partial, Placement, PlacementList, Replicate
from jlocalmap.specs import (AnyMesh, as_placement_list, axis_sizes, check_mesh,
                             local_shape, normalize_placements, placements_to_spec)
from jlocalmap.uneven import (UnevenArray, dim_splits, pad, padded_shape,
                              refill, uneven_dims, unpad)

_CACHE_SIZE = 64


def _is_none(x: Any) -> bool:
    return x is None


def _is_input_leaf(x: Any) -> bool:
    return x is None or isinstance(x, UnevenArray)


def _is_entry(x: Any) -> bool:
    """One leaf's placement entry: None, a Placement, or a list of them."""
    return x is None or isinstance(x, Placement) or (
        isinstance(x, (list, tuple)) and len(x) > 0
        and all(isinstance(p, Placement) for p in x))


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, complex)) and not isinstance(x, bool)


def assign_placements(placements: Any, tree: Any, n_leaves: int, mesh: AnyMesh,
                      what: str, kind: str) -> list:
    """One entry per flattened leaf of ``tree``, from ``placements`` given as a
    single placement list (one leaf), one entry per leaf, or a pytree prefix of
    ``tree`` (a dict keyed like the argument, say)."""
    if _is_entry(placements) and not (placements is None or isinstance(placements, Placement)) \
            and len(placements) == len(mesh.axis_names):
        placements = (placements,)
    if isinstance(placements, (list, tuple)) and len(placements) == n_leaves and all(
            _is_entry(p) for p in placements):
        return list(placements)
    prefix, prefix_tree = jax.tree_util.tree_flatten(placements, is_leaf=_is_entry)
    for path, stray in jax.tree_util.tree_flatten_with_path(placements, is_leaf=_is_entry)[0]:
        if not _is_entry(stray):
            raise PlacementTypeError(
                f"{what}{jax.tree_util.keystr(path) or '[0]'}: expected a list or tuple of "
                f"jlocalmap placements (Shard(d), Replicate(), Partial(op)), one per "
                f"mesh axis {tuple(mesh.axis_names)}, or None (PyTorch's placement "
                f"objects and strings are not accepted); found {stray!r}; write e.g. "
                f"{[Replicate()] * len(mesh.axis_names)}.")
    try:
        subtrees = prefix_tree.flatten_up_to(tree)
    except (ValueError, TypeError):
        found = len(placements) if isinstance(placements, (list, tuple)) else 1
        raise PlacementValueError(
            f"{what}: Expecting {found} {kind} to local_map function based on "
            f"placements, but found {n_leaves}. Give one entry (a placement list "
            f"or None) per flattened {kind[:-1]} leaf, or a pytree prefix of the "
            f"{'arguments' if kind == 'inputs' else 'outputs'}: the placements' "
            f"structure {prefix_tree} does not prefix the "
            f"{'arguments' if kind == 'inputs' else 'outputs'}' "
            f"{jax.tree_util.tree_structure(tree, is_leaf=_is_none)}.") from None
    return [entry for entry, sub in zip(prefix, subtrees)
            for _ in jax.tree_util.tree_leaves(sub, is_leaf=_is_none)]


def _signature(leaves: Sequence[Any], in_tree, kwargs) -> Optional[tuple]:
    """A cheap key of an eager call (tree, and each leaf's type, shape, dtype and
    sharding, or value when static), or None when a leaf is a tracer or unhashable."""
    signature = []
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            return None
        if isinstance(leaf, jax.Array):
            signature.append((leaf.shape, leaf.dtype, leaf.sharding))
        elif isinstance(leaf, UnevenArray):
            signature.append((UnevenArray, leaf.shape, leaf.placements, leaf.padded.sharding))
        elif isinstance(leaf, np.ndarray):
            signature.append((np.ndarray, leaf.shape, leaf.dtype))
        else:
            signature.append((type(leaf), leaf))
    kw_leaves, kw_tree = jax.tree_util.tree_flatten(kwargs, is_leaf=_is_none)
    key = ("signature", in_tree, tuple(signature), kw_tree,
           tuple((type(v), v) for v in kw_leaves))
    try:
        hash(key)
    except TypeError:
        return None
    return key


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

    def stacked_axes(self, mesh: AnyMesh) -> tuple[str, ...]:
        return layouts.partial_axes(self.dst, mesh)


@dataclasses.dataclass
class _Trace:
    """What tracing the body found out about its outputs."""
    out_tree: Any = None
    statics: dict = dataclasses.field(default_factory=dict)
    array_positions: list = dataclasses.field(default_factory=list)
    out_specs: list = dataclasses.field(default_factory=list)
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
        leaves, in_tree = jax.tree_util.tree_flatten(args, is_leaf=_is_input_leaf)
        signature = _signature(leaves, in_tree, kwargs)
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
            fn = jax.jit(functools.partial(
                self._impl, mesh, in_tree, tuple(inputs), statics, kwargs, trace))
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
                elif self.redistribute_inputs and not isinstance(leaf, (jax.core.Tracer, UnevenArray)) \
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
                local_shape(padded_shape(leaf.shape, dst, mesh), dst, mesh, what=what)
            if dst is None:
                raise PlacementValueError(
                    f"{what}: input {i} is on Auto-axis mesh {mesh}, whose placements "
                    f"JAX does not track under jax.jit; give in_placements explicitly.")
            if src is not None and layouts.canonical(src, mesh) != layouts.canonical(dst, mesh) \
                    and not self.redistribute_inputs:
                raise PlacementValueError(
                    f"{what}: input {i} has placements {list(src)}, but the local_map "
                    f"requires {list(dst)}; set redistribute_inputs=True to "
                    f"redistribute it, or call jlocalmap.redistribute(x, mesh, "
                    f"{list(dst)}) first.")
            if isinstance(leaf, UnevenArray) and layouts.canonical(src, mesh) != \
                    layouts.canonical(dst, mesh):
                leaves[i] = leaf = layouts.full_tensor(leaf)  # re-laid out from whole
                src = None
        elif _is_array(leaf) or (_is_number(leaf) and entry is not None):
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
        relayout = src is None or layouts.canonical(src, mesh) != layouts.canonical(dst, mesh)
        shape = tuple(leaf.shape) if isinstance(leaf, UnevenArray) else np.shape(leaf)
        placements_to_spec(dst, mesh, len(shape), what=what)
        declared = None if grad is None else normalize_placements(as_placement_list(
            grad, mesh, f"in_grad_placements[{i}]"), len(shape), f"in_grad_placements[{i}]")
        reductions = () if grad is None else grad_reductions(
            dst, declared, mesh, f"in_grad_placements[{i}]")
        padded = isinstance(leaf, UnevenArray)
        if padded:
            leaves[i] = leaf.padded
        uneven = uneven_dims(shape, dst, mesh)
        sizes = {d: size for d, size, _, _ in uneven}
        full = padded_shape(shape, dst, mesh)
        chunks = tuple((axes, full[d] // math.prod(ns), sizes.get(d))
                       for d, (axes, ns) in dim_splits(dst, mesh, len(shape)).items())
        return _Input(i, src, tuple(dst), relayout, reductions, declared, uneven, padded,
                      chunks)

    @staticmethod
    def _key(in_tree, inputs, statics, kwargs, dyn):
        def hashable(x):
            try:
                hash(x)
                return (type(x), x)
            except TypeError:
                return ("id", id(x))  # the cache entry holds x, so the id stays unique
        kw_leaves, kw_tree = jax.tree_util.tree_flatten(kwargs, is_leaf=_is_none)
        avals = tuple((np.shape(x), getattr(x, "dtype", type(x)),
                       getattr(x, "sharding", None) if isinstance(x, jax.Array) else None)
                      for x in dyn)
        return (in_tree, tuple(inputs), tuple((i, hashable(v)) for i, v in statics.items()),
                kw_tree, tuple(hashable(v) for v in kw_leaves), avals)

    # -- the traced implementation -------------------------------------------
    def _impl(self, mesh, in_tree, inputs, statics, kwargs, trace, *dyn, pad_fill=0.0):
        in_specs, laid_out = [], []
        for plan, x in zip(inputs, dyn):
            x = jnp.asarray(x)
            if plan.uneven and plan.padded:
                # pad_fill != 0 only when checking that padding changes no result
                x = refill(x, plan.uneven, pad_fill) if pad_fill else x
            elif plan.uneven:
                if plan.src is not None:  # gather the whole value, then pad it
                    x = layouts.relayout(x, mesh, plan.src, [Replicate()] * len(mesh.axis_names))
                x = pad(x, plan.uneven, pad_fill)
                plan = dataclasses.replace(plan, src=None)
            if plan.relayout:
                x = layouts.relayout(x, mesh, plan.src, plan.dst,
                                     what=f"in_placements[{plan.index}]")
            spec = placements_to_spec(plan.dst, mesh, x.ndim,
                                      what=f"in_placements[{plan.index}]")
            stacked = plan.stacked_axes(mesh)
            if stacked:
                x, spec = layouts.stack_summands(x, mesh, spec, stacked)
            in_specs.append(spec)
            laid_out.append(x)

        def body(*local, adapt=True):
            leaves = dict(statics)
            for plan, v in zip(inputs, local):
                if plan.stacked_axes(mesh):
                    v = v[0] * layouts.avg_scale(plan.dst, mesh)
                # Unchecked bodies (check_vma=False) need no adapter: JAX's own
                # transpose there sums every device's cotangent of a replicated input.
                leaves[plan.index] = (with_grad_reductions(v, plan.grad)
                                      if adapt and self.check_vma else v)
            args = jax.tree_util.tree_unflatten(in_tree, [leaves[i] for i in range(len(leaves))])
            return self._finish_outputs(self.func(*args, **kwargs), mesh, trace, inputs)

        body.__name__ = f"local_map[{getattr(self.func, '__name__', 'func')}]"
        # Trace once without gradient adapters: the output structure fixes
        # out_specs, and the jaxpr shows what JAX's typing proves about gradients.
        probe = jax.shard_map(lambda *a: (body(*a, adapt=False), ())[1], mesh=mesh,
                              in_specs=tuple(in_specs), out_specs=(),
                              check_vma=self.check_vma)
        verify = self.check_vma and any(p.declared_grad for p in inputs)
        if verify:
            self._verify_grads(jax.make_jaxpr(probe)(*laid_out), inputs, mesh)
        else:
            jax.eval_shape(probe, *laid_out)
        region = jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs),
                               out_specs=tuple(trace.out_specs), check_vma=self.check_vma)
        return region(*laid_out)

    def _check_padding(self, mesh, in_tree, inputs, statics, kwargs, dyn) -> None:
        """Run the region on random data with zero and with nonzero padding (once
        per signature): the logical outputs must not change."""
        key = ("padding-checked", self._key(in_tree, inputs, statics, kwargs, dyn))
        if key in self._cache:
            return
        rng = np.random.default_rng(0)
        samples = []
        for plan, x in zip(inputs, dyn):
            shape = list(np.shape(x))
            dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.result_type(x))
            for d, size, _, _ in plan.uneven if plan.padded else ():
                shape[d] = size  # the logical shape, laid out anew below
            data = (rng.standard_normal(shape) if np.issubdtype(dtype, np.inexact)
                    else rng.integers(0, 2, shape)).astype(dtype)
            if plan.padded:
                data = layouts.distribute_tensor(data, mesh, plan.dst).padded
            elif plan.src is not None:
                data = layouts.distribute_tensor(data, mesh, plan.src)
            else:
                data = layouts.distribute_tensor(data, mesh, [Replicate()] * len(mesh.axis_names))
            samples.append(data)
        results = []
        for fill in (0.0, 1.0):
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
        leaves, trace.out_tree = jax.tree_util.tree_flatten(out, is_leaf=_is_none)
        if self.out_placements is None:
            entries = [None] * len(leaves)
        else:
            entries = assign_placements(self.out_placements, out, len(leaves), mesh,
                                        "out_placements", "outputs")
        trace.statics, trace.array_positions, trace.out_specs = {}, [], []
        trace.uneven_outputs = {}
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
            if not _is_array(leaf):
                raise PlacementValueError(
                    f"{what}: output {j} is a {type(leaf).__name__}, not an array, so "
                    f"its entry must be None; found {entry!r}.")
            placements = as_placement_list(entry, mesh, what)
            placements = normalize_placements(placements, jnp.ndim(leaf), what)
            value, placements = _to_out_layout(jnp.asarray(leaf), placements, mesh, j)
            spec = placements_to_spec(placements, mesh, value.ndim, what=what)
            dims = _uneven_output_dims(value.shape, placements, mesh, inputs, j)
            if dims:
                trace.uneven_outputs[j] = (dims, placements)
            trace.array_positions.append(j)
            trace.out_specs.append(spec)
            arrays.append(value)
        return tuple(arrays)


def _uneven_output_dims(local: Sequence[int], placements: PlacementList, mesh: AnyMesh,
                        inputs: Sequence[_Input], j: int) -> tuple:
    """The uneven dims of output ``j``: a dim split over the same axes as an
    uneven input dim, whose local length is that input's padded chunk length and
    no even input's, has that input's logical size; another length on axes that
    split an uneven input is refused. (Taking an output for even when it came
    from an uneven input shows up in the padding check.)"""
    known: dict = {}
    for plan in inputs:
        for axes, width, size in plan.chunks:
            known.setdefault((axes, width), set()).add(size)
    uneven_axes = {axes for (axes, _), sizes in known.items() if sizes - {None}}
    dims = []
    for d, (axes, splits) in sorted(dim_splits(placements, mesh, len(local)).items()):
        matches = known.get((axes, local[d]), set())
        if None in matches and len(matches) > 1:
            raise PlacementValueError(
                f"out_placements[{j}]: output {j}'s dim {d}, split over {axes} in chunks of "
                f"{local[d]}, could be an even input's rows or an uneven input's (of "
                f"{sorted(m for m in matches if m is not None)} rows) padded to the same "
                f"chunk length, so jlocalmap cannot tell whether it has padding rows. "
                f"Return it from a separate local_map, or Replicate() it over {axes}.")
        if None in matches or (not matches and axes not in uneven_axes):
            continue
        if len(matches) == 1:
            (size,) = matches
            dims.append((d, size, axes, splits))
        else:
            raise PlacementValueError(
                f"out_placements[{j}]: output {j} is sharded over {axes} on dim {d} like "
                f"an uneven input, but its local length {local[d]} "
                f"{'matches several uneven inputs of different sizes' if matches else 'matches no uneven input'} "
                f"(padded chunk lengths: {sorted(w for a, w in known if a == axes)}), so "
                f"jlocalmap cannot tell its padding rows from its rows. Keep uneven dims "
                f"row for row, or Replicate() the output over {axes} (reduce in the body).")
    return tuple(dims)


def _to_out_layout(v: jax.Array, placements: PlacementList, mesh: AnyMesh,
                   j: int) -> tuple[jax.Array, PlacementList]:
    """The local output ``v`` as the storage of its declared placements:
    avg-partials are stored as sums, max/min partials are reduced here."""
    varying = varying_axes(v)
    sizes = axis_sizes(mesh)
    stored, summed, scale = [], [], 1
    for axis, p in zip(mesh.axis_names, placements):
        if p.is_replicate() and axis in varying:
            raise PlacementValueError(
                f"out_placements[{j}]: output {j} is declared Replicate() on mesh axis "
                f"{axis!r}, but its value varies over {axis!r} (devices hold different "
                f"values). Reduce it in the body (jax.lax.psum(y, {axis!r})) or "
                f"declare Partial() so that a later redistribute reduces it.")
        if p.is_partial() and sizes[axis] == 1:
            # One summand is the value: stored as Replicate (see specs.placements_to_spec).
            v = jax.lax.psum(v, axis) if axis in varying else v
            stored.append(Replicate())
        elif p.is_partial():
            if axis not in varying:
                v = jax.lax.pcast(v, axis, to="varying")
            if p.reduce_op in ("max", "min"):
                v = (jax.lax.pmax if p.reduce_op == "max" else jax.lax.pmin)(v, axis)
                stored.append(Replicate())
                continue
            scale *= sizes[axis] if p.reduce_op == "avg" else 1
            summed.append(axis)
            stored.append(Partial("sum"))
        else:
            stored.append(p)
    if summed:  # divide before the cast: JAX has no division of unreduced values
        v = v / jnp.asarray(scale, v.dtype) if scale != 1 else v
        v = jax.lax.pcast(v, tuple(summed), to="unreduced")
    return v, tuple(stored)


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
