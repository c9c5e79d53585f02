"""Regenerate the validation tables of docs/estimates.md: ``jlm.estimate`` against
one H200 (validation 2) and against published training rows (validation 3), and
the worked question (Llama 3 70B on 64 H100s as FSDP8 x TP8).

    python benchmarks/estimate_validation.py [--results docs/results/estimates]

Reads the device call's JSON (benchmarks/estimate_device.py) from ``--results``
where there is some: the matmul efficiency calibrated there (the llama step's
matmul mix over the datasheet bf16 peak) is the one calibration every row uses,
H100 rows too (without a device call: the H200 preset's measured figure);
nothing is fitted per row. Prints markdown tables and writes them, with
every estimate's figures, to ``--results``/validation.{txt,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jlocalmap as jlm

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import llama_programs as lp  # noqa: E402  (examples/ is put on the path first)

GIB = 2 ** 30
MAXTEXT = ("NVIDIA/dgxc-benchmarking maxtext/README_70b.md (MaxText 2024.12.09, BF16, "
           "save_qkv_proj, cudnn_flash_te, per-device batch 2)")
TORCHTITAN = ("pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Table 1 "
              "(H100 96 GB HBM2e at 500 W; seq_len 8192 from train_configs/llama3_8b.toml)")
NEMO = ("NVIDIA/NeMo docs/source/performance/performance_summary.md (NeMo 24.07, FP8, "
        "MBS 1, TP1 PP1 CP1: DP 8 with 16 microbatches, distributed optimizer)")


@dataclasses.dataclass(frozen=True)
class Published:
    """A published training row, and the program that stands for it."""
    name: str
    model: str
    mesh: dict
    batch: int
    seq: int
    plan: lp.Plan
    step_s: float                  # published step time (derived from tokens/s where given so)
    source: str
    memory_gib: float | None = None
    note: str = ""


def maxtext_row(gpus: int, step_s: float) -> Published:
    """MaxText's mesh: fsdp over 8 GPUs a node times up to 16 nodes, dp beyond."""
    fsdp = min(gpus, 128)
    mesh = {"dp": gpus // fsdp, "fsdp": fsdp} if gpus > fsdp else {"fsdp": fsdp}
    return Published(f"MaxText Llama2-70B, {gpus} H100", "llama2-70b", mesh, 2 * gpus, 4096,
                     lp.Plan(remat="qkv", attention="blocked"), step_s, MAXTEXT)


PUBLISHED = [
    *(maxtext_row(g, s) for g, s in ((64, 6.999), (128, 7.072), (256, 7.153), (512, 7.091),
                                     (1024, 7.084), (2048, 7.066))),
    Published("torchtitan Llama 3.1 8B, 8 H100, FSDP8, SAC", "llama3-8b", {"fsdp": 8}, 16, 8192,
              lp.Plan(remat="selective", attention="blocked"), 16 * 8192 / (8 * 5762),
              TORCHTITAN, memory_gib=82.4, note="5,762 tokens/s/GPU"),
    Published("NeMo Llama2-7B FP8, 8 H100, GBS 128", "llama2-7b", {"fsdp": 8}, 128, 4096,
              lp.Plan(remat="none", attention="blocked", precision="fp8", microbatches=16),
              128 * 4096 / (8 * 16847), NEMO,
              note="16,847 tokens/s/GPU; 16 microbatches of one sequence accumulated in a "
                   "scan; Megatron's distributed optimizer (optimizer state and float32 "
                   "weights split over the 8 data-parallel GPUs) as fsdp8, which also "
                   "gathers the bf16 weights per use and reduce-scatters per microbatch"),
]


def load(results: pathlib.Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))
            if p.stem in ("calibration", "mlp", "llama", "llama-kept")}


def calibrated(measured: dict) -> tuple[float, str]:
    """(matmul efficiency, its source): the llama step's matmul mix measured by
    the device call over the bf16 peak (the H100's and the H200's are the same
    chip's, 989 TFLOP/s dense), else the H200 preset's own measured figure."""
    preset = jlm.Hardware.preset("h200")
    if "calibration" not in measured:
        return preset.matmul_efficiency, preset.sources.get("matmul_efficiency", "the preset")
    tflops = measured["calibration"]["llama_matmul_tflops"]
    return (tflops * 1e12 / preset.peak_flops["bf16"],
            f"the device call: the llama step's bf16 matmuls at {tflops:.0f} TFLOP/s")


