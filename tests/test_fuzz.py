"""Fuzzing the API surface of ``jlm.local_map``: every call either returns the
unsharded result or raises a jlocalmap error (``jlm.LocalMapError``, which is a
``ValueError`` or ``TypeError``), never anything else.

Each example draws

- a mesh over the 8 simulated CPU devices (1 to 3 axes, size-1 axes included,
  Explicit or, now and then, Auto axis types);
- a pytree of positional arguments (tuples, lists, dicts, nested, empty
  containers, ``None`` leaves, strings, Python ints/floats/bools, numpy
  scalars), whose array leaves are numpy arrays, single-device jax arrays,
  values distributed with ``jlm.distribute_tensor`` (on the local_map mesh or
  on another mesh, in the entry's layout or another one) of random shapes of
  rank 0 to 3 (non-divisible and zero-size dims included, so ``UnevenArray``\\ s
  too) and dtype float32 or int32;
- ``in_placements`` as one entry per leaf, as a pytree prefix of the arguments
  (uniform subtrees collapsed into one entry), or ``None``; entries draw
  ``Shard(d)`` (negative ``d`` too), ``Replicate()`` and ``Partial(op)`` of
  every op;
- settings: ``redistribute_inputs``, ``device_mesh`` given or not,
  ``in_grad_placements`` (``None``, the inputs' own, or random), and a call
  under ``jax.jit`` now and then (array leaves traced, the rest closed over);

and, in the second property, mutations that break the call: strings, ints,
``None``, torch-like objects and bare placements in placement positions,
placement lists of the wrong length, Shard dims out of range, entries added or
dropped, dict keys renamed, placements for static leaves, ``Partial('mean')``,
``Shard(1.0)``, a non-bool ``redistribute_inputs``, a non-mesh ``device_mesh``.

The body is elementwise (``v * 2`` on arrays and numbers, strings and ``None``
unchanged) and ``out_placements`` mirror ``in_placements`` (the same structure
and entries; with ``in_placements=None`` each output gets its input's actual
layout). With an elementwise body every valid layout gives the same global
result, so whatever the call accepts must equal ``2 * x`` on the global inputs
(compared through ``jlm.full_tensor``); static leaves come back as they are.
Reinterpretations the API allows (a dropped entry that still prefixes the
arguments, a plain call when there is no mesh) are held to the same oracle.

Case count and time (2 CPU cores, ``derandomize=True``): 400 mostly valid
calls (about 255 return the unsharded result, 145 get a jlocalmap error) + 400
mutated calls (100 results, 300 jlocalmap errors of 34 kinds) in two tests, an
outcome-mix check and 3 bug reproducers: 6 tests, about 55-65 s;
``JLOCALMAP_FUZZ_EXAMPLES=N`` sets both counts (1,500 each: about 5 minutes,
clean on 01512a0). The outcome mix of a run is printed (``-s``).

Bugs found (``BUG_REASONS``; reproducers below): an UnevenArray input on
another mesh (AttributeError, fixed in 98ebe40), an UnevenArray input Partial
on another axis (JAX TypeError in the padding check) and an UnevenArray
argument under jax.jit (AttributeError): the last two fail on 020eef1 and are
fixed in 01512a0. Listing a key in ``KNOWN_BUGS`` marks its reproducer
``xfail(strict=True)`` and lets the properties count (not fail on) it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import traceback
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import need
from jax.sharding import AxisType

import jlocalmap as jlm
from jlocalmap import Partial, Replicate, Shard

need("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SCALE = os.environ.get("JLOCALMAP_FUZZ_EXAMPLES")
VALID_EXAMPLES = int(_SCALE) if _SCALE else 400
BROKEN_EXAMPLES = int(_SCALE) if _SCALE else 400


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# -- meshes (built once) ----------------------------------------------------------------
MESH_SHAPES = [(8,), (4,), (2,), (2, 4), (4, 2), (2, 2), (2, 2, 2), (1, 8), (2, 1, 4)]
AXIS_NAMES = ("a", "b", "c")
_MESHES: dict = {}


def get_mesh(shape: tuple, auto: bool = False, offset: int = 0) -> jax.sharding.Mesh:
    """A mesh of ``shape`` over devices ``offset .. offset + prod(shape)``."""
    key = (shape, auto, offset)
    if key not in _MESHES:
        types = (AxisType.Auto if auto else AxisType.Explicit,) * len(shape)
        devices = jax.devices()[offset:offset + math.prod(shape)]
        _MESHES[key] = jax.make_mesh(shape, AXIS_NAMES[:len(shape)], axis_types=types,
                                     devices=devices)
    return _MESHES[key]


# -- the model of one call ----------------------------------------------------------------
# A placement is described by a tuple and built inside the call (so that bad
# constructor arguments, Shard(1.0) or Partial('mean'), are part of what is fuzzed):
# ("S", d), ("R",), ("P", op), or garbage: ("str", s), ("int", i), ("none",),
# ("torch", d), ("raw", object).


class TorchShard:
    """Looks like a torch.distributed.tensor placement, but is not a jlocalmap one."""

    def __init__(self, dim):
        self.dim = dim

    def __repr__(self):
        return f"TorchShard({self.dim})"


def build_placement(desc):
    tag = desc[0]
    if tag == "S":
        return Shard(desc[1])
    if tag == "R":
        return Replicate()
    if tag == "P":
        return Partial(desc[1])
    if tag in ("str", "int", "raw"):
        return desc[1]
    if tag == "none":
        return None
    if tag == "torch":
        return TorchShard(desc[1])
    raise AssertionError(desc)


def build_entry(entry):
    """An entry: None, ("list"|"tuple", [descs]), ("bare", desc), ("junk", object)."""
    if entry is None:
        return None
    kind, body = entry
    if kind == "list":
        return [build_placement(d) for d in body]
    if kind == "tuple":
        return tuple(build_placement(d) for d in body)
    if kind == "bare":
        return build_placement(body)
    if kind == "junk":
        return body
    raise AssertionError(entry)


@dataclasses.dataclass
class Leaf:
    """One argument leaf. ``kind``: np, jax1 (single-device jax.Array), dist
    (distributed on the local_map mesh), other (distributed on another mesh),
    npscalar, pyint, pyfloat, pybool, str, none."""
    kind: str
    value: Any = None                 # the global value (arrays: numpy)
    src: Optional[tuple] = None       # dist/other: placement descs it is laid out with
    other: Optional[tuple] = None     # other: (mesh shape, offset)
    entry: Any = None                 # its in_placements entry (see build_entry)

    def __repr__(self):
        shape = np.shape(self.value) if self.kind in ARRAY_KINDS else None
        return (f"Leaf({self.kind}, shape={shape}, dtype="
                f"{getattr(self.value, 'dtype', type(self.value).__name__)}, src={self.src}, "
                f"other={self.other}, entry={self.entry})")


ARRAY_KINDS = ("np", "jax1", "dist", "other", "npscalar")
NUMBER_KINDS = ("pyint", "pyfloat")


@dataclasses.dataclass
class Case:
    mesh_shape: tuple
    auto: bool
    args: tuple                      # the argument tree, Leaf objects at the leaves
    in_form: str                     # "none", "per-leaf", "prefix"
    redistribute: Any
    give_mesh: Any                   # True, False, or a junk device_mesh
    grad_form: str                   # "none", "own", "random"
    grad_entries: tuple              # random: per-leaf entries
    mutations: tuple = ()            # applied to the built placements (see mutate)
    jit: bool = False                # call under jax.jit (array leaves traced, the rest closed over)
    must_succeed: bool = False       # a call the API must accept (see must_succeed)

    @property
    def mesh(self):
        return get_mesh(self.mesh_shape, self.auto)


def leaves_of(tree) -> list[Leaf]:
    return jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, Leaf))


# -- strategies -----------------------------------------------------------------------------
DIM_SIZES = st.sampled_from([1, 2, 3, 4, 5, 8, 0, 6, 16])
OPS = ("sum", "avg", "max", "min")


@st.composite
def placement_descs(draw, rank: int, n_axes: int, sizes: tuple, partial: bool = True,
                    only_reducible: bool = False):
    """A valid-looking placement list: Shard of an existing dim (written from the
    end now and then), Replicate, or Partial (max/min rarely)."""
    out = []
    for _ in range(n_axes):
        choices = ["S"] * (3 if rank else 0) + ["R"] * 2 + (["P"] if partial else [])
        tag = draw(st.sampled_from(choices))
        if tag == "S":
            d = draw(st.integers(0, rank - 1))
            out.append(("S", d - rank if draw(st.integers(0, 4)) == 0 else d))
        elif tag == "R":
            out.append(("R",))
        else:
            ops = ("sum", "avg") if only_reducible else \
                draw(st.sampled_from([("sum", "avg"), ("sum", "avg"), OPS]))
            out.append(("P", draw(st.sampled_from(ops))))
    return tuple(out)


@st.composite
def leaves(draw, mesh_shape: tuple, auto: bool, seed_base: int):
    kind = draw(st.sampled_from(["np", "dist", "np", "dist", "np", "dist", "dist", "jax1",
                                 "other", "npscalar", "pyint", "pyfloat", "pybool", "str",
                                 "none"]))
    n_axes = len(mesh_shape)
    if kind in ("np", "jax1", "dist", "other"):
        rank = draw(st.integers(0, 3))
        shape = tuple(draw(DIM_SIZES) for _ in range(rank))
        dtype = draw(st.sampled_from([np.float32, np.float32, np.int32]))
        rng = np.random.default_rng(seed_base)
        value = rng.integers(-4, 5, shape).astype(dtype)
        entry_descs = draw(placement_descs(rank, n_axes, mesh_shape))
        leaf = Leaf(kind, value)
        if kind == "dist":
            same = draw(st.integers(0, 4)) > 0 and all(
                d[0] != "P" or d[1] in ("sum", "avg") for d in entry_descs)
            leaf.src = entry_descs if same else draw(placement_descs(
                rank, n_axes, mesh_shape, partial=not auto, only_reducible=True))
            if auto and any(d[0] == "P" for d in leaf.src):
                leaf.src = tuple(("R",) if d[0] == "P" else d for d in leaf.src)
        elif kind == "other":
            other_shape = draw(st.sampled_from([(2,), (4,), (8,), (2, 2), (4, 2)]))
            offset = draw(st.sampled_from([0, 8 - math.prod(other_shape)]))
            leaf.other = (other_shape, offset)
            leaf.src = draw(placement_descs(rank, len(other_shape), other_shape,
                                            only_reducible=True))
        # host arrays may go without an entry (then the body sees them whole)
        none_ok = kind in ("np", "jax1") and draw(st.integers(0, 5)) == 0
        leaf.entry = None if none_ok else (draw(st.sampled_from(["list", "tuple"])), entry_descs)
        return leaf
    if kind == "npscalar":
        leaf = Leaf(kind, np.float32(draw(st.integers(-4, 4))))
    elif kind == "pyint":
        leaf = Leaf(kind, draw(st.integers(-4, 4)))
    elif kind == "pyfloat":
        leaf = Leaf(kind, float(draw(st.integers(-4, 4))) + 0.5)
    elif kind == "pybool":
        return Leaf(kind, draw(st.booleans()))
    elif kind == "str":
        return Leaf(kind, draw(st.sampled_from(["tag", "", "Shard(0)"])))
    else:
        return Leaf(kind, None)
    # numbers: with an entry they are global values laid out on the mesh, without
    # one they pass through (numpy scalars: replicated arrays)
    if draw(st.booleans()):
        leaf.entry = ("list", draw(placement_descs(0, len(mesh_shape), mesh_shape)))
    return leaf


@st.composite
def trees(draw, mesh_shape, auto, depth=0, counter=None):
    counter = counter if counter is not None else [0]
    if depth >= 2 or draw(st.integers(0, 9)) < 6:
        counter[0] += 1
        return draw(leaves(mesh_shape, auto, counter[0]))
    kind = draw(st.sampled_from(["tuple", "list", "dict"]))
    n = draw(st.integers(0, 3))
    children = [draw(trees(mesh_shape, auto, depth + 1, counter)) for _ in range(n)]
    if kind == "tuple":
        return tuple(children)
    if kind == "list":
        return children
    keys = draw(st.permutations(["w", "b", "x", "k"]))[:n]
    return dict(zip(keys, children, strict=True))


@st.composite
def cases(draw) -> Case:
    mesh_shape = draw(st.sampled_from(MESH_SHAPES))
    auto = draw(st.integers(0, 6)) == 0
    counter = [0]
    args = tuple(draw(trees(mesh_shape, auto, 1, counter)) for _ in range(draw(st.integers(1, 3))))
    in_form = draw(st.sampled_from(["per-leaf", "prefix", "prefix", "none"]))
    if in_form == "none":
        # out_placements come from the inputs' actual layouts: keep every leaf on
        # the local_map mesh (another mesh's leaf would be re-expressed)
        for leaf in leaves_of(args):
            if leaf.kind == "other":
                leaf.kind, leaf.other = "dist", None
                leaf.src = draw(placement_descs(np.ndim(leaf.value), len(mesh_shape), mesh_shape,
                                                partial=not auto, only_reducible=True))
    grad_form = draw(st.sampled_from(["none", "none", "own", "random"]))
    grad_entries = ()
    if grad_form == "random":
        grad_entries = tuple(
            ("list", draw(placement_descs(np.ndim(l.value), len(mesh_shape), mesh_shape)))
            if l.kind in ARRAY_KINDS and draw(st.integers(0, 3)) else None
            for l in leaves_of(args))
    # under jax.jit outputs must be JAX types: no string leaves there
    jit = not any(l.kind == "str" for l in leaves_of(args)) and draw(st.integers(0, 3)) == 0
    case = Case(mesh_shape, auto, args, in_form, draw(st.booleans()),
                draw(st.integers(0, 4)) > 0, grad_form, grad_entries, jit=jit)
    case.must_succeed = must_succeed(case)
    return case


def is_uneven(leaf: Leaf, mesh_shape: tuple) -> bool:
    """Whether the leaf's entry splits a dim into chunks of different sizes."""
    if leaf.kind not in ARRAY_KINDS or leaf.entry is None:
        return False
    splits: dict = {}
    for n, d in zip(mesh_shape, leaf.entry[1], strict=True):
        if d[0] == "S":
            splits[d[1] % np.ndim(leaf.value)] = splits.get(d[1] % np.ndim(leaf.value), 1) * n
    return any(np.shape(leaf.value)[dim] % n for dim, n in splits.items())


