"""benchmarks/dtype_accuracy.py: fp16 / bf16 against fp32 on real triplets (README, Dtypes)."""
import importlib.util
import json
import math
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "benchmarks", "dtype_accuracy.py")
DAVIS = os.path.join(HERE, "data", "triplets", "davis")


def _script():
    spec = importlib.util.spec_from_file_location("dtype_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_on_cpu(tmp_path, capsys, small_safetensors):
    script = _script()
    out = tmp_path / "acc.json"
    assert script.main([DAVIS, "--model", small_safetensors, "--device", "cpu",
                        "--dtypes", "bf16", "--max-examples", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bf16" in printed and "davis" in printed
    report = json.loads(out.read_text())
    assert report["triplets"] == 1 and report["plain_torch_is_the_backend"] is True
    s = report["dtypes"]["bf16"]
    # bf16 keeps 8 mantissa bits: visibly different from fp32, yet close.
    assert 0 < s["max_abs_error"] < 0.5 and 20 < s["psnr_vs_fp32"] < 120
    assert s["error_ratio"] == 1.0  # on a CPU the auto backend is plain PyTorch
    assert math.isfinite(s["gain_db"]["davis"]) and math.isfinite(report["fp32_gain_db"]["davis"])
    assert [item["name"] for item in s["items"]] == ["dive-in"]


def test_plain_torch_run_when_the_backend_is_not_torch(monkeypatch, small_safetensors):
    script = _script()
    real = script.ops.resolve
    # Pretend a kernel backend was picked: the plain-PyTorch models are then loaded and run
    # separately (here they compute the same thing, so the ratio is exactly 1).
    monkeypatch.setattr(script.ops, "resolve", lambda op, backend, device: ("triton",) +
                        tuple(real(op, backend, device)[1:]))
    import torch
    report = script.measure(small_safetensors, [DAVIS], torch.device("cpu"), ["fp16"],
                            max_examples=1)
    s = report["dtypes"]["fp16"]
    assert report["plain_torch_is_the_backend"] is False
    assert s["torch_max_abs_error"] == s["max_abs_error"] > 0 and s["error_ratio"] == 1.0


def test_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="unsupported dtype"):
        _script().main(["--dtypes", "fp8"])
