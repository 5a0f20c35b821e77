"""Object storage: a real S3-compatible server (moto, its own process on 127.0.0.1, started and stopped here).

Convert a local folder to s3://, train a few RM updates reading the shards from s3:// with checkpoints to an
s3:// storage path and resume from it, batch-score from and to s3:// (resume included), and the errors for
wrong credentials and a missing bucket.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = "rayapp-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    """Until the server accepts TCP connections (an HTTP probe would spend one of its unauthenticated actions)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not listen on 127.0.0.1:{port} within {timeout} s")


@pytest.fixture(scope="module")
def s3_server(ray_cluster, tmp_path_factory):
    """moto in server mode with authentication on: the first 3 actions (unauthenticated) create an IAM user, its
    allow-all policy and its access key; every later request must be signed with that key. The AWS_* variables
    of this process point at it for the module, then are restored. The Ray cluster is started first, so its
    workers never see them: what reaches S3 from a worker carries the driver's credentials itself."""
    import boto3
    import pyarrow.fs as pafs

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - closed at teardown
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                            "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_EC2_METADATA_DISABLED")}
    try:
        _wait_for_port(port, process)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="rayapp")
        iam.put_user_policy(UserName="rayapp", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="rayapp")["AccessKey"]
        creds = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                 "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.update(creds)
        pafs.S3FileSystem(access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"], endpoint_override=endpoint,
                          scheme="http", region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
        yield {"endpoint": endpoint, "env": creds}
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def local_source(tmp_path_factory) -> Path:
    """A local folder to convert: per split a GitHub-style JSON list with the images as files, plus the
    synthetic set's tokenizer (tiny, 64 px images)."""
    from rayapp.data.shards import iter_comparisons
    from rayapp.data.synth import write_synthetic_set

    root = tmp_path_factory.mktemp("s3src")
    synth = root / "synth"
    write_synthetic_set(synth, prompts=60, per_prompt=4, seed=3, val_fraction=0.25, test_fraction=0.0,
                        progress=False)
    for split in ("train", "val"):
        records = []
        for record in iter_comparisons(synth / split):
            names = []
            for k, image in enumerate(record["images"]):
                name = f"{split}/{record['id']}_{k}.png"
                (root / "images" / split).mkdir(parents=True, exist_ok=True)
                (root / "images" / name).write_bytes(image)
                names.append(name)
            records.append({"id": record["id"], "prompt": record["prompt"], "generations": names,
                            "ranking": record["ranking"]})
        (root / f"{split}.json").write_text(json.dumps(records))
    return root


def test_storage_listing_and_errors_name_the_uri(s3_server, tmp_path):
    """One listing for paths and URIs; wrong credentials and a missing bucket say so and name the URI."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayapp.data import storage
    from rayapp.data.shards import parquet_files

    local = tmp_path / "shards"
    (local / "sub").mkdir(parents=True)
    for name in ("b.parquet", "a.parquet", "sub/c.parquet", "_SUCCESS", ".hidden.parquet"):
        pq.write_table(pa.table({"x": [1]}), local / name) if name.endswith(".parquet") else (local / name).touch()
    assert parquet_files(local) == [str(local / n) for n in ("a.parquet", "b.parquet", "sub/c.parquet")]
    uri = f"s3://{BUCKET}/listing"
    storage.upload_dir(local, uri)
    assert parquet_files(uri) == [f"{uri}/{n}" for n in ("a.parquet", "b.parquet", "sub/c.parquet")]
    assert parquet_files(f"{uri}/b.parquet") == [f"{uri}/b.parquet"]
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/nothing-here"):
        parquet_files(f"s3://{BUCKET}/nothing-here")

    missing = f"s3://no-such-bucket-{os.getpid()}/data"
    with pytest.raises(storage.StorageError, match=rf"{missing}: the bucket .* does not exist"):
        storage.ensure_writable_dir(missing)
    with pytest.raises(storage.StorageError, match=rf"{missing}: the bucket"):
        parquet_files(missing)
    good = os.environ["AWS_SECRET_ACCESS_KEY"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong-secret"
    try:
        with pytest.raises(storage.StorageError, match=rf"{uri}: access denied - check the credentials"):
            parquet_files(uri)
    finally:
        os.environ["AWS_SECRET_ACCESS_KEY"] = good


def test_imagerewarddb_zips_read_in_place_from_s3(s3_server, tmp_path, capsys):
    """The hub layout on s3:// (zips read by range requests, nothing extracted) converted to s3://."""
    import io
    import zipfile

    from PIL import Image

    from rayapp.cli import main
    from rayapp.data import storage
    from rayapp.data.shards import iter_comparisons

    def webp(colour) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(buf, format="WEBP", lossless=True)
        return buf.getvalue()

    records, images = [], {}
    for pid, prompt, ranks in (("p1", "a cat", [2, 1]), ("p2", "a dog", [1, 3, 2])):
        for k, rank in enumerate(ranks):
            path = f"images/test/test_1/{pid}-{k}.webp"
            images[path] = webp((40 * k + 20, 100, 200 - 50 * k))
            records.append({"image_path": path, "prompt_id": pid, "prompt": prompt, "classification": "Animals",
                            "image_amount_in_total": len(ranks), "rank": rank, "overall_rating": 3 + rank,
                            "image_text_alignment_rating": 4, "fidelity_rating": 5})
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("test_1.json", json.dumps(records))
        for path, data in images.items():
            zf.writestr(path.rsplit("/", 1)[1], data)
    root = f"s3://{BUCKET}/ImageRewardDB"
    storage.write_bytes(f"{root}/images/test/test_1.zip", archive.getvalue())
    out = f"s3://{BUCKET}/irdb-shards"
    assert main(["data", "convert", root, "--split", "test", "--out", out]) == 0
    assert "as imagerewarddb" in capsys.readouterr().err
    rows = {r["id"]: r for r in iter_comparisons(f"{out}/test")}
    assert rows["p2"]["ranking"] == [1, 3, 2] and rows["p2"]["overall_rating"] == [4, 6, 5]
    assert rows["p1"]["images"] == [images["images/test/test_1/p1-0.webp"], images["images/test/test_1/p1-1.webp"]]


def test_convert_to_s3_train_resume_and_score(ray_cluster, s3_server, local_source, tmp_path, capsys):
    import rayapp
    from rayapp.cli import main
    from rayapp.data import storage
    from rayapp.data.pairs import pair_stats
    from rayapp.data.shards import iter_comparisons

    data = f"s3://{BUCKET}/data"
    # ---- convert: a local folder -> s3://
    for split in ("train", "val"):
        assert main(["data", "convert", str(local_source / f"{split}.json"), "--image-root",
                     str(local_source / "images"), "--out", f"{data}/{split}", "--rows-per-shard", "8"]) == 0
    storage.upload_dir(local_source / "synth" / "tokenizer", f"{data}/tokenizer")
    printed = capsys.readouterr().out
    assert f"to {data}/train" in printed and f"to {data}/val" in printed
    local_stats = pair_stats(local_source / "synth" / "train")
    remote_stats = pair_stats(f"{data}/train")
    assert remote_stats["prompts"] == local_stats["prompts"] == 45 and remote_stats["pairs"] == local_stats["pairs"]
    assert [r["images"] for r in iter_comparisons(f"{data}/val")] == \
        [r["images"] for r in iter_comparisons(local_source / "synth" / "val")]
    # a second conversion into the same prefix refuses, naming it
    assert main(["data", "convert", str(local_source / "val.json"), "--image-root", str(local_source / "images"),
                 "--out", f"{data}/val"]) == 2
    assert f"{data}/val is not empty" in capsys.readouterr().err

    # ---- the pair pipeline straight from s3:// (shards and tokenizer; the workers have no credentials of their own)
    from rayapp.data.pipeline import build_pair_dataset

    ds = build_pair_dataset(f"{data}/val", image_size=32, tokenizer_dir=f"{data}/tokenizer", max_length=12,
                            with_ids=True)
    got = [str(p) for batch in ds.iter_batches(batch_size=64, batch_format="numpy") for p in batch["pair_id"]]
    assert len(got) == len(set(got)) == pair_stats(local_source / "synth" / "val")["pairs"]

    # ---- train a few updates from s3:// with checkpoints in s3://, then resume from the checkpoint
    ckpt = f"s3://{BUCKET}/checkpoints"
    # the tokenizer is passed as a local dir: rayapp.rm's own copy of <data_dir>/tokenizer from a URI writes into
    # a directory it has not created yet (reported to the lead)
    tokenizer = storage.local_dir(f"{data}/tokenizer")
    first = _train(ray_cluster, s3_server, data, ckpt, tmp_path / "run1", max_steps=2, run_name="rm-s3-a",
                   tokenizer=tokenizer)
    assert first["metrics"]["step"] == 2 and f"{BUCKET}/checkpoints/rm-s3-a/" in first["checkpoint"], first
    # resume from the step-1 checkpoint (the step-2 one is the finished run's): the second run goes on from there
    states = {json.loads(storage.read_bytes(f"s3://{path}"))["step"]: f"s3://{path.rsplit('/', 1)[0]}"
              for path in storage.list_files(f"{ckpt}/rm-s3-a", suffixes=("trainer_state.json",))[1]}
    assert 1 in states and 2 in states, states  # checkpoint_every=1: every update's checkpoint is in the bucket
    second = _train(ray_cluster, s3_server, data, ckpt, tmp_path / "run2", max_steps=3, run_name="rm-s3-b",
                    resume_from=states[1], tokenizer=tokenizer)
    # The run's history goes on from the step-1 checkpoint's: update 1 reported once (by the first run), 2 and 3
    # by this one after its resume.
    assert [(h["step"], h["restarts"]) for h in second["reports"]] == [(1, 0), (2, 1), (3, 1)], second["reports"]
    assert second["metrics"]["step"] == 3
    model = rayapp.load(tmp_path / "run2" / "model", device="cpu")

    # ---- batch scoring from and to s3://, workers writing the parts; resume finds everything done
    scores = f"s3://{BUCKET}/scores"
    job = [sys.executable, str(REPO / "jobs" / "score_dataset.py"), "--input", f"{data}/val", "--output", scores,
           "--scorer", str(tmp_path / "run2" / "model"), "--rows-per-block", "4", "--num-cpus", "0.5",
           "--no-progress", "--drop-images"]
    from rayapp.eval import score_dataset  # the entry point jobs/score_dataset.py runs

    assert score_dataset.main(job[2:]) == 0
    from rayapp.eval.batch_scoring import output_parts, read_scored

    parts = output_parts(scores)
    assert len(parts) >= 2 and all(p.startswith(f"{scores}/part-") for p in parts)  # one part per write task
    table = read_scored(scores)
    records = list(iter_comparisons(f"{data}/val"))
    assert sorted(table["_row_key"].to_pylist()) == sorted(f"part-{i:05d}.parquet:{k}" for i, n in
                                                          _rows_per_file(f"{data}/val") for k in range(n))
    scored = dict(zip(table["id"].to_pylist(), table["score_ImageReward"].to_pylist()))
    for record in records[:3]:
        assert scored[record["id"]] == pytest.approx(model.score(record["prompt"], record["images"]), abs=1e-5)
    capsys.readouterr()
    assert score_dataset.main(job[2:] + ["--resume"]) == 0
    assert f"nothing to score: {len(records)} rows already in {scores}" in capsys.readouterr().out
    # wrong credentials and a missing bucket: exit 2, the URI named
    good = os.environ["AWS_SECRET_ACCESS_KEY"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong-secret"
    try:
        assert score_dataset.main(job[2:] + ["--resume"]) == 2
        assert "access denied" in capsys.readouterr().err
    finally:
        os.environ["AWS_SECRET_ACCESS_KEY"] = good
    bad_out = f"s3://missing-bucket-{os.getpid()}/scores"
    assert score_dataset.main(job[2:4] + ["--output", bad_out] + job[6:]) == 2
    assert f"{bad_out}: the bucket" in capsys.readouterr().err


def test_score_hf_image_dicts_from_s3(ray_cluster, s3_server, tiny_rm_dir, tmp_path):
    """A `datasets`-style table (image column = {"bytes", "path"} structs) on s3://, one dict without bytes whose
    path is relative to the table's prefix: scored like the library scores the same images."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from rayapp.data import storage
    from rayapp.eval.batch_scoring import ScoreJobConfig, read_scored, run_score_job
    from rayapp.eval.scorers import load_scorer

    def png(colour) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), colour).save(buf, format="PNG")
        return buf.getvalue()

    images = [png((200, 30, 30)), png((30, 30, 200)), png((30, 200, 30))]
    table = pa.table({
        "prompt": ["a red circle", "a blue square", "a green circle"],
        "image": pa.array([{"bytes": images[0], "path": "r.png"}, {"bytes": None, "path": "files/b.png"},
                           {"bytes": images[2], "path": None}],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    })
    src = f"s3://{BUCKET}/hf-table"
    storage.write_bytes(f"{src}/files/b.png", images[1])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(f"{src}/train-00000-of-00001.parquet", buf.getvalue())
    out = f"s3://{BUCKET}/hf-scores"
    result = run_score_job(ScoreJobConfig(input=src, output=out, scorers=[str(tiny_rm_dir)], rows_per_block=2,
                                          num_cpus=0.5, progress=False))
    assert result.rows_written == 3 and result.errors == 0 and all(f.startswith(out) for f in result.files)
    got = {r["prompt"]: r["score_ImageReward"] for r in read_scored(out).to_pylist()}
    expected = load_scorer(str(tiny_rm_dir), device="cpu").score_pairs(list(table["prompt"].to_pylist()), images)
    assert [got[p] for p in table["prompt"].to_pylist()] == pytest.approx(expected, abs=1e-5)
    assert not any(math.isnan(v) for v in got.values())


def _rows_per_file(path: str) -> list[tuple[int, int]]:
    from rayapp.data.storage import open_parquet, parquet_files

    return [(i, open_parquet(f).metadata.num_rows) for i, f in enumerate(parquet_files(path))]


TRAIN_SCRIPT = """
import json, os, sys
import ray
# Ray Train's checkpoint uploads run in the workers: they get the credentials through the job's runtime_env,
# as a cluster job would (the data pipeline carries its own filesystem object).
aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
ray.init(address=os.environ["RAY_ADDRESS"], runtime_env={"env_vars": aws}, log_to_driver=False)
from rayapp.rm import RMTrainConfig, train_reward_model
result = train_reward_model(RMTrainConfig.from_preset("offline", **json.loads(sys.argv[1])))
print("RESULT " + json.dumps({"metrics": result.metrics, "reports": result.reports,
                              "checkpoint": result.checkpoint_path}, default=str))
"""


def _train(cluster, server, data: str, storage_path: str, out: Path, *, max_steps: int, run_name: str,
           tokenizer: str, resume_from: str | None = None) -> dict:
    """A few tiny RM updates in a driver of its own (so its workers get the credentials), reading s3:// shards."""
    overrides = {"data_dir": data, "output_dir": str(out), "storage_path": storage_path, "run_name": run_name,
                 "max_steps": max_steps, "num_workers": 1, "checkpoint_every": 1, "train_batch_size": 8,
                 "eval_every": 2, "log_every": 1, "warmup_steps": 0, "tokenizer": tokenizer, "num_to_keep": None}
    if resume_from:
        overrides["resume_from"] = resume_from
    env = {**cluster.env, **server["env"], "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, json.dumps(overrides)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    line = [text for text in done.stdout.splitlines() if text.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# ------------------------------------------------------------------------------------------- URI rules and cache
@pytest.mark.parametrize("text, scheme, remote", [
    ("s3://bucket/key", "s3", True),
    ("S3://bucket", "s3", True),
    ("s3a://bucket/x", "s3a", True),
    ("gs://b/x", "gs", True),
    ("abfs://container@account/p", "abfs", True),
    ("hf://owner/repo/sub", "hf", True),
    ("https://host/ImageReward.pt", "https", True),
    ("http://127.0.0.1:8000/x", "http", True),
    ("s3://b/x?endpoint_override=127.0.0.1:9000", "s3", True),
    ("file:///tmp/x", "file", False),
    ("runs/rm/model", "", False),
    ("/abs/path", "", False),
    ("C://Users/x", "", False),  # a Windows drive, not a scheme
    ("c:\\data", "", False),
    ("ImageReward-v1.0", "", False),
    ("CLIP:tiny", "", False),
    ("dir/with://inside", "", False),
    ("3d://x", "", False),
    ("s3:/one-slash", "", False),
    ("://x", "", False),
    ("", "", False),
])
def test_is_uri_table(text, scheme, remote):
    from rayapp.data import storage

    assert storage.scheme(text) == scheme
    assert storage.is_uri(text) == bool(scheme)
    assert storage.is_remote(text) == remote


def test_http_names_one_file_not_a_directory():
    from rayapp.data import storage

    for call in (storage.resolve, storage.list_files, storage.ensure_writable_dir):
        with pytest.raises(storage.StorageError, match=r"https:// URL names one file .* object store URI"):
            call("https://example.invalid/shards")


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    from rayapp.data import storage

    monkeypatch.delenv("RAYAPP_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.cache_root() == tmp_path / "home" / ".cache" / "rayapp"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert storage.cache_root() == tmp_path / "xdg" / "rayapp"
    monkeypatch.setenv("RAYAPP_CACHE", str(tmp_path / "mine"))
    assert storage.cache_root() == tmp_path / "mine"


class _Files:
    """What the test HTTP server serves, how (whole, slowly, cut off) and how often it was asked."""

    def __init__(self):
        import threading

        self.body = b""
        self.mode = "whole"
        self.gets = 0
        self.lock = threading.Lock()


@pytest.fixture
def http_files():
    """A real HTTP server on 127.0.0.1 serving `/w/model.bin` (stopped when the test ends)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    files = _Files()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- http.server's name
            with files.lock:
                files.gets += 1
            body = files.body
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            half = len(body) // 2
            self.wfile.write(body[:half])
            self.wfile.flush()
            if files.mode == "cut":
                return  # the connection closes with half the promised bytes sent
            if files.mode == "slow":
                time.sleep(1.0)  # both clients are mid-download together
            self.wfile.write(body[half:])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    files.url = f"http://127.0.0.1:{server.server_address[1]}/w/model.bin"
    try:
        yield files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "uri").iterdir()) if (cache / "uri").is_dir() else []


def test_cache_never_uses_a_half_written_copy(http_files, tmp_path, monkeypatch):
    from rayapp.data import storage

    cache = tmp_path / "cache"
    monkeypatch.setenv("RAYAPP_CACHE", str(cache))
    http_files.body = os.urandom(4096)
    # a download cut off half-way is an error and leaves nothing in the cache
    http_files.mode = "cut"
    with pytest.raises(OSError, match="stopped after 2048 of 4096 bytes"):
        storage.local_path(http_files.url)
    assert _entries(cache) == []
    # an entry without its marker (a copy made before the rename existed, or by hand) is redone, not used
    http_files.mode = "whole"
    key = storage._key(http_files.url)
    (cache / "uri" / key).mkdir(parents=True)
    (cache / "uri" / key / "model.bin").write_bytes(b"half")
    (cache / "uri" / f".{key}.partial-killed").mkdir()  # the staging dir of a fetch whose process died
    local = Path(storage.local_path(http_files.url))
    assert local == cache / "uri" / key / "model.bin" and local.read_bytes() == http_files.body
    assert (local.parent / storage.COMPLETE_MARKER).read_text() == http_files.url
    assert http_files.gets == 2 and _entries(cache) == [key]
    # a complete entry is used as it is
    http_files.body = b"changed on the server"
    assert Path(storage.local_path(http_files.url)).read_bytes() != http_files.body and http_files.gets == 2


FETCH_SCRIPT = """
import sys
from rayapp.data import storage
print("PATH " + storage.local_path(sys.argv[1]))
"""


def test_two_processes_fetching_one_uri_share_one_complete_entry(http_files, tmp_path):
    from rayapp.data import storage

    cache = tmp_path / "cache"
    http_files.body = os.urandom(1 << 20)
    http_files.mode = "slow"
    env = {**os.environ, "RAYAPP_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", FETCH_SCRIPT, http_files.url], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs), outputs
    paths = {line[len("PATH "):] for out, _ in outputs for line in out.splitlines() if line.startswith("PATH ")}
    assert len(paths) == 1
    (path,) = paths
    assert Path(path).read_bytes() == http_files.body
    # one download (the second process waited for the first), one entry, no partial copies left over
    assert http_files.gets == 1
    assert _entries(cache) == [storage._key(http_files.url)]
    assert (Path(path).parent / storage.COMPLETE_MARKER).is_file()


def test_a_directory_uri_is_copied_once_and_file_uris_stay_in_place(tmp_path, monkeypatch):
    import fsspec

    from rayapp.data import storage

    monkeypatch.setenv("RAYAPP_CACHE", str(tmp_path / "cache"))
    memory = fsspec.filesystem("memory")  # fsspec's in-process filesystem: any scheme without pyarrow support
    root = f"/{tmp_path.name}"
    memory.pipe(f"{root}/tok/vocab.txt", b"a b c")
    memory.pipe(f"{root}/tok/sub/config.json", b"{}")
    try:
        uri = f"memory://{tmp_path.name}/tok"
        local = Path(storage.local_dir(uri))
        assert local.name == "tok" and (local / "vocab.txt").read_bytes() == b"a b c"
        assert (local / "sub" / "config.json").read_bytes() == b"{}"
        memory.pipe(f"{root}/tok/vocab.txt", b"new")
        assert (Path(storage.local_dir(uri)) / "vocab.txt").read_bytes() == b"a b c"  # the cached copy
        (local.parent / storage.COMPLETE_MARKER).unlink()  # as if cut off before the marker
        assert (Path(storage.local_dir(uri)) / "vocab.txt").read_bytes() == b"new"
        with pytest.raises(NotADirectoryError):
            storage.local_dir(f"{uri}/vocab.txt")
        with pytest.raises(FileNotFoundError, match="does not exist"):
            storage.local_path(f"{uri}/missing")
    finally:
        memory.rm(root, recursive=True)
    assert storage.local_path(f"file://{tmp_path}") == str(tmp_path)
    assert storage.local_path("relative/x") == os.path.abspath("relative/x")
