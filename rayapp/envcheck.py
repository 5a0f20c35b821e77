"""A clear message when a job starts under a Python that lacks rayapp's dependencies (stdlib only).

Under `ray job submit ... -- python jobs/x.py` the entrypoint runs whatever `python` the cluster's PATH
gives; a cluster started with `.venv/bin/ray start` without activating the venv gives the system Python.
"""
from __future__ import annotations

import importlib.util
import sys

REQUIRED = ("torch", "transformers", "PIL", "ray", "pyarrow")


def require_job_dependencies(job: str, extra: tuple[str, ...] = ()) -> None:
    """Exit with a message naming this Python and what it misses, instead of an ImportError traceback."""
    missing = [name for name in REQUIRED + extra if importlib.util.find_spec(name) is None]
    if not missing:
        return
    sys.exit(
        f"{job}: this Python ({sys.executable}) lacks {', '.join(missing)}. Under `ray job submit` the "
        "entrypoint's `python` is the one on the cluster's PATH: start the cluster from the project's venv "
        "(`source .venv/bin/activate && ray start --head`, or `scripts/local_cluster.sh up`), or install rayapp "
        "into the cluster's Python (`pip install -c constraints.txt -e '.[all]'`).")
