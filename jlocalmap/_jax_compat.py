"""The few JAX internals jlocalmap reads, in one place, for jax 0.10 to 0.12."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import core as _core
from jax._src import dtypes as _dtypes


def varying_axes(x: jax.Array) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (its vma type)."""
    return frozenset(jax.typeof(x).manual_axis_type.varying)  # .vma before jax 0.10


def scalar_like(value: complex, x: jax.Array) -> jax.Array:
    """``value`` as a 0-d array of ``x``'s dtype that varies over the mesh axes
    ``x`` varies over: with ``jax_auto_pcast`` off (JAX's planned default) JAX
    refuses ``x / n`` for a constant ``n`` that does not."""
    constant = jnp.asarray(value, x.dtype)
    axes = tuple(a for a in jax.sharding.get_abstract_mesh().axis_names
                 if a in varying_axes(x))
    return jax.lax.pcast(constant, axes, to="varying") if axes else constant


def manual_axes() -> frozenset:
    """Mesh axes that are manual at this point of tracing (inside ``shard_map``)."""
    mesh = jax.sharding.get_abstract_mesh()
    return frozenset(() if mesh.empty else mesh.manual_axes)


def sub_jaxprs(eqn) -> list:
    """The jaxprs an equation's parameters hold (bodies of jit, scan, cond
    branches, remat, shard_map, custom_vjp ...), open (not closed); for JAX's
    hijax forms (``call_hi_primitive``) the jaxpr its primitive object traced."""
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            item = getattr(item, "traced", item)  # a hijax custom rule: its jax.stages.Traced
            inner = getattr(item, "jaxpr", item)
            inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's open jaxpr
            if hasattr(inner, "eqns"):
                found.append(inner)
    return found


# jax 0.11+ can trace custom rules and remat as one primitive, call_hi_primitive,
# whose `_prim` object says which (flags jax_custom_vjp3, jax_custom_jvp3 and
# jax_remat3, planned to become the default): read under their classic names.
_HI_PRIMITIVES = {"CustomVJPTraced": "custom_vjp_call", "CustomJVPTraced": "custom_jvp_call",
                  "RematTraced": "remat2"}


def primitive_name(eqn) -> str:
    """The name of an equation's primitive, hijax forms under their classic names."""
    name = eqn.primitive.name
    if name == "call_hi_primitive":
        return _HI_PRIMITIVES.get(type(eqn.params.get("_prim")).__name__, name)
    return name


# JAX keeps this internal: whether a trace is a jit's.
_UNDER_JIT = getattr(_core, "unsafe_am_i_under_a_jit", None)


def under_jit() -> bool:
    """Whether tracing happens inside ``jax.jit`` or ``make_jaxpr`` (rather than
    under eager transformations alone, such as an eager ``jax.vmap``)."""
    return True if _UNDER_JIT is None else _UNDER_JIT()



def refuse_as_array(cls: type, error: Callable[[Any], Exception]) -> None:
    """Make JAX raise ``error(x)`` where it would take an instance ``x`` of the
    pytree class ``cls`` as an array (the arguments of ``jax.numpy`` functions,
    which are jitted, and of ``custom_jvp`` functions such as ``jax.nn.relu``):
    JAX's own message would be "not a valid JAX type"."""
    def refuse(x: Any) -> Any:
        raise error(x)

    _core.pytype_aval_mappings[cls] = refuse
    _dtypes.canonicalize_value_handlers[cls] = refuse


# XLA's partitioner reduces a value unreduced over several mesh axes into a
# replicated one with one all-reduce over them all up to jax 0.10, and with one
# all-reduce per axis in the XLA of jax 0.12 (measured on 8 CPU devices).
UNREDUCED_ALL_REDUCE_PER_AXIS = tuple(int(p) for p in jax.__version__.split(".")[:2]) >= (0, 11)


def scan_counts(eqn) -> tuple[int, int]:
    """(constants, carry) among a ``scan`` equation's inputs: parameters up to
    jax 0.11, the lengths of its flat input trees (constants, carry, xs) after."""
    params = eqn.params
    if "num_carry" in params:
        return int(params["num_consts"]), int(params["num_carry"])
    consts, carry, _ = params["ft_in"].unpack()
    return len(list(consts.vals)), len(list(carry.vals))
