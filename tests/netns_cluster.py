"""Ray clusters of separate network hosts on one machine, for tests: a thin driver of scripts/local_cluster.sh.

Each node is a Linux network namespace with its own IP on a private bridge and its own Ray `--temp-dir`;
the script does the work (so tests exercise what users run), this module adds bounded waits, per-test
names and subnets, the Ray REST queries tests need, and teardown that also runs at interpreter exit.
`LoopbackHead` is a one-node `ray start --head` sized like the machine, in a private namespace when root so
that fixed ports (8000, 8265) cannot collide with anything else running here.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "local_cluster.sh"
VENV_BIN = REPO_ROOT / ".venv" / "bin"


def netns_unavailable_reason() -> str | None:
    """Why namespace clusters cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "multi-host tests need root (they create network namespaces, a bridge and veth pairs)"
    if shutil.which("ip") is None:
        return "multi-host tests need the 'ip' command (iproute2)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_name(prefix: str) -> str:
    """`prefix` + this process's PID in base 36 (short: interface names are limited to 15 characters)."""
    pid, digits = os.getpid(), ""
    while True:
        pid, rest = divmod(pid, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[rest] + digits
        if not pid:
            return prefix + digits


def _creator_alive(name: str, prefix: str) -> bool:
    try:
        pid = int(name[len(prefix):].split("-")[0], 36)
        os.kill(pid, 0)
    except ValueError:
        return True  # not one of ours
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def sweep_stale_namespaces(prefix: str) -> None:
    """Remove what test sessions killed outright (no teardown ran) left behind: the namespaces named
    `prefix<pid>-...` of PIDs that no longer exist, with their clusters (scripts/local_cluster.sh down)."""
    if netns_unavailable_reason() is not None:
        return
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False)
    names = {line.split()[0] for line in listing.stdout.splitlines() if line.startswith(prefix)}
    for stale in sorted({n.split("-")[0] for n in names if not _creator_alive(n, prefix)}):
        subprocess.run(["bash", str(SCRIPT), "down"], env=cli_env(RAYAPP_CLUSTER_NAME=stale), capture_output=True,
                       timeout=120, check=False)
        for namespace in sorted(n for n in names if n.split("-")[0] == stale):
            PrivateLoopback(namespace).close()
        shutil.rmtree(f"/tmp/rlh-{stale}", ignore_errors=True)


def _subnet_in_use(subnet: str) -> bool:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10,
                         check=False).stdout
    return f" {subnet}." in out


def free_subnet(seed: int) -> str:
    """A 10.214.X prefix no interface on this machine uses (X derived from `seed`, then the next free one)."""
    for k in range(250):
        subnet = f"10.214.{(seed + k) % 250 + 1}"
        if not _subnet_in_use(subnet):
            return subnet
    raise RuntimeError("no free 10.214.X.0/24 subnet for a test cluster")


