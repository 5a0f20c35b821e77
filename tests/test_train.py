"""Reward-model training on a real local Ray cluster: learning, a killed worker, the job path, the exports."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One synthetic set and one training run serve the learning, fault and export tests (2 CPUs, minutes).
SYNTH = {"prompts": 2000, "per_prompt": 4, "seed": 0}  # the default attributes (colour, size)
FAIL_AFTER_EPOCH_1 = 3  # rank 1 dies when about to run update steps_per_epoch + 3 (mid epoch 2)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    """The offline comparison set: train / val / test Parquet shards plus its tokenizer."""
    from rayapp.data.synth import write_synthetic_set

    out = tmp_path_factory.mktemp("train_synth") / "data"
    write_synthetic_set(out, progress=False, **SYNTH)
    return out


@pytest.fixture(scope="module")
def trained(ray_cluster, synth_dir, tmp_path_factory):
    """A tiny model trained with 2 workers; rank 1 is killed once mid-run and the run resumes."""
    from rayapp.train.config import RMTrainConfig
    from rayapp.train.rm_trainer import prepare, train_reward_model

    out = tmp_path_factory.mktemp("train_run")
    config = RMTrainConfig(data_dir=str(synth_dir), output_dir=str(out), num_workers=2, cpus_per_worker=1.0,
                           step_log=str(out / "steps.log"), max_failures=2)
    config.fail_at_step = prepare(config)[3]["steps_per_epoch"] + FAIL_AFTER_EPOCH_1
    started = time.time()
    result = train_reward_model(config, log=lambda line: None)
    result.wall_s = time.time() - started
    print(f"shared training run: {result.wall_s:.0f} s, plan {result.plan}")
    result.fail_at_step = config.fail_at_step
    return result, out


def test_learns_held_out_pairs_and_reads_the_caption(trained, synth_dir):
    """Held-out pairwise accuracy >= 0.90 overall (chance: 0.5) and >= 0.85 where only the caption decides."""
    import rayapp
    from rayapp.train.rm_eval import pairwise_accuracy

    result, _ = trained
    scores = pairwise_accuracy(rayapp.load(result.model_dir, device="cpu"), synth_dir / "test")
    print("held-out", scores, "train metrics", result.metrics)
    assert scores["pairs"] > 200 and scores["pairs_caption"] > 40
    assert scores["accuracy"] >= 0.90, scores
    assert scores["accuracy_caption"] >= 0.85, scores


def test_killed_worker_resumes_without_losing_or_repeating_updates(trained):
    """Rank 1 hard-exits mid epoch 2; the run restarts from the epoch-1 checkpoint and finishes the plan."""
    result, out = trained
    total, per_epoch, fail_at = result.plan["total_steps"], result.plan["steps_per_epoch"], result.fail_at_step
    assert total > fail_at > per_epoch
    state = json.loads((Path(result.checkpoint_path) / "trainer_state.json").read_text())
    # The model's update history: every planned update exactly once, in order.
    assert state["history"] == list(range(total))
    assert state["step"] == total and state["restarts"] == 1
    assert result.metrics["step"] == total
    # What actually ran: attempt 1 (one PID) until the kill, attempt 2 (another PID) from the epoch checkpoint.
    runs: dict[str, list[int]] = {}
    for line in (out / "steps.log").read_text().split("\n"):
        if line:
            pid, step = line.split()
            runs.setdefault(pid, []).append(int(step))
    assert len(runs) == 2, runs
    first, second = runs.values()
    assert first == list(range(fail_at))
    # Updates after the checkpoint died with the worker group and were redone once; none before it.
    assert second == list(range(per_epoch, total))


def test_official_export_scores_identically(trained, synth_dir):
    """ImageReward.pt + med_config.json load with rayapp.load and give our format's rewards."""
    import rayapp
    from rayapp.data.shards import iter_comparisons

    result, _ = trained
    ours = rayapp.load(result.model_dir, device="cpu")
    official = rayapp.load(Path(result.official_dir) / "ImageReward.pt", device="cpu")
    assert (Path(result.official_dir) / "med_config.json").is_file()
    record = next(iter_comparisons(synth_dir / "test"))
    a = ours.score(record["prompt"], list(record["images"]))
    b = official.score(record["prompt"], list(record["images"]))
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert len({round(x, 3) for x in a}) > 1  # not a constant scorer
    # The fitted normalisation: raw outputs on training images have mean ~0 / std ~1 after normalising.
    assert ours.config.reward_mean == pytest.approx(result.metrics["reward_mean"])
    assert ours.config.reward_std == pytest.approx(result.metrics["reward_std"])
    assert ours.config.reward_std > 0


def test_job_submit_trains_and_writes_a_loadable_model(ray_cluster, tmp_path):
    """`ray job submit --working-dir .` of jobs/train_rm.py (offline default: it synthesises its data) against
    the session's head: SUCCEEDED, the derived quantities printed, a loadable model written."""
    import rayapp

    out = tmp_path / "job_out"
    cmd = [
        str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard_url,
        "--working-dir", ".", "--", sys.executable, "jobs/train_rm.py", "--synth-prompts", "100",
        "--output-dir", str(out), "--max-steps", "3", "--log-every-steps", "1", "--num-workers", "2",
    ]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert re.search(r"Job '\S+' succeeded", log), log[-4000:]  # the CLI's words for status SUCCEEDED
    assert "steps per epoch:" in log and "effective batch: 32 pairs" in log, log[-4000:]
    assert "held-out pairwise accuracy" in log, log[-4000:]
    # the loop's own progress line replaces Ray Train's per-report INFO dump
    assert "[train] update 3/3" in log and "Reporting training result" not in log, log[-4000:]
    model = rayapp.load(out / "model", device="cpu")
    assert model.config.image_size == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["step"] == 3
    rayapp.load(out / "official", device="cpu")


def test_cluster_yaml_matches_rays_cluster_schema():
    """cluster.yaml validates against ray/autoscaler/ray-schema.json and has a GPU worker type."""
    import jsonschema
    import ray
    import yaml

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    assert config["max_workers"] >= sum(t.get("min_workers", 0) for t in types.values())
    assert any("pip install" in c and "-e" in c for c in config["setup_commands"])
