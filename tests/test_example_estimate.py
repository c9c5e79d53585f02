"""examples/estimate.py: a preset's estimate from flags, quickly; the printed
figures are the estimate's; wrong flags are refused by name."""

import importlib.util
import json
import pathlib
import sys
import time

import pytest

_EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


lp = _load("llama_programs")
example = _load("estimate")


def test_tiny_preset_estimate_prints_and_writes_its_figures(capsys, tmp_path):
    out = tmp_path / "est.json"
    est = example.main(["--model", "tiny", "--mesh", "fsdp=2,tp=2", "--batch", "4",
                        "--seq", "16", "--hardware", "h200", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "llama3" not in printed and "tiny" in printed and "4 devices" in printed
    assert str(est).splitlines()[0] in printed
    figures = json.loads(out.read_text())
    assert figures == json.loads(json.dumps(est.to_dict(), default=str))
    assert est.step_time_s > 0 and est.peak_bytes > 0


def test_the_405b_preset_on_16384_devices_estimates_within_a_minute(capsys):
    start = time.perf_counter()
    est = example.main(["--model", "405b", "--mesh", "dp=32,fsdp=64,tp=8", "--batch", "2048",
                        "--seq", "8192", "--remat", "full"])
    assert time.perf_counter() - start < 60
    flops = lp.model_flops(lp.PRESETS["llama3-405b"], 2048, 8192)
    assert est.tokens_per_s_per_device == pytest.approx(2048 * 8192 / est.step_time_s / 16384)
    assert 0 < est.mfu < 1 and flops > 6 * 405e9 * 2048 * 8192
    assert "405" in capsys.readouterr().out


def test_a_matmul_efficiency_override_changes_the_compute_time():
    flags = ["--model", "8b", "--mesh", "", "--batch", "1", "--seq", "1024"]  # one device
    slow = example.main([*flags, "--matmul-efficiency", "0.2"])
    fast = example.main([*flags, "--matmul-efficiency", "0.8"])
    assert slow.step_time_s > 1.5 * fast.step_time_s


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "pp=4"], "axes among"),
    (["--mesh", "tp=8", "--model", "tiny"], "n_kv_heads 2 must be a multiple of tp = 8"),
])
def test_wrong_flags_are_refused_by_name(flags, message, capsys):
    with pytest.raises(SystemExit):
        example.main(flags)
    assert message in capsys.readouterr().err
