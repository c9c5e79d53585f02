"""The few JAX internals jlocalmap reads, in one place, for jax 0.10 to 0.12."""

from __future__ import annotations

import jax
from jax._src import core as _core


def varying_axes(x: jax.Array) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (its vma type)."""
    return frozenset(jax.typeof(x).manual_axis_type.varying)  # .vma before jax 0.10


def manual_axes() -> frozenset:
    """Mesh axes that are manual at this point of tracing (inside ``shard_map``)."""
    mesh = jax.sharding.get_abstract_mesh()
    return frozenset(() if mesh.empty else mesh.manual_axes)


def sub_jaxprs(eqn) -> list:
    """The jaxprs an equation's parameters hold (bodies of jit, scan, cond
    branches, remat, shard_map, custom_vjp ...), open (not closed)."""
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            inner = getattr(item, "jaxpr", item)
            if hasattr(inner, "eqns"):
                found.append(inner)
    return found


# JAX keeps this internal: whether a trace is a jit's.
_UNDER_JIT = getattr(_core, "unsafe_am_i_under_a_jit", None)


def under_jit() -> bool:
    """Whether tracing happens inside ``jax.jit`` or ``make_jaxpr`` (rather than
    under eager transformations alone, such as an eager ``jax.vmap``)."""
    return True if _UNDER_JIT is None else _UNDER_JIT()