def must_succeed(case: Case) -> bool:
    """Whether the API must accept a generated call (and return ``2 * x``): Explicit
    axes; placements given (per leaf or as a prefix) for every array, of Shard and
    Replicate only;
    every distributed input on the local_map mesh, laid out as its entry says (or
    redistributed, from a Shard/Replicate layout); gradients undeclared or declared
    as the inputs' own placements. What stays out may be refused for a reason: Partial
    kinds JAX cannot hold, another mesh's devices, a layout that differs without
    ``redistribute_inputs``, Auto axes under ``jax.jit``, random gradient declarations,
    several uneven inputs (an output's padding could be any one's: refused), and a
    prefix of several arguments (run_case may collapse it into one placement list,
    which then reads as the entry of a single argument)."""
    if case.auto or case.in_form == "none" or case.grad_form == "random":
        return False
    if case.in_form == "prefix" and len(case.args) > 1:
        return False
    if sum(is_uneven(leaf, case.mesh_shape) for leaf in leaves_of(case.args)) > 1:
        return False
    for leaf in leaves_of(case.args):
        if leaf.kind in ARRAY_KINDS and leaf.entry is None:
            return False   # its output mirrors the entry: an array output needs placements
        entry = leaf.entry[1] if leaf.entry is not None else ()
        if leaf.kind == "other" or any(d[0] == "P" for d in entry + (leaf.src or ())):
            return False
        if leaf.kind == "dist" and leaf.src != entry and case.redistribute is not True:
            return False
    return True


