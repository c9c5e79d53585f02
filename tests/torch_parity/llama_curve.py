"""Train the torchtitan debug llama in PyTorch DTensor and in jlocalmap on the
same token batches from the same weights, mesh (dp=2, tp=2) on 4 CPU ranks /
devices, and compare the per-step losses (and with the unsharded JAX run).

Writes ``loss_curve.json`` (every step's losses and relative differences, the
run times) and ``loss_curve.png`` (both curves and the relative difference)
under ``--out``; exits with status 1 if a step's losses differ by more than
``--tol`` relative. See docs/parity.md, "A loss curve".

Run:  python tests/torch_parity/llama_curve.py --steps 30 --out docs/results/parity/

    >>> [round(x, 2) for x in relative_differences([2.0, 4.4], [2.0, 4.0])]
    [0.0, 0.1]
"""

from __future__ import annotations

import os

if __name__ == "__main__":   # before JAX loads; spawned torch ranks skip this module's JAX side
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import dataclasses
import json
import sys
import time

from llama_common import AdamWConfig, LlamaConfig, block_arrays, differences

TOL = 1e-4


def relative_differences(a: list[float], ref: list[float]) -> list[float]:
    """|a - ref| / |ref|, step by step."""
    return [abs(x - r) / abs(r) for x, r in zip(a, ref, strict=True)]


def block_record(cfg: LlamaConfig, seed: int, torch_block: dict) -> dict:
    """Per array, the block's max relative differences for three pairs of runs."""
    import llama_jax
    runs = {"torch": torch_block, "unsharded": llama_jax.block_result(cfg, seed),
            "jlocalmap": llama_jax.block_result(cfg, seed, llama_jax.make_mesh())}
    return {f"{a} vs {b}": differences(block_arrays(runs[a]), block_arrays(runs[b]))
            for a, b in (("torch", "unsharded"), ("jlocalmap", "unsharded"),
                         ("jlocalmap", "torch"))}


def compare(cfg: LlamaConfig, opt: AdamWConfig, steps: int, seed: int) -> dict:
    """Both frameworks' losses and their relative differences, step by step, and
    the unsharded JAX run's; the first step's gradients and a block's. PyTorch
    runs on 4 gloo ranks, jlocalmap on 4 of the simulated devices, both mesh
    (dp=2, tp=2)."""
    import llama_jax      # here, not at the top: the spawned torch ranks import this module
    import llama_torch
    start = time.perf_counter()
    torch_runs = llama_torch.run_parity(cfg, opt, steps, seed)
    torch_block, torch_run = torch_runs["block"], torch_runs["train"]
    torch_run["wall_seconds"] = time.perf_counter() - start
    jax_run = llama_jax.train(cfg, opt, steps, seed, llama_jax.make_mesh())
    reference = llama_jax.train(cfg, opt, steps, seed)
    grads = [run.pop("first_grads") for run in (torch_run, jax_run, reference)]
    return {"config": dataclasses.asdict(cfg), "adamw": dataclasses.asdict(opt), "seed": seed,
            "torch": torch_run, "jlocalmap": jax_run, "jax_unsharded": reference,
            "rel_diff_torch": relative_differences(jax_run["losses"], torch_run["losses"]),
            "rel_diff_unsharded": relative_differences(jax_run["losses"], reference["losses"]),
            "first_step_grads": {"jlocalmap vs torch": differences(grads[1], grads[0]),
                                 "jlocalmap vs unsharded": differences(grads[1], grads[2])},
            "block": block_record(cfg, seed, torch_block),
            "torch_embedding_gradient_through_local_map_norm": torch_runs["async_input"]}


def plot(record: dict, path: str) -> None:
    """Both loss curves over the steps, and their relative difference below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = range(1, len(record["torch"]["losses"]) + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    top.plot(steps, record["torch"]["losses"], "o-", label="PyTorch DTensor (4 gloo ranks)")
    top.plot(steps, record["jlocalmap"]["losses"], "x--", label="jlocalmap (4 CPU devices)")
    top.set_ylabel("loss")
    top.set_title("llama debug model, mesh (dp=2, tp=2), AdamW")
    top.legend()
    floor = 1e-9   # an exact match would vanish from the log plot
    bottom.semilogy(steps, [max(d, floor) for d in record["rel_diff_torch"]], "o-",
                    label="jlocalmap vs PyTorch")
    bottom.semilogy(steps, [max(d, floor) for d in record["rel_diff_unsharded"]], "x--",
                    label="jlocalmap vs unsharded JAX")
    bottom.axhline(TOL, color="red", linestyle=":", label=f"tolerance {TOL:g}")
    bottom.set_xlabel("step")
    bottom.set_ylabel("relative difference\n(0 drawn at 1e-9)")
    bottom.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(record: dict) -> str:
    """The per-step table and the run times, as printed."""
    lines = ["step  PyTorch loss  jlocalmap loss  rel diff (PyTorch)  rel diff (unsharded)"]
    for i, (t, j, d, u) in enumerate(zip(record["torch"]["losses"], record["jlocalmap"]["losses"],
                                         record["rel_diff_torch"], record["rel_diff_unsharded"], strict=True)):
        lines.append(f"{i + 1:4d}  {t:12.6f}  {j:14.6f}  {d:18.2e}  {u:20.2e}")
    for what, key in (("first step's gradients", "first_step_grads"), ("block", "block")):
        for pair, diffs in record[key].items():
            name = max(diffs, key=diffs.get)
            lines.append(f"{what}, {pair}: max relative difference {diffs[name]:.2e} "
                         f"({name}, of {len(diffs)} arrays)")
    lines.append(f"PyTorch: {record['torch']['seconds']:.1f} s of steps, "
                 f"{record['torch']['wall_seconds']:.1f} s with the processes' start and "
                 f"the block; "
                 f"jlocalmap: {record['jlocalmap']['seconds']:.1f} s of steps, "
                 f"{record['jlocalmap']['compile_seconds']:.1f} s to compile")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run from command-line flags; return the exit status (1: above --tol)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="docs/results/parity/", help="folder for the JSON and PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=LlamaConfig.batch,
                        help="global batch (a multiple of dp=2)")
    parser.add_argument("--tol", type=float, default=TOL)
    args = parser.parse_args(argv)
    if args.batch % 2:
        parser.error(f"--batch {args.batch} must be a multiple of dp=2")
    record = compare(LlamaConfig(batch=args.batch), AdamWConfig(), args.steps, args.seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "loss_curve.json"), "w") as f:
        json.dump(record, f, indent=1)
    plot(record, os.path.join(args.out, "loss_curve.png"))
    print(report(record))
    worst = max(record["rel_diff_torch"])
    print(f"max relative |jlocalmap - PyTorch| loss difference = {worst:.2e}")
    if worst > args.tol:
        print(f"FAILED: above the tolerance {args.tol:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
