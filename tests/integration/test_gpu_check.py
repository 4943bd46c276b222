"""`make gpu-check`'s figures, and its refusal on a machine without CUDA (it runs on GPUs only)."""

import subprocess
import sys

import pytest

from pipeline.bench.gpu import GPU_CHECK_OVERRIDES, stage_figures
from pipeline.config import load_config
from tests.e2e.project import ROOT
from tools.preset import apply_preset


def test_training_stages_get_mfu_from_six_flops_per_parameter_per_token():
    report = {"perf/steady_tokens_per_s": 100_000.0, "model/parameters": 124e6, "perf/peak_gpu_mem_mb": 2048.0}
    sft = stage_figures("sft", report, wall_s=30.0, peak_tflops=800.0)
    assert sft["mfu"] == pytest.approx(6 * 124e6 * 100_000 / 800e12)  # 0.093
    assert sft["peak_gpu_mem_mb"] == 2048.0 and sft["wall_s"] == 30.0
    assert stage_figures("ppo", report, 1.0, 800.0)["mfu"] is None  # sampling and training mixed: no MFU
    assert stage_figures("preferences", {"perf/wall_s": 3.0}, 3.0, 800.0)["steady_tokens_per_s"] is None


def test_the_overrides_make_a_valid_config_over_the_gpu_preset():
    import yaml

    text, _ = apply_preset((ROOT / "params.yaml").read_text(), ROOT / "presets/gpu.yaml")  # what gpu-check applies
    params = yaml.safe_load(text)
    for section, values in GPU_CHECK_OVERRIDES.items():
        params[section].update(values)
    cfg = load_config(params)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.n_embd == 768
    assert cfg.sft.max_steps < 1500  # reduced from the preset's


def test_without_cuda_it_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu-check.json"
    done = subprocess.run(
        [sys.executable, "-m", "tools.gpu_check", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "sees no CUDA device" in done.stderr and "GPU_PYTHON" in done.stderr
    assert not out.exists()
