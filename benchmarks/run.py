"""jlocalmap's benchmark harness: jlocalmap against the same programs written by
hand with ``jax.shard_map`` (and PyTorch DTensor's ``local_map`` when torch is
importable), interleaved round by round in one process, on the devices present
(the GPUs, or 8 simulated CPU devices).

Run from a checkout:

    python -m benchmarks            # the full run (minutes)
    python -m benchmarks --quick    # CI size (about a minute on 2 CPU cores)
    python benchmarks/run.py --help

Prints a table (median and spread over rounds, ratio to hand-written shard_map,
TFLOP/s and fraction of the matmul rate measured in the same run) and the
targets, pass or fail; writes results.json, step_times.png and trace_depth.png
to --out. docs/benchmarks.md explains each figure.
"""

from __future__ import annotations

import os
import sys


def _configure_environment() -> None:
    """Before JAX starts: 8 simulated devices when the platform is the CPU (no
    effect on GPUs), and no up-front GPU memory grab (the PyTorch rows run in
    other processes on the same GPUs)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


_configure_environment()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a checkout works without installing

import jax  # noqa: E402

import jlocalmap  # noqa: E402,F401  (fail early, before any timing)
from benchmarks import report, strategy, torch_rows, workloads  # noqa: E402
from benchmarks.timing import Progress, calibrate, run_rounds  # noqa: E402
from benchmarks.workloads import BlockSize, MlpSize  # noqa: E402

GROUPS = ("mlp", "block", "eager", "depth", "torch", "strategy")


@dataclasses.dataclass
class Settings:
    mlp: MlpSize
    block: BlockSize
    depth_block: BlockSize
    depths: tuple
    compile_max: int
    rounds: int
    round_s: float
    depth_rounds: int


def default_settings(accelerator: bool, quick: bool) -> Settings:
    """Sizes per platform: the issue's sizes on GPUs, scaled down on CPUs."""
    if accelerator:
        big, dtype = not quick, "bfloat16"
        return Settings(
            mlp=MlpSize(8192, 4096, 14336, dtype) if big else MlpSize(2048, 1024, 4096, dtype),
            block=(BlockSize(1, 4096, 4096, 32, 14336, dtype) if big
                   else BlockSize(1, 1024, 1024, 8, 4096, dtype)),
            depth_block=BlockSize(1, 128, 256, 8, 512, dtype),
            depths=(1, 2, 4, 8, 16, 32, 64) if big else (1, 4, 16),
            compile_max=16, rounds=20 if big else 5,
            round_s=0.3 if big else 0.1, depth_rounds=3)
    if quick:
        return Settings(mlp=MlpSize(128, 128, 512, "float32"),
                        block=BlockSize(2, 32, 64, 4, 128, "float32"),
                        depth_block=BlockSize(1, 16, 32, 4, 64, "float32"),
                        depths=(1, 2, 4, 8), compile_max=2, rounds=5, round_s=0.05,
                        depth_rounds=3)
    return Settings(mlp=MlpSize(512, 512, 2048, "float32"),
                    block=BlockSize(2, 128, 256, 8, 1024, "float32"),
                    depth_block=BlockSize(1, 16, 32, 4, 64, "float32"),
                    depths=(1, 2, 4, 8, 16, 32, 64), compile_max=16, rounds=15,
                    round_s=0.25, depth_rounds=3)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI sizes and few rounds")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="output folder (default benchmarks/results/<quick|full>)")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups to run, of {','.join(GROUPS)}")
    parser.add_argument("--tp", type=int, default=None,
                        help="devices of the MLP and eager rows (default: all)")
    parser.add_argument("--block-mesh", default=None,
                        help="dp,cp,tp of the block and depth rows (default: cp=2 from 4 "
                             "devices on, tp the rest)")
    parser.add_argument("--no-overlap", action="store_true",
                        help="skip the sequence-parallel rows (collective matmuls, XLA auto)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per group")
    parser.add_argument("--round-s", type=float, default=None, help="seconds per row per round")
    parser.add_argument("--mlp", default=None, help="tokens,d_model,d_ff of the MLP rows")
    parser.add_argument("--depths", default=None, help="comma-separated layer counts")
    parser.add_argument("--compile-depth-max", type=int, default=None,
                        help="compile the depth programs up to this many layers")
    parser.add_argument("--torch-timeout", type=float, default=None,
                        help="seconds for the PyTorch launch")
    parser.add_argument("--label", default="", help="a note stored in the JSON (e.g. flags)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target fails")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _ints(text: str, what: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"{what}: expected comma-separated integers, found {text!r}") from None
    if any(v < 1 for v in values):
        raise SystemExit(f"{what}: expected positive integers, found {text!r}")
    return values


