"""The package as pip users get it: the wheel built from this repository, installed into a fresh virtualenv where the
checkout is not importable, runs every job from an empty directory (a few RM updates, a few ReFL updates, a tiny
model served and scored over HTTP). Also: the wheel holds every data file, `[serve]` pulls no training stack, and
the shipped serve configs are the repository's serve_configs/.

The fresh virtualenv gets rayapp only from the wheel; the other packages come from the test's own environment
through a .pth line naming its site-packages (a plain path line: the editable install's finder there is never
loaded). Each command starts its own local Ray under a private RAY_TMPDIR, so it cannot join another Ray on the
machine; whatever a command leaves running is stopped by its process group and that temp dir.
"""
from __future__ import annotations

import email
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE")
TRAINING_STACK = ("deepspeed", "diffusers", "peft")


def test_shipped_serve_configs_are_the_repository_ones():
    """rayapp/serve/configs (package data) and serve_configs/ (for `serve run serve_configs/...`) hold the same
    files; after editing one: python deploy/sync_serve_config.py"""
    shipped = {p.name: p.read_text() for p in (REPO_ROOT / "rayapp" / "serve" / "configs").glob("*.yaml")}
    top = {p.name: p.read_text() for p in (REPO_ROOT / "serve_configs").glob("*.yaml")}
    assert shipped.keys() == top.keys() and "rm_cpu_local.yaml" in shipped
    differing = sorted(name for name in shipped if shipped[name] != top[name])
    assert not differing, f"{differing} differ: run python deploy/sync_serve_config.py"


def run_checked(*args, timeout: float) -> str:
    """Run a setup step; a failure shows its output."""
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} -> {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def build_wheel(out: Path) -> Path:
    """`pip wheel` of a copy of the package sources (the build writes build/ and *.egg-info beside them)."""
    source = out / "src"
    shutil.copytree(REPO_ROOT / "rayapp", source / "rayapp", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in PACKAGE_FILES:
        shutil.copy2(REPO_ROOT / name, source / name)
    run_checked(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                "--disable-pip-version-check", "-w", out / "dist", source, timeout=300)
    (wheel,) = (out / "dist").glob("rayapp-*.whl")
    return wheel


def make_venv(root: Path, wheel: Path) -> Path:
    """A virtualenv with the wheel installed and this environment's packages (not its rayapp) importable."""
    venv = root / "venv"
    run_checked(sys.executable, "-m", "venv", "--without-pip", venv, timeout=120)
    python = venv / "bin" / "python"
    site = run_checked(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", timeout=60).strip()
    (Path(site) / "_rayapp_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run_checked(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q",
                "--disable-pip-version-check", wheel, timeout=300)
    return venv


def kill_leftovers(marker: str) -> None:
    """SIGKILL every process whose command line names `marker` (the private Ray temp dir of this test)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            if marker in cmdline:
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def stop_group(process: subprocess.Popen, first: int = signal.SIGINT, grace: float = 60) -> None:
    """Stop a command's process group: `first` (Ctrl-C), then SIGKILL after `grace` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, first)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


class Installed:
    """Commands run with the installed wheel, from an empty working directory."""

    def __init__(self, venv: Path, workdir: Path, ray_tmp: str):
        self.venv, self.workdir = venv, workdir
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
        self.env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", RAY_TMPDIR=ray_tmp,
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_AUTH_MODE="disabled",
                        RAY_USAGE_STATS_ENABLED="0")

    def start(self, *args: str, log: Path) -> subprocess.Popen:
        return subprocess.Popen([str(a) for a in args], cwd=self.workdir, env=self.env, start_new_session=True,
                                stdout=log.open("w"), stderr=subprocess.STDOUT)

    def run(self, *args: str, timeout: float) -> str:
        """Run to completion; a failure shows the command's output tail."""
        log = self.workdir.parent / f"log-{time.monotonic_ns()}.txt"
        process = self.start(*args, log=log)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop_group(process, signal.SIGTERM, grace=10)
        output = log.read_text(errors="replace")
        assert process.returncode == 0, f"{' '.join(map(str, args))} -> {process.returncode}:\n{output[-4000:]}"
        return output


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root)
    venv = make_venv(root, wheel)
    workdir = root / "empty"
    workdir.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rw-", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        yield wheel, Installed(venv, workdir, ray_tmp)
    finally:
        kill_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_wheel_holds_data_files_entry_points_and_lean_serve_extra(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(info))
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    package_files = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "rayapp").rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert package_files - names == set()
    for data in ("rayapp/serve/configs/rm_cpu_local.yaml", "rayapp/serve/configs/rm.yaml",
                 "rayapp/model/presets/tiny.json", "rayapp/rm/presets/offline.json", "rayapp/refl/presets/offline.json",
                 "rayapp/serve/static/index.html", "rayapp/__main__.py"):
        assert data in names
    assert re.search(r"^rayapp = rayapp\.cli:main$", entry_points, re.M)
    serve_requires = [r for r in metadata.get_all("Requires-Dist") if re.search(r"extra == ['\"]serve['\"]", r)]
    assert any(r.startswith("ray[") for r in serve_requires)
    assert not [r for r in serve_requires if r.split("[")[0].split(">")[0].split("=")[0].strip() in TRAINING_STACK]