MUTATIONS = ["entry-str", "entry-int", "entry-torch", "entry-bare-list-of-junk", "entry-none",
             "entry-len", "entry-dim", "entry-partial-bad-op", "entry-shard-float",
             "count-drop", "count-add", "static-entry", "dict-key", "out-str", "out-len",
             "out-dim", "out-none", "redistribute-junk", "mesh-junk", "grad-junk",
             "entry-bare-placement", "bare-base-placement"]


@st.composite
def broken_cases(draw) -> Case:
    case = draw(cases())
    case.must_succeed = False   # its arguments are broken on purpose
    if case.in_form == "none":
        case.in_form = "per-leaf"
    muts = draw(st.lists(st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 10**6)),
                         min_size=1, max_size=2))
    case.mutations = tuple(muts)
    return case


# -- building the call -------------------------------------------------------------------------
def build_arg(leaf: Leaf, mesh):
    """The argument value of a leaf (distributed ones are laid out here)."""
    if leaf.kind == "np":
        return leaf.value
    if leaf.kind == "jax1":
        return jnp.asarray(leaf.value)
    if leaf.kind == "dist":
        return jax.block_until_ready(jlm.distribute_tensor(
            leaf.value, mesh, [build_placement(d) for d in leaf.src]))
    if leaf.kind == "other":
        shape, offset = leaf.other
        return jax.block_until_ready(jlm.distribute_tensor(
            leaf.value, get_mesh(shape, False, offset), [build_placement(d) for d in leaf.src]))
    return leaf.value


