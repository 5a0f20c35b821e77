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
    """A tiny model trained with 2 workers (offline preset); rank 1 is killed once mid-run and the run resumes."""
    from faults import KillWorkerOnce, StepLog

    from rayapp.rm import RMTrainConfig, train_reward_model
    from rayapp.rm.driver import count_split_pairs, make_schedule

    out = tmp_path_factory.mktemp("train_run")
    config = RMTrainConfig.from_preset("offline", data_dir=str(synth_dir), output_dir=str(out), num_workers=2,
                                       max_failures=2)
    fail_at = make_schedule(config, count_split_pairs(synth_dir / "train")).steps_per_epoch + FAIL_AFTER_EPOCH_1
    step_log = StepLog(out / "steps.log")
    started = time.time()
    result = train_reward_model(config, callbacks=[KillWorkerOnce(fail_at, out / "killed.marker"), step_log])
    result.wall_s = time.time() - started
    print(f"shared training run: {result.wall_s:.0f} s, schedule {result.schedule}")
    result.fail_at_step = fail_at
    result.step_log = step_log
    return result, out


def test_learns_held_out_pairs_and_reads_the_caption(trained, synth_dir):
    """Held-out pairwise accuracy >= 0.90 overall (chance: 0.5) and >= 0.85 where only the caption decides."""
    import rayapp
    from rayapp.rm.evaluation import pairwise_accuracy

    result, _ = trained
    scores = pairwise_accuracy(rayapp.load(result.model_dir, device="cpu"), synth_dir / "test")
    print("held-out", scores, "train metrics", result.metrics)
    assert scores["pairs"] > 200 and scores["pairs_caption"] > 40
    assert scores["accuracy"] >= 0.90, scores
    assert scores["accuracy_caption"] >= 0.85, scores


def test_killed_worker_resumes_without_losing_or_repeating_updates(trained):
    """Rank 1 hard-exits mid epoch 2; the run restarts from the epoch-1 checkpoint and finishes the plan."""
    result, _ = trained
    total, per_epoch, fail_at = result.schedule.total_steps, result.schedule.steps_per_epoch, result.fail_at_step
    assert total > fail_at > per_epoch
    state = json.loads((Path(result.checkpoint_path) / "trainer_state.json").read_text())
    # The model's update history: every planned update exactly once, in order.
    assert state["completed_updates"] == list(range(total))
    assert state["step"] == total and state["restarts"] == 1
    assert result.metrics["step"] == total
    # What actually ran: attempt 1 (one PID) until the kill, attempt 2 (another PID) from the epoch checkpoint.
    runs = result.step_log.attempts()
    assert len(runs) == 2, runs
    first, second = runs
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


TRACKER_SECRET = "not-for-the-dashboard-5d1e"
TRAIN_RUNS = "/api/train/v2/runs/v1"  # Ray 2.60's Train v2 route (ray/dashboard/modules/train/train_head.py)


def _train_run_of(dashboard_url: str, submission_id: str) -> dict | None:
    """The dashboard Train API's run for this job submission, or None while it has none (or no state actor yet)."""
    import requests

    response = requests.get(dashboard_url + TRAIN_RUNS, timeout=30)
    if response.status_code != 200:  # 500 "Train state data is not available" until the run creates the actor
        return None
    for run in response.json()["train_runs"]:
        if (run.get("job_details") or {}).get("submission_id") == submission_id:
            return run
    return None


def _workers(run: dict) -> list[dict]:
    return run["attempts"][-1]["workers"] if run["attempts"] else []


