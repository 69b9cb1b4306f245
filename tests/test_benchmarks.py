"""benchmarks/gpu.py: the GPU benchmark's refusal without CUDA, and its --smoke run of the same code on the CPU.

The smoke run builds the five inference candidates (dense, DynamicViT at 0.7 and 0.5, EViT and ToMe matched to
DynamicViT/0.7's GFLOPs), times them interleaved in fp32 and fp16 autocast, times the masked training step
against the dense one, and trains the tiny a/dynamic run a few steps through the engine (~30-40 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def gpu_benchmark(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, even on a machine with one
    result = gpu_benchmark(tmp_path / "out", env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "no CUDA device" in lines[0], result.stderr
    assert "--smoke" in lines[0] and not (tmp_path / "out").exists()


def test_smoke_runs_every_part_and_writes_markdown_and_json(tmp_path: Path) -> None:
    result = gpu_benchmark(tmp_path, "--smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "gpu-smoke.json").read_text())
    markdown = (tmp_path / "gpu-smoke.md").read_text()
    rows = data["inference"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    assert len(models) == 5 and models[0] == "tiny ViT (dense)", models
    assert models[1:3] == ["DynamicViT-tiny/0.7", "DynamicViT-tiny/0.5"]
    assert models[3].startswith("EViT/") and models[4].startswith("ToMe r=")
    assert {(r["batch"], r["precision"]) for r in rows} == {(b, p) for b in (1, 4) for p in ("fp32", "fp16")}
    assert len(rows) == 5 * 4
    by_model = {r["model"]: r for r in rows}
    for matched in models[3:]:  # at DynamicViT/0.7's cost: within the 2% peers_match allows
        assert by_model[matched]["gflops"] == pytest.approx(by_model[models[1]]["gflops"], rel=0.02), matched
    for r in rows:
        assert r["images_per_s"] > 0 and r["rounds"] == 2
        low, high = r["images_per_s_iqr"]
        assert 0 < low <= high
    assert {(r["precision"], r["step"]) for r in data["train_step"]} == {
        (p, s) for p in ("fp32", "fp16") for s in ("dense", "dynamic", "teacher")
    }
    amp = data["amp_training"]
    assert amp["steps"] == 4 and amp["all_finite"] and len(amp["losses"]) == 4
    assert amp["precision"] == "fp32" and not amp["grad_scaler"]  # the engine trains the CPU in fp32
    for heading in ("## Inference", "## Training step", "## 4 training steps of the tiny a/dynamic run"):
        assert heading in markdown, heading
    assert f"| 4 | fp16 | {models[3]} |" in markdown
