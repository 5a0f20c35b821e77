"""The `ray job submit --working-dir .` entry point of `rayapp offline-pipeline`
(same flags, same code: rayapp.offline_pipeline).

    python jobs/offline_pipeline.py --help
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/offline_pipeline.py ...
"""
from __future__ import annotations

import os
import sys

from rayapp.envcheck import require_job_dependencies

require_job_dependencies("jobs/offline_pipeline.py")

if __name__ == "__main__":
    from rayapp.offline_pipeline import main

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(prog="jobs/offline_pipeline.py"))
