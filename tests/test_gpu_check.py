"""``tools/gpu_check.sh`` on a machine without CUDA: it runs what it can (``pytest -m gpu``, which
skips), skips the GPU stages with the reason, writes its summary and passes; and the comparison it
uses for the bit-exact resume."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resume_comparison_is_exact_and_ignores_timings():
    check = _gpu_check_module()
    row = {"step": 31, "loss": 0.5, "grad_norm": 1.25, "lr": 1e-4, "route_frac": [[0.5, 0.5]]}
    timed = {**row, "step_time_s": 0.1, "img_per_s": 320.0, "peak_mem_mb": 900.0}
    kept = {k: v for k, v in timed.items() if check.EXACT_METRIC.match(k)}
    assert kept == row
    assert check._compare({31: row}, {31: dict(row)}, range(31, 32))["identical"]
    off = check._compare({31: row}, {31: {**row, "loss": 0.5 + 2**-40}}, range(31, 32))
    assert not off["identical"] and off["differing"][0]["keys"] == ["loss"]
    missing = check._compare({31: row}, {}, range(31, 32))
    assert not missing["identical"] and missing["missing_in_b"] == [31]
    assert not check._compare({}, {}, range(31, 32))["identical"]  # nothing compared is no pass


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs for minutes: run it by hand")
def test_gpu_check_without_cuda_skips_gpu_stages_with_reasons_and_passes(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"))
    proc = subprocess.run(
        ["bash", str(REPO / "tools" / "gpu_check.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    stages = summary["stages"]
    assert summary["ok"] and summary["mode"] == "cpu" and not summary["failed"]
    assert stages["env"]["status"] == "pass"
    assert stages["pytest_gpu"]["status"] == "skip" and "CUDA" in stages["pytest_gpu"]["reason"]
    assert stages["pytest_gpu"]["counts"].get("skipped", 0) >= 5
    for name in ("data", "train", "resume", "syncs", "sample", "bench_moe", "bench"):
        assert stages[name]["status"] == "skip" and "CUDA" in stages[name]["reason"], name
    assert "skip train" in proc.stdout and "PASSED" in proc.stdout
