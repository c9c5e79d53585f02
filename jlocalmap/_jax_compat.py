"""The JAX internals jlocalmap reads, in one place: the parameters of
higher-order and collective equations (shard_map, jit, scan, while, custom
rules, hijax forms), name stacks, aval typing and the text of one JAX error.
Each says which JAX versions it covers; tests run on jax 0.10.2 and the newest
(0.12). The parameters of plain ``jax.lax`` primitives (a dot's dimension
numbers, a reduction's axes, a slice's bounds), which are the arguments of the
documented ``jax.lax`` functions, are read where they are used.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jlocalmap._jax_compat import collective_axes, varying_of
    >>> mesh = jax.make_mesh((2,), ("tp",))
    >>> f = jax.shard_map(lambda x: jax.lax.psum(x, "tp"), mesh=mesh,
    ...                   in_specs=jax.P("tp"), out_specs=jax.P())
    >>> x = jax.ShapeDtypeStruct((4,), jnp.float32,
    ...                          sharding=jax.NamedSharding(mesh, jax.P("tp")))
    >>> body = jax.make_jaxpr(f)(x).jaxpr.eqns[0].params["jaxpr"]
    >>> collective_axes(body.eqns[-1]), varying_of(body.invars[0].aval)
    (('tp',), frozenset({'tp'}))
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax._src import core as _core
from jax._src import dtypes as _dtypes
from jax.extend import core as jcore


def varying_of(aval: Any) -> frozenset:
    """Mesh axes over which a value of type ``aval`` varies inside ``shard_map``:
    ``aval.vma`` (jax 0.10, 0.11), ``aval.mat.varying`` (jax 0.12's
    manual-axis types)."""
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def scalar_like(value: complex, x: jax.Array) -> jax.Array:
    """``value`` as a 0-d array of ``x``'s dtype that varies over the mesh axes
    ``x`` varies over: with ``jax_auto_pcast`` off (JAX's planned default) JAX
    refuses ``x / n`` for a constant ``n`` that does not."""
    constant = jnp.asarray(value, x.dtype)
    axes = tuple(a for a in jax.sharding.get_abstract_mesh().axis_names
                 if a in varying_axes(x))
    return jax.lax.pcast(constant, axes, to="varying") if axes else constant


def varying_axes(x: jax.Array) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (its vma type)."""
    return varying_of(jax.typeof(x))


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


def aligned_sub_jaxprs(eqn) -> list[tuple[Any, Optional[list]]]:
    """Each sub-jaxpr with the positions of the equation's inputs its inputs
    take, or None where they do not line up. Sub-jaxpr inputs are the
    equation's last ones (cond's index, while's condition constants come
    first): jit, remat, shard_map, custom_jvp/vjp, scan, cond on jax 0.10-0.12."""
    found = []
    for sub in sub_jaxprs(eqn):
        n, total = len(sub.invars), len(eqn.invars)
        found.append((sub, list(range(total - n, total)) if n <= total else None))
    return found


def loop_carry(eqn, sub) -> Optional[tuple[int, int]]:
    """(position of the first carry among ``sub``'s inputs, number of carries)
    where ``sub`` is the body of a loop equation (``while``: its
    ``body_nconsts``; ``scan``: :func:`scan_counts`), else None."""
    name = primitive_name(eqn)
    if name == "while":
        start = eqn.params["body_nconsts"]
        return (start, len(sub.outvars)) if len(sub.invars) == start + len(sub.outvars) else None
    if name == "scan":
        return scan_counts(eqn)
    return None


def collective_axes(eqn) -> tuple:
    """The mesh axes a collective equation works over (``axes`` of psum, pmax,
    pmin, pcast; ``axis_name`` of ppermute, all_gather, all_to_all,
    psum_scatter), or () for other equations."""
    axes = eqn.params.get("axes", eqn.params.get("axis_name", ()))
    axes = axes if isinstance(axes, (tuple, list, frozenset, set)) else (axes,)
    return tuple(a for a in axes if isinstance(a, str))


def shard_map_parts(eqn) -> tuple[Any, Any, tuple]:
    """(mesh, open body jaxpr, in_specs) of a ``shard_map`` equation."""
    body = eqn.params["jaxpr"]
    body = body.jaxpr if isinstance(body, jcore.ClosedJaxpr) else body
    return eqn.params["mesh"], body, tuple(eqn.params["in_specs"])


def shard_map_out_specs(eqn) -> Optional[tuple]:
    """The ``out_specs`` of a ``shard_map`` equation, or None for other equations."""
    return tuple(eqn.params["out_specs"]) if eqn.primitive.name == "shard_map" else None


def jit_parts(eqn) -> Optional[tuple[Any, tuple]]:
    """(open body jaxpr, donated flags of its inputs) of a ``jax.jit`` equation
    (named ``pjit`` up to jax 0.10, ``jit`` from 0.11), or None for others."""
    if eqn.primitive.name not in ("pjit", "jit"):
        return None
    return sub_jaxprs(eqn)[0], tuple(eqn.params.get("donated_invars", ()))


def name_stack(eqn) -> str:
    """An equation's name stack as text, e.g. ``transpose(jvp(local_map[f](...)))``."""
    return str(eqn.source_info.name_stack)


def transforms_in(stack: str) -> str:
    """JAX's transformations in a name stack, outermost first (``jvp``,
    ``transpose(jvp)``), without user scopes: a label, never an identity."""
    names = re.findall(r"\b(jvp|transpose|vmap)\(", stack)
    return "".join(f"{n}(" for n in names) + ")" * len(names) if names else ""


def register_identity_rules(prim: Any, jvp: Callable, transpose: Callable,
                            dce: Callable, partial_eval: Callable) -> None:
    """Make ``prim`` an identity on its operands for every JAX interpreter:
    evaluation (also inside an eager ``shard_map``), abstract evaluation,
    lowering (to nothing), batching, and the given JVP, transpose, DCE and
    partial-evaluation (``jax.checkpoint``) rules (jax 0.10-0.12)."""
    from jax._src import shard_map as _shard_map
    from jax.interpreters import ad, batching, mlir
    from jax.interpreters import partial_eval as pe
    prim.multiple_results = True
    prim.def_impl(lambda *xs, **_: list(xs))
    prim.def_abstract_eval(lambda *avals, **_: list(avals))
    mlir.register_lowering(prim, lambda ctx, *xs, **_: list(xs))
    batching.primitive_batchers[prim] = lambda xs, dims, **p: (prim.bind(*xs, **p), dims)
    _shard_map.eager_rules[prim] = lambda mesh, *xs, **_: list(xs)
    ad.primitive_jvps[prim] = jvp
    ad.primitive_transposes[prim] = transpose
    # jax 0.12 passes DCE rules (used_outputs, live_inputs, eqn); 0.10-0.11 (used_outputs, eqn)
    pe.dce_rules[prim] = lambda used_outputs, *rest: dce(used_outputs, rest[-1])
    pe.partial_eval_jaxpr_custom_rules[prim] = partial_eval


def is_high(x: Any) -> bool:
    """Whether a traced value has one of JAX's "hijax" types (jax 0.12's
    unreduced arrays), which a plain primitive cannot take; False before."""
    return bool(getattr(jax.typeof(x), "is_high", False))


def is_zero_tangent(t: Any) -> bool:
    """Whether an AD tangent or cotangent is JAX's symbolic zero."""
    from jax.interpreters import ad
    return type(t) is ad.Zero


def saved_by_policy(saveable: Callable, eqn: Any) -> bool:
    """Whether a ``jax.checkpoint`` policy saves an equation's outputs (rather
    than recomputing them in the backward pass)."""
    from jax._src.interpreters import partial_eval as _pe
    policy = _pe.ensure_enum(saveable(eqn.primitive, *[v.aval for v in eqn.invars],
                                      **eqn.params))
    return not isinstance(policy, _pe.RecomputeType)


def transposed(stack: str) -> bool:
    """Whether a name stack is of a transposed (backward) equation."""
    return "transpose(" in stack


# JAX's custom_vjp bwd type error (jax 0.10-0.12): the output's and input's types.
_RULE_ERROR = re.compile(
    r"Custom VJP bwd rule.*must produce an output with the same type.*?"
    r"of type (\w+)\[([\d, ]*)\](?:\{V:([^}]*)\})? corresponding to an input of type "
    r"\w+\[[\d, ]*\](?:\{V:([^}]*)\})?", re.S)


def custom_rule_type_error(text: str) -> Optional[tuple]:
    """(dtype, dims text, produced vma text, expected vma text) of JAX's
    custom_vjp bwd type error, or None for another error."""
    m = _RULE_ERROR.search(text)
    return None if m is None else m.groups()


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
