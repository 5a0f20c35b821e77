"""deploy/: the Dockerfile, KubeRay manifests, Grafana dashboard and cluster.yaml agree with the project."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml
from conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kuberay").glob("*.yaml"))


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def project_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


def load_manifest(path) -> dict:
    (doc,) = list(yaml.safe_load_all(path.read_text()))
    return doc


def containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


# ---- the image --------------------------------------------------------------------------------------

def test_dockerfile_uses_the_pinned_ray_image_and_constraints():
    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.MULTILINE))
    assert args["RAY_VERSION"] == constraints()["ray"], "the base image's Ray must be constraints.txt's"
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${VARIANT}"
    python = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    tag_minor = int(args["PYTHON_TAG"].removeprefix("py3"))
    assert tag_minor >= int(re.search(r">=\s*3\.(\d+)", python).group(1)), (args["PYTHON_TAG"], python)
    # Every pip install goes through constraints.txt, and nothing pins a version of its own.
    installs = re.findall(r"pip install[^;&\\\n]*", text)
    assert installs and all("-c constraints.txt" in cmd for cmd in installs), installs
    assert not re.search(r"pip install[^\n]*==", text)
    # The GPU variant is Ray's -gpu image; the CPU one takes torch's CPU wheel.
    assert 'if [ "$VARIANT" = "-gpu" ]' in text and "download.pytorch.org/whl/cpu" in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


# ---- KubeRay ----------------------------------------------------------------------------------------

def test_manifests_parse_and_pin_ray_and_images():
    kinds = {}
    for path in MANIFESTS:
        doc = load_manifest(path)
        assert doc["apiVersion"] == "ray.io/v1", path
        kinds[path.name] = doc["kind"]
        cluster = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]["rayClusterSpec"]
        assert cluster["rayVersion"] == constraints()["ray"], path
        for container in containers(cluster):
            image = container["image"]
            assert image in (f"rayapp:{project_version()}-cpu", f"rayapp:{project_version()}-gpu"), (path, image)
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            assert image.endswith("-gpu") == bool(gpus), f"{path.name}: GPU pods use the -gpu image, others not"
    assert sorted(kinds.values()) == ["RayJob", "RayJob", "RayService"], kinds


def test_rayservice_embeds_rm_yaml_verbatim():
    service = load_manifest(DEPLOY / "kuberay" / "rayservice.yaml")
    embedded = service["spec"]["serveConfigV2"]
    assert embedded == (REPO_ROOT / "serve_configs" / "rm.yaml").read_text(), \
        "serveConfigV2 drifted from serve_configs/rm.yaml: run python deploy/sync_serve_config.py"
    check = subprocess.run([sys.executable, str(DEPLOY / "sync_serve_config.py"), "--check"], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

    from ray.serve.schema import ServeDeploySchema

    from rayapp.serve.app import AppArgs

    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(embedded)).applications
    args = AppArgs.model_validate(app.args)
    # The token the app reads is the one the pods get from the Secret.
    for container in containers(service["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in container.get("env", [])}
        assert args.auth.token_env in env and "secretKeyRef" in env[args.auth.token_env]["valueFrom"]
    ports = {p["containerPort"] for c in containers(service["spec"]["rayClusterConfig"]) for p in c["ports"]}
    assert yaml.safe_load(embedded)["http_options"]["port"] in ports


@pytest.mark.parametrize("name,script,config", [
    ("rayjob-train-rm.yaml", "jobs/train_rm.py", "rayapp.rm.config:RMTrainConfig"),
    ("rayjob-refl.yaml", "jobs/refl.py", "rayapp.refl.config:ReFLConfig"),
])
def test_rayjob_entrypoints_name_real_scripts_and_flags(name, script, config):
    import importlib

    job = load_manifest(DEPLOY / "kuberay" / name)
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"/home/ray/rayapp/{script}"
    assert (REPO_ROOT / script).is_file()
    module, cls = config.split(":")
    config_class = getattr(importlib.import_module(module), cls)
    fields = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(config_class)}
    flags = {arg for arg in argv[2:] if arg.startswith("--")}
    assert flags <= fields | {"--preset", "--config"}, flags - fields
    presets = {p.stem for p in (REPO_ROOT / "rayapp" / module.split(".")[1] / "presets").glob("*.json")}
    assert argv[argv.index("--preset") + 1] in presets
    assert job["spec"]["shutdownAfterJobFinishes"] is True


# ---- cluster launcher, dashboard ---------------------------------------------------------------------

def test_cluster_yaml_installs_with_constraints():
    config = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    commands = (config["setup_commands"] + config.get("head_setup_commands", [])
                + config.get("worker_setup_commands", []))
    installs = [c for c in commands if "pip install" in c and "--upgrade pip" not in c]
    assert installs and all("-c constraints.txt" in c and c.startswith("cd ~/rayapp") for c in installs), installs
    assert any('-e ".[ray]"' in c for c in installs)


def test_grafana_dashboard_charts_our_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "rayapp_serve_dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    used = set(re.findall(r"ray_(rayapp_\w+?)(?:_total|_bucket|_sum|_count)?\b", exprs))
    source = (REPO_ROOT / "rayapp" / "serve" / "metrics.py").read_text()
    defined = set(re.findall(r'(?:Counter|Histogram|Gauge)\(\s*"(rayapp_\w+)"', source))
    assert used and used <= defined, used - defined
    for wanted in ("rayapp_images_scored", "rayapp_score_bucket", "rayapp_rejections", "rayapp_preprocess_seconds",
                   "rayapp_model_seconds", "rayapp_batch_images", "rayapp_batch_requests"):
        assert wanted in used, f"the dashboard does not chart {wanted}"
