"""The region stage: a planned call as one named ``shard_map`` program.

Inputs are laid out as their plans say (uneven ones padded first, see
``padding``), Partial inputs passed as their stacked summands, gradient
declarations applied as adapters on the local values, and the body traced
once inside ``jax.shard_map`` under the region's name (``region_names``). What
the body's outputs are (their tree and layouts) is learnt once per call
signature, by a shape-only trace that also verifies gradient declarations
(``gradients``), and reused: each compile traces the body once.

Example:
    >>> import jax, jax.numpy as jnp, jlocalmap as jlm
    >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
    >>> f = jlm.local_map(jnp.sin, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
    >>> jaxpr = jax.make_jaxpr(f)(jax.ShapeDtypeStruct((8,), jnp.float32)).jaxpr
    >>> jaxpr.eqns[-1].primitive.name, str(jaxpr.eqns[-1].source_info.name_stack)
    ('shard_map', 'local_map[sin](S(0) -> S(0))')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlocalmap._caches import LRU
from jlocalmap._jax_compat import config_value
from jlocalmap.call import padding
from jlocalmap.call.call_plan import CallPlan
from jlocalmap.call.input_plan import InputPlan
from jlocalmap.call.settings import Settings
from jlocalmap.errors import PlacementValueError
from jlocalmap.layouts.dtypes import as_dtype
from jlocalmap.layouts.grad_axes import reduced_axes
from jlocalmap.movement.relayout import relayout, stack_summands
from jlocalmap.region.custom_rules import check_custom_rules, has_custom_vjp
from jlocalmap.region.gradients import (
    verify_grad_placements,
    with_grad_reductions,
    with_scaled_cotangent,
)
from jlocalmap.region.marker import mark
from jlocalmap.region.names import region_name
from jlocalmap.region.outputs import OutputFacts, finish_outputs
from jlocalmap.region.record import RegionArray, RegionSettings
from jlocalmap.region.row_flow import check_padding_rows

_MEMO_SIZE = 256


class _StaleFacts(Exception):
    """The body returned other outputs than the learnt facts say (it reads state)."""


@dataclasses.dataclass
class Region:
    """The program of one local_map: runs planned calls, and remembers per call
    signature what the body's outputs are."""
    settings: Settings
    _facts: LRU = dataclasses.field(default_factory=lambda: LRU(_MEMO_SIZE))

    def __call__(self, plan: CallPlan, *dyn: Any, pad_fill: float = 0.0
                 ) -> tuple[tuple, OutputFacts]:
        """The region's array outputs (one per ``facts.arrays``) and the facts."""
        key = plan.key(dyn, shardings=False)
        laid_out, in_specs = _lay_out(plan, dyn, pad_fill)
        facts = self._facts.get(key)
        if facts is not None:
            try:
                return self._stage(plan, facts, laid_out, in_specs), facts
            except _StaleFacts:
                self._facts.pop(key)
        facts = self._facts.put(key, self._probe(plan, laid_out, in_specs))
        return self._stage(plan, facts, laid_out, in_specs), facts

    def _body(self, plan: CallPlan, local: Sequence[Any], adapt: bool):
        out = self._run_func(plan, local, adapt)
        return finish_outputs(out, self.settings.out_placements, plan.mesh, plan.inputs,
                              plan.marked, self.settings.check_vma)

    def _run_func(self, plan: CallPlan, local: Sequence[Any], adapt: bool) -> Any:
        """``func`` on the local operands (and the leaves passed through)."""
        leaves = dict(plan.statics)
        for p in plan.inputs:
            if not p.operand:
                leaves[p.index] = jnp.zeros(p.dst.local_shape, p.dst.dtype)
        for p, v in zip(plan.operands, local, strict=True):
            if p.dst.partial_axes:
                v = v[0] * p.dst.avg_scale
            leaves[p.index] = self._adapt(p, v) if adapt else v
        args = jax.tree_util.tree_unflatten(plan.in_tree, [leaves[i] for i in range(len(leaves))])
        return self.settings.func(*args, **plan.kwargs)

    def _trace_backward(self, plan: CallPlan, laid_out: Sequence, in_specs: tuple) -> None:
        """Trace the body's backward once, shapes only (its custom rules get typed)."""
        def backward(*local):
            floats = [k for k, v in enumerate(local) if jnp.issubdtype(v.dtype, jnp.inexact)]

            def differentiable(*diff):
                values = list(local)
                for k, v in zip(floats, diff, strict=True):
                    values[k] = v
                leaves = jax.tree_util.tree_leaves(self._run_func(plan, values, adapt=True))
                return [o for o in leaves if isinstance(o, jax.Array) and
                        jnp.issubdtype(o.dtype, jnp.inexact)]
            out, pullback = jax.vjp(differentiable, *[local[k] for k in floats])
            pullback(out)
            return ()
        jax.eval_shape(jax.shard_map(backward, mesh=plan.mesh, in_specs=in_specs, out_specs=(),
                                     check_vma=True), *laid_out)

    def _adapt(self, p: InputPlan, v: Any) -> Any:
        """The local input with its gradient declaration applied."""
        if self.settings.check_vma:
            return with_grad_reductions(v, p.grad)
        if p.declared_grad is None:
            return v
        # JAX's transpose of an unchecked body sums every replicated input's
        # cotangent: one the body reduced itself (declared Replicate()) is divided back.
        return with_scaled_cotangent(v, reduced_axes(p.dst.placements, p.declared_grad,
                                                     p.dst.mesh), -1)

    def _probe(self, plan: CallPlan, laid_out: Sequence, in_specs: tuple) -> OutputFacts:
        """Trace the body once for its output facts (shapes only) and its jaxpr:
        gradient declarations are checked against its varying-axes typing, and
        uneven inputs' padding rows followed through it (``row_flow``)."""
        found: list = []

        def body(*local):
            values, facts = self._body(plan, local, adapt=False)
            found.append(facts)
            return values

        def probe(*local):
            # Inside the region (its axes manual): the body's own jaxpr, outputs included.
            found.append(body(*local) if debugging else jax.make_jaxpr(body)(*local).jaxpr)
            return ()
        debugging = config_value("jax_disable_jit")
        region = jax.shard_map(probe, mesh=plan.mesh, in_specs=in_specs, out_specs=(),
                               check_vma=self.settings.check_vma)
        if debugging:
            # The body runs on concrete values (Python control flow on them works),
            # so it is run, not traced; declarations are applied, not verified.
            region(*laid_out)
            return found[0]
        jax.eval_shape(region, *laid_out)
        facts, jaxpr = found
        if self.settings.check_vma:
            if any(p.declared_grad is not None for p in plan.operands):
                _verify(jaxpr, plan, self.settings.func_name)
            if has_custom_vjp(jaxpr):
                check_custom_rules(lambda: self._trace_backward(plan, laid_out, in_specs), plan,
                                   self.settings.func_name)
        if plan.uneven:
            check_padding_rows(jaxpr, plan, facts)
        return facts

    def _stage(self, plan: CallPlan, facts: OutputFacts, laid_out: Sequence,
               in_specs: tuple) -> tuple:
        call = _region_call(self.settings.func_name, plan, laid_out, facts)

        def body(*local):
            values, found = self._body(plan, local, adapt=True)
            if not found.matches(facts):
                raise _StaleFacts()
            return tuple(mark(values, call))  # the region's identity, in the program itself
        body.__name__ = f"local_map[{self.settings.func_name}]"
        region = jax.shard_map(body, mesh=plan.mesh, in_specs=in_specs,
                               out_specs=facts.out_specs, check_vma=self.settings.check_vma)
        with jax.named_scope(call.name):  # the region's name, for profilers (HLO metadata)
            try:
                out = iter(region(*laid_out))
            except NotImplementedError:  # JAX batching what it cannot: say what and why
                check_batchable(facts)
                raise
        return tuple(next(out) if o.in_region else _make_empty(o.layout)
                     for o in facts.arrays)


