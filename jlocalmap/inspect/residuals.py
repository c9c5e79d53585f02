"""Residuals: what the forward pass of a differentiated region saves for its
backward pass, each named by the primitive that computed it inside the body
(read from the traced program by :func:`~jlocalmap.inspect.regions`).

Example:
    >>> import jax, jax.numpy as jnp, jlocalmap as jlm
    >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
    >>> f = jlm.local_map(jnp.exp, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
    >>> [r] = jlm.inspect.regions(jax.grad(lambda x: f(x).sum()), jax.ShapeDtypeStruct((8,), jnp.float32))
    >>> [str(res) for res in r.residuals]
    ['f32[2] from exp']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.extend import core as jcore

from jlocalmap._jax_compat import aligned_sub_jaxprs, primitive_name
from jlocalmap.region.marker import region_p
from jlocalmap.region.record import RegionSettings, aval_text, body_of


@dataclasses.dataclass(frozen=True)
class Residual:
    """A value the forward pass of a region saves for its backward pass.

    ``producer`` is the primitive that computed it inside the body (looking
    through calls, ``pvary`` casts and the identity of ``in_grad_placements``),
    ``input <i>`` for a region input saved as is (``operand <k>`` where the
    leaf is not known), ``constant`` for a literal, or
    ``checkpoint_name:<name>`` for a value named with
    ``jax.ad_checkpoint.checkpoint_name``.

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
        >>> f = jlm.local_map(jnp.exp, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> [r] = jlm.inspect.regions(jax.grad(lambda x: f(x).sum()), jax.ShapeDtypeStruct((8,), jnp.float32))
        >>> [(res.shape, res.producer) for res in r.residuals]
        [((2,), 'exp')]
    """
    shape: tuple
    dtype: np.dtype
    producer: str

    def __str__(self) -> str:
        return f"{aval_text(self.shape, self.dtype)} from {self.producer}"


def _producer(jaxpr, var) -> tuple:
    """("input", k) if ``var`` is (a cast of) input k of ``jaxpr``, else
    ("op", text) naming the primitive that computed it."""
    if not isinstance(var, jcore.Var):
        return ("op", "constant")
    if var in jaxpr.invars:
        return ("input", jaxpr.invars.index(var))
    eqn = next((e for e in jaxpr.eqns if var in e.outvars), None)
    if eqn is None:
        return ("op", "constant")
    name = primitive_name(eqn)
    if name in ("pvary", "pcast") and len(eqn.invars) == 1:
        return _producer(jaxpr, eqn.invars[0])
    if eqn.primitive is region_p:  # the region's marker: an identity
        return _producer(jaxpr, eqn.invars[eqn.outvars.index(var)])
    if name == "reduce_precision" and _is_noop_rounding(eqn):
        # jax.checkpoint marks the values it saves with a rounding to their own
        # precision (against CSE): the value is the operand's.
        return _producer(jaxpr, eqn.invars[0])
    if name == "name":
        return ("op", f"checkpoint_name:{eqn.params['name']}")
    if name in ("broadcast_in_dim", "convert_element_type", "reshape") and \
            _producer(jaxpr, eqn.invars[0]) == ("op", "constant"):
        return ("op", "constant")
    for sub, positions in aligned_sub_jaxprs(eqn):
        if len(sub.outvars) == len(eqn.outvars) and positions is not None:
            kind, what = _producer(sub, sub.outvars[eqn.outvars.index(var)])
            if kind == "input":
                return _producer(jaxpr, eqn.invars[positions[what]])
            return kind, what
    return ("op", name)


def _is_noop_rounding(eqn) -> bool:
    dtype = eqn.invars[0].aval.dtype
    if not np.issubdtype(dtype, np.floating) or not isinstance(eqn.invars[0], jcore.Var):
        return False
    info = jax.numpy.finfo(dtype)
    return (eqn.params.get("exponent_bits") == info.nexp
            and eqn.params.get("mantissa_bits") == info.nmant)


def residuals(forward, readers: Sequence, settings: RegionSettings,
              pieces: dict) -> tuple[Residual, ...]:
    """What the backward (and recompute) equations read of the forward pass
    (``forward``, ``readers`` and ``pieces``: region_inspection's occurrences of
    region equations, with their values' provenance tokens):
    the forward equation's outputs and inputs, and what loop-invariant pieces
    of the region hoisted out of a scan computed."""
    body = body_of(forward.eqn)
    sources: dict = {}
    for j, ts in enumerate(forward.out_tokens):
        for t in ts:
            sources[t] = (body, body.outvars[j], forward)
    for k, ts in enumerate(forward.in_tokens):
        for t in ts:
            sources.setdefault(t, (body, body.invars[k], forward))
    for piece in pieces.get(id(forward), ()):
        piece_body = body_of(piece.eqn)
        for j, ts in enumerate(piece.out_tokens):
            for t in ts:
                sources[t] = (piece_body, piece_body.outvars[j], piece)
    exact = _operands_are_the_calls(forward.eqn, settings)
    seen, found = set(), []
    for reader in readers:
        for ts in reader.in_tokens:
            hit = next((sources[t] for t in ts if t in sources), None)
            if hit is None or id(hit[1]) in seen:
                continue
            seen.add(id(hit[1]))
            jaxpr, var, owner = hit
            kind, what = _producer(jaxpr, var)
            if kind == "input":
                what = (_input_label(what, forward.eqn, settings, exact)
                        if owner is forward else "loop-invariant input")
            found.append(Residual(tuple(var.aval.shape), var.aval.dtype, what))
    return tuple(found)


def _input_label(k: int, eqn, settings: RegionSettings, exact: bool) -> str:
    """Operand ``k`` of a forward equation as ``input <leaf index>``: directly
    where the equation's operands are the call's (``exact``), else (JAX split
    the region, as a scan's partial evaluation does) by a unique match of its
    shape and dtype among the call's inputs; ``operand <k>`` otherwise."""
    if exact:
        return f"input {settings.inputs[k].index}"
    aval = eqn.invars[k].aval
    matches = [op for op in settings.inputs
               if tuple(op.global_shape) == tuple(aval.shape) and op.dtype == aval.dtype]
    return f"input {matches[0].index}" if len(matches) == 1 else f"operand {k}"


def _operands_are_the_calls(eqn, settings: RegionSettings) -> bool:
    """Whether the body's inputs are the call's operands, in order (a Partial
    input's body value has its stacked summands' leading dim)."""
    body = body_of(eqn)
    if len(body.invars) != len(settings.inputs):
        return False
    return all(tuple(v.aval.shape) in (op.local_shape, (1, *op.local_shape))
               and v.aval.dtype == op.dtype
               for v, op in zip(body.invars, settings.inputs, strict=True))
