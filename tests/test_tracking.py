"""Run tracking (rayapp.runtime.tracking) against the real backends: a local MLflow server, TensorBoard event files
read back with EventAccumulator, and W&B offline runs read back with wandb's own reader."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys

import numpy as np
import pytest
from PIL import Image
from tracking_support import read_scalars, read_tensorboard, read_wandb_run, wandb_offline_runs

from rayapp.runtime.tracking import (
    TRACKERS,
    RunTracker,
    TrackingError,
    check_available,
    flatten_params,
    parse_tracking,
    tracking_env,
)

CONFIG = {"learning_rate": 3e-4, "adam_betas": (0.9, 0.999), "resume_from": None, "use_gpu": False,
          "model": {"preset": "tiny", "layers": [2, 2], "extra": {}}, "run_name": "t"}


@pytest.fixture(autouse=True)
def clean_tracker_env(monkeypatch):
    """No tracker settings of the machine leak in; W&B never goes online."""
    for key in list(os.environ):
        if key.startswith(("MLFLOW_", "WANDB_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")


@contextlib.contextmanager
def tracking_warnings():
    """The tracking module's warnings (its logger may not propagate: rayapp's logging set-up stops that)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    tracker_logger = logging.getLogger("rayapp.runtime.tracking")
    tracker_logger.addHandler(handler)
    try:
        yield records
    finally:
        tracker_logger.removeHandler(handler)


def png(path, colour=(200, 30, 30), size=(12, 8)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_parse_tracking():
    assert parse_tracking("tensorboard,mlflow") == ("tensorboard", "mlflow")
    assert parse_tracking(" MLflow , TensorBoard,mlflow") == ("mlflow", "tensorboard")
    assert parse_tracking(["wandb", "tensorboard"]) == ("wandb", "tensorboard")
    assert parse_tracking("none") == parse_tracking("") == parse_tracking("NONE") == parse_tracking([]) == ()
    with pytest.raises(ValueError, match="tensorboard, mlflow, wandb or none"):
        parse_tracking("tensorboard,comet")
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        parse_tracking("none,mlflow")
    assert set(TRACKERS) == {"tensorboard", "mlflow", "wandb"}


def test_tracking_env_takes_the_backends_settings_only():
    environ = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_EXPERIMENT_NAME": "e",
               "MLFLOW_TRACKING_TOKEN": "secret", "WANDB_MODE": "offline", "WANDB_API_KEY": "k",
               "WANDB_SERVICE": "2-123-tcp-localhost-4567", "HOME": "/root", "PATH": "/bin"}
    assert tracking_env(environ) == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_EXPERIMENT_NAME": "e",
                                     "MLFLOW_TRACKING_TOKEN": "secret", "WANDB_MODE": "offline",
                                     "WANDB_API_KEY": "k"}


def test_check_available_names_the_extra(monkeypatch):
    check_available("tensorboard,mlflow,wandb")
    check_available("none")
    # sys.modules[name] = None is how Python marks a module as not importable
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrackingError, match=r'wandb needs wandb.*pip install "rayapp\[tracking\]"'):
        check_available("tensorboard,wandb")
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(TrackingError, match="mlflow needs sqlalchemy"):  # the default store is SQLite
        check_available("mlflow")
    check_available("mlflow", env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})  # a server: client only


def test_flatten_params():
    assert flatten_params(CONFIG) == {
        "learning_rate": "0.0003", "adam_betas": "[0.9, 0.999]", "resume_from": "None", "use_gpu": "False",
        "model.preset": "tiny", "model.layers": "[2, 2]", "model.extra": "{}", "run_name": "t"}


