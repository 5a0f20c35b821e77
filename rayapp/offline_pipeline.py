"""`rayapp offline-pipeline` and `jobs/offline_pipeline.py`: the offline end-to-end job. Synthetic comparisons ->
reward model on Ray Train + DeepSpeed -> held-out accuracy -> the model behind a Ray Serve endpoint, scored
over HTTP -> ReFL of a tiny Stable Diffusion against the trained reward model.

    rayapp offline-pipeline                               # starts a local Ray; ~12 minutes on 2 CPUs
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/offline_pipeline.py

Everything lands under --output-dir (default runs/): rm/ (data, model, official export), refl/ (grids,
reward curve, final pipeline). `rayapp serve --config rm_cpu_local` serves runs/rm/model afterwards.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rayapp.job_command import JobCommand


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's flags."""
    parser.add_argument("--output-dir", default="runs", help="where every stage writes (default: %(default)s)")
    parser.add_argument("--serve-port", type=int, default=8000, help="loopback port of the demo endpoint")
    parser.add_argument("--refl-steps", type=int, default=24, help="ReFL optimizer updates (default: %(default)s)")
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--skip-refl", action="store_true")




def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Train the RM, serve it and score over HTTP, then run ReFL against it; each stage runs its own command."""
    from rayapp.refl import cli as refl_cli
    from rayapp.rm import cli as rm_cli

    out = Path(args.output_dir).resolve()
    print("== 1/3 reward model: synthetic data -> Ray Train + DeepSpeed (2 workers) -> held-out accuracy", flush=True)
    rm_cli.main(["--output-dir", str(out / "rm")])
    model_dir, test_dir = out / "rm" / "model", out / "rm" / "data" / "test"

    if not args.skip_serve:
        print("== 2/3 serving: Ray Serve endpoint on loopback, scored over HTTP", flush=True)
        serve_and_query(model_dir, test_dir, args.serve_port)

    if not args.skip_refl:
        print("== 3/3 ReFL: tiny Stable Diffusion fine-tuned against the trained reward model", flush=True)
        refl_cli.main(["--reward", str(model_dir), "--pretrain-data", str(out / "rm" / "data" / "train"),
                       "--output-dir", str(out / "refl"), "--max-steps", str(args.refl_steps)])
    print(f"done: reward model in {model_dir} (official export in {out / 'rm' / 'official'})")
    return 0


COMMAND = JobCommand("offline-pipeline", "the offline end-to-end job: RM -> Serve -> ReFL", __doc__, add_arguments, run)
build_parser, main, register = COMMAND.build_parser, COMMAND.main, COMMAND.register
