"""benchmarks/estimate_validation.py reads a folder of the device call's JSON
(benchmarks/estimate_device.py's files) and compares each measured program
with its estimate at the sizes it ran: the calibration it reads is the one
every row uses."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import estimate_validation as ev  # noqa: E402

TINY = {"model": "tiny", "n_layers": 2, "batch": 2, "seq": 16, "remat": "selective",
        "attention": "blocked", "attention_block": 8}


def test_device_results_are_read_and_compared_at_their_own_sizes(tmp_path):
    machine = {"device_kind": "NVIDIA H200", "jax": "0.10.2"}
    files = {"calibration": {"machine": machine, "llama_matmul_tflops": 700.0},
             "mlp": {"machine": machine, "size": {"tokens": 64, "d_model": 32, "d_ff": 128},
                     "mlp/jlocalmap": 2e-4, "peak_bytes_in_use": 2 ** 20},
             "llama": {"machine": machine, "spec": TINY, "donate": True,
                       "step_seconds": 2e-3, "peak_bytes_in_use": 2 ** 20}}
    for part, result in files.items():
        (tmp_path / f"{part}.json").write_text(json.dumps(result))
    measured = ev.load(tmp_path)
    efficiency, source = ev.calibrated(measured)
    assert efficiency == 700e12 / 989e12 and "700 TFLOP/s" in source
    hardware = ev.jlm.Hardware.preset("h200").replace(matmul_efficiency=efficiency)
    mlp, llama, kept = ev.device_rows(measured, hardware)
    assert mlp["name"].endswith("T=64 d=32 ffn=128") and mlp["measured_step_s"] == 2e-4
    assert llama["name"].startswith("tiny layer x 2") and llama["measured_step_s"] == 2e-3
    assert llama["time_ratio"] == llama["predicted_step_s"] / 2e-3
    assert llama["memory_ratio"] == llama["predicted_peak_gib"] * 2 ** 30 / 2 ** 20
    assert kept["measured_step_s"] is None and "not donated" in kept["name"]