def resolve(args: argparse.Namespace) -> tuple[Settings, dict]:
    devices = jax.devices()
    accelerator = devices[0].platform != "cpu"
    settings = default_settings(accelerator, args.quick)
    if args.mlp:
        settings.mlp = MlpSize(*_ints(args.mlp, "--mlp"), settings.mlp.dtype)
    if args.depths:
        settings.depths = _ints(args.depths, "--depths")
    for field, value in (("rounds", args.rounds), ("round_s", args.round_s),
                         ("compile_max", args.compile_depth_max)):
        if value is not None:
            setattr(settings, field, value)
    n = len(devices)
    tp = args.tp or n
    if tp > n:
        raise SystemExit(f"--tp: {tp} devices asked for, {n} present")
    if args.block_mesh:
        block_mesh = _ints(args.block_mesh, "--block-mesh")
        if len(block_mesh) != 3 or block_mesh[0] * block_mesh[1] * block_mesh[2] > n:
            raise SystemExit(f"--block-mesh: expected dp,cp,tp with at most {n} devices in "
                             f"all, found {args.block_mesh!r}")
    else:
        block_mesh = (1, 2, n // 2) if n >= 4 and n % 2 == 0 else (1, 1, n)
    only = set(args.only.split(","))
    if only - set(GROUPS):
        raise SystemExit(f"--only: unknown groups {sorted(only - set(GROUPS))}; pick of {GROUPS}")
    plan = {"devices": devices, "accelerator": accelerator, "tp": tp, "block_mesh": block_mesh,
            "only": only, "overlap": not args.no_overlap}
    return settings, plan


def machine_info(devices) -> dict:
    import jaxlib
    import numpy as np
    return {"devices": f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})",
            "platform": devices[0].platform, "device_count": len(devices),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "system": platform.platform(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def time_group(work: workloads.Workload, settings: Settings, sync_each: bool,
               progress: Progress) -> None:
    iters = calibrate(work.rows, jax.block_until_ready, settings.round_s)
    work.info["iters_per_round"] = iters
    run_rounds(work.rows, settings.rounds, iters, jax.block_until_ready, sync_each, progress)


def run_jax_groups(settings: Settings, plan: dict, progress: Progress) -> tuple[list, dict]:
    """Build and time the JAX groups; (works, depth times)."""
    devices, only, works = plan["devices"], plan["only"], []
    step_sync = not plan["accelerator"]  # simulated CPU devices: one call in flight
    builders = [("mlp", lambda: workloads.mlp_workload(devices, plan["tp"], settings.mlp,
                                                       plan["overlap"]), step_sync),
                ("block", lambda: workloads.block_workload(devices, plan["block_mesh"],
                                                           settings.block), step_sync),
                ("eager", lambda: workloads.eager_workload(devices, plan["tp"]), True),
                ("strategy", lambda: strategy.strategy_workload(devices[:plan["tp"]],
                                                                settings.mlp), step_sync)]
    for group, build, sync_each in builders:
        if group in only:
            progress.advance(f"building {group}", 0)
            start = time.perf_counter()
            work = build()
            built = time.perf_counter()
            time_group(work, settings, sync_each, progress)
            if group == "strategy":  # its baseline is the fastest hand-picked row
                strategy.pick_baseline(work)
            work.info.update(group=group, build_s=built - start,
                             timing_s=time.perf_counter() - built)
            works.append(work)
    depth = {}
    if "depth" in only:
        start = time.perf_counter()
        depth = workloads.depth_sweep(devices, plan["block_mesh"], settings.depth_block,
                                      settings.depths, settings.depth_rounds,
                                      settings.compile_max, progress)
        depth["wall_s"] = time.perf_counter() - start
    return works, depth


def run_torch(settings: Settings, plan: dict, timeout_s: float,
              args: argparse.Namespace) -> dict:
    if "torch" not in plan["only"]:
        return {"skipped": "not asked for (--only)"}
    if not torch_rows.available():
        return {"skipped": "PyTorch rows skipped: torch is not importable here "
                           "(pip install torch to add them)"}
    config = {"device": "cuda" if plan["accelerator"] else "cpu",
              "dtype": settings.mlp.dtype,
              "mlp": [settings.mlp.tokens, settings.mlp.d_model, settings.mlp.d_ff],
              "rounds": settings.rounds, "round_s": settings.round_s,
              "compile": not args.quick}
    result = torch_rows.launch(config, plan["tp"], timeout_s)
    return {"skipped": result} if isinstance(result, str) else result


def assemble(works: list, depth: dict, torch_result: dict, settings: Settings, plan: dict,
             args: argparse.Namespace) -> dict:
    """One dict of everything: rows with statistics and ratios, the targets."""
    rows = {row.name: row for work in works for row in work.rows}
    outputs = {k: v for work in works for k, v in work.outputs.items()}
    matmul = rows.get("matmul/local")
    rate = (matmul.flops / report.summarize(matmul.times)["median"] / 1e12
            if matmul is not None else None)
    entries = {}
    for name, row in rows.items():
        entries[name] = report.row_entry(row, rows, rate)
        if row.baseline in outputs and name in outputs:
            entries[name]["rel_diff"] = report.relative_difference(outputs[name],
                                                                   outputs[row.baseline])
        _mark_invalid(entries[name])
    _add_torch_rows(entries, torch_result, rows, rate)
    result = {"machine": plan["machine"],
              "config": {"mode": "quick" if args.quick else "full", "label": args.label,
                         "tp": plan["tp"], "block_mesh": plan["block_mesh"],
                         "settings": dataclasses.asdict(settings)},
              "groups": {work.info.get("group", i): work.info for i, work in enumerate(works)},
              "rows": dict(sorted(entries.items(), key=lambda kv: _order(kv[0]))),
              "collectives": [list(c) for work in works for c in work.collectives],
              "depth": {impl: {str(d): t for d, t in times.items()}
                        for impl, times in depth.items() if impl != "wall_s"},
              "depth_wall_s": depth.get("wall_s"),
              "torch": {k: v for k, v in torch_result.items() if k != "rows"}}
    result["targets"] = report.targets(result)
    return result


def _order(name: str) -> tuple:
    group, impl = name.split("/", 1)
    groups = ("matmul", "mlp", "mlp-sp", "block", "eager", "strategy")
    return (groups.index(group) if group in groups else len(groups), impl != "shard_map"
            and impl != "jit(shard_map)", name)


def _add_torch_rows(entries: dict, torch_result: dict, rows: dict, rate) -> None:
    from benchmarks.timing import Row
    for name, data in torch_result.get("rows", {}).items():
        group = name.split("/")[0]
        baseline = {"eager": "eager/jit(shard_map)", "matmul": "matmul/local"}.get(
            group, f"{group}/shard_map")
        flops = rows[baseline].flops if baseline in rows else None
        row = Row(name, lambda: None, baseline=baseline, flops=flops,
                  note="PyTorch, its own launch (not interleaved with the JAX rows)",
                  times=data["times"])
        entries[name] = report.row_entry(row, rows, rate, paired=False)
        _mark_invalid(entries[name], torch_result.get("grad_check", {}).get(name))


def _mark_invalid(entry: dict, grad_check: Optional[dict] = None) -> None:
    failed = report.failed_check(entry, grad_check)
    if failed is not None:
        entry["invalid"] = failed


def main(argv=None) -> int:
    args = parse_args(argv)
    settings, plan = resolve(args)
    out = args.out or ROOT / "benchmarks" / "results" / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    plan["machine"] = machine_info(plan["devices"])  # the load average at the start
    print(f"devices: {plan['machine']['devices']}; jax {jax.__version__}; "
          f"mode {'quick' if args.quick else 'full'}; out {out}", flush=True)
    start = time.perf_counter()
    progress = Progress(_progress_total(settings, plan), enabled=not args.no_progress)
    works, depth = run_jax_groups(settings, plan, progress)
    progress.advance("PyTorch rows" if "torch" in plan["only"] else "done", 0)
    timeout = args.torch_timeout or (180 if args.quick else 600)
    torch_result = run_torch(settings, plan, timeout, args)
    progress.advance("done", progress.total - progress.done)
    progress.close()
    result = assemble(works, depth, torch_result, settings, plan, args)
    result["wall_s"] = time.perf_counter() - start
    result["machine"]["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") \
        else None
    report.write_json(result, out / "results.json")
    written = report.plots(result, out)
    print(report.table(result))
    if "strategy" in result["groups"]:
        print("strategy region, the cost model's table:\n"
              + result["groups"]["strategy"]["cost_table"])
    if "skipped" in result["torch"]:
        print(result["torch"]["skipped"])
    for name, error in result["torch"].get("errors", {}).items():
        print(f"{name}: not run: {error}")
    print(f"wrote {out / 'results.json'}" + "".join(f", {p}" for p in written)
          + f" in {result['wall_s']:.0f} s")
    failed = [t for t in result["targets"] if not t["passed"]]
    return 1 if args.check and failed else 0


def _progress_total(settings: Settings, plan: dict) -> int:
    only = plan["only"]
    rows = ((4 if plan["overlap"] else 0) + 3) * ("mlp" in only) \
        + 2 * ("block" in only) + 3 * ("eager" in only) + 4 * ("strategy" in only)
    depth = len(settings.depths) * settings.depth_rounds * 2 * ("depth" in only)
    return rows * settings.rounds + depth + ("torch" in only)


if __name__ == "__main__":
    raise SystemExit(main())