def _lay_out(plan: CallPlan, dyn: Sequence[Any], pad_fill: float) -> tuple[list, tuple]:
    """The region's operands in their planned layouts, and their in_specs."""
    laid_out, specs = [], []
    for p, x in zip(plan.inputs, dyn, strict=True):
        if not p.operand:
            continue
        x = jnp.asarray(x)
        src = p.src
        if p.dst.is_uneven and not p.padded:
            x, src = padding.pad_input(x, p, pad_fill), None
        if src is None or p.relayout:
            x = relayout(x, None if src is None else src.storage(), p.dst.storage(),
                         carry_devices=False)
        spec = p.dst.spec
        if p.dst.partial_axes:
            x, spec = stack_summands(x, plan.mesh, spec, p.dst.partial_axes)
        laid_out.append(x)
        specs.append(spec)
    return laid_out, tuple(specs)


def check_batchable(facts: OutputFacts) -> None:
    """JAX has no batching rule for unreduced values: where it raised its bare
    NotImplementedError batching a region with Partial outputs (under jax.vmap,
    jacfwd, hessian), say what and why instead."""
    partial = [o.index for o in facts.region_outputs if o.layout.partial_axes]
    if partial:
        raise PlacementValueError(
            f"out_placements[{partial[0]}]: output {partial[0]} is declared Partial(), and "
            f"this call is batched by jax.vmap (jacfwd and hessian vmap too); JAX stores "
            f"Partial values as unreduced arrays and has no batching rule for them. Reduce "
            f"it in the body (jax.lax.psum, Replicate()) or declare Shard(d) with "
            f"jax.lax.psum_scatter, or vmap inside the body instead.")


def _make_empty(layout) -> jax.Array:
    """A value with no elements, made outside the region (jax 0.11's CPU
    runtime crashes on empty shard_map results next to others)."""
    return relayout(jnp.zeros(layout.padded_shape, layout.dtype), None, layout.storage())


def _verify(body, plan: CallPlan, func_name: str) -> None:
    for k, p in enumerate(plan.operands):   # the body's inputs are the operands
        if p.declared_grad is not None:
            try:
                verify_grad_placements(body, k, p.dst.placements, p.declared_grad, plan.mesh,
                                       f"in_grad_placements[{p.index}]")
            except PlacementValueError as e:  # models have many regions: say which
                raise PlacementValueError(f"{e} (in local_map[{func_name}])") from None


def _operand(index: int, layout, local: tuple, dtype, grad=None) -> RegionArray:
    return RegionArray(index, layout.placements, tuple(layout.shape), tuple(local),
                       as_dtype(dtype), grad)


def _region_call(func_name: str, plan: CallPlan, laid_out: Sequence,
                 facts: OutputFacts) -> RegionSettings:
    """The region's settings, and its name from them."""
    operands: list[InputPlan] = list(plan.operands)
    ins = tuple(_operand(p.index, p.dst, p.dst.local_shape, x.dtype, p.declared_grad)
                for p, x in zip(operands, laid_out, strict=True))
    outs = tuple(_operand(o.index, o.layout, o.local, o.layout.dtype)
                 for o in facts.region_outputs)
    name = region_name(
        func_name, [op.placements for op in ins], [op.placements for op in outs],
        [op.grad_placements for op in ins],
        in_sizes=[p.dst.shape if p.dst.is_uneven else None for p in operands],
        out_sizes=[o.layout.shape if o.layout.is_uneven else None
                   for o in facts.region_outputs])
    return RegionSettings(name, func_name, plan.mesh,
                      ins, outs)
