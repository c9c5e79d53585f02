"""``in_grad_placements``: how the gradient of each local input is laid out.

jlocalmap differentiates the body with JAX's varying-axes typing
(``check_vma``), so gradients equal the unsharded computation by default: a
replicated input used with sharded data gets its all-reduce from JAX itself.
A declared gradient placement is honoured through a ``jax.custom_vjp`` adapter
on the local input: on an axis where the input is ``Replicate()`` and the
gradient is declared ``Partial(op)``, the forward marks the input as varying
and the backward reduces the local cotangent (``psum``, or ``pmean`` for avg).
Declarations that cannot describe a cotangent of the input's local shape are
refused. See docs/gradients.md.

Example:
    >>> import jax, jlocalmap as jlm
    >>> from jlocalmap.gradients import grad_reductions
    >>> mesh = jax.sharding.AbstractMesh((2,), ("dp",))
    >>> grad_reductions((jlm.Replicate(),), (jlm.Partial(),), mesh, "in_grad_placements[1]")
    (('dp', 'sum'),)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax

from jlocalmap.errors import PlacementValueError
from jlocalmap.placements import Placement
from jlocalmap.specs import AnyMesh


def grad_reductions(input_placements: Sequence[Placement],
                    grad_placements: Sequence[Placement], mesh: AnyMesh,
                    what: str) -> tuple[tuple[str, str], ...]:
    """The (axis, reduce_op) reductions that turn a local cotangent laid out by
    ``grad_placements`` into one laid out like the input; raises for pairs that
    do not describe a cotangent of the local input's shape."""
    reductions = []
    for axis, p, g in zip(mesh.axis_names, input_placements, grad_placements):
        if g == p or (g.is_partial() and p.is_partial()):
            continue
        if p.is_replicate() and g.is_partial():
            if g.reduce_op not in ("sum", "avg"):
                raise PlacementValueError(
                    f"{what}: Partial({g.reduce_op}) on mesh axis {axis!r} is not a "
                    f"gradient reduction (gradients add up); use Partial('sum').")
            reductions.append((axis, g.reduce_op))
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


def with_grad_reductions(x: jax.Array, reductions: tuple[tuple[str, str], ...]) -> jax.Array:
    """Inside a body: ``x`` unchanged in value, varying over the reduced axes, and
    its cotangent reduced over them on the way back."""
    if not reductions:
        return x
    axes = tuple(a for a, _ in reductions)
    return _reduce_cotangent(axes, tuple(op for _, op in reductions), x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reduce_cotangent(axes, ops, x):
    return jax.lax.pcast(x, axes, to="varying")


def _reduce_cotangent_fwd(axes, ops, x):
    return _reduce_cotangent(axes, ops, x), None


def _reduce_cotangent_bwd(axes, ops, _, ct):
    for axis, op in zip(axes, ops):
        ct = jax.lax.pmean(ct, axis) if op == "avg" else jax.lax.psum(ct, axis)
    return (ct,)


_reduce_cotangent.defvjp(_reduce_cotangent_fwd, _reduce_cotangent_bwd)
