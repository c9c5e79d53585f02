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
    >>> [r] = jlm.inspect.regions(jax.grad(lambda x, w: matmul(x, w).sum(), (0, 1)), x, w)
    >>> r.name, r.inputs[0].local_shape, r.differentiated
    ('local_map[matmul](S(0)S(1), RS(0) -> S(0)R)', (8, 8), True)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import re
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
from jax.extend import core as jcore

from jlocalmap._jax_compat import aligned_sub_jaxprs, name_stack, rematerialized, transposed
from jlocalmap.inspect.residuals import Residual, residuals
from jlocalmap.layouts.meshes import mesh_context
from jlocalmap.layouts.value_layout import mesh_of
from jlocalmap.region.names import name_in
from jlocalmap.region.record import (
    RegionSettings,
    body_of,
    eqn_key,
    lookup,
    recorded,
    settings_from_equation,
    staging,
    unknown_settings,
)


@dataclasses.dataclass(frozen=True)
class Region:
    """One ``local_map`` call of a traced program (see :func:`regions`).

    ``settings`` are its name, function, mesh and operands (also readable as
    attributes of the region). ``jaxpr`` is the body as staged (local shapes);
    for a region that JAX differentiated it is the forward pass (its outputs and
    the residuals it saves), ``backward`` the body of the transposed region,
    ``recompute`` the part ``jax.checkpoint`` around the call reruns in the
    backward pass (None if none, or if it is spread over several pieces), and
    ``residuals`` what passes from forward to backward. ``transform`` lists
    JAX's transformations of the forward equation (e.g. ``jvp``), ``eqn`` is
    the ``shard_map`` equation itself.

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
        >>> f = jlm.local_map(jnp.tanh, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> [r] = jlm.inspect.regions(jax.grad(lambda x: f(x).sum()), jax.ShapeDtypeStruct((8,), jnp.float32))
        >>> r.name, r.differentiated, r.backward is not None
        ('local_map[tanh](S(0) -> S(0))', True, True)
    """
    settings: RegionSettings
    jaxpr: jcore.Jaxpr
    transform: str
    eqn: Any
    backward: Optional[jcore.Jaxpr] = None
    recompute: Optional[jcore.Jaxpr] = None
    residuals: Optional[tuple[Residual, ...]] = None

    name = property(lambda self: self.settings.name, doc="The region's name.")
    func_name = property(lambda self: self.settings.func_name, doc="The body's name.")
    mesh = property(lambda self: self.settings.mesh,
                    doc="The region's mesh (a Mesh, or the AbstractMesh traced on).")
    inputs = property(lambda self: self.settings.inputs, doc="The array inputs.")
    outputs = property(lambda self: self.settings.outputs, doc="The array outputs.")

    @property
    def differentiated(self) -> bool:
        """Whether JAX produced a backward pass of this region."""
        return self.backward is not None

    @property
    def forward(self) -> Optional[jcore.Jaxpr]:
        """The forward body of a differentiated region (``jaxpr``), else None."""
        return self.jaxpr if self.differentiated else None

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
            >>> [r] = jlm.inspect.regions(f, jax.ShapeDtypeStruct((8,), jnp.float32))
            >>> print(r.pretty(jaxprs=False))
            local_map[sin](S(0) -> S(0)) on mesh (tp=4), not differentiated
              input  [0] f32[8] S(0) -> local f32[2]
              output [0] f32[8] S(0) -> local f32[2]
              body: 1 equations (sin)
        """
        mesh = ", ".join(f"{a}={n}" for a, n in self.mesh.shape.items())
        how = (f"differentiated ({self.transform})" if self.differentiated
               else f"traced under {self.transform}" if self.transform else "not differentiated")
        lines = [f"{self.name} on mesh ({mesh}), {how}"]
        lines += [f"  input  {op}" for op in self.inputs]
        lines += [f"  output {op}" for op in self.outputs]
        lines.append(f"  body: {_summary(self.jaxpr)}")
        if self.differentiated:
            if self.recompute is not None:
                lines.append(f"  recompute: {_summary(self.recompute)}")
            lines.append(f"  backward: {_summary(self.backward)}")
            residuals = self.residuals or ()
            lines.append(f"  residuals ({len(residuals)}):")
            lines += [f"    {r}" for r in residuals]
        if jaxprs:
            parts = [("forward" if self.differentiated else "body", self.jaxpr),
                     ("recompute", self.recompute), ("backward", self.backward)]
            for title, jaxpr in parts:
                if jaxpr is not None:
                    text = str(jaxpr).replace("\n", "\n    ")
                    lines.append(f"  {title} jaxpr:\n    {text}")
        return "\n".join(lines)


# -- finding regions -----------------------------------------------------------
@dataclasses.dataclass(eq=False)
class _Occurrence:
    """A region equation found in the traced program, with data provenance:
    each value carries the set of tokens naming it at every jaxpr level it
    passes through (a set, as ``cond`` branches may return different ones)."""
    name: str
    eqn: Any
    context: str
    in_tokens: list
    out_tokens: list
    staged: bool = False  # local_map staged it during this trace: a call

    @property
    def role(self) -> str:
        if self.staged:
            return "forward"
        if rematerialized(self.context):
            return "recompute"
        if transposed(self.context):
            return "backward"
        return "forward"

    def produced(self) -> set:
        return set().union(*self.out_tokens) if self.out_tokens else set()

    def touched(self) -> set:
        return self.produced().union(*self.in_tokens)


def _collect(jaxpr, env: dict, context: str, visit: int, counter, found: list) -> None:
    def tokens(v) -> frozenset:
        if not isinstance(v, jcore.Var):
            return frozenset()
        return env.get(v, frozenset({(visit, v)}))

    for eqn in jaxpr.eqns:
        stack = name_stack(eqn)
        here = "/".join(s for s in (context, stack) if s)
        name = name_in(stack) if eqn.primitive.name == "shard_map" else None
        if name is not None:
            found.append(_Occurrence(name, eqn, here, [tokens(v) for v in eqn.invars],
                                     [frozenset({(visit, v)}) for v in eqn.outvars]))
            continue
        merged: dict = {}
        for sub, positions in aligned_sub_jaxprs(eqn):
            child, child_env = next(counter), {}
            for inner, outer in zip(sub.invars, [eqn.invars[k] for k in positions or ()], strict=True):
                if tokens(outer):
                    child_env[inner] = tokens(outer)
            _collect(sub, child_env, here, child, counter, found)
            if len(sub.outvars) == len(eqn.outvars):
                for inner, outer in zip(sub.outvars, eqn.outvars, strict=True):
                    if isinstance(inner, jcore.Var):
                        merged[outer] = merged.get(outer, frozenset()) | child_env.get(
                            inner, frozenset({(child, inner)}))
        env.update(merged)


def _transforms(context: str) -> str:
    """JAX's transformations in a name stack, outermost first (``jvp``,
    ``transpose(jvp)``), without user scopes."""
    names = re.findall(r"\b(jvp|transpose|vmap)\(", context)
    return "".join(f"{n}(" for n in names) + ")" * len(names) if names else ""


def _assemble(found: list[_Occurrence], orphans: Sequence[tuple] = ()) -> list[Region]:
    """Regions from the occurrences; ``orphans`` are keys of calls staged in
    this trace that JAX rewrote (e.g. a scan body split by partial evaluation):
    a rewritten forward takes the settings of the first of its name."""
    forwards = [o for o in found if o.role == "forward"]
    recomputes = [o for o in found if o.role == "recompute"]
    # JAX's partial evaluation hoists loop-invariant pieces of a region out of
    # a scan (constants, or work on closed-over inputs): an unstaged forward
    # equation whose outputs only feed one of the same name is part of it.
    pieces: dict = {}
    regions_ = []
    orphans = list(orphans)
    logged = {o.name for o in found if o.staged} | {key[0] for key in orphans}
    adopted: dict = {}
    for o in forwards:
        fed = [f for f in forwards if f is not o and f.name == o.name
               and o.produced() & set().union(*f.in_tokens)]
        if not o.staged and (fed or not o.out_tokens):
            if fed:
                pieces.setdefault(id(fed[0]), []).append(o)
            continue
        if not o.staged and o.name in logged:
            # A rewrite of a call of this trace: the first takes the call's
            # settings; others (linearize's tangent pass) are not calls.
            key = next((k for k in orphans if k[0] == o.name), None)
            if key is None:
                continue
            orphans.remove(key)
            adopted[id(o)] = lookup(key)
        regions_.append(o)
    order = {id(f): k for k, f in enumerate(regions_)}
    paired: dict = {}
    for back in (o for o in found if o.role == "backward"):
        feeding = [c for c in recomputes if c.name == back.name
                   and c.produced() & set().union(*back.in_tokens)]
        reads = set().union(*back.in_tokens, *(t for c in feeding for t in c.in_tokens))
        candidates = [f for f in regions_ if f.name == back.name and id(f) not in paired]
        if not candidates:
            continue
        # Data flow names the forward pass; without any, the latest unpaired
        # forward before it (backward passes run in reverse order).
        best = max(candidates, key=lambda f: (len(reads & f.touched()), order[id(f)]))
        paired[id(best)] = (back, feeding)
    result = []
    for fwd in regions_:
        call = recorded(fwd.name, fwd.eqn)
        exact = call is not None
        call = call if exact else adopted.get(id(fwd))
        settings = (call if isinstance(call, RegionSettings) else
                    settings_from_equation(fwd.name, fwd.eqn)
                    or unknown_settings(fwd.name, fwd.eqn))
        back, feeding = paired.get(id(fwd), (None, []))
        result.append(Region(
            settings=settings, jaxpr=body_of(fwd.eqn), transform=_transforms(fwd.context),
            eqn=fwd.eqn,
            backward=body_of(back.eqn) if back is not None else None,
            recompute=body_of(feeding[0].eqn) if len(feeding) == 1 else None,
            residuals=(residuals(fwd, [back, *feeding], settings, exact, pieces)
                       if back is not None else None)))
    return result


def regions(fn: Callable, *args: Any, **kwargs: Any) -> list[Region]:
    """Trace ``fn(*args, **kwargs)`` and return one :class:`Region` per
    ``local_map`` call it makes, in program order.

    ``fn`` may use ``jax.jit``, ``jax.grad``, ``jax.checkpoint``,
    ``jax.lax.scan``, ``cond`` and ``while_loop`` around its calls, and
    ``jax.custom_vjp`` functions whose forward and backward call regions;
    ``args`` may be arrays or ``jax.ShapeDtypeStruct``\\ s (with a
    ``NamedSharding`` on a ``Mesh`` or an ``AbstractMesh`` where the mesh's axes
    are Explicit). Nothing runs: only tracing, so a 256-device ``AbstractMesh``
    works on one CPU. A region inside a scan body is reported once, like the
    body. Higher-order derivatives report each call once, with its first
    backward pass.

    Example:
        >>> import jax, jax.numpy as jnp, jlocalmap as jlm
        >>> mesh = jax.sharding.AbstractMesh((4,), ("tp",))
        >>> f = jlm.local_map(jnp.exp, [jlm.Shard(0)], ([jlm.Shard(0)],), device_mesh=mesh)
        >>> [r] = jlm.inspect.regions(jax.grad(lambda x: f(x).sum()),
        ...                   jax.ShapeDtypeStruct((8,), jnp.float32))
        >>> [str(res) for res in r.residuals]
        ['f32[2] from exp']
    """
    mesh = next((m for m in map(_mesh_of_spec, jax.tree_util.tree_leaves((args, kwargs)))
                 if m is not None), None)
    context = _mesh_scope(mesh) if mesh is not None else contextlib.nullcontext()
    with staging() as staged, context:
        closed = jax.make_jaxpr(fn)(*args, **kwargs)
    found: list[_Occurrence] = []
    _collect(closed.jaxpr, {}, "", 0, itertools.count(1), found)
    # Equations local_map staged in this trace are calls, whatever JAX's name
    # stack says (a custom_vjp backward is traced under transpose(...)). The
    # rest are JAX's rewrites of them (or calls traced before, inside a cached
    # jax.jit): their name stacks tell.
    remaining = collections.Counter(staged)
    for occurrence in found:
        key = eqn_key(occurrence.name, occurrence.eqn)
        if remaining[key] > 0:
            remaining[key] -= 1
            occurrence.staged = True
    # One staged equation reached twice (a jitted function called twice shares
    # its jaxpr) is two calls.
    staged_eqns = {id(o.eqn) for o in found if o.staged}
    for occurrence in found:
        occurrence.staged = occurrence.staged or id(occurrence.eqn) in staged_eqns
    orphans = []  # staged, but no equation of the trace is the call as staged
    for key in staged:
        if remaining[key] > 0:
            remaining[key] -= 1
            orphans.append(key)
    return _assemble(found, orphans)


def _mesh_of_spec(leaf: Any):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        return None if mesh is None or mesh.empty else mesh
    return mesh_of(leaf)


def _mesh_scope(mesh):
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh_context(mesh)
    return jax.sharding.use_abstract_mesh(mesh)


def _summary(jaxpr) -> str:
    counts: dict[str, int] = {}
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
    ops = ", ".join(f"{n} {p}" if n > 1 else p for p, n in counts.items())
    return f"{len(jaxpr.eqns)} equations ({ops})"