def expected_of(leaf: Leaf):
    if leaf.kind in ARRAY_KINDS:
        return np.asarray(leaf.value) * 2
    if leaf.kind in NUMBER_KINDS + ("pybool",):
        return leaf.value * 2
    return leaf.value


def actual_entry(leaf: Leaf, n_axes: int):
    """The placements the body's value has when in_placements is None."""
    if leaf.kind == "dist":  # placements_of reads Partial('avg') as the sums it stores
        return ("list", tuple(("P", "sum") if d == ("P", "avg") else d for d in leaf.src))
    if leaf.kind in ("np", "jax1", "npscalar"):
        return ("list", (("R",),) * n_axes)
    return None


def map_tree(tree, fn):
    return jax.tree_util.tree_map(fn, tree, is_leaf=lambda x: isinstance(x, Leaf))


def prefix_of(tree, fn, rng: np.random.Generator):
    """A pytree prefix of ``tree`` with ``fn(leaf)`` entries: subtrees whose leaves
    all have the same entry are collapsed into it now and then (dicts, lists and
    tuples are kept as the same node types)."""
    if isinstance(tree, Leaf):
        return fn(tree)
    sub = [prefix_of(c, fn, rng) for c in (tree.values() if isinstance(tree, dict) else tree)]
    entries = [fn(l) for l in leaves_of(tree)]
    if entries and all(e == entries[0] for e in entries) and entries[0] is not None \
            and rng.integers(0, 3) == 0:
        return entries[0]
    if isinstance(tree, dict):
        return dict(zip(tree.keys(), sub, strict=True))
    return type(tree)(sub)


