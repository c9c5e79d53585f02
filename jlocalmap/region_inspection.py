"""Regions: every ``local_map`` call in a traced program, as an inspectable unit.

A ``local_map`` call is one ``shard_map`` equation of the outer jaxpr (global
shapes outside, local shapes inside), staged under a ``jax.named_scope`` whose
name identifies it and its placements, e.g.
``local_map[attention](S(0)S(1)S(2), S(0)S(1)R -> S(0)S(1)S(2))``. That name is
the equation's name: it survives ``jax.jit``, ``jax.grad``, ``jax.checkpoint``
and ``jax.lax.scan`` (JAX wraps it as ``jvp(...)`` and ``transpose(jvp(...))``)
and prefixes the HLO metadata of every operation of the region.

:func:`regions` traces a function (concrete arrays or ``jax.ShapeDtypeStruct``\\ s,
over a ``Mesh`` or an ``AbstractMesh`` of any size; no devices are needed) and
returns one :class:`Region` per region call: its settings, global and local
shapes, its body, and where JAX differentiated it, the forward and backward
bodies and the residuals that pass from one to the other.

Example:
    >>> import jax, jax.numpy as jnp, jlocalmap as jlm
    >>> mesh = jax.sharding.AbstractMesh((8, 4), ("dp", "tp"))
    >>> @jlm.local_map(out_placements=[jlm.Shard(0), jlm.Replicate()],
    ...                in_placements=([jlm.Shard(0), jlm.Shard(1)],
    ...                               [jlm.Replicate(), jlm.Shard(0)]), device_mesh=mesh)
    ... def matmul(x, w):
    ...     return jax.lax.psum(x @ w, "tp")
    >>> x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    >>> w = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    >>> [r] = jlm.regions(jax.grad(lambda x, w: matmul(x, w).sum(), (0, 1)), x, w)
    >>> r.name, r.inputs[0].local_shape, r.differentiated
    ('local_map[matmul](S(0)S(1), RS(0) -> S(0)R)', (8, 8), True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
from jax.extend import core as jcore
import numpy as np

from jlocalmap import layouts
from jlocalmap.placements import PlacementList, compact

_NAME_LIMIT = 160      # longer names are shortened to func name + digest
_REGISTRY_SIZE = 4096  # recorded region calls kept for regions() to look up
_PREFIX = "local_map["


@dataclasses.dataclass(frozen=True)
class Operand:
    """One array input or output of a region.

    ``index`` is the leaf's position among the call's flattened arguments (or
    the body's flattened outputs); ``global_shape`` is the value's logical shape
    outside, ``local_shape`` what one device's body sees (padded chunk length
    along uneven dims).
    """
    index: int
    placements: PlacementList
    global_shape: tuple
    local_shape: tuple
    dtype: np.dtype
    grad_placements: Optional[PlacementList] = None

    def __str__(self) -> str:
        grad = "" if self.grad_placements is None else f"  grad {compact(self.grad_placements)}"
        return (f"[{self.index}] {_aval(self.global_shape, self.dtype)} "
                f"{compact(self.placements)} -> local {_aval(self.local_shape, self.dtype)}{grad}")


@dataclasses.dataclass(frozen=True)
class RegionCall:
    """What ``local_map`` records when it stages a region (see :func:`record`)."""
    name: str
    func_name: str
    mesh: tuple[tuple[str, int], ...]
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]


@dataclasses.dataclass(frozen=True)
class Residual:
    """A value the forward pass of a region saves for its backward pass.

    ``producer`` is the primitive that computed it inside the body (looking
    through calls, ``pvary`` casts and the identity of ``in_grad_placements``),
    ``input <i>`` for a region input saved as is, or
    ``checkpoint_name:<name>`` for a value named with
    ``jax.ad_checkpoint.checkpoint_name``.
    """
    shape: tuple
    dtype: np.dtype
    producer: str

    def __str__(self) -> str:
        return f"{_aval(self.shape, self.dtype)} from {self.producer}"


@dataclasses.dataclass(frozen=True)
class Region:
    """One ``local_map`` call of a traced program (see :func:`regions`).

    ``jaxpr`` is the body as staged (local shapes). For a region that JAX
    differentiated, ``forward`` is the same body (its outputs plus the residuals
    it saves), ``backward`` the body of the transposed region, ``recompute`` the
    part ``jax.checkpoint`` reruns in the backward pass (None if none), and
    ``residuals`` what passes from forward to backward. ``transform`` is JAX's
    transformation path of the forward equation (e.g. ``jvp()``), ``eqn`` the
    ``shard_map`` equation itself.
    """
    name: str
    func_name: str
    mesh: tuple[tuple[str, int], ...]
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    jaxpr: jcore.Jaxpr
    transform: str
    eqn: Any
    forward: Optional[jcore.Jaxpr] = None
    backward: Optional[jcore.Jaxpr] = None
    recompute: Optional[jcore.Jaxpr] = None
    residuals: Optional[tuple[Residual, ...]] = None

    @property
    def differentiated(self) -> bool:
        """Whether JAX produced a backward pass of this region."""
        return self.backward is not None

    def __str__(self) -> str:
        return self.pretty(jaxprs=False)

    def pretty(self, jaxprs: bool = True) -> str:
        """The region as text: settings, operands, residuals and (with
        ``jaxprs``) the body, forward, recompute and backward jaxprs.

        Example:
            >>> import jax, jax.numpy as jnp, jlocalmap as jlm
            >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
            >>> f = jlm.local_map(jnp.sin, [jlm.Shard(0)], ([jlm.Shard(0)],),
            ...                   device_mesh=mesh)
            >>> [r] = jlm.regions(f, jax.ShapeDtypeStruct((8,), jnp.float32))
            >>> print(r.pretty(jaxprs=False))
            local_map[sin](S(0) -> S(0)) on mesh (tp=4), not differentiated
              input  [0] f32[8] S(0) -> local f32[2]
              output [0] f32[8] S(0) -> local f32[2]
              body: 1 equations (sin)
        """
        mesh = ", ".join(f"{a}={n}" for a, n in self.mesh)
        how = (f"differentiated ({self.transform or 'grad'})" if self.differentiated
               else f"traced under {self.transform}" if self.transform else "not differentiated")
        lines = [f"{self.name} on mesh ({mesh}), {how}"]
        lines += [f"  input  {op}" for op in self.inputs]
        lines += [f"  output {op}" for op in self.outputs]
        lines.append(f"  body: {_summary(self.jaxpr)}")
        if self.differentiated:
            if self.recompute is not None:
                lines.append(f"  recompute: {_summary(self.recompute)}")
            lines.append(f"  backward: {_summary(self.backward)}")
            lines.append(f"  residuals ({len(self.residuals)}):")
            lines += [f"    {r}" for r in self.residuals]
        if jaxprs:
            parts = [("forward" if self.differentiated else "body", self.jaxpr),
                     ("recompute", self.recompute), ("backward", self.backward)]
            for title, jaxpr in parts:
                if jaxpr is not None:
                    text = str(jaxpr).replace("\n", "\n    ")
                    lines.append(f"  {title} jaxpr:\n    {text}")
        return "\n".join(lines)


# -- naming and recording (called by local_map when it stages a region) ------
_REGISTRY: OrderedDict = OrderedDict()


def region_name(func_name: str, in_placements: Sequence[Optional[PlacementList]],
                out_placements: Sequence[PlacementList],
                grad_placements: Sequence[Optional[PlacementList]] = ()) -> str:
    """The name a region is staged under: the function and its placements in
    DTensor's short notation; beyond 160 characters, the function and a digest.

    Example:
        >>> import jlocalmap as jlm
        >>> from jlocalmap.region_inspection import region_name
        >>> S, R = jlm.Shard, jlm.Replicate
        >>> region_name("attn", [(S(0), S(1)), (S(0), R())], [(S(0), S(1))])
        'local_map[attn](S(0)S(1), S(0)R -> S(0)S(1))'
    """
    text = (", ".join(compact(p) for p in in_placements) + " -> "
            + ", ".join(compact(p) for p in out_placements))
    if any(g is not None for g in grad_placements):
        text += "; grad " + ", ".join(compact(g) for g in grad_placements)
    name = f"{_PREFIX}{func_name}]({text})"
    if len(name) > _NAME_LIMIT:
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        name = f"{_PREFIX}{func_name}]#{digest}"
    return name


def record(call: RegionCall, staged_avals: Sequence[Any]) -> None:
    """Remember a staged region by its name and the avals of the arrays it was
    staged with, so :func:`regions` can report its settings."""
    key = (call.name, _avals_key(staged_avals))
    _REGISTRY[key] = call
    _REGISTRY[(call.name, None)] = call
    _REGISTRY.move_to_end(key)
    while len(_REGISTRY) > _REGISTRY_SIZE:
        _REGISTRY.popitem(last=False)


def _avals_key(avals: Sequence[Any]) -> tuple:
    return tuple((tuple(a.shape), str(a.dtype)) for a in avals)


def _recorded(name: str, eqn) -> Optional[RegionCall]:
    return (_REGISTRY.get((name, _avals_key([v.aval for v in eqn.invars])))
            or _REGISTRY.get((name, None)))


def name_in(name_stack: str) -> Optional[str]:
    """The region name inside an equation's name stack (JAX may wrap it, as in
    ``transpose(jvp(local_map[f](...)))``), or None.

    Example:
        >>> from jlocalmap.region_inspection import name_in
        >>> name_in("transpose(jvp(local_map[f](S(0) -> R)))")
        'local_map[f](S(0) -> R)'
    """
    start = name_stack.find(_PREFIX)
    if start < 0:
        return None
    end = _balanced_end(name_stack, start + len(_PREFIX) - 1, "[", "]")
    if end < len(name_stack) and name_stack[end] == "(":
        end = _balanced_end(name_stack, end, "(", ")")
    elif name_stack.startswith("#", end):
        end += 11
    return name_stack[start:end]


def region_settings(eqn: Any) -> Optional[RegionCall]:
    """The settings of the ``local_map`` region a jaxpr equation stages (name,
    function, mesh, operands with placements and shapes), or None for any other
    equation: how tools walking their own jaxprs find every region.

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
        >>> f = jlm.local_map(jnp.cos, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> jaxpr = jax.make_jaxpr(f)(jax.ShapeDtypeStruct((8,), jnp.float32)).jaxpr
        >>> [(s.func_name, s.inputs[0].placements, s.inputs[0].local_shape)
        ...  for s in map(jlm.region_settings, jaxpr.eqns) if s is not None]
        [('cos', (Shard(dim=0),), (2,))]
    """
    if getattr(getattr(eqn, "primitive", None), "name", None) != "shard_map":
        return None
    name = name_in(str(eqn.source_info.name_stack))
    return None if name is None else _recorded(name, eqn)


def _balanced_end(text: str, open_at: int, opening: str, closing: str) -> int:
    depth = 0
    for k in range(open_at, len(text)):
        depth += (text[k] == opening) - (text[k] == closing)
        if depth == 0:
            return k + 1
    return len(text)


# -- finding regions -----------------------------------------------------------
@dataclasses.dataclass(eq=False)
class _Occurrence:
    """A region equation found in the traced program, with data provenance:
    tokens name values independently of the jaxpr level they pass through."""
    name: str
    eqn: Any
    context: str
    in_tokens: list
    out_tokens: list

    @property
    def role(self) -> str:
        if "rematted_computation" in self.context:
            return "recompute"
        if "transpose(" in self.context:
            return "backward"
        return "forward"


def _sub_jaxprs(eqn) -> list:
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jcore.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jcore.Jaxpr):
                found.append(item)
    return found


def _collect(jaxpr, env: dict, context: str, visit: int, counter, found: list) -> None:
    def token(v):
        return env.get(v, (visit, v)) if isinstance(v, jcore.Var) else None

    for eqn in jaxpr.eqns:
        stack = str(eqn.source_info.name_stack)
        here = "/".join(s for s in (context, stack) if s)
        name = name_in(stack) if eqn.primitive.name == "shard_map" else None
        if name is not None:
            found.append(_Occurrence(name, eqn, here, [token(v) for v in eqn.invars],
                                     [(visit, v) for v in eqn.outvars]))
            continue
        for sub in _sub_jaxprs(eqn):
            child, child_env = next(counter), {}
            tail = eqn.invars[len(eqn.invars) - len(sub.invars):] \
                if len(sub.invars) <= len(eqn.invars) else []
            for inner, outer in zip(sub.invars, tail):
                if token(outer) is not None:
                    child_env[inner] = token(outer)
            _collect(sub, child_env, here, child, counter, found)
            if len(sub.outvars) == len(eqn.outvars):
                for inner, outer in zip(sub.outvars, eqn.outvars):
                    if isinstance(inner, jcore.Var):
                        env[outer] = child_env.get(inner, (child, inner))


def _producer(jaxpr, var) -> tuple:
    """("input", k) if ``var`` is (a cast of) input k of ``jaxpr``, else
    ("op", text) naming the primitive that computed it."""
    if var in jaxpr.invars:
        return ("input", jaxpr.invars.index(var))
    eqn = next((e for e in jaxpr.eqns if var in e.outvars), None)
    if eqn is None:
        return ("op", "constant")
    name = eqn.primitive.name
    if name in ("pvary", "pcast") and len(eqn.invars) == 1:
        return _producer(jaxpr, eqn.invars[0]) if isinstance(
            eqn.invars[0], jcore.Var) else ("op", name)
    if name == "reduce_precision" and _is_noop_rounding(eqn):
        # jax.checkpoint marks the values it saves with a rounding to their own
        # precision (against CSE): the value is the operand's.
        return _producer(jaxpr, eqn.invars[0])
    if name == "name":
        return ("op", f"checkpoint_name:{eqn.params['name']}")
    for sub in _sub_jaxprs(eqn):
        if len(sub.outvars) == len(eqn.outvars) and len(sub.invars) <= len(eqn.invars):
            inner = sub.outvars[eqn.outvars.index(var)]
            if not isinstance(inner, jcore.Var):
                return ("op", "constant")
            kind, what = _producer(sub, inner)
            if kind == "input":
                outer = eqn.invars[len(eqn.invars) - len(sub.invars) + what]
                return (_producer(jaxpr, outer) if isinstance(outer, jcore.Var)
                        else ("op", "constant"))
            return kind, what
    return ("op", name)


def _is_noop_rounding(eqn) -> bool:
    dtype = eqn.invars[0].aval.dtype
    if not np.issubdtype(dtype, np.floating) or not isinstance(eqn.invars[0], jcore.Var):
        return False
    info = jax.numpy.finfo(dtype)
    return (eqn.params.get("exponent_bits") == info.nexp
            and eqn.params.get("mantissa_bits") == info.nmant)


def _residuals(forward: _Occurrence, readers: Sequence[_Occurrence],
               call: Optional[RegionCall]) -> tuple[Residual, ...]:
    body = _body(forward.eqn)
    outs = {t: j for j, t in enumerate(forward.out_tokens)}
    ins = {t: k for k, t in enumerate(forward.in_tokens) if t is not None}
    seen, found = set(), []
    for reader in readers:
        for t in reader.in_tokens:
            if t is None or t in seen or (t not in outs and t not in ins):
                continue
            seen.add(t)
            var = body.outvars[outs[t]] if t in outs else body.invars[ins[t]]
            kind, what = _producer(body, var)
            if kind == "input":
                what = f"input {_input_index(what, forward.eqn, call)}"
            found.append(Residual(tuple(var.aval.shape), var.aval.dtype, what))
    return tuple(found)


def _input_index(k: int, eqn, call: Optional[RegionCall]) -> Any:
    """Body input ``k`` of a forward equation as the call's leaf index. JAX's
    partial evaluation may prepend inputs (hoisted constants): the call's own
    inputs are then the last ones."""
    if call is None:
        return k
    extra = len(eqn.invars) - len(call.inputs)
    if extra < 0 or k < extra:
        return "?"
    return call.inputs[k - extra].index


def _body(eqn):
    body = eqn.params["jaxpr"]
    return body.jaxpr if isinstance(body, jcore.ClosedJaxpr) else body


def _overlap(a: Sequence, b: _Occurrence) -> int:
    tokens = set(b.in_tokens) | set(b.out_tokens)
    return sum(t is not None and t in tokens for t in a)


def _assemble(found: list[_Occurrence]) -> list[Region]:
    forwards = [o for o in found if o.role == "forward"]
    # JAX's partial evaluation may hoist an input-free piece of a region (a
    # loop-invariant constant, or nothing at all) out of a scan: it feeds the
    # region, not a new one.
    forwards = [o for o in forwards if o.in_tokens or (o.out_tokens and not any(
        f is not o and f.name == o.name and set(o.out_tokens) & set(f.in_tokens)
        for f in forwards))]
    recomputes = [o for o in found if o.role == "recompute"]
    order = {id(f): k for k, f in enumerate(forwards)}
    paired: dict[int, tuple] = {}
    for back in (o for o in reversed(found) if o.role == "backward"):
        feeding = [c for c in recomputes if c.name == back.name
                   and set(c.out_tokens) & set(back.in_tokens)]
        reads = list(back.in_tokens) + [t for c in feeding for t in c.in_tokens]
        candidates = [f for f in forwards if f.name == back.name and id(f) not in paired]
        if not candidates:
            continue
        # Data flow names the forward pass; without any, the latest unpaired one
        # (backward passes run in reverse order).
        best = max(candidates, key=lambda f: (_overlap(reads, f), order[id(f)]))
        paired[id(best)] = (back, feeding)
    regions = []
    for fwd in forwards:
        call = _recorded(fwd.name, fwd.eqn)
        body = _body(fwd.eqn)
        back, feeding = paired.get(id(fwd), (None, []))
        inputs, outputs = _operands(call, fwd, body)
        regions.append(Region(
            name=fwd.name, func_name=call.func_name if call else fwd.name,
            mesh=call.mesh if call else tuple(fwd.eqn.params["mesh"].shape.items()),
            inputs=inputs, outputs=outputs, jaxpr=body,
            transform=fwd.context.replace(fwd.name, "").strip("/"),
            eqn=fwd.eqn,
            forward=body if back is not None else None,
            backward=_body(back.eqn) if back is not None else None,
            recompute=(_body(feeding[0].eqn) if len(feeding) == 1 else None),
            residuals=(_residuals(fwd, [back, *feeding], call) if back is not None else None)))
    return regions


def _operands(call: Optional[RegionCall], fwd: _Occurrence, body) -> tuple[tuple, tuple]:
    if call is not None:
        return call.inputs, call.outputs
    # A region staged before the registry forgot it: shapes from the equation.
    def ops(outer, inner):
        return tuple(Operand(k, (), tuple(o.aval.shape), tuple(i.aval.shape), o.aval.dtype)
                     for k, (o, i) in enumerate(zip(outer, inner)))
    return ops(fwd.eqn.invars, body.invars), ops(fwd.eqn.outvars, body.outvars)


def regions(fn: Callable, *args: Any, **kwargs: Any) -> list[Region]:
    """Trace ``fn(*args, **kwargs)`` and return one :class:`Region` per
    ``local_map`` call it makes, in program order (forward passes).

    ``fn`` may use ``jax.jit``, ``jax.grad``, ``jax.checkpoint`` and
    ``jax.lax.scan`` around its calls; ``args`` may be arrays or
    ``jax.ShapeDtypeStruct``\\ s (with a ``NamedSharding`` on a ``Mesh`` or an
    ``AbstractMesh`` where the mesh's axes are Explicit). Nothing runs: only
    tracing, so a 256-device ``AbstractMesh`` works on one CPU. A region inside a
    scan body is reported once, like the body. Regions named by a name stack but
    recorded by another process report shapes from the jaxpr only.

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
        >>> f = jlm.local_map(jnp.exp, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> [r] = jlm.regions(jax.grad(lambda x: f(x).sum()),
        ...                   jax.ShapeDtypeStruct((8,), jnp.float32))
        >>> [str(res) for res in r.residuals]
        ['f32[2] from exp']
    """
    mesh = next((m for m in map(_mesh_of_spec, jax.tree_util.tree_leaves((args, kwargs)))
                 if m is not None), None)
    context = _mesh_scope(mesh) if mesh is not None else contextlib.nullcontext()
    with context:
        closed = jax.make_jaxpr(fn)(*args, **kwargs)
    found: list[_Occurrence] = []
    counter = itertools.count(1)
    _collect(closed.jaxpr, {}, "", 0, counter, found)
    return _assemble(found)


def _mesh_of_spec(leaf: Any):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        return None if mesh is None or mesh.empty else mesh
    return layouts.mesh_of(leaf)


def _mesh_scope(mesh):
    if isinstance(mesh, jax.sharding.Mesh):
        return layouts.mesh_context(mesh)
    return jax.sharding.use_abstract_mesh(mesh)


def _aval(shape: tuple, dtype) -> str:
    return jax.core.ShapedArray(tuple(shape), dtype).str_short(short_dtypes=True)


def _summary(jaxpr) -> str:
    counts: dict[str, int] = {}
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
    ops = ", ".join(f"{n} {p}" if n > 1 else p for p, n in counts.items())
    return f"{len(jaxpr.eqns)} equations ({ops})"
