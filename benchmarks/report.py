"""What the harness reports: per-row statistics and ratios, the targets
(pass/fail), the terminal table, the JSON file and the PNG plots.

Ratios of interleaved rows are *paired*: the median over rounds of the row's time
over its baseline's time in the same round, which cancels the drift a shared
machine adds to both. Rows from another process (PyTorch's) are compared by
their medians.

Example:
    >>> from benchmarks.report import paired_ratio, linear_exponent
    >>> paired_ratio([2.0, 2.2, 2.1], [1.0, 1.1, 1.0])
    2.0
    >>> round(linear_exponent({8: 1.0, 16: 2.0, 32: 4.0}), 2)
    1.0
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any, Optional

from benchmarks.timing import Row, summarize

STEP_RATIO_MAX = 1.02
EAGER_RATIO_MAX = 1.2
DEPTH_EXPONENT_MAX = 1.15  # time ~ depth ** exponent over the deepest octaves
DEPTH_EXPONENT_SLACK = 0.05  # JAX's own tracing may grow faster: jlocalmap adds at most this
# A row's own checks (bf16 rounds to 2**-8 relative; a few roundings stay under 2 %):
REL_DIFF_MAX = 0.02    # a JAX row's results against its baseline's, max |a - b| / max |b|
GRAD_CHECK_TOL = 0.02  # a PyTorch row's weight gradients: |norm ratio - 1| and max rel. error


def failed_check(entry: dict, grad_check: Optional[dict] = None) -> Optional[str]:
    """The row's own check that fails, as text (``invalid: <check>``), or None: a
    JAX row's results must equal its baseline's (``rel_diff``), a PyTorch row's
    weight gradients the unsharded ones (``grad_check``).

    Example:
        >>> failed_check({"rel_diff": 0.0}, {"norm_ratio": [0.0, 0.0], "max_rel_err": [1.0, 1.0]})
        'grad_check: norm_ratio [0.0, 0.0], max_rel_err [1.0, 1.0]'
        >>> failed_check({"rel_diff": 1e-3}) is None
        True
    """
    if entry.get("rel_diff", 0.0) > REL_DIFF_MAX:
        return f"rel_diff {entry['rel_diff']:.1e} > {REL_DIFF_MAX}"
    if grad_check is not None:
        ratios, errors = grad_check["norm_ratio"], grad_check["max_rel_err"]
        if any(abs(r - 1) > GRAD_CHECK_TOL for r in ratios) or max(errors) > GRAD_CHECK_TOL:
            return f"grad_check: norm_ratio {ratios}, max_rel_err {errors}"
    return None


def paired_ratio(times: Sequence[float], baseline: Sequence[float]) -> float:
    return statistics.median(t / b for t, b in zip(times, baseline, strict=True))


def linear_exponent(seconds_by_depth: dict) -> float:
    """The exponent ``k`` of ``time ~ depth ** k``: a least-squares fit in log-log
    over the deepest three octaves (1.0 is linear; a program's fixed cost makes
    shallow points flatter, so they are left out once there are deeper ones)."""
    deepest = max(seconds_by_depth)
    points = [(math.log(d), math.log(t)) for d, t in seconds_by_depth.items()
              if d >= deepest / 8 and t > 0]
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return (sum((x - mx) * (y - my) for x, y in points)
            / sum((x - mx) ** 2 for x, _ in points))


def relative_difference(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over the leaves of two results (loss and gradients)."""
    import jax
    import numpy as np
    diffs, scales = [0.0], [1e-30]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        diffs.append(float(np.max(np.abs(x - y))) if x.size else 0.0)
        scales.append(float(np.max(np.abs(y))) if y.size else 0.0)
    return max(diffs) / max(scales)


def row_entry(row: Row, rows: dict, matmul_rate: Optional[float], paired: bool = True) -> dict:
    """Statistics of one row: median and spread, ratio to its baseline, TFLOP/s
    and the fraction of the matmul rate of the same run."""
    stats = summarize(row.times)
    entry: dict = {"stats": stats, "times": list(row.times), "note": row.note,
                   "baseline": row.baseline}
    base = rows.get(row.baseline) if row.baseline else None
    if base is not None and base.times:
        entry["ratio"] = (paired_ratio(row.times, base.times) if paired and
                          len(base.times) == len(row.times) else
                          stats["median"] / summarize(base.times)["median"])
    if row.flops:
        entry["tflops"] = row.flops / stats["median"] / 1e12
        if matmul_rate:
            entry["matmul_fraction"] = entry["tflops"] / matmul_rate
    return entry


