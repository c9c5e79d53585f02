"""A body's own ``jax.custom_vjp`` rules against its gradient declarations.

A custom rule's backward, not the body's forward, defines its inputs' cotangents,
so the declaration verification (``region.gradients``) trusts the declaration
there. JAX types the rule's output when the backward is traced: a backward that
returns a per-rank value (a partial sum, say the weight gradient of a fused
RMSNorm over this rank's rows, torchtitan #404) for an input whose gradient is
declared ``Replicate()`` (or left to be the input's own ``Replicate()``) is
refused with JAX's bare "Custom VJP bwd rule must produce an output with the
same type ..." error. On a region's first trace, jlocalmap traces the body's
backward once (shapes only) where the body holds such a rule, and turns that
error into one naming the region, the argument, the declared and the actual
placement, and the fix; JAX's message is kept as its cause.

Example:
    >>> from jlocalmap.region.custom_rules import parse_rule_error
    >>> parse_rule_error("Custom VJP bwd rule must produce an output with the same type as "
    ...     "the args tuple of the primal function, but at output[1] the bwd rule produced "
    ...     "an output of type float32[4]{V:tp} corresponding to an input of type float32[4], "
    ...     "so the manual axis types do not match")
    ('float32', (4,), ('tp',))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import numpy as np

from jlocalmap._jax_compat import custom_rule_type_error, primitive_name, sub_jaxprs
from jlocalmap.errors import PlacementValueError
from jlocalmap.layouts.placements import Partial

_VJP_RULES = ("custom_vjp_call", "custom_vjp_call_jaxpr")


def has_custom_vjp(jaxpr) -> bool:
    """Whether a jaxpr (or one nested in it) calls a ``jax.custom_vjp`` rule."""
    return any(primitive_name(eqn) in _VJP_RULES or any(map(has_custom_vjp, sub_jaxprs(eqn)))
               for eqn in jaxpr.eqns)


def parse_rule_error(text: str) -> Optional[tuple[str, tuple, tuple]]:
    """(dtype, local shape, mesh axes the rule's output varies over and its input
    does not) from JAX's custom-rule type error, or None for another error."""
    groups = custom_rule_type_error(text)
    if groups is None:
        return None
    dtype, dims, produced, expected = groups
    shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
    axes = lambda s: [a.strip() for a in (s or "").strip("()").split(",") if a.strip()]
    return dtype, shape, tuple(a for a in axes(produced) if a not in axes(expected))


def check_custom_rules(trace_backward: Callable[[], object], plan, func_name: str) -> None:
    """Run ``trace_backward`` (a shape-only trace of the body's backward) and
    re-raise JAX's custom-rule type error as one that names the declaration.
    Other failures are left to the user's own backward, where they belong."""
    try:
        trace_backward()
    except Exception as e:  # noqa: BLE001 - only the type mismatch is this check's business
        parsed = parse_rule_error(str(e)) if isinstance(e, ValueError) else None
        if parsed is not None:
            raise PlacementValueError(_message(parsed, plan, func_name, str(e))) from e


def _suspects(parsed: tuple, plan) -> list:
    """The inputs the rule's output may be the gradient of: same local shape and
    dtype, and a gradient that is not Partial on the axes the output varies over."""
    dtype, shape, axes = parsed
    found = []
    for p in plan.operands:
        if p.dst.local_shape != shape or np.dtype(p.dst.dtype).name != dtype:
            continue
        declared = p.declared_grad or p.dst.placements
        names = p.dst.mesh.axis_names
        if all(declared[names.index(a)].is_replicate() for a in axes if a in names):
            found.append(p)
    return found


def _message(parsed: tuple, plan, func_name: str, cause: str) -> str:
    dtype, shape, axes = parsed
    suspects = _suspects(parsed, plan) or list(plan.operands)
    p = suspects[0]
    names = plan.mesh.axis_names
    declared = p.declared_grad
    shown = (f"declared {list(declared)}" if declared is not None
             else f"undeclared, so its own placements {list(p.dst.placements)}")
    wanted = _with_partial(declared or p.dst.placements, names, axes)
    axes_text = ("axes " if len(axes) > 1 else "axis ") + ", ".join(repr(a) for a in axes)
    others = (f" (or in_grad_placements[{', '.join(str(q.index) for q in suspects[1:])}]: "
              f"inputs of the same local type)" if len(suspects) > 1 else "")
    return (f"in_grad_placements[{p.index}]{others}: the custom_vjp rule in "
            f"local_map[{func_name}] returns, for input {p.index} ({dtype}{list(shape)} "
            f"locally), a gradient that differs across mesh {axes_text}: a per-rank "
            f"partial sum, Partial() there, but its gradient is {shown}. Declare "
            f"in_grad_placements[{p.index}]={wanted} (jlocalmap then sums it), or reduce "
            f"it in the rule's backward (jax.lax.psum(grad, {tuple(axes)!r})). "
            f"JAX's message: {cause}")


def _with_partial(placements, names, axes) -> list:
    return [Partial() if a in axes else p for a, p in zip(names, placements, strict=True)]
