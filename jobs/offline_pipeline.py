"""The offline end-to-end job: synthetic comparisons -> reward model on Ray Train + DeepSpeed -> held-out
accuracy -> the model behind a Ray Serve endpoint, scored over HTTP -> ReFL of a tiny Stable Diffusion
against the trained reward model.

    python jobs/offline_pipeline.py                       # starts a local Ray; ~15 minutes on 2 CPUs
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/offline_pipeline.py

Everything lands under --output-dir (default runs/): rm/ (data, model, official export), refl/ (grids,
reward curve, final pipeline). `serve run serve_configs/rm_cpu_local.yaml` serves runs/rm/model afterwards.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from rayapp.envcheck import require_job_dependencies

require_job_dependencies("jobs/offline_pipeline.py")


def _job(name: str):
    """Import a sibling job script as a module, so each stage runs exactly what its own job runs."""
    spec = importlib.util.spec_from_file_location(f"rayapp_job_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve_and_query(model_dir: Path, test_dir: Path, port: int) -> None:
    """Deploy the trained model with Ray Serve on loopback and score one held-out prompt's images over HTTP."""
    from ray import serve

    import rayapp
    from rayapp.data.shards import iter_comparisons
    from rayapp.serve.app import AppArgs, build_app
    from rayapp.serve.client import RewardClient

    record = next(iter_comparisons(test_dir))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(model=str(model_dir), device="cpu", num_threads=1)), name="rm", route_prefix="/")
    try:
        url = f"http://127.0.0.1:{port}"
        http_scores = RewardClient(url, timeout=120).score(record["prompt"], record["images"])
        library_scores = rayapp.load(model_dir, device="cpu").score(record["prompt"], record["images"])
        print(f"[serve] {url}: prompt {record['prompt']!r}")
        for rank, http, lib in zip(record["ranking"], http_scores, library_scores):
            print(f"[serve]   human rank {rank}: HTTP score {http:+.4f}   library score {lib:+.4f}")
        print(f"[serve] try it: curl -s {url}/v1/score -H 'content-type: application/json' "
              f"-d '{{\"prompt\": \"...\", \"images\": [\"<base64 PNG>\"]}}'   (web page: {url}/)")
    finally:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs", help="where every stage writes (default: %(default)s)")
    parser.add_argument("--serve-port", type=int, default=8000, help="loopback port of the demo endpoint")
    parser.add_argument("--refl-steps", type=int, default=24, help="ReFL optimizer updates (default: %(default)s)")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--skip-refl", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.output_dir).resolve()

    print("== 1/3 reward model: synthetic data -> Ray Train + DeepSpeed (2 workers) -> held-out accuracy", flush=True)
    _job("train_rm").main(["--output-dir", str(out / "rm")])
    model_dir, test_dir = out / "rm" / "model", out / "rm" / "data" / "test"

    if not args.skip_serve:
        print("== 2/3 serving: Ray Serve endpoint on loopback, scored over HTTP", flush=True)
        serve_and_query(model_dir, test_dir, args.serve_port)

    if not args.skip_refl:
        print("== 3/3 ReFL: tiny Stable Diffusion fine-tuned against the trained reward model", flush=True)
        _job("refl").main(["--reward", str(model_dir), "--pretrain-data", str(out / "rm" / "data" / "train"),
                           "--output-dir", str(out / "refl"), "--max-steps", str(args.refl_steps)])
    print(f"done: reward model in {model_dir} (official export in {out / 'rm' / 'official'})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
