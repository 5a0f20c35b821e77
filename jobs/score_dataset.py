"""The `ray job submit --working-dir .` entry point of `rayapp score-dataset`
(same flags, same code: rayapp.eval.score_dataset).

    python jobs/score_dataset.py --help
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/score_dataset.py ...
"""
from __future__ import annotations

import os
import sys

from rayapp.envcheck import require_job_dependencies

require_job_dependencies("jobs/score_dataset.py")

if __name__ == "__main__":
    from rayapp.eval.score_dataset import main

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(prog="jobs/score_dataset.py"))