def targets(result: dict) -> list:
    """The issue's targets, each with its value, limit and verdict."""
    found = [{"target": f"{name}: its own check passes", "value": entry["invalid"],
              "limit": "valid", "passed": False}
             for name, entry in result["rows"].items() if "invalid" in entry]
    rows = {name: entry for name, entry in result["rows"].items() if "invalid" not in entry}
    for program, ours, hand in result.get("collectives", []):
        found.append({"target": f"{program}: same collectives as hand-written",
                      "value": ours, "limit": hand, "passed": ours == hand})
    for name in ("mlp/jlocalmap", "mlp-sp/jlocalmap", "block/jlocalmap"):
        if "ratio" in rows.get(name, {}):
            ratio = rows[name]["ratio"]
            found.append({"target": f"{name} step / hand-written shard_map",
                          "value": round(ratio, 4), "limit": STEP_RATIO_MAX,
                          "passed": ratio <= STEP_RATIO_MAX})
    if "ratio" in rows.get("strategy/chosen", {}):
        ratio = rows["strategy/chosen"]["ratio"]
        found.append({"target": f"strategy/chosen step / best hand-picked "
                                f"({rows['strategy/chosen']['baseline']})",
                      "value": round(ratio, 4), "limit": STEP_RATIO_MAX,
                      "passed": ratio <= STEP_RATIO_MAX})
    if "ratio" in rows.get("eager/jlocalmap", {}):
        ratio = rows["eager/jlocalmap"]["ratio"]
        found.append({"target": "eager/jlocalmap call / jitted hand-written call",
                      "value": round(ratio, 4), "limit": EAGER_RATIO_MAX,
                      "passed": ratio <= EAGER_RATIO_MAX})
    exponents = {impl: linear_exponent({int(d): t["trace"] for d, t in times.items()})
                 for impl, times in result.get("depth", {}).items() if len(times) >= 2}
    if "jlocalmap" in exponents:
        exponent = exponents["jlocalmap"]
        hand = exponents.get("shard_map")
        # Linear, or no steeper than JAX's own tracing of the hand-written program
        # (measured superlinear on a 2-core CPU) by more than the slack.
        limit = max(DEPTH_EXPONENT_MAX, (hand or 0.0) + DEPTH_EXPONENT_SLACK)
        found.append({"target": "jlocalmap trace time linear in depth (exponent"
                                + (f"; hand-written: {hand:.3f})" if hand is not None else ")"),
                      "value": round(exponent, 3), "limit": round(limit, 3),
                      "passed": exponent <= limit})
    for ours, theirs in (("mlp/jlocalmap", "mlp/torch-eager"),
                         ("eager/jlocalmap", "eager/torch-eager")):
        if ours in rows and theirs in rows:
            ratio = rows[ours]["stats"]["median"] / rows[theirs]["stats"]["median"]
            found.append({"target": f"{ours} faster than {theirs} (time ratio)",
                          "value": round(ratio, 4), "limit": 1.0, "passed": ratio < 1.0})
    return found


# -- the terminal table ---------------------------------------------------------------------
def _time(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:9.1f} us"


