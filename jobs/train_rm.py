"""The `ray job submit --working-dir .` entry point of `rayapp train-rm`
(same flags, same code: rayapp.rm.cli).

    python jobs/train_rm.py --help
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train_rm.py ...
"""
from __future__ import annotations

import os
import sys

from rayapp.envcheck import require_job_dependencies

require_job_dependencies("jobs/train_rm.py")

if __name__ == "__main__":
    from rayapp.rm.cli import main

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(prog="jobs/train_rm.py"))