def placements_arg(case: Case, fn, rng):
    """in_/out_placements (raw entries) in the case's form, before building."""
    if case.in_form == "per-leaf":
        return [fn(l) for l in leaves_of(case.args)]
    return prefix_of(case.args, fn, rng)


def build_tree_entries(tree):
    """Raw entries -> placement objects (entries are tuples tagged list/tuple/bare/junk)."""
    def is_raw(x):
        return x is None or (isinstance(x, tuple) and len(x) == 2 and x[0] in
                             ("list", "tuple", "bare", "junk"))
    return jax.tree_util.tree_map(build_entry, tree, is_leaf=is_raw)


JUNK = ["Shard(0)", 0, 3, TorchShard(0), object()]


def mutate(case: Case, in_raw, out_raw, n_leaves: int, rng: np.random.Generator):
    """Apply the case's mutations to raw per-leaf entry lists (``in_raw``,
    ``out_raw``: lists, one entry per leaf) or to settings. Returns
    (in_raw, out_raw, redistribute, give_mesh, grad_override)."""
    redistribute, give_mesh, grad_override = case.redistribute, case.give_mesh, None
    n_axes = len(case.mesh_shape)
    arrays = [i for i, l in enumerate(leaves_of(case.args)) if in_raw[i] is not None]
    statics = [i for i, l in enumerate(leaves_of(case.args)) if in_raw[i] is None]
    # entry-count changes last, so that the other mutations index the leaves
    for name, seed in sorted(case.mutations, key=lambda m: m[0].startswith("count-")):
        pick = np.random.default_rng(seed)
        target = in_raw if not name.startswith("out-") else out_raw
        idx = arrays[pick.integers(len(arrays))] if arrays else None
        if name == "entry-str" and idx is not None:
            target[idx] = ("junk", pick.choice(["Shard(0)", "R", "replicate"]).item())
        elif name == "entry-int" and idx is not None:
            target[idx] = ("junk", int(pick.integers(-2, 3)))
        elif name == "entry-torch" and idx is not None:
            target[idx] = ("junk", TorchShard(0))
        elif name == "entry-bare-list-of-junk" and idx is not None \
                and target[idx] is not None and target[idx][0] in ("list", "tuple"):
            kind, descs = target[idx]
            descs = list(descs)
            descs[pick.integers(len(descs))] = [("str", "R"), ("int", 0), ("none",),
                                                ("torch", 1)][pick.integers(4)]
            target[idx] = ("list", tuple(descs))
        elif name == "entry-none" and idx is not None:
            target[idx] = None
        elif name in ("entry-len", "out-len") and idx is not None \
                and target[idx] is not None and target[idx][0] in ("list", "tuple"):
            kind, descs = target[idx]
            descs = descs + (("R",),) if pick.integers(2) or len(descs) == 1 else descs[:-1]
            target[idx] = (kind, descs)
        elif name in ("entry-dim", "out-dim") and idx is not None \
                and target[idx] is not None and target[idx][0] in ("list", "tuple"):
            kind, descs = target[idx]
            rank = np.ndim(leaves_of(case.args)[idx].value)
            bad = ("S", int(rank + pick.integers(0, 3)) if pick.integers(2)
                   else -rank - 1 - int(pick.integers(0, 3)))
            descs = list(descs)
            descs[pick.integers(len(descs))] = bad
            target[idx] = (kind, tuple(descs))
        elif name == "entry-partial-bad-op" and idx is not None \
                and target[idx] is not None and target[idx][0] in ("list", "tuple"):
            kind, descs = target[idx]
            descs = list(descs)
            descs[pick.integers(len(descs))] = ("P", ["mean", "prod", "SUM"][pick.integers(3)])
            target[idx] = (kind, tuple(descs))
        elif name == "entry-shard-float" and idx is not None \
                and target[idx] is not None and target[idx][0] in ("list", "tuple"):
            kind, descs = target[idx]
            descs = list(descs)
            descs[pick.integers(len(descs))] = ("S", [1.0, "0", True, None][pick.integers(4)])
            target[idx] = (kind, tuple(descs))
        elif name == "entry-bare-placement" and idx is not None:
            target[idx] = ("bare", ("R",))
        elif name == "bare-base-placement" and idx is not None:
            target[idx] = ("junk", [jlm.Placement] * n_axes)  # the class, not an instance
        elif name == "count-drop" and in_raw:
            in_raw.pop(int(pick.integers(len(in_raw))))
        elif name == "count-add":
            in_raw.insert(int(pick.integers(len(in_raw) + 1)), ("list", (("R",),) * n_axes))
        elif name == "static-entry" and statics:
            in_raw[statics[pick.integers(len(statics))]] = ("list", (("R",),) * n_axes)
        elif name == "out-str" and idx is not None:
            out_raw[idx] = ("junk", "Shard(0)")
        elif name == "out-none" and idx is not None:
            out_raw[idx] = None
        elif name == "redistribute-junk":
            redistribute = ["yes", 1, None, "False"][pick.integers(4)]
        elif name == "mesh-junk":
            give_mesh = ["tp", [0, 1], {"a": 2}, 8][pick.integers(4)]
        elif name == "grad-junk":
            grad_override = ["Shard(0)", 0, [TorchShard(0)], ([Replicate()] * (n_axes + 1),)][
                pick.integers(4)]
        if idx is not None and (name.startswith("entry-") or name.startswith("bare-")):
            out_raw[idx] = in_raw[idx]  # out_placements mirror in_placements
    return in_raw, out_raw, redistribute, give_mesh, grad_override