def http_json(url: str, timeout: float = 10.0, data: bytes | None = None, headers: dict | None = None):
    """GET (or POST `data`) a URL and decode its JSON body."""
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def wait_until(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(interval)


def cli_env(**extra: str) -> dict:
    """Environment for Ray CLIs run by tests: the venv first on PATH, no token auth, no stray RAY_ADDRESS."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '')}", VIRTUAL_ENV=str(VENV_BIN.parent),
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def stop_process_group(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM a process started with start_new_session, then SIGKILL its group if it lingers."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class RayJob:
    """A `ray job submit` run as a subprocess; its output (the job's logs, streamed) goes to `log_path`."""

    process: subprocess.Popen
    log_path: Path
    submission_id: str

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float) -> int:
        """The CLI's exit status (0 = the job succeeded); TimeoutError with the output's tail after `timeout`."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(self.process, grace_s=5)
            raise TimeoutError(f"job {self.submission_id} not finished in {timeout:.0f} s; output tail:\n"
                               f"{self.output()[-4000:]}") from None


def submit_job(dashboard_url: str, entrypoint: list[str], log_path: Path, *, submission_id: str,
               env: dict | None = None, extra_args: list[str] = (), runner: list[str] = ()) -> RayJob:
    """`ray job submit --address URL --working-dir <repo> ... -- <entrypoint>` in the background.

    `runner` prefixes the command (e.g. `ip netns exec NS` to submit from inside a namespace).
    """
    command = [*runner, str(VENV_BIN / "ray"), "job", "submit", "--address", dashboard_url,
               "--working-dir", str(REPO_ROOT), "--submission-id", submission_id, *extra_args, "--", *entrypoint]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env or cli_env(), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return RayJob(process, log_path, submission_id)


class NetnsCluster:
    """A head and worker nodes, each in its own network namespace (see scripts/local_cluster.sh)."""

    def __init__(self, name: str, subnet: str, *, workers: int = 2, head_cpus: int = 1, worker_cpus: int = 2,
                 object_store_mb: int = 300):
        self.name, self.subnet = name, subnet
        self.settings = {
            "RAYAPP_CLUSTER_NAME": name, "RAYAPP_CLUSTER_SUBNET": subnet,
            "RAYAPP_CLUSTER_WORKERS": str(workers), "RAYAPP_CLUSTER_HEAD_CPUS": str(head_cpus),
            "RAYAPP_CLUSTER_WORKER_CPUS": str(worker_cpus),
            "RAYAPP_CLUSTER_OBJECT_STORE_MB": str(object_store_mb),
        }
        self.state_dir = Path(f"/tmp/rlc-{name}")
        self._down = False

    # --- lifecycle ---
    def _script(self, *args: str, timeout: float) -> str:
        result = subprocess.run(["bash", str(SCRIPT), *args], env=cli_env(**self.settings), capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"local_cluster.sh {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        return result.stdout

    def up(self, timeout: float = 240) -> NetnsCluster:
        """Start the head and the workers; returns once Ray reports them all alive. Torn down at exit."""
        atexit.register(self.down)
        try:
            self._script("up", timeout=timeout)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Remove every namespace, link and process of this cluster (idempotent, bounded)."""
        if self._down:
            return
        try:
            self._script("down", timeout=120)
        finally:
            self._down = True

    def add_worker(self, timeout: float = 180) -> str:
        """Start one more worker node; returns its node name once Ray reports it alive."""
        return self._script("add-worker", timeout=timeout).split()[0]

    def kill_node(self, node: str) -> float:
        """Every process of that host dies at once (SIGKILL: raylet, object store, workers); returns the time."""
        self._script("kill-node", node, timeout=60)
        return time.monotonic()

    # --- addresses and state ---
    def node_names(self) -> list[str]:
        return sorted(p.name for p in (self.state_dir / "nodes").iterdir())

    def ip(self, node: str) -> str:
        return (self.state_dir / "nodes" / node / "ip").read_text().strip()

    @property
    def head_ip(self) -> str:
        return self.ip("head")

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:8265"

    @property
    def gcs_address(self) -> str:
        return f"{self.head_ip}:6379"

    def namespace(self, node: str) -> str:
        return f"{self.name}-{node}"

    def alive_nodes(self) -> dict[str, str]:
        """node_id -> IP of the nodes Ray reports ALIVE."""
        data = http_json(f"{self.dashboard_url}/api/v0/nodes?limit=1000")
        return {n["node_id"]: n["node_ip"] for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"}

    def all_nodes(self) -> dict[str, str]:
        """node_id -> IP of every node Ray has known, dead ones included."""
        data = http_json(f"{self.dashboard_url}/api/v0/nodes?limit=1000")
        return {n["node_id"]: n["node_ip"] for n in data["data"]["result"]["result"]}

    def actors(self, **filters: str) -> list[dict]:
        """Ray's actor table (dead actors included), filtered by exact field values."""
        query = "&".join(f"filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
        data = http_json(f"{self.dashboard_url}/api/v0/actors?limit=10000&detail=true&{query}", timeout=30)
        return data["data"]["result"]["result"]

    def in_namespace(self, node: str) -> list[str]:
        """Command prefix that runs a program on that host."""
        return ["ip", "netns", "exec", self.namespace(node)]

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of every node's `ray start` log (for failure messages)."""
        out = []
        for path in sorted(self.state_dir.glob("nodes/*/node.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(out)


class PrivateLoopback:
    """A place with its own loopback: a bare network namespace as root, else this host's (shared) loopback.

    In a namespace, fixed ports (Ray's 6379 / 8265, Serve's 8000) are free whatever else runs on this machine.
    Processes are started through `runner`; `close` SIGKILLs whatever still runs inside and deletes it.
    """

    def __init__(self, name: str):
        self.namespace = name if netns_unavailable_reason() is None else None

    @property
    def runner(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace] if self.namespace else []

    def open(self) -> PrivateLoopback:
        if self.namespace:
            atexit.register(self.close)
            subprocess.run(["ip", "netns", "delete", self.namespace], capture_output=True, timeout=30, check=False)
            subprocess.run(["ip", "netns", "add", self.namespace], check=True, timeout=30)
            subprocess.run([*self.runner, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        return self

    def run(self, argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        """Run a command here (captured output, bounded)."""
        return subprocess.run([*self.runner, *argv], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False, **kwargs)

    def get(self, url: str, timeout: float = 10) -> tuple[int, str]:
        """HTTP GET from here: (status, body); status 0 when nothing answered."""
        result = self.run(["curl", "-s", "-m", str(timeout), "-o", "-", "-w", "\n%{http_code}", url],
                          timeout=timeout + 10)
        body, _, code = result.stdout.rpartition("\n")
        return int(code or 0), body

    def close(self) -> None:
        if not self.namespace:
            return
        for _ in range(10):
            pids = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True,
                                  timeout=10, check=False).stdout.split()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        subprocess.run(["ip", "netns", "delete", self.namespace], capture_output=True, timeout=30, check=False)


class LoopbackHead(PrivateLoopback):
    """`ray start --head` on 127.0.0.1 with the machine's real CPU count, stopped by its process group.

    Started from `cwd` (as a user starts it from the checkout: workers then resolve relative paths there),
    in a private loopback (see PrivateLoopback); CLIs reach it through `runner`.
    """

    def __init__(self, name: str, num_cpus: int | None = None, cwd: Path | None = None):
        super().__init__(f"{name}-lo")
        self.name = name
        self.num_cpus = num_cpus or os.cpu_count() or 1
        self.cwd = cwd
        self.temp_dir = Path(f"/tmp/rlh-{name}")
        self.process: subprocess.Popen | None = None
        self.ports = {"gcs": 6379, "dashboard": 8265}

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    def start(self, timeout: float = 180) -> LoopbackHead:
        atexit.register(self.stop)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir.mkdir(parents=True)
        self.open()
        extra_ports = []
        if not self.namespace:
            # Shared loopback: every port Ray would otherwise take by default must be a free one.
            self.ports = {"gcs": free_port(), "dashboard": free_port()}
            extra_ports = [f"--{name}={free_port()}" for name in (
                "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
        command = [*self.runner, str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                   f"--port={self.ports['gcs']}", f"--dashboard-port={self.ports['dashboard']}",
                   "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--num-cpus={self.num_cpus}",
                   "--num-gpus=0", f"--temp-dir={self.temp_dir}/t", "--disable-usage-stats", *extra_ports]
        with open(self.temp_dir / "head.log", "w") as log:
            self.process = subprocess.Popen(command, cwd=self.cwd, env=cli_env(), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log_tail()}")
            return self.get(f"{self.dashboard_url}/api/version", timeout=3)[0] == 200

        try:
            wait_until(ready, timeout, interval=2, what="the loopback head's dashboard")
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 40) -> str:
        path = self.temp_dir / "head.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """Stop the head (SIGTERM to `ray start --block`, then SIGKILL its group and its namespace's processes)."""
        if self.process is not None:
            stop_process_group(self.process, grace_s=20)
            self.process = None
        self.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
