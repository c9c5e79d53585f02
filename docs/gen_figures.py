"""Placement figures for the docs, drawn from jlocalmap's own layouts.

Each figure lays a value out with ``jlm.distribute_tensor`` on simulated CPU
devices, reads back which device holds which block from ``jlm.inspect.describe(x)``
(for an uneven value: from ``describe`` of its padded storage plus the
devices' own data, which tells real rows from padding), and draws it as SVG.
The docs build runs this (``docs/hooks.py``), so the pictures cannot drift
from the library. To look at them without building the site:

    python docs/gen_figures.py /tmp/figures
"""

from __future__ import annotations

import html
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

DEVICES_NEEDED = 8
# A qualitative palette that reads on white, with black text on top.
PALETTE = ("#a6cee3", "#fdbf6f", "#b2df8a", "#fb9a99", "#cab2d6", "#ffff99",
           "#8dd3c7", "#fccde5", "#d9d9d9", "#bc80bd")
FONT = "Roboto, Helvetica, Arial, sans-serif"


@dataclass(frozen=True)
class Figure:
    """One picture: a value of ``shape`` laid out by ``placements`` on a mesh."""
    name: str
    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    shape: tuple[int, int]
    placements: Callable  # jlocalmap module -> placement list (jlocalmap imports late)
    caption: str


FIGURES = (
    Figure("shard0_shard1.svg", (2, 4), ("dp", "tp"), (8, 8),
           lambda jlm: [jlm.Shard(0), jlm.Shard(1)],
           "rows split over dp, columns over tp: each device holds one block"),
    Figure("shard0_shard0.svg", (2, 4), ("dp", "tp"), (8, 4),
           lambda jlm: [jlm.Shard(0), jlm.Shard(0)],
           "rows split over dp, then each half over tp: device (i, j) holds chunk 4i + j"),
    Figure("replicate_partial.svg", (2, 4), ("dp", "tp"), (4, 4),
           lambda jlm: [jlm.Replicate(), jlm.Partial()],
           "every device holds a whole-shaped summand; the value is the sum over tp"),
    Figure("uneven.svg", (2, 2), ("dp", "tp"), (9, 4),
           lambda jlm: [jlm.Shard(0), jlm.Shard(0)],
           "9 rows in DTensor's chunks 5 + 4, then 3 + 2 and 2 + 2; local values padded to 3 rows"),
)


@dataclass(frozen=True)
class Held:
    """One device's row of ``jlm.inspect.describe``: what it holds of the global value."""
    device: int
    coords: tuple[tuple[str, int], ...]
    index: tuple[tuple[int, int], ...]  # (start, stop) per dim
    partial: bool
    padding: int = 0  # padding rows after the real ones (uneven values)


@dataclass(frozen=True)
class Described:
    """``jlm.inspect.describe`` text, parsed: its header lines and one Held per device."""
    placements: str
    spec: str
    mesh: str
    rows: tuple[Held, ...]


_ROW = re.compile(r"^\s*(\d+)\s+((?:\w+=\d+\s*)+?)\s+\[([^\]]*)\](.*)$")


def parse_describe(text: str) -> Described:
    """Read ``jlm.inspect.describe(x)``'s text back into data (fails loudly if its format changes).

    Example:
        >>> d = parse_describe('''float32[4, 2]
        ... mesh: tp=2 (Explicit)
        ... placements: [Shard(dim=0)]
        ... PartitionSpec: P('tp', None)
        ... device  mesh coords  holds
        ...      0  tp=0         [0:2, 0:2]
        ...      1  tp=1         [2:4, 0:2]''')
        >>> d.spec, d.rows[1].index
        ("P('tp', None)", ((2, 4), (0, 2)))
    """
    lines = text.splitlines()
    header = dict(line.split(": ", 1) for line in lines if line.split(": ", 1)[0]
                  in ("mesh", "placements", "PartitionSpec"))
    rows = []
    for line in lines[lines.index(next(l for l in lines if l.startswith("device "))) + 1:]:
        match = _ROW.match(line)
        if not match:
            raise ValueError(f"jlm.inspect.describe row not understood: {line!r}")
        device, coords, index, rest = match.groups()
        rows.append(Held(
            int(device),
            tuple((a, int(c)) for a, c in (kv.split("=") for kv in coords.split())),
            tuple(tuple(int(v) for v in s.split(":")) for s in index.split(", ")),
            "partial summand" in rest))
    return Described(header["placements"], header["PartitionSpec"], header["mesh"],
                     tuple(rows))


