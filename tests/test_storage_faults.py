"""Storage faults cost no run: the object store of a run's checkpoints goes away mid-run and comes back.

The store is a real S3-compatible server in its own process on 127.0.0.1: moto's S3, whose buckets live in
memory, run by a small wrapper (SERVER below) that writes every object to disk when it stops and loads them when
it starts, so a stop and a start on the same port keep the bucket as a real object store would. The test stops
it by arming a fault switch: the server then exits at a chosen request of the next checkpoint upload (the
request is never answered), the test keeps it down ~30 s and starts it again.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BUCKET = "rayapp-faults"
OUTAGE_S = 30  # how long the store stays away, at least, each time
# a restore (rank 0 reading, listing or downloading checkpoints) waiting for the store
RESTORE_WAIT = re.compile(r"storage unreachable while (reading|listing|downloading) s3://\S+/checkpoint_.*retrying in")

SERVER = r'''
"""moto's S3 on 127.0.0.1:<port>; objects saved to <state>/snapshot when it stops and loaded when it starts.

Fault switch: while <state>/crash-on exists (JSON {"upload_of": suffix, "once_stored": [names]}), the first
upload request (PUT/POST) of an object in a `checkpoint_*` directory whose key ends with `upload_of` is held
until that directory also holds every name in `once_stored`; then the server saves its objects, writes the key
to <state>/crashed and exits without answering. No request finishing after that point is answered either.
"""
import json, os, signal, sys, threading, time
from pathlib import Path

from moto.core import DEFAULT_ACCOUNT_ID
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.s3.models import s3_backends
from werkzeug.serving import make_server

port, state = int(sys.argv[1]), Path(sys.argv[2])
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
frozen = threading.Lock()  # held from the moment the server starts dying: no answer leaves after that


def objects():
    while True:  # other request threads may add keys while we copy
        try:
            return {name: {key: bytes(obj.value) for key, obj in list(bucket.keys.items())}
                    for name, bucket in list(backend.buckets.items())}
        except RuntimeError:
            time.sleep(0.01)


def save_and_exit(code, crashed_key=None):
    frozen.acquire()
    snapshot, tmp = state / "snapshot", state / "snapshot.tmp"
    manifest = {}
    (tmp / "blobs").mkdir(parents=True, exist_ok=True)
    for bucket, keys in objects().items():
        manifest[bucket] = {}
        for i, (key, value) in enumerate(keys.items()):
            blob = f"{len(manifest)}-{i}"
            (tmp / "blobs" / blob).write_bytes(value)
            manifest[bucket][key] = blob
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    if snapshot.exists():
        os.rename(snapshot, state / f"snapshot.old.{time.time_ns()}")
    os.rename(tmp, snapshot)
    if crashed_key is not None:
        (state / "crashed").write_text(crashed_key)
    sys.stdout.flush()
    os._exit(code)


def load():
    manifest = state / "snapshot" / "manifest.json"
    if not manifest.exists():
        return
    for bucket, keys in json.loads(manifest.read_text()).items():
        backend.create_bucket(bucket, "us-east-1")
        for key, blob in keys.items():
            backend.put_object(bucket, key, (state / "snapshot" / "blobs" / blob).read_bytes())
    print(f"loaded {sum(map(len, json.loads(manifest.read_text()).values()))} objects", flush=True)


def stored(bucket, key):
    found = backend.buckets.get(bucket)
    return found is not None and key in found.keys


def maybe_crash(environ):
    switch = state / "crash-on"
    if environ["REQUEST_METHOD"] not in ("PUT", "POST") or not switch.exists():
        return
    bucket, _, key = environ["PATH_INFO"].lstrip("/").partition("/")
    directory, _, name = key.rpartition("/")
    if not name or "/checkpoint_" not in "/" + directory:
        return
    fault = json.loads(switch.read_text())
    if not key.endswith(fault["upload_of"]):
        return
    deadline = time.time() + 120
    while not all(stored(bucket, f"{directory}/{n}") for n in fault["once_stored"]) and time.time() < deadline:
        time.sleep(0.02)
    switch.unlink(missing_ok=True)
    print(f"fault: exiting at {environ['REQUEST_METHOD']} {bucket}/{key}", flush=True)
    save_and_exit(3, f"{bucket}/{key}")


def app(environ, start_response, inner=DomainDispatcherApplication(create_backend_app)):
    maybe_crash(environ)
    body = list(inner(environ, start_response))
    with frozen:
        pass
    return body


load()
server = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
signal.signal(signal.SIGTERM, lambda *_: save_and_exit(0))
threading.Thread(target=server.serve_forever, daemon=True).start()
print(f"listening on 127.0.0.1:{port}", flush=True)
threading.Event().wait()
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """The test's object store: start, stop (SIGTERM: objects saved) and a fault that makes it exit mid-upload."""

    def __init__(self, state: Path, port: int, env: dict | None = None):
        self.state, self.port, self.env = state, port, env or {}
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.log = state / "server.log"
        state.mkdir(parents=True, exist_ok=True)
        (state / "server.py").write_text(SERVER)

    def start(self, timeout: float = 60) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(self.state / "server.py"), str(self.port), str(self.state)],
                env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the S3 server exited with {self.process.returncode}; see {self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the S3 server did not listen on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:
            pass

    def arm(self, upload_of: str = "", once_stored: tuple[str, ...] = ()) -> None:
        """Exit at the next checkpoint upload of a key ending in `upload_of`, once its directory holds
        `once_stored`."""
        (self.state / "crashed").unlink(missing_ok=True)
        (self.state / "crash-on").write_text(json.dumps({"upload_of": upload_of, "once_stored": list(once_stored)}))

    def wait_crashed(self, timeout: float) -> str:
        """The key the server exited at (after `arm`)."""
        self.process.wait(timeout=timeout)
        assert self.process.returncode == 3, f"the S3 server exited with {self.process.returncode}; see {self.log}"
        return (self.state / "crashed").read_text()


def _filesystem(endpoint: str):
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(access_key="rayapp-test", secret_key="rayapp-test", endpoint_override=endpoint,
                                   scheme="http", region="us-east-1", allow_bucket_creation=True)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A persistent S3 server with the bucket made; this process's AWS_* variables point at it (the training
    run's storage filesystem carries them to the workers)."""
    server = S3Server(tmp_path / "s3", _free_port())
    try:
        server.start()
        _filesystem(server.endpoint).create_dir(BUCKET)
        for name, value in {"AWS_ACCESS_KEY_ID": "rayapp-test", "AWS_SECRET_ACCESS_KEY": "rayapp-test",
                            "AWS_ENDPOINT_URL": server.endpoint, "AWS_REGION": "us-east-1",
                            "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        yield server
    finally:
        server.stop()


def _write_complete_checkpoint(filesystem, path: str, step: int) -> None:
    filesystem.create_dir(path)
    for name, text in (("trainer_state.json", json.dumps({"step": step, "world_size": 2})),
                       ("rank_done.0", "ok"), ("rank_done.1", "ok")):
        with filesystem.open_output_stream(f"{path}/{name}") as stream:
            stream.write(text.encode())


def test_storage_calls_wait_out_a_restart_and_refusals_fail_at_once(store, tmp_path, caplog):
    """Checkpoint reads and writes through the run's storage retry while the store is down and find it as it was
    after a restart; a missing bucket, wrong credentials and an outage longer than the budget fail with errors
    that say which."""
    import pyarrow.fs

    from rayapp.runtime import checkpoints
    from rayapp.runtime.storage_retry import StorageUnreachable, patient_filesystem, with_storage_retries

    filesystem = _filesystem(store.endpoint)
    path = f"{BUCKET}/unit/checkpoint_a"
    _write_complete_checkpoint(filesystem, path, step=7)

    store.stop()
    caplog.set_level(logging.WARNING, logger="rayapp.runtime.storage_retry")
    started = time.time()
    # The budget is time since the first failure, so the number of attempts depends on how long each one takes
    # (the AWS SDK retries inside an attempt, slower on a loaded machine): at least two, at most three.
    with pytest.raises(StorageUnreachable, match=r"storage unreachable while reading s3://rayapp-faults/unit/"
                                                 r"checkpoint_a: gave up after [23] attempts over [0-9]+ s"):
        checkpoints.read_checkpoint_state(filesystem, path, retry_seconds=3)
    assert time.time() - started < 30
    assert "retrying in 1s (attempt 1/3)" in caplog.text

    # down for ~4 s more, then back on the same port with its objects: the read waits and finds the checkpoint
    restart = threading.Timer(4, store.start)
    restart.start()
    try:
        assert checkpoints.read_checkpoint_state(filesystem, path, retry_seconds=60) == {"step": 7, "world_size": 2}
    finally:
        restart.join()

    # a write through the run's storage (as Ray Train's controller writes its checkpoint list) waits as well
    patient = patient_filesystem(filesystem, retry_seconds=60)
    store.stop()
    restart = threading.Timer(4, store.start)
    restart.start()
    try:
        with patient.open_output_stream(f"{BUCKET}/unit/snapshot.json") as stream:
            stream.write(b'{"checkpoints": []}')
    finally:
        restart.join()
    with filesystem.open_input_stream(f"{BUCKET}/unit/snapshot.json") as stream:
        assert stream.read() == b'{"checkpoints": []}'
    assert "storage unreachable while writing s3://rayapp-faults/unit/snapshot.json" in caplog.text

    caplog.clear()
    started = time.time()
    with pytest.raises(OSError, match="NO_SUCH_BUCKET"):
        with_storage_retries("listing", lambda: filesystem.get_file_info(pyarrow.fs.FileSelector("no-such-bucket/x")),
                             retry_seconds=60)
    with pytest.raises(OSError, match="NO_SUCH_BUCKET"):
        patient.get_file_info(pyarrow.fs.FileSelector("no-such-bucket/x"))
    assert time.time() - started < 10 and "retrying" not in caplog.text

    # a store that checks signatures (moto with authentication on) refuses our key: no retry either
    strict = S3Server(tmp_path / "s3-auth", _free_port(), env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        strict.start()
        started = time.time()
        with pytest.raises(OSError, match="ACCESS_DENIED"):
            checkpoints.read_checkpoint_state(_filesystem(strict.endpoint), f"{BUCKET}/x", retry_seconds=60)
        assert time.time() - started < 10 and "retrying" not in caplog.text, caplog.text
    finally:
        strict.stop()


@pytest.mark.slow
def test_store_outages_mid_run_cost_no_update(ray_cluster, store, tmp_path):
    """RM training with checkpoints on s3://. Outage 1: the store exits during a checkpoint upload and is back
    30 s later; the upload waits for it and the run goes on without a restart. Outage 2: the store exits just
    before rank 1's completion marker of a checkpoint lands (so that checkpoint has rank 0's state and marker,
    not rank 1's), rank 1's process is killed while the store is away, the new worker group waits for the
    store, skips the cut-off checkpoint and resumes from the newest complete one. Every planned update is in
    the final weights' history exactly once."""
    from faults import PauseForTest, StepLog, WorkerPids

    from rayapp.data import storage
    from rayapp.data.synth import write_synthetic_set
    from rayapp.rm import RMTrainConfig, train_reward_model

    data = tmp_path / "data"
    write_synthetic_set(data, prompts=60, per_prompt=4, seed=3, val_fraction=0.25, test_fraction=0.0,
                        progress=False)
    total, every = 12, 2
    first_pause, second_pause = 2, 6  # 0-based updates after which the test arms a fault (checkpoints follow)
    run_name = f"rm-outage-{os.getpid()}-{int(time.time())}"
    storage_path = f"s3://{BUCKET}/runs"
    config = RMTrainConfig.from_preset(
        "offline", data_dir=str(data), output_dir=str(tmp_path / "out"), storage_path=storage_path,
        run_name=run_name, max_steps=total, num_workers=2, checkpoint_every=every, train_batch_size=8,
        eval_every=100, log_every=every, warmup_steps=0, max_failures=2, tracking="none")
    signals, pids = tmp_path / "signals", tmp_path / "pids"
    signals.mkdir()
    pids.mkdir()
    step_log = StepLog(tmp_path / "steps.log")
    events: dict = {}
    errors: list[BaseException] = []

    run_over = threading.Event()

    def wait_for(path: Path, timeout: float) -> None:
        deadline = time.time() + timeout
        while not path.exists():
            if time.time() > deadline or run_over.is_set():
                raise TimeoutError(f"the run never reached {path.name}")
            time.sleep(0.05)

    def outages() -> None:
        try:
            wait_for(signals / "first", 300)
            store.arm()  # the next upload into a checkpoint dir
            (signals / "first.go").touch()
            events["first_cut"] = store.wait_crashed(120)
            down = time.time()
            time.sleep(max(0.0, down + OUTAGE_S - time.time()))
            store.start()
            events["first_down_s"] = time.time() - down

            wait_for(signals / "second", 300)
            store.arm(upload_of="/rank_done.1", once_stored=("trainer_state.json", "rank_done.0"))
            (signals / "second.go").touch()
            events["second_cut"] = store.wait_crashed(120)
            down = time.time()
            os.kill(int((pids / "rank1.pid").read_text()), signal.SIGKILL)  # a node lost while the store is away
            # Stay away until the new worker group's restore is seen waiting for the store (a restart that
            # failed at once instead would show up as more restarts, or as a failed run).
            deadline = down + 180
            while time.time() < deadline:
                if any(RESTORE_WAIT.search(line) for line in _worker_log_lines(ray_cluster, run_name, since=down)):
                    events["restore_waited_after_s"] = time.time() - down
                    break
                time.sleep(1)
            time.sleep(max(0.0, down + OUTAGE_S - time.time()))
            store.start()
            events["second_down_s"] = time.time() - down
        except BaseException as err:  # noqa: BLE001 - re-raised by the test
            errors.append(err)
            (signals / "first.go").touch()
            (signals / "second.go").touch()

    faults = threading.Thread(target=outages, daemon=True)
    faults.start()
    started = time.time()
    try:
        result = train_reward_model(config, callbacks=[
            PauseForTest(first_pause, signals / "first"), PauseForTest(second_pause, signals / "second"),
            WorkerPids(pids), step_log])
    finally:
        run_over.set()
        faults.join(timeout=OUTAGE_S + 150)
    wall = time.time() - started
    assert not errors, errors
    assert events["first_down_s"] >= OUTAGE_S and events["second_down_s"] >= OUTAGE_S, events
    assert "restore_waited_after_s" in events, events  # the new group's restore waited while the store was away

    state = json.loads(storage.read_bytes(f"s3://{result.checkpoint_path}/trainer_state.json"))
    assert state["completed_updates"] == list(range(total)), state["completed_updates"]
    assert state["step"] == total and state["restarts"] == 1, (state["step"], state["restarts"])

    # Outage 1 cost nothing: the first worker group ran straight through it, up to the second cut.
    runs = step_log.attempts()
    assert len(runs) == 2, runs
    second_checkpoint_step = second_pause + 2  # the checkpoint whose upload outage 2 cut off
    assert runs[0] == list(range(runs[0][-1] + 1)) and runs[0][-1] >= second_checkpoint_step - 1, runs
    # Outage 2: the cut-off checkpoint (state and rank 0's marker there, rank 1's not) was skipped; the run
    # resumed from the complete one before it and redid the updates after it once.
    cut_dir = events["second_cut"].rsplit("/", 1)[0]
    cut_state = json.loads(storage.read_bytes(f"s3://{cut_dir}/trainer_state.json"))
    assert cut_state["step"] == second_checkpoint_step, cut_state["step"]
    _, cut_files = storage.list_files(f"s3://{cut_dir}", suffixes=None)
    names = {name.rsplit("/", 1)[1] for name in cut_files}
    assert "rank_done.0" in names and "rank_done.1" not in names, names
    assert runs[1] == list(range(second_checkpoint_step - every, total)), runs

    logs = _worker_log_lines(ray_cluster, run_name)
    assert any(f"skipping incomplete checkpoint s3://{cut_dir}" in line for line in logs), logs[-40:]
    assert any("storage unreachable while uploading" in line for line in logs), logs[-40:]
    assert any(RESTORE_WAIT.search(line) for line in logs), logs[-40:]  # the restarted group's restore waited
    print(f"outage run: {wall:.0f} s, events {events}")


def _worker_log_lines(cluster, run_name: str, since: float = 0.0) -> list[str]:
    """This run's lines from the Ray session's worker logs (every log line of ours names the run's storage),
    from the files written to since `since` (a time.time())."""
    lines = []
    for path in (Path(cluster.temp_dir) / "session_latest" / "logs").glob("worker-*"):
        try:
            if path.stat().st_mtime < since:
                continue
            text = path.read_text(errors="replace")
        except OSError:
            continue
        lines += [line for line in text.splitlines() if run_name in line]
    return lines
