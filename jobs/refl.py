"""The `ray job submit --working-dir .` entry point of `rayapp refl`
(same flags, same code: rayapp.refl.cli).

    python jobs/refl.py --help
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/refl.py ...
"""
from __future__ import annotations

import os
import sys

from rayapp.envcheck import require_job_dependencies

require_job_dependencies("jobs/refl.py")

if __name__ == "__main__":
    from rayapp.refl.cli import main

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(prog="jobs/refl.py"))
