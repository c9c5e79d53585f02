"""Region names: the ``jax.named_scope`` a local_map region is staged under,
for people and profilers (HLO metadata): the function, each array operand's
placements in DTensor's short notation and the gradient declarations. The
region's identity is its marker (``region.marker``), not its name.

Example:
    >>> import jlocalmap as jlm
    >>> from jlocalmap.region.names import name_in, region_name
    >>> name = region_name("mm", [(jlm.Shard(1),), (jlm.Shard(0),)], [(jlm.Replicate(),)])
    >>> name, name_in(f"transpose(jvp({name}))") == name
    ('local_map[mm](S(1), S(0) -> R)', True)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Optional

from jlocalmap.layouts.placements import PlacementList, compact

_NAME_LIMIT = 160      # longer names are shortened to func name + digest

DIGEST_CHARS = 10

PREFIX = "local_map["


def region_name(func_name: str, in_placements: Sequence[PlacementList],
                out_placements: Sequence[PlacementList],
                grad_placements: Sequence[Optional[PlacementList]] = (),
                in_sizes: Sequence[Optional[tuple]] = (),
                out_sizes: Sequence[Optional[tuple]] = ()) -> str:
    """The name a region is staged under: the function, the placements of its
    array operands in DTensor's short notation (an uneven operand's logical
    shape in brackets) and the declared gradient placements; beyond 160
    characters, the function and a digest.

    Example:
        >>> import jlocalmap as jlm
        >>> from jlocalmap.region.names import region_name
        >>> S, R = jlm.Shard, jlm.Replicate
        >>> region_name("attn", [(S(0), S(1)), (S(0), R())], [(S(0), S(1))])
        'local_map[attn](S(0)S(1), S(0)R -> S(0)S(1))'
        >>> region_name("rows", [(S(0),)], [(S(0),)], in_sizes=[(7, 4)], out_sizes=[(7, 4)])
        'local_map[rows](S(0)[7,4] -> S(0)[7,4])'
    """
    def operands(placements, sizes):
        sizes = list(sizes) + [None] * (len(placements) - len(sizes))
        return ", ".join(compact(p) + ("" if n is None else f"[{','.join(map(str, n))}]")
                         for p, n in zip(placements, sizes, strict=True))
    text = operands(in_placements, in_sizes) + " -> " + operands(out_placements, out_sizes)
    if any(g is not None for g in grad_placements):
        text += "; grad " + ", ".join(compact(g) for g in grad_placements)
    name = f"{PREFIX}{func_name}]({text})"
    if len(name) > _NAME_LIMIT:
        digest = hashlib.sha1(text.encode()).hexdigest()[:DIGEST_CHARS]
        name = f"{PREFIX}{func_name}]#{digest}"
    return name

def name_in(name_stack: str) -> Optional[str]:
    """The region name inside an equation's name stack (JAX may wrap it, as in
    ``transpose(jvp(local_map[f](...)))``), or None.

    Example:
        >>> from jlocalmap.region.names import name_in
        >>> name_in("transpose(jvp(local_map[f](S(0) -> R)))")
        'local_map[f](S(0) -> R)'
    """
    start = name_stack.find(PREFIX)
    if start < 0:
        return None
    end = _balanced_end(name_stack, start + len(PREFIX) - 1, "[", "]")
    if end < len(name_stack) and name_stack[end] == "(":
        end = _balanced_end(name_stack, end, "(", ")")
    elif name_stack.startswith("#", end):
        end += 1 + DIGEST_CHARS
    return name_stack[start:end]

def _balanced_end(text: str, open_at: int, opening: str, closing: str) -> int:
    depth = 0
    for k in range(open_at, len(text)):
        depth += (text[k] == opening) - (text[k] == closing)
        if depth == 0:
            return k + 1
    return len(text)
