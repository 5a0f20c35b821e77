"""The one training loop, through both trainers: what resuming a finished run does, what callbacks see, and
what the trackers (a real MLflow server on loopback, TensorBoard event files, a W&B offline run) receive."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest


def _digest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _rm(tmp_path: Path, callbacks):
    from rayapp.rm import RMTrainConfig, train_reward_model

    config = RMTrainConfig.from_preset("offline", output_dir=str(tmp_path / "out"), run_name="finished-rm",
                                       synth_prompts=60, max_steps=2, log_every=1, num_workers=2, max_failures=0,
                                       tracking="mlflow,tensorboard")
    result = train_reward_model(config, callbacks=callbacks)
    return result, Path(result.model_dir), result.checkpoint_path


def _refl(tmp_path: Path, callbacks):
    from rayapp.refl import ReFLConfig, run_refl

    config = ReFLConfig.from_preset("offline", output_dir=str(tmp_path / "out"), run_name="finished-refl",
                                    max_steps=2, eval_every=0, pretrain_weight=0.0, eval_prompts=("one red circle",),
                                    eval_seeds=(0,), max_failures=0, tracking="mlflow,tensorboard,wandb")
    result = run_refl(config, callbacks=callbacks)
    return result, Path(result.final_dir), result.checkpoint


# What each trainer's run must leave in the trackers: metric -> the steps it was logged at; the curve's name.
EXPECTED = {
    "rm": ({"train_loss": [1, 2], "val_loss": [2], "val_acc": [2], "pairs_per_s": [1, 2]}, "loss_curve.png"),
    "refl": ({"train_loss_reward": [1, 2], "train_reward_train": [1, 2], "eval_reward": [0, 2]}, "reward_curve.png"),
}


@pytest.mark.parametrize("run", [_rm, _refl], ids=["rm", "refl"])
def test_a_run_is_tracked_and_resuming_it_after_the_end_trains_nothing(ray_cluster, mlflow_server, tmp_path,
                                                                       monkeypatch, run):
    """A tiny run logs its resolved config and metric histories to MLflow, TensorBoard (and W&B offline); its
    callbacks see every update's train metrics. Started again, the run finds its final checkpoint: no update,
    evaluation or export is redone, the result points at the same export and MLflow still holds one run."""
    from faults import MetricsLog, StepLog
    from tracking_support import read_scalars, wandb_offline_runs

    from rayapp.runtime.tracking import flatten_params

    job = run.__name__.strip("_")
    metrics_at, curve = EXPECTED[job]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"test-loop-{job}")
    monkeypatch.setenv("WANDB_MODE", "offline")

    first_steps, first_metrics = StepLog(tmp_path / "first.log"), MetricsLog(tmp_path / "metrics.log")
    first, export, checkpoint = run(tmp_path, [first_steps, first_metrics])
    out = export.parent
    assert first.completed_updates == [0, 1] and first_steps.attempts() == [[0, 1]]
    events = first_metrics.events()
    train_key = next(iter(metrics_at))
    assert [e["step"] for e in events] == [0, 1] and all(train_key in e for e in events), events
    assert (out / curve).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["finished"] is True and summary["reports"][-1]["step"] == 2

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name(f"test-loop-{job}")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    tracked = runs[0]
    assert tracked.data.params == flatten_params(first.config.to_dict())
    for key, steps in metrics_at.items():
        assert [m.step for m in client.get_metric_history(tracked.info.run_id, key)] == steps, key
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert any(curve in path for path in artifacts), artifacts
    scalars = read_scalars(out / "tensorboard")
    for key, steps in metrics_at.items():
        assert [step for step, _ in scalars[key]] == steps, (key, scalars.get(key))
    if job == "refl":
        assert wandb_offline_runs(out), list(out.iterdir())

    before = _digest(export)
    again_steps = StepLog(tmp_path / "again.log")
    again, export_again, checkpoint_again = run(tmp_path, [again_steps])
    assert not (tmp_path / "again.log").exists()  # no update ran
    assert again.completed_updates == [0, 1]
    assert export_again == export and _digest(export_again) == before
    assert checkpoint_again == checkpoint  # Ray Train's result is the same final checkpoint
    assert again.metrics["finished"] is True and again.metrics["step"] == 2
    assert len(client.search_runs([experiment.experiment_id])) == 1  # the tracker resumed its run


def test_a_failed_fit_becomes_our_error_naming_the_job_rank_and_cause():
    """Ray Train's WorkerGroupError (what fit raises once restarts are used up) becomes TrainingFailed with the
    job, the run, the failing rank and the worker's own exception."""
    from ray.train import WorkerGroupError

    from rayapp.refl.driver import ReFLJob
    from rayapp.rm.config import RMTrainConfig
    from rayapp.rm.driver import RMJob
    from rayapp.runtime.driver import TrainingFailed, training_failed

    config = RMTrainConfig.from_preset("offline", run_name="broken", max_failures=2)
    cause = ValueError("a prompt file has no 'text' field\nsecond line")
    error = training_failed(RMJob(), config, WorkerGroupError("worker group failed", {1: cause, 0: cause}))
    assert isinstance(error, TrainingFailed)
    assert str(error) == ("jobs/train_rm.py: run broken failed on rank 0 after up to 2 worker-group restarts: "
                          "ValueError: a prompt file has no 'text' field / second line")
    assert ReFLJob.script in str(training_failed(ReFLJob(), config, RuntimeError("controller died")))