def test_tensorboard_scalars_images_text_and_restart(tmp_path):
    run_dir = tmp_path / "run"
    tracker = RunTracker("tensorboard", run_dir=str(run_dir), run_name="r", job="rayapp-test", params=CONFIG)
    for step in range(6):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "val_accuracy": np.float32(0.5 + step / 20),
                             "nan_ok": float("nan"), "flag": np.bool_(step % 2), "note": "skipped",
                             "vector": np.zeros(3)}, step)
    tracker.log_artifact(str(png(tmp_path / "loss_curve.png")))
    tracker.log_artifact(str(tmp_path / "missing.png"))  # warned about, not raised
    (tmp_path / "notes.txt").write_text("not an image")
    tracker.log_artifact(str(tmp_path / "notes.txt"))
    tracker.log_text("export", "/runs/rm/model")  # at step 5, like the image
    state = tracker.state()
    tracker.close(failed=True)
    tracker.close()  # idempotent

    # a restarted worker group resumes from the checkpoint of step 3 and logs steps 4.. again
    with RunTracker(["tensorboard"], run_dir=str(run_dir), run_name="r", job="rayapp-test", params=CONFIG,
                    resume=state) as resumed:
        assert resumed.state() == state
        for step in (4, 5, 6):
            resumed.log_metrics({"train/loss": 10.0 + step}, step)

    scalars = read_scalars(run_dir / "tensorboard")
    assert set(scalars) == {"train/loss", "val_accuracy", "nan_ok", "flag"}
    assert scalars["train/loss"] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3)), (3, 0.25), (4, 14.0),
                                     (5, 15.0), (6, 16.0)]
    assert [step for step, _ in scalars["val_accuracy"]] == [0, 1, 2, 3]  # 4 and 5 were orphaned by the restart
    assert scalars["val_accuracy"][3][1] == pytest.approx(0.65)
    assert all(math.isnan(value) for _, value in scalars["nan_ok"])
    assert [value for _, value in scalars["flag"]] == [0.0, 1.0, 0.0, 1.0]
    events = read_tensorboard(run_dir / "tensorboard")
    assert events.Images("loss_curve") == []  # logged at step 5, after the restart's step 4: orphaned too
    assert [text.step for text in events.Tensors("config/text_summary")] == [0]


def test_tensorboard_image_summary(tmp_path):
    grids = tmp_path / "eval"
    grids.mkdir()
    png(grids / "grid_0004.png", size=(16, 10))
    (grids / "scores.json").write_text("{}")
    with RunTracker("tensorboard", run_dir=str(tmp_path), run_name="r", job="rayapp-test", params={}) as tracker:
        tracker.log_metrics({"reward": 0.1}, 4)
        tracker.log_artifact(str(grids))
        tracker.log_text("export", "/runs/refl/pipeline")
    events = read_tensorboard(tmp_path / "tensorboard")
    assert events.Tags()["images"] == ["eval/grid_0004"]  # scores.json is not an image
    assert [(image.step, image.width, image.height) for image in events.Images("eval/grid_0004")] == [(4, 16, 10)]
    (text,) = events.Tensors("export/text_summary")
    assert text.step == 4 and text.tensor_proto.string_val == [b"/runs/refl/pipeline"]