def _jax_on_cpu():
    """jax with at least DEVICES_NEEDED CPU devices (simulated when jax starts here)."""
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (
                f"{flags} --xla_force_host_platform_device_count={DEVICES_NEEDED}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    devices = jax.devices("cpu")
    if len(devices) < DEVICES_NEEDED:
        raise RuntimeError(
            f"the docs' figures need {DEVICES_NEEDED} CPU devices, found {len(devices)}: jax "
            f"was started before docs/gen_figures.py without "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES_NEEDED}")
    return jax, devices


def _real_rows(x, jax) -> dict[int, tuple[int, int]]:
    """Per device, the logical rows its padded chunk holds (values are row + 1, padding 0)."""
    import numpy as np
    real = {}
    for shard in x.padded.addressable_shards:
        rows = np.asarray(shard.data)[:, 0]
        rows = rows[rows > 0].astype(int) - 1
        real[shard.device.id] = (int(rows.min()), int(rows.max()) + 1) if rows.size else (0, 0)
    return real


def describe_figure(figure: Figure) -> Described:
    """Lay ``figure``'s value out with jlocalmap and read back who holds what."""
    import numpy as np
    jax, devices = _jax_on_cpu()
    import jlocalmap as jlm
    n = int(np.prod(figure.mesh_shape))
    mesh = jax.make_mesh(figure.mesh_shape, figure.axis_names, devices=devices[:n])
    rows = np.arange(1, figure.shape[0] + 1, dtype=np.float32)  # row r holds r + 1
    value = np.repeat(rows[:, None], figure.shape[1], axis=1)
    x = jlm.distribute_tensor(value, mesh, figure.placements(jlm))
    if not isinstance(x, jlm.UnevenArray):
        return parse_describe(jlm.inspect.describe(x))
    stored = parse_describe(jlm.inspect.describe(x.padded))
    real = _real_rows(x, jax)
    held = tuple(replace(r, index=(real[r.device],) + r.index[1:],
                         padding=(r.index[0][1] - r.index[0][0])
                         - (real[r.device][1] - real[r.device][0]))
                 for r in stored.rows)
    placements = str(list(jlm.placements_of(x)))
    return replace(stored, placements=placements, rows=held,
                   spec=f"{stored.spec} on the padded storage")


# ----------------------------------------------------------------------------- SVG


def _text(x, y, s, size=12, anchor="middle", weight="normal", fill="#212121"):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}">{html.escape(s)}</text>')


