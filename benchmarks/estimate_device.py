"""The GPU measurements that jlm.estimate is held against (issue 27, validation 2),
in one device call: ``python benchmarks/estimate_device.py --out DIR``.

Each part runs in its own process, so that ``memory_stats()["peak_bytes_in_use"]``
is that program's peak and nothing else's:

* ``calibration``: the device-to-device copy bandwidth, and the bf16 matmuls of
  the llama step (every projection's forward, input-gradient and
  weight-gradient product, and the LM head's) and of the MLP workload, each
  timed alone: TFLOP/s per shape, and the step-weighted aggregate, the matmul
  efficiency every estimate uses (one calibration, no fitting per row);
* ``mlp``: the project's MLP workload step (benchmarks/workloads.py, T=8192,
  d=4096, ffn=14336, bf16) on a one-device mesh, jlocalmap's and hand-written;
* ``llama``: a Llama 3 8B-shaped training step (examples/llama_programs.py)
  with as many layers as fill most of the GPU, on a one-device mesh, params and
  optimizer state donated; ``llama-kept``: the same step without donation.

Each writes ``DIR/<part>.json``: medians of timed steps after warm-up, the peak
bytes, ``compiled.memory_analysis()`` and XLA's FLOP count. ``--small`` runs
tiny sizes (a CPU check of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

PARTS = ("calibration", "mlp", "llama", "llama-kept")
# The llama of the device call: Llama 3 8B's layer and vocabulary, fewer layers:
# tried with these many layers, then fewer while the GPU's memory is exceeded
# (on a GPU of under 100 GB, an H100, the shorter lists).
LAYERS = {"llama": (12, 10, 8), "llama-kept": (10, 8, 6)}
LAYERS_80GB = {"llama": (6, 4), "llama-kept": (4, 2)}
LLAMA = {"model": "llama3-8b", "n_layers": 12, "batch": 4, "seq": 4096,
         "remat": "selective", "attention": "blocked", "attention_block": 1024}
SMALL = {"model": "tiny", "n_layers": 2, "batch": 2, "seq": 16,
         "remat": "selective", "attention": "blocked", "attention_block": 8}


def median_time(call, iters: int, warmup: int = 2) -> tuple[float, list[float]]:
    """Median seconds of ``call()`` (its result blocked on) after ``warmup`` calls."""
    import jax
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], times


def memory_analysis(compiled) -> dict:
    """``compiled.memory_analysis()``'s sizes, as a dict (None where absent)."""
    stats = compiled.memory_analysis()
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
             "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {n: getattr(stats, n, None) for n in names} if stats is not None else {}


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) if cost else None


def peak_bytes() -> int | None:
    import jax
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


def llama_config(small: bool, layers: int | None = None):
    import dataclasses

    from examples import llama_programs as lp
    spec = dict(SMALL if small else LLAMA)
    spec["n_layers"] = layers or spec["n_layers"]
    cfg = dataclasses.replace(lp.PRESETS[spec["model"]], n_layers=spec["n_layers"])
    plan = lp.Plan(remat=spec["remat"], attention=spec["attention"],
                   attention_block=spec["attention_block"])
    return spec, cfg, plan


def matmul_shapes(cfg, tokens: int) -> list[dict]:
    """The step's bf16 matmuls (m, k, n) and how often each runs per step: every
    projection forward (x @ w), input gradient (dy @ w.T) and weight gradient
    (x.T @ dy), per layer, and the LM head's once."""
    kv = cfg.n_kv_heads * cfg.head_dim
    projections = {"wq": (cfg.dim, cfg.dim), "wk": (cfg.dim, kv), "wv": (cfg.dim, kv),
                   "wo": (cfg.dim, cfg.dim), "w1": (cfg.dim, cfg.ffn_dim),
                   "w3": (cfg.dim, cfg.ffn_dim), "w2": (cfg.ffn_dim, cfg.dim),
                   "output": (cfg.dim, cfg.vocab)}
    shapes = []
    for name, (k, n) in projections.items():
        count = 1 if name == "output" else cfg.n_layers
        shapes += [{"name": f"{name}/fwd", "m": tokens, "k": k, "n": n, "count": count},
                   {"name": f"{name}/dx", "m": tokens, "k": n, "n": k, "count": count},
                   {"name": f"{name}/dw", "m": k, "k": tokens, "n": n, "count": count}]
    return shapes


