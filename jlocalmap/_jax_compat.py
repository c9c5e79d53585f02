"""The few JAX internals jlocalmap reads, in one place, for jax 0.10 to 0.12."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax._src import core as _core
from jax._src import dtypes as _dtypes


def varying_axes(x: jax.Array) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (its vma type)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


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


def config_value(name: str) -> Any:
    """The value of the ``jax.config`` flag ``name`` (``jax_disable_jit``, ...): JAX
    adds its flags as attributes at import time, which type checkers cannot see."""
    return getattr(jax.config, name)


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