def test_job_submit_trains_writes_a_loadable_model_and_shows_on_the_dashboard(ray_cluster, tmp_path):
    """`ray job submit --working-dir .` of jobs/train_rm.py (offline default: it synthesises its data) against
    the session's head: while it trains, the dashboard's Train API lists its run RUNNING with both workers (the
    head has no Train setting of its own: the job turns tracking on), then FINISHED; the job SUCCEEDED, printed
    the derived quantities and wrote a loadable model."""
    import rayapp

    out = tmp_path / "job_out"
    submission_id = f"rm-dashboard-{int(time.time())}"
    cmd = [
        str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_cluster.dashboard_url,
        "--submission-id", submission_id, "--working-dir", ".",
        # a tracker credential in the job's environment travels to rank 0 but must not show on the dashboard
        "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_PASSWORD": TRACKER_SECRET}}),
        "--", sys.executable, "jobs/train_rm.py",
        "--synth-prompts", "100", "--output-dir", str(out), "--max-steps", "6", "--log-every", "1",
        "--num-workers", "2",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        running = None
        deadline = time.time() + 480
        while running is None and proc.poll() is None and time.time() < deadline:
            run = _train_run_of(ray_cluster.dashboard_url, submission_id)
            if run and run["status"] == "RUNNING" and len(_workers(run)) == 2:
                running = run
            else:
                time.sleep(0.5)
        log, _ = proc.communicate(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, log[-4000:]
    assert re.search(r"Job '\S+' succeeded", log), log[-4000:]  # the CLI's words for status SUCCEEDED
    assert running is not None, f"the Train API never listed the run RUNNING with 2 workers:\n{log[-4000:]}"
    assert sorted(w["world_rank"] for w in _workers(running)) == [0, 1]
    assert all(w["status"] == "ALIVE" and w["pid"] > 0 for w in _workers(running)), _workers(running)
    assert running["name"].startswith("rm-"), running["name"]
    final = _train_run_of(ray_cluster.dashboard_url, submission_id)
    assert final is not None and final["status"] == "FINISHED", final
    assert "WorkerPlan(" in json.dumps(final["run_settings"]["train_loop_config"]), final["run_settings"]
    # (the job's own runtime env, credential included, is the Jobs API's to show; the run's settings must not)
    assert TRACKER_SECRET not in json.dumps(final["run_settings"]), "a tracker credential shows in the Train API"
    # the job said where the dashboard is (this head runs without token auth: the plain address)
    assert f"Ray dashboard: {ray_cluster.dashboard_url}" in log, log[-4000:]
    assert "steps per epoch:" in log and "effective batch: 32 pairs" in log, log[-4000:]
    assert "held-out pairwise accuracy" in log, log[-4000:]
    # the loop's own progress line, once per report, replaces Ray Train's per-report INFO dump
    assert log.count("[rm] step 6/6") == 1 and "Reporting training result" not in log, log[-4000:]
    assert re.search(r"\[workers\] node IPs: \S+, \S+", log), log[-4000:]
    model = rayapp.load(out / "model", device="cpu")
    assert model.config.image_size == 64
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["step"] == 6
    rayapp.load(out / "official", device="cpu")


def _help(job: str) -> str:
    proc = subprocess.run([sys.executable, job, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("job, config_module", [("jobs/train_rm.py", "rayapp.rm.config"),
                                                ("jobs/refl.py", "rayapp.refl.config")])
def test_job_help_documents_every_flag_and_nothing_test_only(job, config_module):
    """Every config field is a flag with help text; no fault-injection flag; --help is the same whatever else
    is on the command line."""
    import dataclasses
    import importlib

    text = _help(job)
    module = importlib.import_module(config_module)
    cls = module.RMTrainConfig if job.endswith("train_rm.py") else module.ReFLConfig
    for field in dataclasses.fields(cls):
        assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help text"
        if field.name != "preset":
            assert "--" + field.name.replace("_", "-") in text
    for test_only in ("--fail-at-step", "--step-log", "CRASH"):
        assert test_only not in text
    other = subprocess.run([sys.executable, job, "--pretrained", "CompVis/stable-diffusion-v1-4", "--help"],
                           cwd=REPO, capture_output=True, text=True, timeout=120, check=False).stdout
    assert other == text


@pytest.mark.parametrize("cls_path", ["rayapp.rm.config:RMTrainConfig", "rayapp.refl.config:ReFLConfig"])
def test_config_file_round_trips(cls_path, tmp_path):
    """A resolved config written by a run, fed back with --config, gives the same config; flags override it."""
    import importlib

    from rayapp.configs import parse_config, save_config

    module_name, name = cls_path.split(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, name)
    first, _ = parse_config(cls, ["--preset", max(module.PRESETS), "--learning-rate", "0.25",
                                  "--adam-betas", "0.8", "0.9", "--num-to-keep", "none"],
                            presets=module.PRESETS, default_preset=module.DEFAULT_PRESET, description="t")
    save_config(first, tmp_path / "config.json")
    again, _ = parse_config(cls, ["--config", str(tmp_path / "config.json")], presets=module.PRESETS,
                            default_preset=module.DEFAULT_PRESET, description="t")
    assert again == first and again.learning_rate == 0.25 and again.adam_betas == (0.8, 0.9)
    assert again.num_to_keep is None
    (tmp_path / "partial.yaml").write_text("learning_rate: 0.5\nnum_workers: 3\n")
    mixed, _ = parse_config(cls, ["--config", str(tmp_path / "partial.yaml"), "--num-workers", "5"],
                            presets=module.PRESETS, default_preset=module.DEFAULT_PRESET, description="t")
    assert (mixed.learning_rate, mixed.num_workers, mixed.preset) == (0.5, 5, module.DEFAULT_PRESET)
    (tmp_path / "typo.json").write_text('{"learning_rat": 1}')
    with pytest.raises(SystemExit):
        parse_config(cls, ["--config", str(tmp_path / "typo.json")], presets=module.PRESETS,
                     default_preset=module.DEFAULT_PRESET, description="t")


def test_reference_preset_is_the_spec_recipe():
    """`--preset imagereward-v1` is SPEC 2's recipe: Adam lr 1e-5 cosine, 64 pairs per update, fix_rate 0.7."""
    from rayapp.rm import RMTrainConfig

    config = RMTrainConfig.from_preset("imagereward-v1")
    assert config.learning_rate == 1e-5 and config.lr_scheduler == "cosine" and config.warmup_steps == 0
    assert config.pairs_per_update == 64 and config.fix_rate == 0.7 and config.num_epochs == 10
    assert config.adam_betas == (0.9, 0.999) and config.adam_eps == 1e-8 and config.weight_decay == 0.0
    assert config.evals_per_epoch == 4 and config.seed == 1234 and config.use_gpu


def test_gpu_request_on_a_cpu_cluster_fails_fast(ray_cluster, tmp_path):
    """The reference preset asks for GPUs: on the CPU-only cluster the job says so at once instead of waiting."""
    env = dict(ray_cluster.env)
    started = time.time()
    proc = subprocess.run([sys.executable, "jobs/train_rm.py", "--preset", "imagereward-v1", "--output-dir",
                           str(tmp_path / "out")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert "jobs/train_rm.py" in log and "'GPU': 1.0" in log and "no GPU" in log, log[-3000:]
    assert time.time() - started < 120


def test_placement_check_names_the_job_request_and_cluster():
    """Requests no node can hold fail with what was asked and what exists; fitting ones pass."""
    from rayapp.runtime.cluster import ResourceRequestError, check_placeable

    nodes = [{"CPU": 2.0}, {"CPU": 1.0}]
    check_placeable("jobs/refl.py", "2 train workers", {"CPU": 1.0}, 3, {"CPU": 3.0}, nodes)
    with pytest.raises(ResourceRequestError, match=r"jobs/refl.py: 2 train workers x \{'CPU': 2.0\}.*room for 1"):
        check_placeable("jobs/refl.py", "2 train workers", {"CPU": 2.0}, 2, {"CPU": 3.0}, nodes)
    with pytest.raises(ResourceRequestError, match="no GPU"):
        check_placeable("jobs/train_rm.py", "1 train worker", {"CPU": 1.0, "GPU": 1.0}, 1, {"CPU": 3.0}, nodes)


@pytest.mark.parametrize("form", ["pretrained", "official"])
def test_init_geometry_is_read_without_loading_the_model(tiny_rm_dir, tmp_path, form):
    """Training from `init` sizes the data pipeline from the checkpoint's architecture, read off its config
    (or, for an official file, its tensor shapes), not from the preset the init replaces."""
    import rayapp
    from rayapp.rm import RMTrainConfig
    from rayapp.rm.driver import model_geometry

    init = tiny_rm_dir
    if form == "official":
        init = tmp_path / "official"
        rayapp.load(tiny_rm_dir, device="cpu").export_official(init)
    expected = rayapp.load(init, device="cpu").config
    config = RMTrainConfig.from_preset("imagereward-v1", init=str(init))
    assert model_geometry(config) == (expected.image_size, expected.max_length)
    assert model_geometry(RMTrainConfig.from_preset("imagereward-v1"))[0] == 224  # the preset's, for contrast
    assert expected.image_size != 224
