"""benchmarks/gpu_suite.py: `--smoke` runs every section on the CPU and writes every figure; a failed section is
recorded without hiding the others and makes the exit status non-zero."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"

# Every figure issue 12 asks of the suite (the smoke run uses the same names at tiny sizes).
EXPECTED_FIGURES = [
    "scoring.matmul_bf16_tflops", "scoring.gflop_per_image",
    "scoring.img_s_batch_64", "scoring.roof_share_batch_64",
    "scoring.img_s_batch_256", "scoring.roof_share_batch_256",
    "serve.batched.req_s", "serve.batched.p99_s", "serve.unbatched.req_s", "serve.unbatched.p99_s", "serve.speedup",
    *[f"refl.{case}.{figure}" for case in ("full", "full_gc", "lora4", "lora4_gc")
      for figure in ("s_per_update", "peak_memory_gib")],
    "rm.pairs_s_batch_4", "rm.peak_memory_gib_batch_4", "rm.pairs_s_batch_16", "rm.peak_memory_gib_batch_16",
]


def suite_env() -> dict:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (e.g. a Ray temp dir: its raylet, GCS and workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(proc.name))
    return pids


def test_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(out)], check=False, cwd=REPO,
                          env=suite_env(), capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    assert report["profile"] == "smoke" and report["command"] == "python benchmarks/gpu_suite.py --smoke"
    assert report["failed"] == []
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section.get("error"), section.get("traceback"))
    figures = report["figures"]
    missing = [key for key in EXPECTED_FIGURES if key not in figures]
    assert not missing, f"figures missing from the report: {missing}"
    bad = {key: figures[key] for key in EXPECTED_FIGURES
           if not (isinstance(figures[key], (int, float)) and math.isfinite(figures[key]) and figures[key] > 0)}
    assert not bad, f"figures not positive numbers: {bad}"
    # The Serve section's Ray was sized with this machine's CPUs and is gone afterwards.
    serve = report["sections"]["serve"]
    assert serve["ray_cpus"] == len(os.sched_getaffinity(0))
    assert serve["cases"]["batched"]["errors"] == 0 and serve["cases"]["unbatched"]["errors"] == 0
    assert not processes_mentioning(serve["ray_temp_dir"]), "Ray processes of the suite still running"
    markdown = (out / "gpu_suite.md").read_text()
    assert "Smoke run" in markdown
    for name in ("scoring", "serve", "refl", "rm"):
        assert f"## {name}: ok" in markdown


def test_failed_section_is_recorded_and_others_still_run(tmp_path, monkeypatch):
    sys.path.insert(0, str(SUITE.parent))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(SUITE.parent))

    def broken(profile, work):
        raise RuntimeError("the scorer fell over")

    def fine(profile, work):
        return {"figures": {"rm.pairs_s_batch_4": 1.5}}

    monkeypatch.setitem(gpu_suite.RUNNERS, "scoring", broken)
    monkeypatch.setitem(gpu_suite.RUNNERS, "rm", fine)
    # main() sets these for its own run: keep them scoped to this test.
    for name, value in {"CUDA_VISIBLE_DEVICES": "", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                        "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, value)
    status = gpu_suite.main(["--smoke", "--sections", "scoring", "rm", "--out", str(tmp_path)])
    assert status == 1
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["failed"] == ["scoring"]
    assert report["sections"]["scoring"]["error"] == "RuntimeError: the scorer fell over"
    assert report["sections"]["rm"]["status"] == "ok"
    assert report["figures"] == {"rm.pairs_s_batch_4": pytest.approx(1.5)}
    assert "Failed: `RuntimeError: the scorer fell over`" in (tmp_path / "gpu_suite.md").read_text()