def rename_a_key(tree, rng):
    """The first dict in ``tree`` (depth first) with one key renamed; None if none."""
    if isinstance(tree, dict) and tree:
        k = list(tree)[rng.integers(len(tree))]
        return {("zz" if key == k else key): v for key, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        for i, c in enumerate(tree):
            renamed = rename_a_key(c, rng)
            if renamed is not None:
                items = list(tree)
                items[i] = renamed
                return type(tree)(items)
    return None


# -- library bugs ---------------------------------------------------------------------------------
BUG_REASONS = {  # every library bug this fuzzer found (see the report of issue #6)
    "uneven-partial-input": "library bug (fixed in 01512a0): an UnevenArray input that is Partial on another mesh "
                            "axis fails in the padding check (uneven.refill calls jnp.where on the "
                            "unreduced padded array): JAX's TypeError 'other () cannot be of "
                            "instance tuple when self P(...) has unreduced'",
    "uneven-jit": "library bug (fixed in 01512a0): an UnevenArray argument of jax.jit(local_map) fails in "
                  "arguments.call_signature, which reads leaf.padded.sharding of the traced "
                  "padded array (AttributeError), though docs/uneven.md says UnevenArray passes "
                  "through jax.jit",
    "uneven-other-mesh": "library bug (fixed in 98ebe40): an UnevenArray input on another mesh "
                         "raised AttributeError in layouts.reexpress (x.sharding)",
}
# The ones that reproduce on the code this file last ran against: their strict-xfail
# reproducers below are marked, and the fuzz properties count them instead of failing.
KNOWN_BUGS: dict[str, str] = {k: BUG_REASONS[k] for k in ()}


def known_bug_mark(key: str):
    def mark(test):
        if key in KNOWN_BUGS:
            return pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[key])(test)
        return test
    return mark


def known_bug(e: Exception, case: Case) -> Optional[str]:
    """The name of the known (listed) library bug that ``e`` is, or None."""
    if "uneven-partial-input" in KNOWN_BUGS and isinstance(e, TypeError) \
            and "has unreduced" in str(e) and "PartitionSpec" in str(e):
        return "uneven-partial-input"
    if "uneven-jit" in KNOWN_BUGS and isinstance(e, AttributeError) \
            and "'sharding' attribute is not available on traced" in str(e):
        return "uneven-jit"
    return None


# -- running a case -------------------------------------------------------------------------------
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def call_jitted(f, args):
    """``f(*args)`` under jax.jit: array leaves (UnevenArrays too) are traced
    arguments, the other leaves are closed over."""
    flat, tree = jax.tree_util.tree_flatten(args, is_leaf=is_out_leaf)
    dyn = [i for i, v in enumerate(flat) if isinstance(v, (jax.Array, np.ndarray, jlm.UnevenArray))]

    def call(*values):
        leaves = list(flat)
        for i, v in zip(dyn, values, strict=True):
            leaves[i] = v
        return f(*jax.tree_util.tree_unflatten(tree, leaves))

    return jax.jit(call)(*[flat[i] for i in dyn])


