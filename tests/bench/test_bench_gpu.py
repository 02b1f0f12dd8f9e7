"""bench/bench_gpu.py runs end to end on CPU at the small preset and reports every configuration."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.bench_gpu import OPTIONS, SMALL, TASKS
from model.speed import FP8_ERROR

REPO = Path(__file__).resolve().parents[2]


def test_small_preset_reports_every_configuration(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_gpu", "--preset", "small", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu-small.json").read_text())
    assert (tmp_path / "gpu-small.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    configs = {(c["option"], c["task"], c["size"], c["batch"]): c for c in result["configurations"]}
    expected = set(itertools.product(OPTIONS, TASKS, SMALL.sizes, SMALL.batches))
    assert set(configs) == expected and len(result["configurations"]) == len(expected)
    for (option, _task, _size, _batch), entry in configs.items():
        assert entry["dit_flops_per_step"] > 0
        if "fp8" in option:  # refused on CPU, with the reason
            assert entry["status"] == "not_run" and FP8_ERROR in entry["reason"]
        elif "compile" in option:  # minutes of C++ compilation per shape on CPU: tests/model/test_speed.py
            assert entry["status"] == "not_run" and "compile" in entry["reason"]
        else:
            assert entry["status"] == "measured", entry
            for steps in ("28", "50"):
                rate = entry["per_steps"][steps]
                assert rate["images_per_s"] > 0
                assert abs(rate["seconds_per_image"] * rate["images_per_s"] - 1) < 1e-2
            assert (
                entry["per_steps"]["50"]["seconds_per_image"] > entry["per_steps"]["28"]["seconds_per_image"]
            )
        if entry["status"] == "measured" and entry["cache_threshold"] > 0:
            assert 0 <= entry["cache_blocks_skipped_fraction"] < 1
    assert {c["status"] for c in result["configurations"]} == {"measured", "not_run"}


def test_full_preset_builds_the_real_architecture_on_meta() -> None:
    """What a GPU session will build: Nexus-GenV2's parameter counts (no memory: the meta device)."""
    import torch

    from bench.bench_gpu import FULL, build_components, dit_flops

    components = build_components(FULL, torch.device("meta"), torch.bfloat16)
    billions = {
        name: round(sum(p.numel() for p in getattr(components, name).parameters()) / 1e9, 2)
        for name in ("ar", "gen_dit", "edit_dit", "merger")
    }
    assert billions == {"ar": 8.29, "gen_dit": 11.9, "edit_dit": 11.9, "merger": 0.36}
    assert (
        len(components.gen_dit.transformer_blocks) == 19
        and len(components.gen_dit.single_transformer_blocks) == 38
    )
    assert round(dit_flops(FULL, 1024, 81) / 1e12, 1) == 66.2  # the figure the module docstring documents