def test_installed_wheel_trains_tunes_and_serves_from_an_empty_directory(installed):
    """python -m rayapp, rayapp data synth, train-rm (4 updates), refl (2 updates), serve scored over HTTP."""
    _, app = installed
    python, rayapp_cmd = app.venv / "bin" / "python", app.venv / "bin" / "rayapp"
    where = app.run(python, "-c", "import sys, rayapp; print(rayapp.__file__); "
                    "print([type(f).__name__ for f in sys.meta_path])", timeout=60).splitlines()
    assert where[0].startswith(str(app.venv)) and "Editable" not in where[1], where

    assert "train-rm" in app.run(python, "-m", "rayapp", "--help", timeout=60)
    assert "--config NAME|FILE" in app.run(rayapp_cmd, "serve", "--config", "rm_cpu_local", "--help", timeout=60)
    # The serving path without the training stack: DeepSpeed, diffusers and peft made unimportable.
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in TRAINING_STACK)
    app.run(python, "-c", f"import sys; {blocked}; import rayapp, rayapp.serve.app, rayapp.serve.cli, "
            "rayapp.serve.client; from rayapp.model import create_model", timeout=120)

    app.run(rayapp_cmd, "data", "synth", "--prompts", "60", "--per-prompt", "4", "--out", "data", timeout=120)
    app.run(rayapp_cmd, "train-rm", "--data-dir", "data", "--max-steps", "4", "--output-dir", "OUT", timeout=300)
    model_dir = app.workdir / "OUT" / "model"
    card = (model_dir / "README.md").read_text()
    assert "library_name: rayapp" in card and "test_accuracy" in card
    assert (app.workdir / "OUT" / "official" / "ImageReward.pt").is_file()

    refl_log = app.run(rayapp_cmd, "refl", "--reward", "OUT/model", "--max-steps", "2", "--eval-every", "0",
                       "--pretrain-weight", "0", "--eval-seeds", "0", "--eval-prompts", "one red circle",
                       "--output-dir", "REFL", timeout=300)
    assert "(2 updates)" in refl_log, refl_log[-2000:]

    serve_and_score(app, model_dir)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_and_score(app: Installed, model_dir: Path) -> None:
    """`rayapp serve --config rm_cpu_local --model ...`: HTTP scores equal the library's, then Ctrl-C stops it."""
    import numpy as np
    from PIL import Image

    import rayapp
    from rayapp.serve.client import RewardClient

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    port = free_port()
    log = app.workdir.parent / "serve.log"
    process = app.start(app.venv / "bin" / "rayapp", "serve", "--config", "rm_cpu_local", "--model", "OUT/model",
                        "--port", str(port), log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, f"rayapp serve exited with {process.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no healthy endpoint in 240 s:\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(2)
        http_scores = RewardClient(url, timeout=120).score("one red circle", images)
        library_scores = rayapp.load(model_dir, device="cpu").score("one red circle", images)
        assert http_scores == pytest.approx(library_scores, abs=1e-4)
    finally:
        stop_group(process)  # Ctrl-C: `serve run` shuts Serve down and its local Ray stops with it
    assert process.returncode is not None


def test_serve_command_resolves_shipped_configs_and_overrides(tmp_path, capsys):
    """`rayapp serve --print-config`: a shipped name or a file, --model/--port applied, valid for Serve; no Ray."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from rayapp.cli import main
    from rayapp.serve.config import AppArgs

    (tmp_path / "model").mkdir()
    assert main(["serve", "--config", "rm_cpu_local", "--model", str(tmp_path / "model"), "--port", "8123",
                 "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    ServeDeploySchema.model_validate(config)
    AppArgs.model_validate(config["applications"][0]["args"])
    assert config["http_options"]["port"] == 8123
    assert config["applications"][0]["args"]["model"] == str(tmp_path / "model")
    assert main(["serve", "--config", str(REPO_ROOT / "serve_configs" / "rm.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == (REPO_ROOT / "serve_configs" / "rm.yaml").read_text()
    assert main(["serve", "--config", "no_such_config"]) == 2
    assert "neither a shipped config (rm, rm_cpu_local, rm_multi)" in capsys.readouterr().err
    assert main(["serve", "--config", "rm_multi", "--model", "acme/rm", "--print-config"]) == 0
    multi = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert multi["model"] == "acme/rm" and "models" not in multi and "default_model" not in multi
    assert AppArgs.model_validate(multi).model_specs()[0].source == "acme/rm"
