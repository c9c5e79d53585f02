"""Placement entries over a pytree: which placement entry each leaf of a call's
arguments or of a body's outputs gets (one per leaf, a single list, or a pytree
prefix), with the error texts of bad prefixes; and which leaves are arrays.

Example:
    >>> import jax, jlocalmap as jlm
    >>> from jlocalmap.layouts.entries import assign_placements
    >>> mesh = jax.sharding.AbstractMesh((2,), ("dp",))
    >>> assign_placements(({"b": [jlm.Shard(0)], "a": None},), ({"a": 1, "b": 2},), 2,
    ...                   mesh, "in_placements", "inputs")
    [None, [Shard(dim=0)]]
"""

from __future__ import annotations

from typing import Any, cast

import jax
import numpy as np

from jlocalmap.errors import PlacementTypeError, PlacementValueError
from jlocalmap.layouts.meshes import AnyMesh
from jlocalmap.layouts.placements import Placement, Replicate


def is_none(x: Any) -> bool:
    return x is None


def is_placement_list(x: Any) -> bool:
    """A non-empty list or tuple of placements (one per mesh axis)."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(p, Placement) for p in x)


def is_entry(x: Any) -> bool:
    """One leaf's placement entry: None, a Placement, or a list of them."""
    return x is None or isinstance(x, Placement) or is_placement_list(x)


def is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float, complex)) and not isinstance(x, bool)


def assign_placements(placements: Any, tree: Any, n_leaves: int, mesh: AnyMesh,
                      what: str, kind: str) -> list:
    """One entry per flattened leaf of ``tree``, from ``placements`` given as a
    single placement list (for the one input argument, or for an output that is
    not a tuple or list: all of its leaves), one
    entry per leaf, or a pytree prefix of ``tree`` (a dict keyed like the
    argument, say)."""
    single = is_entry(placements) and not (placements is None or isinstance(placements, Placement)) \
        and len(placements) == len(mesh.axis_names)
    if single and kind == "outputs" and not isinstance(tree, (tuple, list)):
        return [placements] * n_leaves  # one output (a dict, say): all of its leaves
    if single:
        placements = (placements,)  # for the one positional argument, or output
    if isinstance(placements, (list, tuple)) and len(placements) == n_leaves \
            and all(is_entry(p) for p in placements):
        return list(placements)
    prefix, prefix_tree = jax.tree_util.tree_flatten(placements, is_leaf=is_entry)
    _check_entries(placements, mesh, what)
    try:
        subtrees = cast(Any, prefix_tree).flatten_up_to(tree)  # jaxlib's PyTreeDef: no stub
    except (ValueError, TypeError):
        found = len(placements) if isinstance(placements, (list, tuple)) else 1
        where = "arguments" if kind == "inputs" else "outputs"
        if len(prefix) == n_leaves == found:
            raise PlacementValueError(_nested_message(placements, prefix_tree, tree, what,
                                                      kind, where)) from None
        raise PlacementValueError(
            f"{what}: Expecting {found} {kind} to local_map function based on "
            f"placements, but found {n_leaves}. Give one entry (a placement list "
            f"or None) per flattened {kind[:-1]} leaf, or a pytree prefix of the "
            f"{where}: {_mismatch(placements, tree, where)}") from None
    return [entry for entry, sub in zip(prefix, subtrees, strict=True)
            for _ in jax.tree_util.tree_leaves(sub, is_leaf=is_none)]


def _nested_message(placements: Any, prefix_tree, tree: Any, what: str, kind: str,
                    where: str) -> str:
    """The counts agree, the nesting does not: an entry wrapped in one list too many."""
    paths = [jax.tree_util.keystr(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(placements, is_leaf=is_entry)[0]]
    return (f"{what}{paths[0].rsplit('[', 1)[0] if paths else ''}: the {kind} and entries "
            f"both number {len(paths)}, but an entry sits one list deeper than its "
            f"{kind[:-1]} ({paths[0] if paths else ''} is a placement list inside another "
            f"list or tuple: wrapped twice?); give each {kind[:-1]} its placement list "
            f"directly, e.g. in_placements=([Shard(0)],) for one input. The {where}' "
            f"structure is {_short(str(jax.tree_util.tree_structure(tree, is_leaf=is_none)))}.")


def _check_entries(placements: Any, mesh: AnyMesh, what: str) -> None:
    for path, stray in jax.tree_util.tree_flatten_with_path(placements, is_leaf=is_entry)[0]:
        if not is_entry(stray):
            raise PlacementTypeError(
                f"{what}{jax.tree_util.keystr(path) or '[0]'}: expected a list or tuple of "
                f"jlocalmap placements (Shard(d), Replicate(), Partial(op)), one per "
                f"mesh axis {tuple(mesh.axis_names)}, or None (PyTorch's placement "
                f"objects and strings are not accepted); found {_short(repr(stray))}; "
                f"write e.g. {[Replicate()] * len(mesh.axis_names)}.")


def _short(text: str, limit: int = 240) -> str:
    return text if len(text) <= limit else text[:limit - 20] + f" ... ({len(text)} chars)"


def _mismatch(placements: Any, tree: Any, where: str) -> str:
    """Where the placements' structure stops prefixing ``tree``, in a few lines
    (structures of thousands of leaves are not printed whole)."""
    covered = {jax.tree_util.keystr(path[:k])
               for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_none)[0]
               for k in range(len(path) + 1)}
    given = [jax.tree_util.keystr(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(placements, is_leaf=is_entry)[0]]
    missing = [p for p in given if p not in covered]
    structure = _short(str(jax.tree_util.tree_structure(placements, is_leaf=is_entry)))
    found = _short(str(jax.tree_util.tree_structure(tree, is_leaf=is_none)))
    text = (f"the placements' structure {structure} ({len(given)} entries) does not "
            f"prefix the {where}' {found} "
            f"({len(jax.tree_util.tree_leaves(tree, is_leaf=is_none))} leaves)")
    if missing:
        text += (f"; first entry with no {where[:-1]} at its path: {missing[0]!s}"
                 f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    return text + "."