def estimate_llama(cfg: lp.LlamaConfig, mesh_sizes: dict, batch: int, seq: int, plan: lp.Plan,
                   hardware: jlm.Hardware, donate: bool = True) -> jlm.Estimate:
    mesh = lp.make_abstract_mesh(mesh_sizes)
    step, args, flops, tokens = lp.build(cfg, mesh, batch=batch, seq=seq, plan=plan)
    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    return jlm.estimate(jitted, *args, hardware=hardware, model_flops=flops,
                        tokens_per_step=tokens)


def estimate_mlp(size: dict, hardware: jlm.Hardware) -> jlm.Estimate:
    """The MLP workload's jlocalmap step (benchmarks/workloads.py) on one device."""
    from benchmarks import workloads as wl
    mesh = jax.sharding.AbstractMesh((1,), ("tp",), axis_types=(AxisType.Explicit,))
    t, d, f = size["tokens"], size["d_model"], size["d_ff"]

    def spec(shape, p, dtype="bfloat16"):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=NamedSharding(mesh, p))
    step = wl.grad_step(lambda w1, w2, x: wl.with_local_map(
        wl.mlp_body, mesh, *wl.MLP_PLACEMENTS["mlp"])(x, w1, w2))
    return jlm.estimate(step, spec((d, f), P(None, "tp")), spec((f, d), P("tp")),
                        spec((t, d), P()), spec((t, d), P(), "float32"), hardware=hardware)


def device_programs() -> list[tuple[str, str, dict]]:
    """(name, part, spec) of the programs benchmarks/estimate_device.py measures."""
    from benchmarks import estimate_device as dev
    programs = [("MLP workload step (jlocalmap), T=8192 d=4096 ffn=14336", "mlp",
                 {"tokens": 8192, "d_model": 4096, "d_ff": 14336})]
    for part, donate in (("llama", True), ("llama-kept", False)):
        spec = {**dev.LLAMA, "n_layers": dev.LAYERS[part][0], "donate": donate}
        programs.append((llama_name(spec), part, spec))
    return programs


def llama_name(spec: dict) -> str:
    """A device llama's row name, from the sizes it ran (or will run) at."""
    model = "Llama 3 8B" if spec["model"] == "llama3-8b" else spec["model"]
    return (f"{model} layer x {spec['n_layers']}, batch {spec['batch']} x {spec['seq']}, "
            f"{spec['remat']} remat, " + ("donated" if spec["donate"] else "not donated"))


def device_rows(measured: dict, hardware: jlm.Hardware) -> list[dict]:
    """Validation 2: each device program's prediction, against its measurement
    where the device call ran (a measured run's own sizes are used)."""
    rows = []
    for name, part, spec in device_programs():
        run = measured.get(part)
        if part == "mlp":
            size = (run or {}).get("size", spec)
            name = (f"MLP workload step (jlocalmap), T={size['tokens']} d={size['d_model']} "
                    f"ffn={size['d_ff']}")
            est = estimate_mlp(size, hardware)
        else:
            spec = {**run["spec"], "donate": run["donate"]} if run else spec
            name = llama_name(spec)
            cfg = dataclasses.replace(lp.PRESETS[spec["model"]], n_layers=spec["n_layers"])
            plan = lp.Plan(remat=spec["remat"], attention=spec["attention"],
                           attention_block=spec["attention_block"])
            est = estimate_llama(cfg, {}, spec["batch"], spec["seq"], plan, hardware,
                                 donate=spec["donate"])
        step_s = (run or {}).get("mlp/jlocalmap" if part == "mlp" else "step_seconds")
        rows.append(_compare(name, est, step_s, (run or {}).get("peak_bytes_in_use")))
    return rows


def _compare(name: str, est: jlm.Estimate, step_s: float | None, peak: int | None) -> dict:
    return {"name": name, "measured_step_s": step_s, "predicted_step_s": est.step_time_s,
            "time_ratio": est.step_time_s / step_s if step_s else None,
            "measured_peak_gib": peak / GIB if peak else None,
            "predicted_peak_gib": est.peak_bytes / GIB,
            "memory_ratio": est.peak_bytes / peak if peak else None, "estimate": est.to_dict()}