def time_matmul(m: int, k: int, n: int, iters: int) -> float:
    import jax
    import jax.numpy as jnp
    keys = jax.random.split(jax.random.key(m + k + n), 2)
    a = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    b = jax.random.normal(keys[1], (k, n), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    return median_time(lambda: matmul(a, b), iters)[0]


def part_calibration(small: bool) -> dict:
    import jax
    import jax.numpy as jnp
    spec, cfg, _ = llama_config(small)
    iters = 3 if small else 10
    copy_n = 2 ** 14 if small else 2 ** 30           # bf16 elements: 2 GiB
    x = jax.random.normal(jax.random.key(0), (copy_n,), jnp.bfloat16)
    copy = jax.jit(lambda x: x * 2)
    copy_s = median_time(lambda: copy(x), iters)[0]
    rows = matmul_shapes(cfg, spec["batch"] * spec["seq"])
    mlp = (64, 32, 128) if small else (8192, 4096, 14336)
    rows += [{"name": f"mlp/{n}", "m": m, "k": k, "n": nn, "count": 1} for n, (m, k, nn) in
             (("fwd1", (mlp[0], mlp[1], mlp[2])), ("fwd2", (mlp[0], mlp[2], mlp[1])),
              ("dh", (mlp[0], mlp[1], mlp[2])), ("dw2", (mlp[2], mlp[0], mlp[1])),
              ("dw1", (mlp[1], mlp[0], mlp[2])))]
    for row in rows:
        row["seconds"] = time_matmul(row["m"], row["k"], row["n"], iters)
        row["tflops"] = 2 * row["m"] * row["k"] * row["n"] / row["seconds"] / 1e12
        print(f"  {row['name']:<12} {row['m']:>7} x {row['k']:>7} x {row['n']:>7}  "
              f"{row['tflops']:8.1f} TFLOP/s", flush=True)
    return {"copy_bytes": 4 * copy_n, "copy_seconds": copy_s,
            "copy_bandwidth": 4 * copy_n / copy_s, "matmuls": rows,
            "llama_matmul_tflops": aggregate([r for r in rows if not r["name"].startswith("mlp/")]),
            "mlp_matmul_tflops": aggregate([r for r in rows if r["name"].startswith("mlp/")])}


def aggregate(rows: list[dict]) -> float:
    """TFLOP/s of the rows' matmuls run ``count`` times each, back to back."""
    flops = sum(2 * r["m"] * r["k"] * r["n"] * r["count"] for r in rows)
    return flops / sum(r["seconds"] * r["count"] for r in rows) / 1e12


def part_mlp(small: bool) -> dict:
    import jax

    from benchmarks import workloads as wl
    size = wl.MlpSize(64, 32, 128, "bfloat16") if small else wl.MlpSize(8192, 4096, 14336,
                                                                        "bfloat16")
    work = wl.mlp_workload(jax.devices()[:1], 1, size, overlap=False)
    w1, w2, x, dy = work.inputs["mlp"]
    mesh = wl.make_mesh(jax.devices()[:1], (1,), ("tp",))
    step = wl.grad_step(lambda w1, w2, x: wl.with_local_map(
        wl.mlp_body, mesh, *wl.MLP_PLACEMENTS["mlp"])(x, w1, w2))
    with jax.set_mesh(mesh):
        compiled = step.lower(w1, w2, x, dy).compile()
    result = {"size": vars(size), "flops_per_step": work.info["flops_per_device"],
              "memory_analysis": memory_analysis(compiled), "xla_flops": xla_flops(compiled)}
    for row in work.rows:
        result[row.name] = median_time(row.call, 3 if small else 20)[0]
    result["peak_bytes_in_use"] = peak_bytes()
    return result


def part_llama(small: bool, donate: bool, layers: int | None) -> dict:
    import jax

    from examples import llama_programs as lp
    spec, cfg, plan = llama_config(small, layers)
    mesh = lp.make_mesh({}, jax.devices()[:1])
    step, args, flops, tokens = lp.build(cfg, mesh, batch=spec["batch"], seq=spec["seq"],
                                         plan=plan)
    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        compile_s = time.perf_counter() - start
        params = lp.init_params(args[0], seed=0)
        state = jax.jit(lp.make_step(lp.reference_ops(cfg, plan), cfg, plan)[1].init)(params)
        batch = lp.random_tokens(args[2], cfg.vocab, seed=0)
        carry = [params, state]

        def call():
            new_params, new_state, loss = compiled(*carry, *batch)
            if donate:
                carry[:] = [new_params, new_state]
            return loss
        median, times = median_time(call, 3 if small else 6)
        loss = float(call())
    return {"spec": spec, "config": vars(cfg), "plan": vars(plan), "donate": donate,
            "n_params": cfg.n_params, "model_flops": flops, "tokens_per_step": tokens,
            "step_seconds": median, "step_times": times, "loss": loss,
            "compile_seconds": compile_s, "xla_flops": xla_flops(compiled),
            "memory_analysis": memory_analysis(compiled), "peak_bytes_in_use": peak_bytes()}


def run_part(part: str, small: bool, layers: int | None) -> dict:
    if part == "calibration":
        return part_calibration(small)
    if part == "mlp":
        return part_mlp(small)
    return part_llama(small, donate=part == "llama", layers=layers)


def machine() -> dict:
    import jax
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {"jax": jax.__version__, "device_kind": device.device_kind,
            "platform": device.platform, "bytes_limit": stats.get("bytes_limit")}


def layer_counts(part: str) -> tuple:
    """The llama's layer counts to try on this GPU (``(None,)`` for other parts)."""
    if part not in LAYERS:
        return (None,)
    query = "import jax; print((jax.devices()[0].memory_stats() or {}).get('bytes_limit', 0))"
    found = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True,
                           check=True).stdout.split()
    limit = float(found[-1]) if found else 0.0
    return (LAYERS if limit > 100e9 else LAYERS_80GB)[part]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--small", action="store_true", help="tiny sizes (a CPU check)")
    parser.add_argument("--part", choices=PARTS, help="run one part here (else each in a "
                        "process of its own)")
    parser.add_argument("--layers", type=int, help="the llama's layers (default: LAYERS)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"the parts to run, in turn (default: {','.join(PARTS)})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:
        start = time.perf_counter()
        result = {"part": args.part, "machine": machine(),
                  **run_part(args.part, args.small, args.layers)}
        result["wall_seconds"] = time.perf_counter() - start
        (args.out / f"{args.part}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "matmuls"}, indent=1)[:3000])
        return 0
    failed = 0
    for part in args.parts.split(","):
        command = [sys.executable, __file__, "--out", str(args.out), "--part", part]
        command += ["--small"] if args.small else []
        for layers in (None,) if args.small else layer_counts(part):
            print(f"=== {part}" + (f" with {layers} layers" if layers else ""), flush=True)
            code = subprocess.call(command + ([f"--layers={layers}"] if layers else []),
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if code == 0:
                break
        failed += code != 0
    return failed


if __name__ == "__main__":
    sys.exit(main())