def body(*args):
    def twice(v):
        if isinstance(v, str) or v is None:
            return v
        return v * 2
    return jax.tree_util.tree_map(twice, args)


def is_out_leaf(x):
    return x is None or isinstance(x, jlm.UnevenArray)


def check_equal(out, expected, case: Case):
    out_leaves, out_tree = jax.tree_util.tree_flatten(out, is_leaf=is_out_leaf)
    exp_leaves, exp_tree = jax.tree_util.tree_flatten(expected, is_leaf=lambda x: x is None)
    assert out_tree == exp_tree, f"output structure {out_tree} != {exp_tree}"
    for j, (o, e) in enumerate(zip(out_leaves, exp_leaves, strict=True)):
        if e is None or isinstance(e, str):
            assert o == e and type(o) is type(e), f"static output {j}: {o!r} != {e!r}"
            continue
        assert isinstance(o, (jax.Array, jlm.UnevenArray, np.ndarray, np.generic, int, float)), \
            f"output {j}: {type(o).__name__}"
        got = np.asarray(jlm.full_tensor(o) if isinstance(o, (jax.Array, jlm.UnevenArray)) else o)
        assert got.shape == np.shape(e), f"output {j}: shape {got.shape} != {np.shape(e)}"
        np.testing.assert_array_equal(got.astype(np.float64), np.asarray(e, np.float64),
                                      err_msg=f"output {j}")


def run_case(case: Case, family: str) -> None:
    mesh = case.mesh
    n_axes = len(case.mesh_shape)
    rng = np.random.default_rng(len(repr(case)))
    all_leaves = leaves_of(case.args)
    # the arguments (setup: always valid, so errors here are bugs too)
    try:
        args = map_tree(case.args, lambda l: build_arg(l, mesh))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"setup (distribute_tensor) raised {type(e).__module__}."
                    f"{type(e).__name__}: {e}\n{traceback.format_exc()}\ncase: {case}")
    expected = map_tree(case.args, expected_of)

    # placements, in the case's form
    if case.in_form == "none":
        in_placements = None
        out_raw = [actual_entry(l, n_axes) for l in all_leaves]
        out_placements = out_raw
        grads_raw = out_raw
    elif case.mutations:
        in_raw = [l.entry for l in all_leaves]
        out_raw = list(in_raw)
        in_raw, out_raw, redistribute, give_mesh, grad_override = mutate(
            case, in_raw, out_raw, len(all_leaves), rng)
        in_placements, out_placements = in_raw, out_raw
        if case.in_form == "prefix" and len(in_raw) == len(all_leaves):
            # re-nest the (mutated) per-leaf entries as a prefix of the arguments
            it = iter(in_raw)
            in_placements = map_tree(case.args, lambda l: next(it))
            it = iter(out_raw)
            out_placements = map_tree(case.args, lambda l: next(it))
            if any(m == "dict-key" for m, _ in case.mutations):
                renamed = rename_a_key(in_placements, rng)
                in_placements = renamed if renamed is not None else in_placements
        grads_raw = [l.entry for l in all_leaves]
    else:
        in_placements = out_placements = placements_arg(case, lambda l: l.entry, rng)
        grads_raw = [l.entry for l in all_leaves]
    if not case.mutations:
        redistribute, give_mesh, grad_override = case.redistribute, case.give_mesh, None

    try:
        in_pl = None if in_placements is None else build_tree_entries(in_placements)
        out_pl = build_tree_entries(out_placements)
        if grad_override is not None:
            grad_pl = grad_override
        elif case.grad_form == "own":
            grad_pl = build_tree_entries(grads_raw)
        elif case.grad_form == "random":
            grad_pl = build_tree_entries(list(case.grad_entries))
        else:
            grad_pl = None
        device_mesh = mesh if give_mesh is True else None if give_mesh is False else give_mesh
        f = jlm.local_map(body, out_pl, in_pl, grad_pl, device_mesh,
                          redistribute_inputs=redistribute)
        out = jax.block_until_ready(call_jitted(f, args) if case.jit else f(*args))
    except jlm.LocalMapError as e:
        assert isinstance(e, (ValueError, TypeError)), type(e)
        assert type(e).__module__.startswith("jlocalmap"), type(e)
        if case.must_succeed:
            pytest.fail(f"local_map refused a call it must accept: {type(e).__name__}: "
                        f"{str(e)[:2000]}\ncase: {case}")
        OUTCOMES[family]["jlocalmap error"] += 1
        OUTCOMES[family + " errors"][type(e).__name__ + ": " + str(e).split(":")[0][:40]] += 1
        return
    except Exception as e:  # noqa: BLE001
        bug = known_bug(e, case)
        if bug is not None:
            OUTCOMES[family]["known library bug: " + bug] += 1
            return
        pytest.fail(f"local_map raised {type(e).__module__}.{type(e).__name__} (not a "
                    f"jlocalmap error): {str(e)[:2000]}\n{traceback.format_exc()[-3000:]}\n"
                    f"case: {case}")
    try:
        check_equal(out, expected, case)
    except AssertionError as e:
        pytest.fail(f"local_map returned a wrong value: {e}\ncase: {case}")
    OUTCOMES[family]["returned the unsharded result"] += 1
    OUTCOMES[family]["of them marked must succeed"] += case.must_succeed