def test_mlflow_params_metrics_artifacts_resume_and_failure(mlflow_server, tmp_path):
    client = mlflow_server.client()
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_EXPERIMENT_NAME": "rayapp-tracking-test"}
    curves = tmp_path / "curves"
    curves.mkdir()
    png(curves / "loss.png")
    (curves / "history.json").write_text("[]")
    tracker = RunTracker("mlflow", run_dir=str(tmp_path), run_name="rm-unit", job="rayapp-rm", params=CONFIG,
                         env=env)
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server.url  # the driver's settings apply while it runs
    for step in range(5):
        tracker.log_metrics({"train_loss": 1.0 - step / 10, "val/accuracy": np.float64(step / 4),
                             "skipped": None, "status": "ok"}, step)
    tracker.log_artifact(str(curves / "loss.png"))
    tracker.log_artifact(str(curves))
    tracker.log_text("export", "/runs/rm/model")
    state = tracker.state()
    tracker.close(failed=True)
    assert "MLFLOW_TRACKING_URI" not in os.environ

    run_id = state["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.info.run_name == "rm-unit"
    assert client.get_experiment(run.info.experiment_id).name == "rayapp-tracking-test"
    assert run.data.params == flatten_params(CONFIG)
    assert run.data.tags["export"] == "/runs/rm/model"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")] == \
        [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6)]
    assert [m.value for m in client.get_metric_history(run_id, "val/accuracy")] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert set(run.data.metrics) == {"train_loss", "val/accuracy"}
    assert sorted(f.path for f in client.list_artifacts(run_id)) == ["curves", "export.txt", "loss.png"]
    assert sorted(f.path for f in client.list_artifacts(run_id, "curves")) == ["curves/history.json",
                                                                               "curves/loss.png"]

    # the restarted worker group continues the same run; a changed param keeps its first value
    with RunTracker("mlflow", run_dir=str(tmp_path), run_name="rm-unit", job="rayapp-rm",
                    params={**CONFIG, "learning_rate": 1e-3, "max_steps": 9}, env=env, resume=state) as resumed:
        assert resumed.state() == state
        assert client.get_run(run_id).info.status == "RUNNING"
        resumed.log_metrics({"train_loss": 0.5}, 5)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.0003" and run.data.params["max_steps"] == "9"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [0, 1, 2, 3, 4, 5]

    # an exception inside the block ends the run as failed
    with pytest.raises(KeyError), RunTracker("mlflow", run_dir=str(tmp_path), run_name="rm-crash",
                                             job="rayapp-rm", params={}, env=env) as crashing:
        crash_id = crashing.state()["mlflow_run_id"]
        raise KeyError("boom")
    assert client.get_run(crash_id).info.status == "FAILED"


def test_mlflow_error_mid_run_is_a_warning(mlflow_server, tmp_path):
    """A run deleted on the server while training: logging warns, the run (and the other trackers) go on."""
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    with tracking_warnings() as warnings, RunTracker("mlflow,tensorboard", run_dir=str(tmp_path), run_name="deleted",
                                                     job="rayapp-rm", params={}, env=env) as tracker:
        tracker.log_metrics({"loss": 1.0}, 0)
        mlflow_server.client().delete_run(tracker.state()["mlflow_run_id"])
        for step in range(1, 12):
            tracker.log_metrics({"loss": 1.0 / step}, step)
    failures = [r.getMessage() for r in warnings if "mlflow log_metrics failed" in r.getMessage()]
    assert len(failures) == 2 and "(1 time(s)" in failures[0] and "(10 time(s)" in failures[1]
    assert len(read_scalars(tmp_path / "tensorboard")["loss"]) == 12


def test_tracker_that_cannot_start_fails_at_start(tmp_path):
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = {"MLFLOW_TRACKING_URI": unreachable, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    with pytest.raises(TrackingError, match="mlflow could not start"):
        RunTracker("tensorboard,mlflow", run_dir=str(tmp_path), run_name="r", job="rayapp-rm", params={}, env=env)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the environment is restored on the way out


def test_mlflow_default_store_is_under_the_run_dir(tmp_path, monkeypatch):
    """Without MLFLOW_TRACKING_URI: a SQLite store and its artifacts beside the run, not in the worker's cwd."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    png(tmp_path / "curve.png")
    with RunTracker("mlflow", run_dir=str(run_dir), run_name="local", job="rayapp-refl", params={"a": 1}) as t:
        t.log_metrics({"reward": 0.25}, 3)
        t.log_artifact(str(tmp_path / "curve.png"))
        run_id = t.state()["mlflow_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "rayapp-refl"
    assert run.data.metrics == {"reward": 0.25} and run.data.params == {"a": "1"}
    assert list((run_dir / "mlartifacts").rglob("curve.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "run"]  # nothing written to the cwd


def test_wandb_offline_run(tmp_path):
    run_dir = tmp_path / "run"
    grids = tmp_path / "eval"
    grids.mkdir()
    png(grids / "grid_0002.png")
    with RunTracker("wandb", run_dir=str(run_dir), run_name="refl-unit", job="rayapp-refl", params=CONFIG,
                    env={"WANDB_MODE": "offline"}) as tracker:
        for step in range(4):
            tracker.log_metrics({"reward": step / 4, "nan_ok": float("nan"), "note": "skipped"}, step)
        tracker.log_artifact(str(grids))
        tracker.log_text("export", "/runs/refl/pipeline")
        state = tracker.state()

    (offline,) = wandb_offline_runs(run_dir)
    assert offline.name.endswith(state["wandb_run_id"])
    assert list(offline.glob("run-*.wandb"))
    assert (offline / "files" / "eval" / "grid_0002.png").is_file()
    run = read_wandb_run(offline)
    assert [(row["_step"], row["reward"]) for row in run["history"] if "reward" in row] == \
        [(0, 0), (1, 0.25), (2, 0.5), (3, 0.75)]
    assert all("note" not in row for row in run["history"])
    summary = run["summary"]
    assert summary["state"] == "finished" and summary["name"] == "refl-unit" and summary["project"] == "rayapp-refl"
    assert summary["summary"]["export"] == "/runs/refl/pipeline"
    assert summary["summary"]["eval/grid_0002"]["_type"] == "image-file"
    assert summary["config"]["model"] == {"preset": "tiny", "layers": [2, 2]}  # W&B drops empty dicts
    assert summary["config"]["adam_betas"] == [0.9, 0.999]

    # a restart continues under the same run id
    with RunTracker("wandb", run_dir=str(run_dir), run_name="refl-unit", job="rayapp-refl", params=CONFIG,
                    resume=state) as resumed:
        assert resumed.state() == state
        resumed.log_metrics({"reward": 1.0}, 4)
    later = wandb_offline_runs(run_dir)[-1]
    assert later != offline and later.name.endswith(state["wandb_run_id"])
    assert [row["reward"] for row in read_wandb_run(later)["history"]] == [1.0]
