"""Serve load: N concurrent loopback clients against the reward endpoint, dynamic batching vs max batch size 1.

    python benchmarks/serve_load.py                                  # tiny model, 32 clients, CPU
    python benchmarks/serve_load.py --clients 8 32 --requests 640 --max-batch-size 32
    python benchmarks/serve_load.py --model runs/rm/model            # a real checkpoint
    python benchmarks/serve_load.py --preset imagereward-v1 --device cuda --dtype bfloat16 --num-gpus 1
    python benchmarks/serve_load.py --set vision_num_layers=12 text_num_layers=12   # a model-bound CPU case

Starts its own local Ray (or joins --address), serves the model with a fixed number of replicas, and
sends a fixed number of one-prompt requests from N asyncio clients on 127.0.0.1. Each setting is
measured twice over the same replicas: with dynamic batching (max_batch_size B) and with max batch
size 1 (the batching user_config is applied live; the model is not reloaded). Prints requests/s,
images/s, p50/p99 latency and the mean forward-pass size. Figures only, no assertions.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "two", "three", "red", "green", "blue", "yellow", "circle", "square", "triangle", "small", "large", "photo"]
PROMPT = "a photo of two red circles on a blue square"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_model_dir(preset: str, out: Path, overrides: dict) -> Path:
    """A random-weight checkpoint of the preset's shape (throughput does not depend on the weights)."""
    import rayapp
    from rayapp.model.tokenizer import build_wordpiece_tokenizer

    # A small WordPiece vocab on disk: no hub download; its ids fit every preset's embedding.
    tokenizer = build_wordpiece_tokenizer(WORDS, save_dir=out / "tokenizer")
    rayapp.create_model(preset, tokenizer=tokenizer, seed=0, **overrides).save_pretrained(out / "model")
    return out / "model"


def make_images(n: int, side: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


async def run_load(url: str, clients: int, requests: int, images: list[str], per_request: int) -> dict:
    """`clients` coroutines share a fixed budget of `requests`; returns throughput and latency figures."""
    import aiohttp

    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors = 0
    remaining = requests

    async def client(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal remaining, errors
        i = k
        while remaining > 0:
            remaining -= 1
            body = {"prompt": PROMPT, "images": [images[(i + j) % len(images)] for j in range(per_request)]}
            i += clients
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/score", json=body) as resp:
                data = await resp.json()
            if resp.status != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            batch_sizes.append(data["batch_size"])

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        await asyncio.gather(*[client(session, k) for k in range(clients)])
        elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    ok = len(lat)
    return {
        "req_s": ok / elapsed,
        "img_s": ok * per_request / elapsed,
        "p50_ms": 1000 * lat[ok // 2] if ok else float("nan"),
        "p99_ms": 1000 * lat[min(ok - 1, int(ok * 0.99))] if ok else float("nan"),
        "mean_batch": statistics.fmean(batch_sizes) if batch_sizes else float("nan"),
        "errors": errors,
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint dir / .pt to serve (default: random weights of --preset)")
    parser.add_argument("--preset", default="tiny", help="preset for the random-weight model (default: tiny)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON",
                        help="override preset fields of the random-weight model, e.g. vision_num_layers=12")
    parser.add_argument("--clients", type=int, nargs="+", default=[32], help="concurrent clients (default: 32)")
    parser.add_argument("--requests", type=int, default=480, help="requests per measurement (default: 480)")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--image-side", type=int, default=256, help="pixels per side of the sent PNGs")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the dynamic-batching setting")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (fixed, no autoscaling)")
    parser.add_argument("--api-replicas", type=int, default=1)
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--num-threads", type=int, default=None, help="torch threads per model replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=2, help="alternating on/off measurements per client count")
    parser.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray (default: 8)")
    args = parser.parse_args()

    import ray
    from ray import serve

    from rayapp.serve.app import AppArgs, build_app

    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    model = args.model or str(make_model_dir(args.preset, tmp, overrides))
    images = make_images(64, args.image_side)
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"

    def deploy(max_batch_size: int) -> None:
        app_args = AppArgs(
            model=model, device=args.device, dtype=args.dtype, num_threads=args.num_threads,
            max_batch_size=max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
            limits={"max_images": max(32, args.images_per_request), "max_request_bytes": 1 << 30},
            scorer_options={"num_replicas": args.replicas, "max_ongoing_requests": 256,
                            "ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": args.num_gpus}},
            api_options={"num_replicas": args.api_replicas},
        )
        serve.run(build_app(app_args), name="rm", route_prefix="/")

    print(f"model={args.model or args.preset + ' (random weights)'}{' ' + ' '.join(args.set) if args.set else ''} "
          f"device={args.device} dtype={args.dtype} replicas={args.replicas} api_replicas={args.api_replicas} "
          f"requests={args.requests} images/request={args.images_per_request} image={args.image_side}px "
          f"rounds={args.rounds}")
    print(f"{'clients':>7} {'max_batch':>9} {'round':>5} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'mean batch':>10} {'errors':>6}")
    try:
        for clients in args.clients:
            rates: dict[int, list[float]] = {args.max_batch_size: [], 1: []}
            # Alternating rounds, so drift in machine load hits both settings alike.
            for rnd in range(1, args.rounds + 1):
                for max_batch in (args.max_batch_size, 1):
                    deploy(max_batch)
                    # Warm-up outside the measurement (first forward, connection set-up).
                    asyncio.run(run_load(url, clients, clients * 2, images, args.images_per_request))
                    r = asyncio.run(run_load(url, clients, args.requests, images, args.images_per_request))
                    rates[max_batch].append(r["req_s"])
                    print(f"{clients:>7} {max_batch:>9} {rnd:>5} {r['req_s']:>8.1f} {r['img_s']:>8.1f} "
                          f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['mean_batch']:>10.2f} {r['errors']:>6}",
                          flush=True)
            on, off = statistics.median(rates[args.max_batch_size]), statistics.median(rates[1])
            print(f"{clients:>7} clients: median {on:.1f} req/s with dynamic batching vs {off:.1f} req/s at max batch "
                  f"size 1 = {on / off:.2f}x", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
