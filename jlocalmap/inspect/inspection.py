"""Regions: every ``local_map`` call in a traced program, as an inspectable unit.

A ``local_map`` call is one ``shard_map`` equation of the outer jaxpr (global
shapes outside, local shapes inside) whose body ends with the region's marker
(``region.marker``), an identity equation that holds the region's settings.
JAX's transformations carry the marker and give it a role, so the forward
pass of a differentiated region, its backward pass and what ``jax.checkpoint``
recomputes are each known from the program itself. The region is also staged
under a ``jax.named_scope`` that names it and its placements, e.g.
``local_map[attention](S(0)S(1)S(2), S(0)S(1)R -> S(0)S(1)S(2))``, which
prefixes the HLO metadata of every operation of the region, for profilers.

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

import contextlib
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any, Optional, cast

import jax
from jax.extend import core as jcore

from jlocalmap._jax_compat import aligned_sub_jaxprs, name_stack, transforms_in
from jlocalmap.inspect.residuals import Residual, residuals
from jlocalmap.layouts.meshes import mesh_context
from jlocalmap.layouts.value_layout import mesh_of
from jlocalmap.region.marker import Marker, marker_of, region_p
from jlocalmap.region.names import name_in
from jlocalmap.region.record import RegionSettings, body_of


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
    passes through (a set, as ``cond`` branches may return different ones).
    ``marker`` is what the equation's body says it is; an unmarked equation
    under a region's name is a piece JAX split off a region (``name``)."""
    eqn: Any
    context: str
    in_tokens: list
    out_tokens: list
    marker: Optional[Marker]
    name: Optional[str] = None

    @property
    def role(self) -> str:
        return self.marker.role if self.marker is not None else "piece"

    @property
    def settings(self) -> Optional[RegionSettings]:
        return self.marker.settings if self.marker is not None else None

    def produced(self) -> set:
        return set().union(*self.out_tokens) if self.out_tokens else set()

    def reads(self) -> set:
        return set().union(*self.in_tokens) if self.in_tokens else set()

    def touched(self) -> set:
        return self.produced() | self.reads()


def _collect(jaxpr, env: dict, context: str, visit: int, counter, found: list) -> None:
    def tokens(v) -> frozenset:
        if not isinstance(v, jcore.Var):
            return frozenset()
        return env.get(v, frozenset({(visit, v)}))

    for eqn in jaxpr.eqns:
        stack = name_stack(eqn)
        here = "/".join(s for s in (context, stack) if s)
        marker = marker_of(eqn)
        name = name_in(stack) if eqn.primitive.name == "shard_map" else None
        if marker is not None or name is not None:
            found.append(_Occurrence(eqn, here, [tokens(v) for v in eqn.invars],
                                     [frozenset({(visit, v)}) for v in eqn.outvars],
                                     marker, name))
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


def _pieces(found: list[_Occurrence], forwards: list[_Occurrence]) -> dict:
    """JAX's partial evaluation hoists loop-invariant pieces of a region out of
    a scan (constants, or work on closed-over inputs): an unmarked equation
    under a region's name whose outputs feed that region is part of it."""
    pieces: dict = {}
    for piece in (o for o in found if o.role == "piece"):
        fed = [f for f in forwards if cast(RegionSettings, f.settings).name == piece.name
               and piece.produced() & f.reads()]
        if fed:
            pieces.setdefault(id(fed[0]), []).append(piece)
    return pieces


def _pair_backwards(found: list[_Occurrence], forwards: list[_Occurrence]) -> dict:
    """Each forward pass's backward pass, and the recomputations that feed it:
    same settings, and data flow between them; without any, the latest
    unpaired forward before it (backward passes run in reverse order)."""
    recomputes = [o for o in found if o.role == "recompute"]
    order = {id(f): k for k, f in enumerate(forwards)}
    paired: dict = {}
    for back in (o for o in found if o.role == "backward"):
        feeding = [c for c in recomputes if c.settings == back.settings
                   and c.produced() & back.reads()]
        reads = back.reads().union(*(c.reads() for c in feeding))
        candidates = [f for f in forwards if f.settings == back.settings and id(f) not in paired]
        if candidates:
            best = max(candidates, key=lambda f: (len(reads & f.touched()), order[id(f)]))
            paired[id(best)] = (back, feeding)
    return paired


def _assemble(found: list[_Occurrence]) -> list[Region]:
    """One region per forward occurrence (a call), with its backward pass,
    recomputation and residuals where JAX differentiated it."""
    forwards = [o for o in found if o.role == "forward"]
    pieces = _pieces(found, forwards)
    paired = _pair_backwards(found, forwards)
    result = []
    for fwd in forwards:
        settings = cast(RegionSettings, fwd.settings)
        back, feeding = paired.get(id(fwd), (None, []))
        result.append(Region(
            settings=settings, jaxpr=body_of(fwd.eqn), transform=transforms_in(fwd.context),
            eqn=fwd.eqn,
            backward=body_of(back.eqn) if back is not None else None,
            recompute=body_of(feeding[0].eqn) if len(feeding) == 1 else None,
            residuals=(residuals(fwd, [back, *feeding], settings, pieces)
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
    works on one CPU. Each region is read from the program itself (its
    marker, see ``region.marker``): the answer does not depend on what the
    process traced before. A region inside a scan body is reported once, like
    the body. Higher-order derivatives report each call once, with its first
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
    with context:
        closed = jax.make_jaxpr(fn)(*args, **kwargs)
    found: list[_Occurrence] = []
    _collect(closed.jaxpr, {}, "", 0, itertools.count(1), found)
    return _assemble(found)


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
    """The body's equations by primitive (the region's marker left out)."""
    counts: dict[str, int] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive is not region_p:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
    ops = ", ".join(f"{n} {p}" if n > 1 else p for p, n in counts.items())
    return f"{sum(counts.values())} equations ({ops})"
