"""Serving overhead: end-to-end images/s through HTTP divided by the library's batched images/s, same run.

    python benchmarks/serve_load.py                         # full-size ImageReward (random weights), bf16, CPU,
                                                            # 1 replica, 32 clients: a few minutes on 2 cores
    python benchmarks/serve_load.py --preset tiny --requests 960 --library-images 960   # the serving stack alone
    python benchmarks/serve_load.py --device cuda --num-gpus 1 --max-batch-size 64 --requests 2048 \
        --library-images 2048
    python benchmarks/serve_load.py --route score    # base64 JSON /v1/score instead of raw-bytes /v1/score_batch

Same model, same images, same machine, in alternating rounds (so a change in machine load hits both sides):
  library  `model.score(prompt, png_bytes, batch_size=B)` (decode + preprocess + forward) in a Ray actor with the
           replica's CPU share and torch threads;
  serving  `--clients` asyncio clients (httpx, keep-alive) each posting `--images-per-request` PNGs to the
           endpoint (Serve proxy -> RewardAPI: read, decode, resize -> RewardScorer: dynamic batching, forward).
The library is measured at the serving max batch size and at the mean batch size serving actually ran (on a
small CPU a smaller batch can be faster per image); the ratio is taken against the better of the two. Prints
both rates per round and the median ratio (goal >= 0.8), p50/p99 latency and mean batch size, then where the
serving wall time went: the model replica's forward time (from its own counters), its share, and the rest.
Figures only, no assertions.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "two", "three", "red", "green", "blue", "yellow",
         "circle", "square", "triangle", "small", "large", "photo"]
PROMPT = "a photo of two red circles on a blue square"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_model_dir(preset: str, out: Path) -> Path:
    """A random-weight checkpoint of the preset's shape (throughput does not depend on the weights)."""
    import rayapp
    from rayapp.model.tokenizer import build_wordpiece_tokenizer

    tokenizer = build_wordpiece_tokenizer(WORDS, save_dir=out / "tokenizer")
    rayapp.create_model(preset, tokenizer=tokenizer, seed=0).save_pretrained(out / "model")
    return out / "model"


def make_images(n: int, side: int) -> list[bytes]:
    """PNG bytes of smooth gradients plus noise: about the size of generated images, not worst-case noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    out = []
    for _ in range(n):
        base = np.stack([np.sin(6 * x * rng.random() + rng.random() * 6) for _ in range(3)], -1) * 0.35 + 0.5
        pixels = np.clip(base * (1 - y[..., None] * rng.random()) + rng.normal(0, 0.03, base.shape), 0, 1)
        buf = io.BytesIO()
        Image.fromarray((pixels * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class LibraryScorer:
    """The library side, in a Ray actor sized like the model replica, so both run in the same kind of process
    (Ray workers get OMP_NUM_THREADS from their CPU share) on the same CPUs."""

    def __init__(self, model_dir: str, dtype: str, device: str, threads: int):
        import torch

        import rayapp

        torch.set_num_threads(threads)
        self.model = rayapp.load(model_dir, device=device, dtype=dtype)

    def rate(self, images: list[bytes], n: int, batch_size: int) -> float:
        """Images/s of rayapp's batched scoring from PNG bytes (decode + preprocess + forward), after a warm-up."""
        work = [images[i % len(images)] for i in range(n)]
        self.model.score(PROMPT, work[:min(4, n)], batch_size=batch_size)  # first-call kernel set-up
        start = time.perf_counter()
        self.model.score(PROMPT, work, batch_size=batch_size)
        return n / (time.perf_counter() - start)


