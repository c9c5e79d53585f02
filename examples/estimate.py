"""Estimate a Llama training step on a cluster you don't have: memory, FLOPs,
collectives per mesh axis and step time per device, from the traced program
(``jlm.estimate``; nothing runs or compiles for the target).

The step is examples/llama_programs.py's: forward, backward and AdamW on a
``(dp, fsdp, cp, tp)`` mesh, with local_map regions where torchtitan and MaxText
put per-device code. Example: does Llama 3 70B fit on 64 H100s as FSDP8 x TP8?

    python examples/estimate.py --model 70b --mesh fsdp=8,tp=8 --batch 8 --seq 8192

Flags name the model (8b, 70b, 405b: Llama 3; llama2-7b, llama2-70b), the mesh
(axes among dp, fsdp, cp, tp; tp last varies fastest, inside a node), the
hardware preset, the global batch and sequence, activation checkpointing,
attention and precision. ``--matmul-efficiency`` overrides the calibrated
fraction of peak a matmul reaches; ``--json`` writes every figure to a file.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

import jlocalmap as jlm

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import llama_programs as lp

MODELS = {"8b": "llama3-8b", "70b": "llama3-70b", "405b": "llama3-405b",
          **{name: name for name in lp.PRESETS}}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="8b")
    parser.add_argument("--mesh", type=lp.parse_mesh, default={"fsdp": 8},
                        help="axis=size,... over dp, fsdp, cp, tp (default fsdp=8)")
    parser.add_argument("--hardware", choices=("h100-sxm", "h200", "cpu"), default="h100-sxm")
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--remat", choices=tuple(lp.REMAT_POLICIES), default="selective")
    parser.add_argument("--attention", choices=("dense", "blocked"), default="blocked")
    parser.add_argument("--attention-block", type=int, default=1024)
    parser.add_argument("--precision", choices=("bf16", "fp8"), default="bf16")
    parser.add_argument("--matmul-efficiency", type=float,
                        help="fraction of peak a matmul reaches (default: the preset's)")
    parser.add_argument("--no-donate", action="store_true",
                        help="keep the old parameters and optimizer state (not donated)")
    parser.add_argument("--json", type=pathlib.Path, help="write est.to_dict() here")
    return parser


def hardware_of(args: argparse.Namespace) -> jlm.Hardware:
    hardware = jlm.Hardware.preset(args.hardware)
    if args.matmul_efficiency is not None:
        hardware = hardware.replace(matmul_efficiency=args.matmul_efficiency)
    return hardware


def run(args: argparse.Namespace) -> jlm.Estimate:
    """Build the step on an abstract mesh and estimate it."""
    cfg = lp.PRESETS[MODELS[args.model]]
    plan = lp.Plan(remat=args.remat, attention=args.attention,
                   attention_block=args.attention_block, precision=args.precision)
    mesh = lp.make_abstract_mesh(args.mesh)
    step, step_args, flops, tokens = lp.build(cfg, mesh, batch=args.batch, seq=args.seq,
                                              plan=plan)
    jitted = jax.jit(step, donate_argnums=() if args.no_donate else (0, 1))
    return jlm.estimate(jitted, *step_args, hardware=hardware_of(args), model_flops=flops,
                        tokens_per_step=tokens)


def main(argv=None) -> jlm.Estimate:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        est = run(args)
    except ValueError as error:   # sizes the mesh does not divide
        parser.error(str(error))
    n = jax.tree.reduce(lambda a, b: a * b, list(lp.mesh_sizes(args.mesh)))
    print(f"{MODELS[args.model]} ({lp.PRESETS[MODELS[args.model]].n_params / 1e9:.2f}B "
          f"parameters), global batch {args.batch} x {args.seq} tokens, {n} devices; "
          f"remat {args.remat}, attention {args.attention}, {args.precision}")
    print(est)
    print(f"estimated in {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(est.to_dict(), indent=1, default=str))
    return est


if __name__ == "__main__":
    main()