def _rect(x, y, w, h, fill, stroke="#424242", width=1.0, extra=""):
    return (f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="{width}" {extra}/>')


def _block_colors(rows: tuple[Held, ...]) -> dict:
    """One color per distinct block, so replicas of a block share a color."""
    colors = {}
    for r in rows:
        colors.setdefault(r.index, PALETTE[len(colors) % len(PALETTE)])
    return colors


def _array(x, y, cell, shape, blocks, colors, labels=True, partial_ids=None):
    """The global array at (x, y), its blocks filled; ``blocks``: index -> devices."""
    out = [_rect(x, y, shape[1] * cell, shape[0] * cell, "#ffffff")]
    for index, devices in blocks.items():
        (r0, r1), (c0, c1) = index
        bx, by, bw, bh = x + c0 * cell, y + r0 * cell, (c1 - c0) * cell, (r1 - r0) * cell
        out.append(_rect(bx, by, bw, bh, colors[index], width=1.2))
        if partial_ids and index in partial_ids:
            out.append(_rect(bx, by, bw, bh, "url(#hatch)", stroke="none"))
        if labels:
            size = 11 if len(devices) <= 2 else 10
            label = " ".join(str(d) for d in devices)
            out.append(_text(bx + bw / 2, by + bh / 2 + 4, label, size=size, weight="bold"))
    for i in range(1, shape[0]):  # element grid, faint
        out.append(f'<line x1="{x}" y1="{y + i * cell}" x2="{x + shape[1] * cell}" '
                   f'y2="{y + i * cell}" stroke="#000" stroke-opacity="0.12"/>')
    for j in range(1, shape[1]):
        out.append(f'<line x1="{x + j * cell}" y1="{y}" x2="{x + j * cell}" '
                   f'y2="{y + shape[0] * cell}" stroke="#000" stroke-opacity="0.12"/>')
    return out


def _index_text(held: Held) -> str:
    text = "[" + ", ".join(f"{a}:{b}" for a, b in held.index) + "]"
    if held.padding:
        text += f" + {held.padding} pad"
    return text + (" summand" if held.partial else "")


def _local_value(x, y, cell, held, shape, color):
    """What the body sees of an uneven value: real rows, then hatched padding rows."""
    real = held.index[0][1] - held.index[0][0]
    out = [_rect(x, y, shape[1] * cell, real * cell, color, width=1.2)]
    if held.padding:
        py, ph = y + real * cell, held.padding * cell
        out += [_rect(x, py, shape[1] * cell, ph, "#eeeeee", width=1.2),
                _rect(x, py, shape[1] * cell, ph, "url(#hatch)", stroke="none")]
    return out


def _device_cell(x, y, w, held, shape, colors, chunk_rows):
    """One device of the mesh: its id, coordinates, and its block in a miniature;
    with ``chunk_rows`` (uneven values) also its padded local value."""
    out = [_rect(x, y, w, 118, "#fafafa", stroke="#9e9e9e", extra='rx="6"'),
           _text(x + w / 2, y + 16, f"device {held.device}", size=12, weight="bold"),
           _text(x + w / 2, y + 30, " ".join(f"{a}={c}" for a, c in held.coords), size=11,
                 fill="#616161")]
    cell = min(52 / shape[0], (w - 40) / shape[1])
    width = shape[1] * cell * (2.6 if chunk_rows else 1)
    ax = x + (w - width) / 2
    out += _array(ax, y + 38, cell, shape, {held.index: [held.device]}, colors, labels=False,
                  partial_ids={held.index} if held.partial else None)
    if chunk_rows:
        lx = ax + shape[1] * cell * 1.6
        out.append(_text(lx + shape[1] * cell / 2, y + 46, "local", size=9, fill="#616161"))
        out += _local_value(lx, y + 50, cell, held, shape, colors[held.index])
    out.append(_text(x + w / 2, y + 108, _index_text(held), size=10.5))
    return out


def _width_of(text: str, size: float) -> float:
    return 0.52 * size * len(text)  # a sans-serif average, enough to size the canvas


def render(figure: Figure, described: Described) -> str:
    """The SVG of ``figure``: the global array by block, and the mesh of devices."""
    rows = described.rows
    colors = _block_colors(rows)
    blocks: dict = {}
    for r in rows:
        blocks.setdefault(r.index, []).append(r.device)
    mesh_rows = figure.mesh_shape[0] if len(figure.mesh_shape) > 1 else 1
    mesh_cols = len(rows) // mesh_rows
    cell = min(170 / figure.shape[0], 170 / figure.shape[1])
    partial = {r.index for r in rows if r.partial}
    label = ("global value: every device a summand" if partial
             else "global value: devices per block")
    cell_w, top = 132, 84
    left_w = 40 + max(figure.shape[1] * cell, _width_of(label, 11.5))
    chunk_rows = max(r.index[0][1] - r.index[0][0] + r.padding for r in rows) \
        if any(r.padding for r in rows) else 0
    lines = [(described.placements, 16, "bold", "#212121"),
             (f"f32{list(figure.shape)}  ·  PartitionSpec {described.spec}  ·  mesh "
              f"{described.mesh.replace(' (Explicit)', '')}", 12.5, "normal", "#424242"),
             (figure.caption, 12.5, "normal", "#424242")]
    width = max(left_w + mesh_cols * (cell_w + 10) + 10,
                *(32 + _width_of(t, size) for t, size, _, _ in lines))
    height = max(top + mesh_rows * 128, top + 24 + figure.shape[0] * cell) + 12
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="{FONT}" role="img">',
           f'<title>{html.escape(described.placements)}: {html.escape(figure.caption)}</title>',
           '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#000" '
           'stroke-opacity="0.35" stroke-width="1.5"/></pattern></defs>',
           _rect(0, 0, width, height, "#ffffff", stroke="#e0e0e0", extra='rx="8"')]
    out += [_text(16, 24 + 19 * k, t, size=size, anchor="start", weight=weight, fill=fill)
            for k, (t, size, weight, fill) in enumerate(lines)]
    out.append(_text(20, top + 8, label, size=11.5, anchor="start", fill="#424242"))
    out += _array(20, top + 18, cell, figure.shape, blocks, colors, partial_ids=partial)
    for k, held in enumerate(rows):
        i, j = divmod(k, mesh_cols)
        out += _device_cell(left_w + j * (cell_w + 10), top + i * 128, cell_w, held,
                            figure.shape, colors, chunk_rows)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render_all() -> dict[str, str]:
    """Every figure's file name and SVG text."""
    return {f.name: render(f, describe_figure(f)) for f in FIGURES}


def main(argv: list[str]) -> None:
    out = Path(argv[1] if len(argv) > 1 else "figures")
    out.mkdir(parents=True, exist_ok=True)
    for name, svg in render_all().items():
        (out / name).write_text(svg)
        print(out / name)


if __name__ == "__main__":
    main(sys.argv)