def table(result: dict) -> str:
    lines = [f"{'row':28s} {'median':>12s} {'spread':>7s} {'ratio':>7s} {'TFLOP/s':>8s} "
             f"{'%matmul':>7s} {'rel.diff':>9s}"]
    group = None
    for name, entry in result["rows"].items():
        if name.split("/")[0] != group:
            group = name.split("/")[0]
            lines.append(f"-- {group} " + "-" * 60)
        if "invalid" in entry:   # a row whose own check fails has no figure to show
            lines.append(f"{name:28s} invalid: {entry['invalid']}")
            continue
        ratio = f"{entry['ratio']:.3f}x" if "ratio" in entry else ""
        tflops = f"{entry['tflops']:.3f}" if "tflops" in entry else ""
        frac = f"{100 * entry['matmul_fraction']:.1f}%" if "matmul_fraction" in entry else ""
        diff = f"{entry['rel_diff']:.1e}" if "rel_diff" in entry else ""
        lines.append(f"{name:28s} {_time(entry['stats']['median']):>12s} "
                     f"{100 * entry['stats']['spread']:6.1f}% {ratio:>7s} {tflops:>8s} "
                     f"{frac:>7s} {diff:>9s}")
    lines += _depth_lines(result.get("depth", {}))
    lines.append("-- targets " + "-" * 57)
    for t in result["targets"]:
        value, limit = t["value"], t["limit"]
        if isinstance(value, dict):  # collective counts
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v) or "none"
            limit = "hand-written: " + (", ".join(f"{k} {v}" for k, v in limit.items() if v)
                                        or "none")
        lines.append(f"{'PASS' if t['passed'] else 'FAIL'}  {t['target']}: {value} "
                     f"(limit {limit})")
    return "\n".join(lines)


def _depth_lines(depth: dict) -> list:
    if not depth:
        return []
    lines = ["-- depth (best of rounds; seconds) " + "-" * 34,
             f"{'layers':>6s} " + " ".join(f"{impl + ' ' + phase:>19s}"
                                         for impl in depth for phase in ("trace", "compile"))]
    for layers in sorted({int(d) for times in depth.values() for d in times}):
        cells = []
        for times in depth.values():
            t = times.get(layers) or times.get(str(layers)) or {}
            cells += [f"{t['trace']:19.3f}" if "trace" in t else " " * 19,
                      f"{t['compile']:19.3f}" if t.get("compile") is not None else f"{'-':>19s}"]
        lines.append(f"{layers:6d} " + " ".join(cells))
    return lines


# -- files ----------------------------------------------------------------------------------
def write_json(result: dict, path: pathlib.Path) -> None:
    path.write_text(json.dumps(result, indent=1, default=str))


def plots(result: dict, out: pathlib.Path) -> list:
    """step_times.png (median and quartiles per row, one panel per workload) and
    trace_depth.png (trace and compile time versus depth). Returns the paths."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = [_step_plot(plt, result, out / "step_times.png")]
    if result.get("depth"):
        written.append(_depth_plot(plt, result["depth"], out / "trace_depth.png"))
    return written


def _step_plot(plt, result: dict, path: pathlib.Path) -> pathlib.Path:
    groups: dict = {}
    for name, entry in result["rows"].items():
        if "invalid" not in entry:
            groups.setdefault(name.split("/")[0], []).append((name.split("/", 1)[1], entry["stats"]))
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.2 + 0.45 * len(result["rows"])
                                                     + 0.6 * len(groups)), squeeze=False)
    for ax, (group, items) in zip(axes[:, 0], groups.items(), strict=True):
        scale, unit = (1e6, "us") if max(s["median"] for _, s in items) < 1e-3 else (1e3, "ms")
        medians = [s["median"] * scale for _, s in items]
        errors = [[(s["median"] - s["q1"]) * scale for _, s in items],
                  [(s["q3"] - s["median"]) * scale for _, s in items]]
        ax.barh([n for n, _ in items], medians, xerr=errors, color="tab:blue", alpha=0.8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{group}: median time per call ({unit}); bars: quartiles over rounds")
    fig.suptitle(f"{result['machine']['devices']} - {result['config']['mode']} run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _depth_plot(plt, depth: dict, path: pathlib.Path) -> pathlib.Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, phase in zip(axes, ("trace", "compile"), strict=True):
        deepest = None
        for impl, times in depth.items():
            points = sorted((int(d), t[phase]) for d, t in times.items()
                            if t.get(phase) is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=impl)
                deepest = max(deepest or points[-1], points[-1])
        if deepest is not None:  # a line through the deepest point, slope 1: linear
            d, t = deepest
            ax.plot([1, d], [t / d, t], "k--", lw=0.8, label="linear in depth")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("layers (attention + MLP region each)")
        ax.set_ylabel(f"{phase} time (s, {'best of rounds' if phase == 'trace' else 'one compile'})")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
