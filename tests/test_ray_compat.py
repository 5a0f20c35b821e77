"""rayapp.ray_compat: every private Ray API rayapp relies on still resolves, and nothing else in rayapp uses one."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rayapp import ray_compat

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(ray_compat.PRIVATE_APIS))
def test_private_api_resolves(path):
    try:
        ray_compat.private(path)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"Ray moved {path} ({type(err).__name__}: {err}); update rayapp/ray_compat.py")


def test_private_apis_keep_the_signatures_called():
    get_client = ray_compat.private("ray.serve.context:_get_global_client")
    assert "raise_if_no_controller_running" in inspect.signature(get_client).parameters, \
        "Ray changed _get_global_client's parameters; update rayapp/ray_compat.py"
    kv_get = ray_compat.private("ray.experimental.internal_kv:_internal_kv_get")
    assert list(inspect.signature(kv_get).parameters)[0] == "key", \
        "Ray changed _internal_kv_get's parameters; update rayapp/ray_compat.py"


def test_every_private_name_in_the_code_is_listed():
    """The table is complete: each "module:attr" the module resolves (or names for the logging YAML) is in it."""
    source = (REPO / "rayapp" / "ray_compat.py").read_text()
    used = set(re.findall(r'private\("([^"]+)"\)', source)) | set(ray_compat._LAZY_CLASSES.values())
    assert used and used <= set(ray_compat.PRIVATE_APIS), used - set(ray_compat.PRIVATE_APIS)


def test_only_ray_compat_names_private_ray_modules():
    """`_private` and `_internal` appear in rayapp's Python and YAML only in rayapp/ray_compat.py."""
    offenders = []
    for path in sorted((REPO / "rayapp").rglob("*")):
        if path.suffix not in (".py", ".yaml", ".yml") or path.name == "ray_compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"_private|_internal", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_ray_data_takes_the_quiet_logging_config():
    """A fresh process with RAY_DATA_LOGGING_CONFIG set imports Ray Data with our handlers: the session file and an
    ERROR-level console, i.e. the YAML's class paths resolve through ray_compat."""
    from rayapp.logs import RAY_DATA_QUIET_CONFIG

    probe = (
        "import logging, ray.data\n"
        "handlers = logging.getLogger('ray.data').handlers\n"
        "print(sorted((type(h).__name__, logging.getLevelName(h.level)) for h in handlers))\n"
    )
    env = {**os.environ, "RAY_DATA_LOGGING_CONFIG": RAY_DATA_QUIET_CONFIG}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180,
                          cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[('SessionFileHandler', 'NOTSET'), ('StderrHandler', 'ERROR')]" in proc.stdout, proc.stdout + proc.stderr