def flash_seconds(cfg: lp.LlamaConfig, mesh: dict, batch: int, seq: int, plan: lp.Plan,
                  hardware: jlm.Hardware) -> float:
    """A fused causal attention kernel's time per device (FlashAttention's count:
    forward 2 matmuls over half the scores, backward 2.5 times the forward, the
    forward again where checkpointing recomputes it), at the calibrated matmul
    rate, with no score traffic."""
    size = {a: mesh.get(a, 1) for a in lp.AXES}
    local = (batch // (size["dp"] * size["fsdp"]), cfg.n_heads // size["tp"], seq // size["cp"])
    forward = 2 * local[0] * local[1] * local[2] * seq * cfg.head_dim * cfg.n_layers
    passes = 3.5 + (1.0 if plan.remat in ("full", "qkv") else 0.0)
    rate = hardware.peak_flops["bf16"] * hardware.matmul_efficiency
    return passes * forward / rate


def fused_attention_step(cfg, mesh: dict, batch: int, seq: int, plan: lp.Plan,
                         hardware: jlm.Hardware) -> tuple[jlm.Estimate, float, float]:
    """The step with attention priced as a fused kernel: the program without
    attention (plan.attention "none"), plus ``flash_seconds`` of compute, behind
    which overlapped communication that compute did not hide can now hide."""
    est = estimate_llama(cfg, mesh, batch, seq, dataclasses.replace(plan, attention="none"),
                         hardware)
    flash = flash_seconds(cfg, mesh, batch, seq, plan, hardware)
    not_hidden = est.to_dict()["time_s"].get("comm overlapped, not hidden", 0.0)
    return est, est.step_time_s + flash - min(flash, not_hidden), flash


def published_rows(hardware: jlm.Hardware) -> list[dict]:
    """Validation 3: each published row's prediction, attention as written (XLA
    ops: the scores through HBM) and as a fused kernel."""
    rows = []
    for row in PUBLISHED:
        cfg = lp.PRESETS[row.model]
        est = estimate_llama(cfg, row.mesh, row.batch, row.seq, row.plan, hardware)
        fused, fused_s, flash = fused_attention_step(cfg, row.mesh, row.batch, row.seq,
                                                     row.plan, hardware)
        rows.append({"name": row.name, "mesh": row.mesh, "batch": row.batch, "seq": row.seq,
                     "plan": dataclasses.asdict(row.plan), "published_step_s": row.step_s,
                     "predicted_step_s": est.step_time_s,
                     "time_ratio": est.step_time_s / row.step_s,
                     "fused_attention_step_s": fused_s,
                     "fused_attention_ratio": fused_s / row.step_s, "attention_kernel_s": flash,
                     "fused_attention_estimate": fused.to_dict(),
                     "published_memory_gib": row.memory_gib,
                     "predicted_peak_gib": est.peak_bytes / GIB,
                     "fused_attention_peak_gib": fused.peak_bytes / GIB, "mfu": est.mfu,
                     "tokens_per_s_per_device": est.tokens_per_s_per_device,
                     "source": row.source, "note": row.note, "estimate": est.to_dict()})
    return rows


def worked_question(hardware: jlm.Hardware) -> list[dict]:
    """Llama 3 70B on 64 H100s as FSDP8 x TP8, sequence 8192: by checkpointing and batch."""
    rows = []
    for remat, batch in (("selective", 8), ("full", 8), ("full", 16), ("none", 8)):
        cfg, mesh, plan = lp.PRESETS["llama3-70b"], {"fsdp": 8, "tp": 8}, lp.Plan(remat=remat)
        est = estimate_llama(cfg, mesh, batch, 8192, plan, hardware)
        fused, fused_s, _ = fused_attention_step(cfg, mesh, batch, 8192, plan, hardware)
        tokens, devices = batch * 8192, 64
        rows.append({"remat": remat, "batch": batch, "peak_gib": est.peak_bytes / GIB,
                     "fits": est.fits, "fused_attention_peak_gib": fused.peak_bytes / GIB,
                     "fused_attention_fits": fused.fits, "step_s": est.step_time_s,
                     "fused_attention_step_s": fused_s,
                     "fused_tokens_per_s_per_device": tokens / fused_s / devices,
                     "fused_mfu": lp.model_flops(cfg, batch, 8192)
                     / (devices * hardware.peak_flops["bf16"] * fused_s),
                     "tokens_per_s_per_device": est.tokens_per_s_per_device, "mfu": est.mfu,
                     "estimate": est.to_dict()})
    return rows


def _figure(value: float | None, form: str) -> str:
    return "not measured" if value is None else form.format(value)


def markdown(device: list, published: list, worked: list, efficiency: float,
             source: str) -> str:
    lines = [(f"Matmul efficiency (one calibration, every row): {efficiency:.3f} of the "
             f"datasheet bf16 peak ({source})."), "", "Validation 2 (one GPU):", "",
             "| program | measured step | predicted | ratio | measured peak | predicted | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in device:
        measured = _figure(r["measured_step_s"] and r["measured_step_s"] * 1e3, "{:.1f} ms")
        lines.append(f"| {r['name']} | {measured} | {r['predicted_step_s'] * 1e3:.1f} ms | "
                     f"{_figure(r['time_ratio'], '{:.3f}')} | "
                     f"{_figure(r['measured_peak_gib'], '{:.2f} GiB')} | "
                     f"{r['predicted_peak_gib']:.2f} GiB | "
                     f"{_figure(r['memory_ratio'], '{:.3f}')} |")
    lines += ["", "Validation 3 (published, H100 preset):", "",
              ("| row | mesh | published step | predicted, XLA attention | ratio | "
               "predicted, fused attention | ratio | of which compute / memory-bound / "
               "exposed comm | published memory | predicted peak, XLA attention | "
               "predicted peak, fused attention |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in published:
        mesh = " x ".join(f"{a}{n}" for a, n in r["mesh"].items())
        memory = f"{r['published_memory_gib']:.1f} GiB" if r["published_memory_gib"] else "-"
        lines.append(f"| {r['name']} | {mesh} | {r['published_step_s']:.3f} s | "
                     f"{r['predicted_step_s']:.3f} s | {r['time_ratio']:.3f} | "
                     f"{r['fused_attention_step_s']:.3f} s | "
                     f"{r['fused_attention_ratio']:.3f} | {breakdown(r)} | {memory} | "
                     f"{r['predicted_peak_gib']:.1f} GiB | {r['fused_attention_peak_gib']:.1f} GiB |")
    lines += ["", "Worked question: Llama 3 70B, 64 H100 as fsdp8 x tp8, sequence 8192:", "",
              ("| remat | global batch | peak per GPU, XLA / fused attention | fits 80 GiB | "
               "step, XLA attention | tokens/s/GPU | MFU | step, fused attention | "
               "tokens/s/GPU | MFU |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in worked:
        fits = "/".join("yes" if f else "no" for f in (r["fits"], r["fused_attention_fits"]))
        lines.append(f"| {r['remat']} | {r['batch']} | {r['peak_gib']:.1f} / "
                     f"{r['fused_attention_peak_gib']:.1f} GiB | {fits} | {r['step_s']:.2f} s | "
                     f"{r['tokens_per_s_per_device']:.0f} | {(r['mfu'] or 0) * 100:.1f}% | "
                     f"{r['fused_attention_step_s']:.2f} s | "
                     f"{r['fused_tokens_per_s_per_device']:.0f} | {r['fused_mfu'] * 100:.1f}% |")
    return "\n".join(lines) + "\n"


def breakdown(row: dict) -> str:
    """Compute (the fused attention's added), memory-bound and exposed
    communication seconds (waited for, or more than compute hides) of a
    published row's fused-attention prediction."""
    time_s = row["fused_attention_estimate"]["time_s"]
    compute = time_s["compute"] + row["attention_kernel_s"]
    exposed = max(0.0, row["fused_attention_step_s"] - compute - time_s["memory"])
    return f"{compute:.2f} / {time_s['memory']:.2f} / {exposed:.2f} s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path,
                        default=ROOT / "docs" / "results" / "estimates")
    args = parser.parse_args(argv)
    measured = load(args.results)
    efficiency, source = calibrated(measured)
    h100 = jlm.Hardware.preset("h100-sxm").replace(matmul_efficiency=efficiency)
    kind = measured.get("calibration", {}).get("machine", {}).get("device_kind", "H200")
    measured_on = h100 if "H100" in kind else jlm.Hardware.preset("h200").replace(
        matmul_efficiency=efficiency)
    device = device_rows(measured, measured_on)
    published, worked = published_rows(h100), worked_question(h100)
    text = markdown(device, published, worked, efficiency, source)
    print(text)
    (args.results / "validation.txt").write_text(text)
    (args.results / "validation.json").write_text(json.dumps(
        {"matmul_efficiency": efficiency, "calibration_source": source, "device": device,
         "published": published,
         "worked_question": worked}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