async def run_load(url: str, clients: int, requests: int, images: list[bytes], per_request: int, route: str) -> dict:
    """`clients` coroutines share a budget of `requests`; returns throughput and latency figures."""
    import base64

    import httpx

    from rayapp.serve import wire

    latencies, batch_sizes, errors, remaining = [], [], 0, requests
    encoded = [base64.b64encode(img).decode() for img in images] if route == "score" else None

    async def client(http: httpx.AsyncClient, k: int) -> None:
        nonlocal remaining, errors
        i = k
        while remaining > 0:
            remaining -= 1
            chosen = [(i + j) % len(images) for j in range(per_request)]
            i += clients
            t0 = time.perf_counter()
            if route == "score":
                resp = await http.post("/v1/score", json={"prompt": PROMPT, "images": [encoded[c] for c in chosen]})
            else:
                body = wire.encode_pairs([PROMPT] * per_request, [images[c] for c in chosen])
                resp = await http.post("/v1/score_batch", content=body, headers={"Content-Type": wire.CONTENT_TYPE})
            if resp.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            batch_sizes.append(resp.json()["batch_size"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800.0), limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(http, k) for k in range(clients)])
        elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    ok = len(lat)
    return {
        "img_s": ok * per_request / elapsed, "req_s": ok / elapsed, "seconds": elapsed, "errors": errors,
        "p50_s": lat[ok // 2] if ok else float("nan"),
        "p99_s": lat[min(ok - 1, int(ok * 0.99))] if ok else float("nan"),
        "mean_batch": statistics.fmean(batch_sizes) if batch_sizes else float("nan"),
    }


def scorer_stats() -> dict:
    """The model replica's own totals (forward seconds, images, batches) for the default model."""
    from ray import serve

    info = serve.get_deployment_handle("RewardScorer", "rm").info.remote().result(timeout_s=120)
    return info["models"][0]["stats"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint dir / .pt to serve (default: random weights of --preset)")
    parser.add_argument("--preset", default="imagereward-v1", help="random-weight model shape (default: full size)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=32, help="concurrent HTTP clients (default: 32)")
    parser.add_argument("--requests", type=int, default=48, help="requests measured per round (after a warm-up)")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--library-images", type=int, default=32, help="images per library measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating library / serving rounds")
    parser.add_argument("--image-side", type=int, default=512, help="pixels per side of the PNGs sent")
    parser.add_argument("--route", choices=["score_batch", "score"], default="score_batch")
    parser.add_argument("--max-batch-size", type=int, default=16, help="serving batch = library batch size")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.05)
    parser.add_argument("--num-threads", type=int, default=os.cpu_count() or 2, help="torch threads (both sides)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs for the model replica")
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()

    import ray
    from ray import serve

    from rayapp.serve.app import AppArgs, build_app

    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    t0 = time.perf_counter()
    model = args.model or str(make_model_dir(args.preset, tmp))
    images = make_images(32, args.image_side)
    print(f"model={args.model or args.preset + ' (random weights)'} dtype={args.dtype} device={args.device} "
          f"threads={args.num_threads} image={args.image_side}px (~{statistics.fmean(map(len, images)) / 1024:.0f} KiB "
          f"PNG) batch={args.max_batch_size} clients={args.clients} requests={args.requests} "
          f"images/request={args.images_per_request} route=/v1/{args.route}  (set-up {time.perf_counter() - t0:.0f} s)",
          flush=True)

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    rounds = []
    try:
        app_args = AppArgs(
            model=model, name="bench", device=args.device, dtype=args.dtype, num_threads=args.num_threads,
            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
            limits={"max_images": max(32, args.images_per_request),
                    "max_batch_pairs": max(256, args.images_per_request), "max_request_bytes": 1 << 30},
            scorer_options={"num_replicas": 1, "max_ongoing_requests": 4 * args.clients,
                            "ray_actor_options": {"num_cpus": 1, "num_gpus": args.num_gpus}},
            api_options={"num_replicas": 1, "max_ongoing_requests": 4 * args.clients},
        )
        library = ray.remote(num_cpus=1, num_gpus=args.num_gpus)(LibraryScorer).remote(
            model, args.dtype, args.device, args.num_threads)
        serve.run(build_app(app_args), name="rm", route_prefix="/")
        ray.get(library.rate.remote(images, 1, 1))  # loaded
        # Warm-up: first forward passes and connections, outside the measurement.
        asyncio.run(run_load(url, args.clients, args.clients, images, args.images_per_request, args.route))
        for rnd in range(1, args.rounds + 1):
            before = scorer_stats()
            r = asyncio.run(run_load(url, args.clients, args.requests, images, args.images_per_request, args.route))
            after = scorer_stats()
            # The library at the serving batch size, and at the batch size serving actually ran: on a small CPU
            # a smaller batch can be faster per image, and the ratio is taken against the library's better rate.
            served_batch = max(1, round(r["mean_batch"]))
            libs = {b: ray.get(library.rate.remote(images, args.library_images, b))
                    for b in sorted({args.max_batch_size, served_batch})}
            lib = max(libs.values())
            forward = after["forward_seconds"] - before["forward_seconds"]
            r.update(library_img_s=lib, library_by_batch=libs, ratio=r["img_s"] / lib, replica_forward_s=forward,
                     replica_img_s=(after["images"] - before["images"]) / forward if forward else float("nan"))
            rounds.append(r)
            shown = ", ".join(f"batch {b}: {v:.2f}" for b, v in libs.items())
            print(f"round {rnd}: serving {r['img_s']:7.2f} img/s ({r['req_s']:.2f} req/s, p50 {r['p50_s']:.2f} s, "
                  f"p99 {r['p99_s']:.2f} s, mean batch {r['mean_batch']:.1f}, errors {r['errors']}) | library img/s "
                  f"{shown} | ratio {r['ratio']:.3f} | model replica busy {forward:.1f} of {r['seconds']:.1f} s at "
                  f"{r['replica_img_s']:.2f} img/s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    ratio = statistics.median(r["ratio"] for r in rounds)
    busy = sum(r["replica_forward_s"] for r in rounds) / sum(r["seconds"] for r in rounds)
    replica = statistics.median(r["replica_img_s"] for r in rounds)
    lib = statistics.median(r["library_img_s"] for r in rounds)
    print(f"overhead ratio serving / library = {ratio:.3f} (median of {len(rounds)} rounds; goal >= 0.8)")
    print(f"where the serving time went: the model replica was computing {100 * busy:.0f}% of the wall time, at "
          f"{replica:.2f} img/s = {replica / lib:.2f}x the library's rate (its forward passes alone; the library's "
          "figure includes decoding); the rest of the wall time is request handling, decoding and batch waits",
          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"ratio": ratio, "rounds": rounds, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