# -- the library bugs this fuzzer found: minimal reproducers ------------------------------------
@known_bug_mark("uneven-partial-input")
def test_uneven_input_partial_on_another_axis():
    mesh = get_mesh((2, 2))
    x = jlm.distribute_tensor(np.arange(3.0, dtype=np.float32), mesh, [Shard(0), Partial()])
    assert isinstance(x, jlm.UnevenArray)
    f = jlm.local_map(lambda v: v * 2, [Shard(0), Partial()], ([Shard(0), Partial()],))
    np.testing.assert_array_equal(np.asarray(jlm.full_tensor(f(x))), [0.0, 2.0, 4.0])


@known_bug_mark("uneven-jit")
def test_uneven_input_under_jit():
    mesh = get_mesh((4,))
    x = jlm.distribute_tensor(np.arange(5.0, dtype=np.float32), mesh, [Shard(0)])
    f = jlm.local_map(lambda v: v * 2, [Shard(0)], ([Shard(0)],))
    np.testing.assert_array_equal(np.asarray(jlm.full_tensor(jax.jit(f)(x))), np.arange(5.0) * 2)


def test_uneven_input_on_another_mesh():
    """Found by this fuzzer on an earlier commit (an AttributeError in
    layouts.reexpress); now a jlocalmap error, or moved whole when asked."""
    line = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    x = jlm.distribute_tensor(np.arange(3.0, dtype=np.float32), line, [Shard(0)])
    mesh = get_mesh((2,))
    f = jlm.local_map(lambda v: v * 2, [Shard(0)], ([Shard(0)],), device_mesh=mesh)
    with pytest.raises(jlm.PlacementValueError, match=r"in_placements\[0\]: input 0 lives on"):
        f(x)
    g = jlm.local_map(lambda v: v * 2, [Shard(0)], ([Shard(0)],), device_mesh=mesh,
                      redistribute_inputs=True)
    np.testing.assert_array_equal(np.asarray(jlm.full_tensor(g(x))), [0.0, 2.0, 4.0])


# -- the properties ---------------------------------------------------------------------------------
@fuzz_settings(VALID_EXAMPLES)
@given(case=cases())
def fuzz_valid(case):
    run_case(case, "valid")


@fuzz_settings(BROKEN_EXAMPLES)
@given(case=broken_cases())
def fuzz_broken(case):
    run_case(case, "broken")


@pytest.mark.slow
def test_fuzz_mostly_valid_calls():
    """Mostly valid calls (some layouts JAX cannot hold, some mismatches): the
    unsharded result, or a jlocalmap error."""
    OUTCOMES["valid"].clear()
    fuzz_valid()
    print("\nmostly valid calls:", dict(OUTCOMES["valid"]))
    # the suite is not vacuous: a good share of calls run and are checked, and a
    # good share of those were marked must-succeed (each of which run_case asserts)
    assert OUTCOMES["valid"]["returned the unsharded result"] >= VALID_EXAMPLES // 4, OUTCOMES["valid"]
    assert OUTCOMES["valid"]["of them marked must succeed"] >= VALID_EXAMPLES // 8, OUTCOMES["valid"]


@pytest.mark.slow
def test_fuzz_broken_calls():
    """Calls with one or two broken arguments: a jlocalmap error, or (where the
    API reinterprets them validly) the unsharded result."""
    OUTCOMES["broken"].clear()
    OUTCOMES["broken errors"].clear()
    fuzz_broken()
    print("\nbroken calls:", dict(OUTCOMES["broken"]))
    assert OUTCOMES["broken"]["jlocalmap error"] >= BROKEN_EXAMPLES // 2, OUTCOMES["broken"]
    # The run met a variety of jlocalmap errors (checked here: a separate test
    # would run on another xdist worker, where this run's outcomes are not).
    print("\nerror kinds:", len(OUTCOMES["broken errors"]))
    for k, v in sorted(OUTCOMES["broken errors"].items(), key=lambda kv: -kv[1])[:30]:
        print(f"  {v:4d}  {k}")
    assert len(OUTCOMES["broken errors"]) >= 5
