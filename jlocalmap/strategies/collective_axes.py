"""Which mesh axes each collective of a compiled program runs over, and whether
it belongs to a ``local_map`` body or to a layout change around it, read from the
HLO text (``replica_groups`` / ``source_target_pairs`` and the op metadata).

XLA prints a collective's device groups in three forms: explicit lists
(``{{0,1},{2,3}}``), iota (``[2,4]<=[4,2]T(1,0)``) and named mesh axes
(``mesh['axis_0'=8] {'axis_0'}``). Device ids are positions in the mesh's device
array, so the axes a group spans are those along which its ids' coordinates vary.

Example:
    >>> from jlocalmap.strategies.collective_axes import axes_of_line
    >>> line = "%ag = f32[8] all-gather(%p), replica_groups=[2,4]<=[8], dimensions={0}"
    >>> axes_of_line(line, (2, 4), ("dp", "tp"))
    (('tp',), 4)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

import numpy as np

_EXPLICIT = re.compile(r"replica_groups=\{(\{[\d,\s]*\})")
_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_NAMED = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")


def _ints(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"\d+", text)]


def _iota_group(dims: str, source: str, perm: Optional[str]) -> list[int]:
    ids = np.arange(int(np.prod(_ints(source)))).reshape(_ints(source))
    if perm:
        ids = ids.transpose(_ints(perm))
    return ids.reshape(_ints(dims))[0].tolist()


def _named_group(axes: str, chosen: str) -> list[int]:
    sizes = [int(v) for v in re.findall(r"=(\d+)", axes)]
    names = re.findall(r"'([^']+)'", axes)
    picked = set(re.findall(r"'([^']+)'", chosen))
    ids = np.arange(int(np.prod(sizes))).reshape(sizes)
    index = tuple(slice(None) if n in picked else 0 for n in names)
    return ids[index].reshape(-1).tolist()


def group_of_line(line: str) -> Optional[list[int]]:
    """The device ids of the collective's first group (for a permute, the first
    pair that moves data), or None where the line names no groups."""
    if match := _EXPLICIT.search(line):
        return _ints(match.group(1))
    if match := _IOTA.search(line):
        return _iota_group(*match.groups())
    if match := _NAMED.search(line):
        return _named_group(*match.groups())
    if match := _PAIRS.search(line):
        pairs = np.array(_ints(match.group(1))).reshape(-1, 2)
        moving = [p for p in pairs.tolist() if p[0] != p[1]]
        return moving[0] if moving else None
    return None


def axes_of_line(line: str, mesh_shape: Sequence[int],
                 axis_names: Sequence[str]) -> tuple[tuple[str, ...], int]:
    """(mesh axes the collective spans, devices in its group). A line whose
    groups cannot be read counts as spanning the whole mesh."""
    group = group_of_line(line)
    if not group or max(group) >= int(np.prod(mesh_shape)):
        return tuple(axis_names), int(np.prod(mesh_shape))
    coords = np.array(np.unravel_index(group, tuple(mesh_shape)))
    axes = tuple(a for a, row in zip(axis_names, coords, strict=True) if len(set(row.tolist())) > 1)
    size = len(group) if not _PAIRS.search(line) else 2
    return axes, size


def instruction_lines(hlo_text: str) -> dict[str, str]:
    """Each instruction's line, by instruction name."""
    lines = {}
    for line in hlo_text.splitlines():
        if match := _NAME.match(line):
            lines[match.group(1)] = line
    return lines


def in_region_body(line: str) -> bool:
    """Whether the op was traced inside a ``local_map`` body (its metadata names
    ``local_map[...]``), rather than by a layout change around the region."""
    match = _OP_NAME.search(line)
    return match is not None and "local_map[" in match.group(1)
