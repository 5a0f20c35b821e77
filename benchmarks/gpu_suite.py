"""GPU suite: scoring, serving, ReFL and reward-model training figures on one GPU, written as JSON + Markdown.

    python benchmarks/gpu_suite.py                                 # one H100/H200-class GPU, under 8 minutes
    python benchmarks/gpu_suite.py --smoke                         # every section on the CPU at tiny sizes
    python benchmarks/gpu_suite.py --sections scoring serve --out results/gpu_suite

Everything is built from configs with random weights (no hub, no network); throughput does not depend on the
weights. Sections, each timed and recorded on its own (a failed one is written down with its error and the
others still run; the exit status is 1 if any failed):
  scoring  full-size ImageReward (the `imagereward-v1` preset) in bf16: images/s of `score_batch` on device
           tensors at batch 64 and 256, and as a share of this GPU's bf16 matmul roof measured in the same run
           (large square bf16 matmul, TFLOP/s) with the scorer's FLOPs per image counted by torch's
           FlopCounterMode on one forward. Goal: >= 2,500 img/s (~45% of the roof).
  serve    the Serve app (`rayapp.serve.app:build_app`) with one GPU model replica under 64 concurrent
           loopback HTTP clients posting one PNG each to /v1/score, dynamic batching on (max_batch_size 64)
           vs max_batch_size 1: req/s and p99 latency. Goal: batching >= 3x the req/s.
  refl     one ReFL update at Stable Diffusion 1.5 size (UNet, VAE, CLIP-L text encoder from the SD 1.5
           config dicts below, 512 px, 40 DDIM steps, gradient step drawn from 30..39) with the full-size
           ImageReward as the reward, through `rayapp.refl.objective.reward_loss_step` and a DeepSpeed bf16
           engine in this one process (as `rayapp.refl.task` does in each worker): full UNet and LoRA rank 4,
           each with and without gradient checkpointing: s/update and peak GPU memory.
  refl_flow  one LoRA ReFL update (rank 32, alpha 64: flow-GRPO's SD3.5-M LoRA) at Stable Diffusion 3.5 Medium
           size and at FLUX.1-dev size (transformer, 16-channel VAE, CLIP + T5-XXL text encoders from the config
           dicts below; frozen parts and the transformer's base weights in bf16, LoRA weights fp32), 512 px,
           10 flow-matching Euler steps (flow-GRPO's training sampler), gradient step drawn from 7..9, the
           full-size ImageReward as the reward, each with and without gradient checkpointing: s/update and peak
           GPU memory; through the same `reward_loss_step` and DeepSpeed bf16 engine as `refl`.
  rm       a full-size reward-model training step (`rayapp.rm.task`'s model, loss and a DeepSpeed bf16 engine
           from `rayapp.runtime.engine.initialize_engine`, ZeRO-2, fix_rate 0.7) in one process: pairs/s and
           peak GPU memory at 4 and 16 pairs per step.
`--smoke` runs the same code on the CPU with the tiny presets, a tiny UNet/VAE/text encoder at 64 px, a few
iterations and 4 clients: a check that the suite works, not figures. Ray is started only by the serve section:
one local Ray sized with this machine's CPUs, in its own temp dir, shut down at the end of the section.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "one", "two", "three", "red", "green", "blue", "yellow",
         "white", "circle", "circles", "square", "triangle", "small", "large", "photo", "background", "next", "to"]
PROMPT = "a photo of two red circles next to a blue square on a white background"
REFL_PROMPT = "one large red circle on a white background"

# Stable Diffusion 1.5's component configs (runwayml/stable-diffusion-v1-5 unet/, vae/ and text_encoder/
# config.json), written out so nothing is fetched.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
}
SD15_TEXT = {  # CLIP ViT-L/14's text tower
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
# The same block structure at toy widths for --smoke (4 VAE levels: the latent factor stays 8).
SMOKE_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1,
              "cross_attention_dim": 32}
SMOKE_VAE = {**SD15_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "sample_size": 64}
SMOKE_TEXT = {**SD15_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "projection_dim": 32}

# Stable Diffusion 3.5 Medium's component configs (stabilityai/stable-diffusion-3.5-medium transformer/, vae/,
# text_encoder/ (CLIP-L), text_encoder_2 (OpenCLIP bigG), text_encoder_3 (T5-XXL) config.json), and FLUX.1-dev's
# transformer (black-forest-labs/FLUX.1-dev transformer/config.json; its VAE has SD3's shape with FLUX's factors,
# its text encoders are CLIP-L and T5-XXL). Written out so nothing is fetched.
SD35M_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLOW_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": False,
    "use_post_quant_conv": False,
}
CLIP_L_TEXT = {**SD15_TEXT, "projection_dim": 768}
CLIP_G_TEXT = {"vocab_size": 49408,
               "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
               "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280}
T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu"}
SD35M = {"family": "sd3", "transformer": SD35M_TRANSFORMER, "vae": {**FLOW_VAE, "scaling_factor": 1.5305,
         "shift_factor": 0.0609}, "clip": (CLIP_L_TEXT, CLIP_G_TEXT), "t5": T5_XXL, "resolution": 512,
         "scheduler": {"shift": 3.0}}
FLUX_DEV = {"family": "flux", "transformer": FLUX_DEV_TRANSFORMER, "vae": {**FLOW_VAE, "scaling_factor": 0.3611,
            "shift_factor": 0.1159}, "clip": (CLIP_L_TEXT,), "t5": T5_XXL, "resolution": 512,
            "scheduler": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                          "base_image_seq_len": 256, "max_image_seq_len": 4096}}
# The same structures at toy widths for --smoke (4 VAE levels: the latent factor stays 8).
SMOKE_TEXT_SMALL = {**SMOKE_TEXT, "projection_dim": 32}
SMOKE_T5 = {"d_model": 64, "d_kv": 8, "d_ff": 128, "num_layers": 2, "num_heads": 8, "relative_attention_num_buckets": 8,
            "feed_forward_proj": "gated-gelu"}
SMOKE_FLOW_VAE = {**FLOW_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "sample_size": 64}
SMOKE_SD3 = {**SD35M, "transformer": {**SD35M_TRANSFORMER, "sample_size": 8, "num_layers": 2, "attention_head_dim": 8,
                                      "num_attention_heads": 4, "joint_attention_dim": 64, "caption_projection_dim": 32,
                                      "pooled_projection_dim": 64, "pos_embed_max_size": 16,
                                      "dual_attention_layers": (0,)},
             "vae": {**SD35M["vae"], **SMOKE_FLOW_VAE}, "clip": (SMOKE_TEXT_SMALL, SMOKE_TEXT_SMALL), "t5": SMOKE_T5,
             "resolution": 64}
SMOKE_FLUX = {**FLUX_DEV, "transformer": {**FLUX_DEV_TRANSFORMER, "num_layers": 1, "num_single_layers": 2,
                                          "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": 64,
                                          "pooled_projection_dim": 32, "axes_dims_rope": (2, 2, 4)},
              "vae": {**FLUX_DEV["vae"], **SMOKE_FLOW_VAE}, "clip": (SMOKE_TEXT_SMALL,), "t5": SMOKE_T5,
              "resolution": 64}


@dataclass(frozen=True)
class Profile:
    """Sizes and iteration counts of one suite run (FULL on a GPU, SMOKE on a CPU)."""

    name: str
    device: str
    rm_preset: str  # scorer / reward architecture (rayapp/model/presets)
    rm_train_preset: str  # RMTrainConfig preset of the training-step section
    score_batches: tuple[int, ...]
    min_seconds: float  # each throughput figure runs at least this long after its warm-up
    matmul_n: int  # side of the square bf16 matmul that measures the roof
    serve_clients: int
    serve_batch: int  # max_batch_size of the batching-on case
    serve_seconds: float  # measured load per case (after a warm-up of a third of it)
    serve_image_side: int
    refl_unet: dict = field(repr=False)
    refl_vae: dict = field(repr=False)
    refl_text: dict = field(repr=False)
    refl_inference_steps: int = 40
    refl_grad_range: tuple[int, int] = (30, 39)
    refl_batch: int = 2  # prompts per update (the sd15 preset's per-worker micro-batch)
    refl_updates: int = 3  # timed updates per case, after one warm-up update
    rm_batches: tuple[int, ...] = (4, 16)  # pairs per training step (4 = the reference's per-GPU micro-batch)
    rm_steps: int = 5  # timed steps per batch size, after two warm-up steps
    section_limit_s: dict = field(default_factory=dict)  # a stuck section is stopped after this long
    flow_models: dict = field(default_factory=dict, repr=False)  # refl_flow: case prefix -> component configs
    flow_inference_steps: int = 10
    flow_grad_range: tuple[int, int] = (7, 9)


FULL = Profile(
    name="full", device="cuda", rm_preset="imagereward-v1", rm_train_preset="imagereward-v1",
    score_batches=(64, 256), min_seconds=3.0, matmul_n=8192, serve_clients=64, serve_batch=64,
    serve_seconds=10.0, serve_image_side=256, refl_unet=SD15_UNET, refl_vae=SD15_VAE, refl_text=SD15_TEXT,
    section_limit_s={"scoring": 90, "serve": 180, "refl": 180, "rm": 90, "refl_flow": 300},
    flow_models={"sd35m": SD35M, "flux": FLUX_DEV},
)
SMOKE = Profile(
    name="smoke", device="cpu", rm_preset="tiny", rm_train_preset="offline",
    score_batches=(64, 256), min_seconds=0.2, matmul_n=512, serve_clients=4, serve_batch=4,
    serve_seconds=2.0, serve_image_side=64, refl_unet=SMOKE_UNET, refl_vae=SMOKE_VAE, refl_text=SMOKE_TEXT,
    refl_inference_steps=4, refl_grad_range=(2, 3), refl_batch=1, refl_updates=1, rm_batches=(4, 16), rm_steps=2,
    section_limit_s={"scoring": 300, "serve": 300, "refl": 300, "rm": 300, "refl_flow": 300},
    flow_models={"sd35m": SMOKE_SD3, "flux": SMOKE_FLUX}, flow_inference_steps=4, flow_grad_range=(2, 3),
)

GOALS = {"scoring_img_s": 2500.0, "scoring_roof_share": 0.45, "serve_speedup": 3.0, "total_seconds": 480.0}
SECTIONS = ("scoring", "serve", "refl", "rm", "refl_flow")
REFL_CASES = (("full", 0, False), ("full_gc", 0, True), ("lora4", 4, False), ("lora4_gc", 4, True))
FLOW_LORA_RANK, FLOW_LORA_ALPHA = 32, 64  # flow-GRPO's SD3.5-M LoRA
FLOW_CASES = (("lora32", False), ("lora32_gc", True))


class SectionTimeout(Exception):
    """A section ran past its limit (raised from SIGALRM in the main thread)."""


class SectionFailed(Exception):
    """A section that failed after measuring part of its figures (kept in the report)."""

    def __init__(self, partial: dict, message: str):
        super().__init__(message)
        self.partial = partial


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------

def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine_cpus() -> int:
    """CPUs this process may run on (the affinity mask; a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def sync(device) -> None:
    """Wait for queued GPU work so wall-clock timings cover it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def per_second(fn, items_per_call: float, device, min_seconds: float, warmup: int = 2, chunk: int = 3) -> float:
    """Items/s of `fn()` after `warmup` calls: calls in chunks of `chunk` until `min_seconds` have passed."""
    for _ in range(warmup):
        fn()
    sync(device)
    calls, start = 0, time.perf_counter()
    while True:
        for _ in range(chunk):
            fn()
        calls += chunk
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return items_per_call * calls / elapsed


class PeakMemory:
    """Peak memory of a measured span: CUDA's allocator peak on a GPU; the process's peak RSS on a CPU (which
    only grows, so CPU figures are cumulative over the run, not per case)."""

    def __init__(self, device):
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.kind = "torch.cuda.max_memory_allocated" if self.cuda else "process peak RSS (cumulative)"
        self.baseline_gib = 0.0

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_gib = torch.cuda.memory_allocated() / 2**30

    def peak_gib(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def goal_met(profile: Profile, met: bool) -> bool | None:
    """Whether a goal is met; None in a smoke run, whose tiny sizes say nothing about the goals."""
    return None if profile.name == "smoke" else bool(met)


def release_memory() -> None:
    """Return freed tensors' memory to the device between cases, so each case's peak is its own."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def single_process_distributed_env() -> None:
    """The variables torch.distributed's env:// init (and so deepspeed.initialize) reads, for a world of one."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def reward_tokenizer(save_dir: Path | None = None):
    """A small WordPiece tokenizer over the suite's prompt words (the full vocabulary size changes no FLOPs)."""
    from rayapp.model.tokenizer import build_wordpiece_tokenizer

    return build_wordpiece_tokenizer(WORDS, save_dir=save_dir)


def reward_model(preset: str, device, tokenizer=None):
    """A random-weight scorer of `preset` in eval mode on `device`, encoders in bf16 (the head stays fp32)."""
    import torch

    import rayapp

    with torch.device(device):  # initialised where it runs: seconds instead of a CPU minute at full size
        model = rayapp.create_model(preset, tokenizer=tokenizer or reward_tokenizer(), seed=0)
    return model.eval().requires_grad_(False).set_dtype("bfloat16")


def destroy_engine(engine) -> None:
    """Drop a DeepSpeed engine's hooks and buffers (engines hold references that outlive `del`)."""
    destroy = getattr(engine, "destroy", None)
    if destroy is not None:
        with contextlib.suppress(Exception):
            destroy()


# ---------------------------------------------------------------------------------------------------------------
# (a) scoring
# ---------------------------------------------------------------------------------------------------------------

def matmul_tflops(device, n: int, min_seconds: float) -> float:
    """TFLOP/s of an n x n x n bf16 matmul (2 n^3 FLOPs): this device's practical bf16 roof."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    rate = per_second(lambda: torch.matmul(a, b, out=out), 2.0 * n**3, device, min_seconds)
    return rate / 1e12


def flops_per_image(model, device) -> float:
    """FLOPs of one scorer forward for one image and prompt, as torch's FlopCounterMode counts them
    (matmuls, convolutions, attention; 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.image_size
    pixels = torch.randn(1, 3, size, size, device=device, dtype=torch.bfloat16)
    ids, mask = model.tokenize([PROMPT])
    counter = FlopCounterMode(display=False)
    with counter:
        model.score_batch(pixels, ids.to(device), mask.to(device))
    return float(counter.get_total_flops())


def scoring_rate(model, batch: int, device, min_seconds: float) -> float:
    """Images/s of `score_batch` on `batch` random images (bf16, on the device) against one prompt."""
    import torch

    size = model.config.image_size
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
    ids, mask = (t.to(device) for t in model.tokenize([PROMPT] * batch))
    return per_second(lambda: model.score_batch(pixels, ids, mask), batch, device, min_seconds)


def section_scoring(profile: Profile, work: Path) -> dict:
    """Scorer images/s at each batch size and its share of the measured bf16 matmul roof."""
    import torch

    device = torch.device(profile.device)
    roof = matmul_tflops(device, profile.matmul_n, profile.min_seconds)
    model = reward_model(profile.rm_preset, device)
    flops = flops_per_image(model, device)
    rows, figures = [], {"scoring.matmul_bf16_tflops": roof, "scoring.gflop_per_image": flops / 1e9}
    for batch in profile.score_batches:
        rate = scoring_rate(model, batch, device, profile.min_seconds)
        share = rate * flops / (roof * 1e12)
        rows.append({"batch": batch, "img_s": rate, "achieved_tflops": rate * flops / 1e12, "roof_share": share})
        figures[f"scoring.img_s_batch_{batch}"] = rate
        figures[f"scoring.roof_share_batch_{batch}"] = share
    best = max(rows, key=lambda row: row["img_s"])
    return {
        "figures": figures, "rows": rows, "preset": profile.rm_preset, "dtype": "bfloat16",
        "what": "model.score_batch on device tensors (preprocessed pixels + tokens), inference_mode",
        "roof": f"torch.matmul {profile.matmul_n}^3 bf16", "flops_counted_by": "torch.utils.flop_counter",
        "goal": {"img_s": GOALS["scoring_img_s"], "roof_share": GOALS["scoring_roof_share"],
                 "met": goal_met(profile, best["img_s"] >= GOALS["scoring_img_s"])},
    }


# ---------------------------------------------------------------------------------------------------------------
# (b) serve
# ---------------------------------------------------------------------------------------------------------------

def png_bodies(count: int, side: int) -> list[bytes]:
    """JSON bodies of /v1/score, each one PNG (smooth colour fields plus noise, like generated images)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    bodies = []
    for _ in range(count):
        base = np.stack([np.sin(6 * x * rng.random() + 6 * rng.random()) for _ in range(3)], -1) * 0.35 + 0.5
        pixels = np.clip(base * (1 - y[..., None] * rng.random()) + rng.normal(0, 0.03, base.shape), 0, 1)
        buf = io.BytesIO()
        Image.fromarray((pixels * 255).astype(np.uint8)).save(buf, format="PNG")
        image = base64.b64encode(buf.getvalue()).decode()
        bodies.append(json.dumps({"prompt": PROMPT, "images": [image]}).encode())
    return bodies


async def http_load(url: str, clients: int, seconds: float, bodies: list[bytes]) -> dict:
    """`clients` keep-alive clients post bodies back to back for `seconds`; req/s and latency percentiles."""
    import asyncio

    import httpx

    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def client(http, k: int) -> None:
        i = k
        while time.perf_counter() < deadline:
            body = bodies[i % len(bodies)]
            i += clients
            t0 = time.perf_counter()
            try:
                resp = await http.post("/v1/score", content=body, headers={"Content-Type": "application/json"})
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            if resp.status_code != 200:
                errors.append(f"HTTP {resp.status_code}: {resp.text[:300]}")
                continue
            latencies.append(time.perf_counter() - t0)
            size = resp.json().get("batch_size")
            if isinstance(size, int):
                batch_sizes.append(size)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    if not latencies:
        raise RuntimeError(f"no request succeeded in {elapsed:.1f} s; first errors: {errors[:3]}")
    lat = sorted(latencies)
    return {
        "requests": len(lat), "errors": len(errors), "first_errors": errors[:3], "seconds": elapsed,
        "req_s": len(lat) / elapsed, "p50_s": lat[len(lat) // 2], "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "mean_batch": statistics.fmean(batch_sizes) if batch_sizes else None,
    }


def serve_app_args(model_dir: Path, profile: Profile, max_batch_size: int, cpus: int) -> tuple[object, list[str]]:
    """AppArgs for one model replica (the GPU, or one CPU) behind enough ingress replicas to decode PNGs;
    options the current AppArgs lacks are left out and named in the returned notes."""
    from rayapp.serve.app import AppArgs

    gpu = profile.device == "cuda"
    # Ingress replicas decode and resize the PNGs: on a GPU box they, not the model, would cap batching.
    api_replicas = max(1, min(4, (cpus - 2) // 2)) if gpu else 1
    api_cpus = 1.0 if gpu else 0.5
    ongoing = 2 * profile.serve_clients
    values = {
        "model": str(model_dir), "name": "gpu-suite", "device": profile.device, "dtype": "bfloat16",
        "num_threads": 2 if gpu else 1, "max_batch_size": max_batch_size,
        "batch_wait_timeout_s": 0.01 if gpu else 0.02, "decode_threads": 4 if gpu else 1,
        "limits": {"max_images": 4, "max_request_bytes": 1 << 26},
        "scorer_options": {"num_replicas": 1, "max_ongoing_requests": ongoing,
                           "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if gpu else 0}},
        "api_options": {"num_replicas": api_replicas, "max_ongoing_requests": ongoing,
                        "ray_actor_options": {"num_cpus": api_cpus}},
    }
    required = {"model", "device", "dtype", "max_batch_size", "scorer_options", "api_options"}
    known = set(AppArgs.model_fields)
    missing = required - known
    if missing:
        raise RuntimeError(f"rayapp.serve AppArgs no longer has {sorted(missing)}: update benchmarks/gpu_suite.py")
    dropped = sorted(set(values) - known)
    args = AppArgs(**{k: v for k, v in values.items() if k in known})
    return args, [f"AppArgs has no {name!r}: left out" for name in dropped]


def section_serve(profile: Profile, work: Path) -> dict:
    """The endpoint's req/s and p99 with dynamic batching vs max_batch_size 1, one model replica."""
    import asyncio

    import ray
    from ray import serve

    import rayapp
    from rayapp.serve.app import build_app

    model_dir = work / "serve_model"
    # fp32 weights on disk, as a trained checkpoint is saved; the replica casts to bf16 when it loads them.
    rayapp.create_model(profile.rm_preset, tokenizer=reward_tokenizer(), seed=0).save_pretrained(model_dir)
    bodies = png_bodies(32, profile.serve_image_side)
    cpus = machine_cpus()
    gpu = profile.device == "cuda"
    # Socket paths live under the temp dir and must stay short; a private dir keeps others' sessions apart.
    ray_tmp = tempfile.mkdtemp(prefix="gs-ray-", dir="/tmp")
    cases, notes = {}, []
    try:
        ray.init(address="local", num_cpus=cpus, num_gpus=1 if gpu else 0, include_dashboard=False,
                 log_to_driver=False, _temp_dir=ray_tmp)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        for case, max_batch in (("batched", profile.serve_batch), ("unbatched", 1)):
            args, notes = serve_app_args(model_dir, profile, max_batch, cpus)
            serve.run(build_app(args), name="gpu-suite", route_prefix="/")
            # Warm-up: connections, first forwards at the batch sizes this load produces.
            asyncio.run(http_load(url, profile.serve_clients, profile.serve_seconds / 3, bodies))
            cases[case] = {"max_batch_size": max_batch,
                           **asyncio.run(http_load(url, profile.serve_clients, profile.serve_seconds, bodies))}
            serve.delete("gpu-suite")
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    speedup = cases["batched"]["req_s"] / cases["unbatched"]["req_s"]
    figures = {"serve.speedup": speedup}
    for case, row in cases.items():
        figures[f"serve.{case}.req_s"] = row["req_s"]
        figures[f"serve.{case}.p99_s"] = row["p99_s"]
    return {
        "figures": figures, "cases": cases, "clients": profile.serve_clients, "route": "/v1/score (JSON, 1 PNG)",
        "image_side": profile.serve_image_side, "ray_cpus": cpus, "ray_temp_dir": ray_tmp, "notes": notes,
        "goal": {"speedup": GOALS["serve_speedup"], "met": goal_met(profile, speedup >= GOALS["serve_speedup"])},
    }


# ---------------------------------------------------------------------------------------------------------------
# (c) ReFL
# ---------------------------------------------------------------------------------------------------------------

def frozen_sd_parts(profile: Profile, device):
    """The frozen VAE and CLIP text encoder (bf16 on `device`) and the tokenizer, shared by every case."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from rayapp.diffusion.tiny import build_tiny_clip_tokenizer

    tokenizer = build_tiny_clip_tokenizer()
    with torch.device(device):  # random init on the device: seconds instead of a minute for 1B parameters
        vae = AutoencoderKL(**profile.refl_vae)
        text = CLIPTextModel(CLIPTextConfig(**profile.refl_text, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id))
    vae.requires_grad_(False).eval().to(dtype=torch.bfloat16)
    text.requires_grad_(False).eval().to(dtype=torch.bfloat16)
    return vae, text, tokenizer


def sd_parts(profile: Profile, device, vae, text, tokenizer):
    """ReFL's parts around a fresh fp32 UNet (the engine keeps fp32 master weights, bf16 autocast)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from rayapp.diffusion.parts import parts_from_pipeline
    from rayapp.diffusion.pipelines import make_scheduler

    with torch.device(device):
        unet = UNet2DConditionModel(**profile.refl_unet)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler("ddim"), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return parts_from_pipeline(pipe, device=device, frozen_dtype=torch.bfloat16, scheduler="ddim")


def refl_case(profile: Profile, device, frozen, rm, lora_rank: int, checkpointing: bool, memory: PeakMemory) -> dict:
    """Timed ReFL updates (one warm-up first) of one configuration; s/update and peak memory."""
    from rayapp.refl.config import ReFLConfig
    from rayapp.refl.models import add_lora
    from rayapp.refl.objective import reward_loss_step
    from rayapp.runtime import engine as rt

    low, high = profile.refl_grad_range
    cfg = ReFLConfig(
        pretrained="sd15-from-config", reward=None, num_inference_steps=profile.refl_inference_steps,
        grad_step_min=low, grad_step_max=high, lora_rank=lora_rank, gradient_checkpointing=checkpointing,
        precision="bf16", train_batch_size=profile.refl_batch, gradient_accumulation_steps=1, num_workers=1,
        use_gpu=device.type == "cuda", max_steps=profile.refl_updates + 1, pretrain_weight=0.0, guidance_scale=1.0,
        learning_rate=1e-5, output_dir="unused",
    )
    cfg.validate()
    memory.reset()
    parts = sd_parts(profile, device, *frozen)
    unet = parts.unet
    if lora_rank:
        add_lora(unet, cfg)
    else:
        unet.requires_grad_(True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    engine = rt.initialize_engine(unet, cfg, total_steps=cfg.max_steps, world_size=1, precision="bf16",
                                  optimizer="AdamW")
    prompts = [REFL_PROMPT] * profile.refl_batch
    times, grad_indices = [], []
    try:
        for update in range(profile.refl_updates + 1):
            sync(device)
            t0 = time.perf_counter()
            # Same seeds in every case: the same gradient steps k, so the cases differ only in what they train.
            loss, stats = reward_loss_step(engine, engine.module, parts, rm, prompts, cfg, device, "bf16", update)
            engine.backward(loss)
            engine.step()
            sync(device)
            times.append(time.perf_counter() - t0)
            grad_indices.append(stats["grad_index"])
        peak = memory.peak_gib()
    finally:
        destroy_engine(engine)
        del engine, unet, parts
        release_memory()
    timed = times[1:] or times
    return {"s_per_update": statistics.median(timed), "update_seconds": times, "peak_memory_gib": peak,
            "baseline_memory_gib": memory.baseline_gib, "trainable_params_m": trainable / 1e6,
            "grad_indices": grad_indices, "lora_rank": lora_rank, "gradient_checkpointing": checkpointing}


def section_refl(profile: Profile, work: Path) -> dict:
    """One ReFL update at SD 1.5 size: full UNet and LoRA, each with and without gradient checkpointing."""
    import torch

    single_process_distributed_env()
    device = torch.device(profile.device)
    memory = PeakMemory(device)
    frozen = frozen_sd_parts(profile, device)
    rm = reward_model(profile.rm_preset, device)
    cases, errors, figures = {}, {}, {}
    for name, rank, checkpointing in REFL_CASES:
        try:
            cases[name] = refl_case(profile, device, frozen, rm, rank, checkpointing, memory)
        except SectionTimeout:
            raise
        except Exception as err:  # noqa: BLE001 -- e.g. out of memory in one case: the others still count
            errors[name] = f"{type(err).__name__}: {err}"
            release_memory()
            continue
        figures[f"refl.{name}.s_per_update"] = cases[name]["s_per_update"]
        figures[f"refl.{name}.peak_memory_gib"] = cases[name]["peak_memory_gib"]
    result = {
        "figures": figures, "cases": cases, "case_errors": errors, "memory_measure": memory.kind,
        "resolution": profile.refl_vae["sample_size"], "prompts_per_update": profile.refl_batch,
        "sampling_steps": profile.refl_inference_steps, "grad_step_range": list(profile.refl_grad_range),
        "reward": profile.rm_preset, "engine": "DeepSpeed ZeRO-2, bf16 autocast, AdamW, 1 process",
    }
    if errors:
        raise SectionFailed(result, f"cases failed: {errors}")
    return result


# ---------------------------------------------------------------------------------------------------------------
# (d) reward-model training step
# ---------------------------------------------------------------------------------------------------------------

def rm_step_rate(engine, model, pairs: int, device, profile: Profile, memory: PeakMemory) -> dict:
    """Pairs/s and peak memory of training steps on `pairs` random pairs (pixels handed over from host memory,
    as the Ray Data pipeline does)."""
    import torch

    from rayapp.rm.task import pair_loss, pair_rewards

    size = model.config.image_size
    ids, mask = model.tokenize([PROMPT] * pairs)
    batch = {"pixels_better": torch.randn(pairs, 3, size, size), "pixels_worse": torch.randn(pairs, 3, size, size),
             "input_ids": ids, "attention_mask": mask}

    def step() -> None:
        loss = pair_loss(*pair_rewards(engine, batch, device))
        engine.backward(loss)
        engine.step()

    memory.reset()
    rate = per_second(step, pairs, device, profile.min_seconds, warmup=2, chunk=profile.rm_steps)
    return {"pairs_per_step": pairs, "pairs_s": rate, "peak_memory_gib": memory.peak_gib()}


def section_rm(profile: Profile, work: Path) -> dict:
    """Reward-model training steps (forward both images of each pair, Bradley-Terry loss, backward, Adam) on a
    DeepSpeed bf16 engine: pairs/s and peak memory per pairs-per-step."""
    import torch

    from rayapp.rm import RMTrainConfig
    from rayapp.rm.task import build_model
    from rayapp.runtime import engine as rt

    single_process_distributed_env()
    device = torch.device(profile.device)
    memory = PeakMemory(device)
    config = RMTrainConfig.from_preset(
        profile.rm_train_preset, num_workers=1, use_gpu=device.type == "cuda", precision="bf16",
        train_batch_size=profile.rm_batches[0], gradient_accumulation_steps=1, warmup_steps=0,
        max_steps=1000, output_dir=str(work / "rm"))
    config.validate()
    with torch.device(device):
        model = build_model(config, reward_tokenizer())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    engine = rt.initialize_engine(model, config, total_steps=config.max_steps, world_size=1, precision="bf16",
                                  optimizer="Adam")
    try:
        rows = [rm_step_rate(engine, model, pairs, device, profile, memory) for pairs in profile.rm_batches]
    finally:
        destroy_engine(engine)
    figures = {}
    for row in rows:
        figures[f"rm.pairs_s_batch_{row['pairs_per_step']}"] = row["pairs_s"]
        figures[f"rm.peak_memory_gib_batch_{row['pairs_per_step']}"] = row["peak_memory_gib"]
    return {
        "figures": figures, "rows": rows, "preset": profile.rm_train_preset, "model_preset": config.model_preset,
        "fix_rate": config.fix_rate, "trainable_params_m": trainable / 1e6, "params_m": total / 1e6,
        "engine": f"DeepSpeed ZeRO-{config.zero_stage}, bf16 autocast, Adam, 1 process",
        "what": "pixels from host memory each step (as the Ray Data pipeline hands them over); 2 images per pair",
        "memory_measure": memory.kind,
    }


# ---------------------------------------------------------------------------------------------------------------
# (e) ReFL on flow-matching transformers (SD3.5 Medium, FLUX.1-dev)
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def built_on(device, dtype):
    """Modules created inside are initialised on `device` in `dtype` (no fp32 copy of a 12B transformer first)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def flow_pipeline(spec: dict, device):
    """A StableDiffusion3Pipeline / FluxPipeline from `spec`'s component configs, random weights, bf16 on
    `device`; tokenizers are the tiny offline ones (the vocabulary size changes no FLOPs of the update)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from rayapp.diffusion.tiny import build_tiny_clip_tokenizer
    from rayapp.diffusion.tiny_sd3 import build_tiny_t5_tokenizer

    clip_tokenizer, t5_tokenizer = build_tiny_clip_tokenizer(), build_tiny_t5_tokenizer()
    special = {"bos_token_id": clip_tokenizer.bos_token_id, "eos_token_id": clip_tokenizer.eos_token_id,
               "pad_token_id": clip_tokenizer.pad_token_id}
    t5_config = T5Config(**spec["t5"], vocab_size=len(t5_tokenizer), is_encoder_decoder=False, use_cache=False,
                         dropout_rate=0.0, pad_token_id=t5_tokenizer.pad_token_id,
                         eos_token_id=t5_tokenizer.eos_token_id)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **spec["scheduler"])
    with built_on(device, torch.bfloat16):
        vae = AutoencoderKL(**spec["vae"])
        t5 = T5EncoderModel(t5_config)
        if spec["family"] == "sd3":
            clip = [CLIPTextModelWithProjection(CLIPTextConfig(**text, **special)) for text in spec["clip"]]
            transformer = SD3Transformer2DModel(**spec["transformer"])
        else:
            clip = [CLIPTextModel(CLIPTextConfig(**spec["clip"][0], **special))]
            transformer = FluxTransformer2DModel(**spec["transformer"])
    if spec["family"] == "sd3":
        return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip[0],
                                        tokenizer=clip_tokenizer, text_encoder_2=clip[1], tokenizer_2=clip_tokenizer,
                                        text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip[0], tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)


def flow_refl_case(profile: Profile, device, spec: dict, rm, checkpointing: bool, memory: PeakMemory) -> dict:
    """Timed LoRA ReFL updates (one warm-up first) on a flow-matching pipeline; s/update and peak memory."""
    import torch

    from rayapp.diffusion.parts import parts_from_pipeline
    from rayapp.refl.config import ReFLConfig
    from rayapp.refl.models import add_lora
    from rayapp.refl.objective import reward_loss_step
    from rayapp.runtime import engine as rt

    low, high = profile.flow_grad_range
    cfg = ReFLConfig(
        pretrained="from-config", reward=None, scheduler="flow-euler", num_inference_steps=profile.flow_inference_steps,
        grad_step_min=low, grad_step_max=high, lora_rank=FLOW_LORA_RANK, lora_alpha=FLOW_LORA_ALPHA,
        gradient_checkpointing=checkpointing, precision="bf16", train_batch_size=profile.refl_batch,
        gradient_accumulation_steps=1, num_workers=1, use_gpu=device.type == "cuda", max_steps=profile.refl_updates + 1,
        pretrain_weight=0.0, guidance_scale=1.0, learning_rate=3e-4, resolution=spec["resolution"], output_dir="unused",
    )
    cfg.validate()
    memory.reset()
    parts = parts_from_pipeline(flow_pipeline(spec, device), device=device, frozen_dtype=torch.bfloat16,
                                resolution=spec["resolution"])
    transformer = parts.unet
    add_lora(transformer, cfg, parts.family.lora_targets)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    total = sum(p.numel() for p in transformer.parameters())
    engine = rt.initialize_engine(transformer, cfg, total_steps=cfg.max_steps, world_size=1, precision="bf16",
                                  optimizer="AdamW")
    prompts = [REFL_PROMPT] * profile.refl_batch
    times, grad_indices = [], []
    try:
        for update in range(profile.refl_updates + 1):
            sync(device)
            t0 = time.perf_counter()
            loss, stats = reward_loss_step(engine, engine.module, parts, rm, prompts, cfg, device, "bf16", update)
            engine.backward(loss)
            engine.step()
            sync(device)
            times.append(time.perf_counter() - t0)
            grad_indices.append(stats["grad_index"])
        peak = memory.peak_gib()
    finally:
        destroy_engine(engine)
        del engine, transformer, parts
        release_memory()
    timed = times[1:] or times
    return {"s_per_update": statistics.median(timed), "update_seconds": times, "peak_memory_gib": peak,
            "baseline_memory_gib": memory.baseline_gib, "trainable_params_m": trainable / 1e6,
            "transformer_params_m": total / 1e6, "grad_indices": grad_indices, "lora_rank": FLOW_LORA_RANK,
            "gradient_checkpointing": checkpointing, "resolution": spec["resolution"]}


def section_refl_flow(profile: Profile, work: Path) -> dict:
    """One LoRA ReFL update at SD3.5-Medium and FLUX.1-dev size, each with and without gradient checkpointing."""
    import torch

    single_process_distributed_env()
    device = torch.device(profile.device)
    memory = PeakMemory(device)
    rm = reward_model(profile.rm_preset, device)
    cases, errors, figures = {}, {}, {}
    for model, spec in profile.flow_models.items():
        for suffix, checkpointing in FLOW_CASES:
            name = f"{model}_{suffix}"
            try:
                cases[name] = flow_refl_case(profile, device, spec, rm, checkpointing, memory)
            except SectionTimeout:
                raise
            except Exception as err:  # noqa: BLE001 -- e.g. out of memory in one case: the others still count
                errors[name] = f"{type(err).__name__}: {err}"
                release_memory()
                continue
            figures[f"refl_flow.{name}.s_per_update"] = cases[name]["s_per_update"]
            figures[f"refl_flow.{name}.peak_memory_gib"] = cases[name]["peak_memory_gib"]
    result = {
        "figures": figures, "cases": cases, "case_errors": errors, "memory_measure": memory.kind,
        "prompts_per_update": profile.refl_batch, "sampling_steps": profile.flow_inference_steps,
        "grad_step_range": list(profile.flow_grad_range), "reward": profile.rm_preset,
        "lora": f"rank {FLOW_LORA_RANK}, alpha {FLOW_LORA_ALPHA}",
        "engine": "DeepSpeed ZeRO-2, bf16 autocast, AdamW, 1 process; frozen weights bf16, LoRA fp32",
    }
    if errors:
        raise SectionFailed(result, f"cases failed: {errors}")
    return result


# ---------------------------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------------------------

RUNNERS = {"scoring": section_scoring, "serve": section_serve, "refl": section_refl, "rm": section_rm,
           "refl_flow": section_refl_flow}


def _alarm(signum, frame):
    raise SectionTimeout("section ran past its time limit")


def run_section(name: str, profile: Profile, work: Path) -> dict:
    """Run one section under its time limit; a failure becomes {status: failed, error, traceback}."""
    limit = int(profile.section_limit_s.get(name, 600))
    print(f"[gpu_suite] {name}: starting (limit {limit} s)", flush=True)
    started = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        result = {"status": "ok", **RUNNERS[name](profile, work)}
    except SectionFailed as err:
        result = {"status": "failed", **err.partial, "error": str(err), "traceback": traceback.format_exc()}
    except BaseException as err:  # one section's failure must not hide the others
        if isinstance(err, KeyboardInterrupt):
            raise
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    result["seconds"] = time.perf_counter() - started
    with contextlib.suppress(Exception):
        release_memory()
    line = f"[gpu_suite] {name}: {result['status']} in {result['seconds']:.1f} s"
    if result["status"] != "ok":
        line += f" -- {result['error']}"
    print(line, flush=True)
    return result


def environment(profile: Profile) -> dict:
    """What ran where: versions, device, CPU count."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": machine_cpus(), "device": profile.device}
    if torch.cuda.is_available() and profile.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    from importlib.metadata import PackageNotFoundError, version

    for package in ("deepspeed", "diffusers", "transformers", "ray", "peft"):
        with contextlib.suppress(PackageNotFoundError):
            info[package] = version(package)  # from the metadata: importing DeepSpeed here would pick its device
    return info


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.{digits}f}"
    return str(value)


def met(goal: dict) -> str:
    if goal["met"] is None:
        return "not judged in a smoke run"
    return "met" if goal["met"] else "not met"


def scoring_markdown(sec: dict) -> list[str]:
    figures = sec["figures"]
    head = (f"{sec['preset']} bf16, {sec['what']}; roof {fmt(figures['scoring.matmul_bf16_tflops'], 1)} TFLOP/s "
            f"({sec['roof']}); {fmt(figures['scoring.gflop_per_image'], 1)} GFLOP/image.")
    goal = (f"Goal: >= {GOALS['scoring_img_s']:,.0f} img/s (~{100 * GOALS['scoring_roof_share']:.0f}% of roof): "
            f"{met(sec['goal'])}.")
    rows = [f"| {r['batch']} | {fmt(r['img_s'], 1)} | {fmt(r['achieved_tflops'], 1)} | {100 * r['roof_share']:.1f}% |"
            for r in sec["rows"]]
    return [head, "", "| batch | img/s | TFLOP/s | share of roof |", "|---:|---:|---:|---:|", *rows, "", goal]


def serve_markdown(sec: dict) -> list[str]:
    head = f"{sec['clients']} clients, {sec['route']}, {sec['image_side']} px; one model replica."
    rows = [(f"| {case} | {r['max_batch_size']} | {fmt(r['req_s'], 1)} | {fmt(r['p50_s'], 3)} | {fmt(r['p99_s'], 3)} "
             f"| {fmt(r['mean_batch'], 1)} | {r['errors']} |") for case, r in sec["cases"].items()]
    goal = (f"Batching speed-up {fmt(sec['figures']['serve.speedup'])}x (goal >= {GOALS['serve_speedup']:.0f}x): "
            f"{met(sec['goal'])}.")
    notes = [f"Note: {note}" for note in sec.get("notes", [])]
    return [head, "", "| case | max_batch_size | req/s | p50 s | p99 s | mean batch | errors |",
            "|---|---:|---:|---:|---:|---:|---:|", *rows, "", goal, *notes]


def refl_markdown(sec: dict) -> list[str]:
    head = (f"{sec['resolution']} px, {sec['prompts_per_update']} prompts/update, {sec['sampling_steps']} DDIM steps, "
            f"gradient step in {sec['grad_step_range']}, reward {sec['reward']}; {sec['engine']}; "
            f"memory: {sec['memory_measure']}.")
    rows = [(f"| {case} | {fmt(r['trainable_params_m'], 1)} | {fmt(r['s_per_update'], 3)} "
             f"| {fmt(r['peak_memory_gib'], 1)} |") for case, r in sec["cases"].items()]
    rows += [f"| {case} | failed: {err} | | |" for case, err in sec.get("case_errors", {}).items()]
    return [head, "", "| case | trainable M | s/update | peak GiB |", "|---|---:|---:|---:|", *rows]


def refl_flow_markdown(sec: dict) -> list[str]:
    head = (f"LoRA {sec['lora']}, {sec['prompts_per_update']} prompts/update, {sec['sampling_steps']} flow-matching "
            f"Euler steps, gradient step in {sec['grad_step_range']}, reward {sec['reward']}; {sec['engine']}; "
            f"memory: {sec['memory_measure']}.")
    rows = [(f"| {case} | {r['resolution']} | {fmt(r['transformer_params_m'], 1)} | {fmt(r['trainable_params_m'], 1)} "
             f"| {fmt(r['s_per_update'], 3)} | {fmt(r['peak_memory_gib'], 1)} |") for case, r in sec["cases"].items()]
    rows += [f"| {case} | failed: {err} | | | | |" for case, err in sec.get("case_errors", {}).items()]
    return [head, "", "| case | px | transformer M | trainable M | s/update | peak GiB |",
            "|---|---:|---:|---:|---:|---:|", *rows]


def rm_markdown(sec: dict) -> list[str]:
    head = (f"{sec['model_preset']} ({fmt(sec['params_m'], 1)} M parameters, {fmt(sec['trainable_params_m'], 1)} M "
            f"trained, fix_rate {sec['fix_rate']}); {sec['engine']}; memory: {sec['memory_measure']}.")
    rows = [f"| {r['pairs_per_step']} | {fmt(r['pairs_s'], 1)} | {fmt(r['peak_memory_gib'], 1)} |"
            for r in sec["rows"]]
    return [head, "", "| pairs/step | pairs/s | peak GiB |", "|---:|---:|---:|", *rows]


# Per section: the Markdown writer and the result key it needs (absent when the section failed early).
MARKDOWN = {"scoring": (scoring_markdown, "rows"), "serve": (serve_markdown, "cases"),
            "refl": (refl_markdown, "cases"), "rm": (rm_markdown, "rows"), "refl_flow": (refl_flow_markdown, "cases")}


def markdown(report: dict) -> str:
    """The report as Markdown: one table per section, goals beside the figures."""
    env = report["environment"]
    intro = (f"`{report['command']}` on {env.get('gpu', env['device'])}; torch {env['torch']}, {env['cpus']} CPUs; "
             f"{report['total_seconds']:.0f} s in all (goal < {GOALS['total_seconds']:.0f} s on one GPU).")
    lines = [f"# GPU suite ({report['profile']})", "", intro, ""]
    if report["profile"] == "smoke":
        lines += [("**Smoke run: tiny sizes on the CPU. These numbers only show that the suite works; they are not "
                   "figures of the system.**"), ""]
    for name, sec in report["sections"].items():
        lines += [f"## {name}: {sec['status']} ({sec['seconds']:.1f} s)", ""]
        if sec["status"] != "ok":
            lines += [f"Failed: `{sec['error']}`", ""]
        writer, needs = MARKDOWN[name]
        if needs in sec:
            lines += [*writer(sec), ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every section on the CPU at tiny sizes (a check)")
    parser.add_argument("--out", default="results/gpu_suite", help="directory for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU even on a GPU machine (DeepSpeed and Ray look too)
    import torch

    profile = SMOKE if args.smoke else FULL
    if profile.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU visible: run on a GPU machine, or pass --smoke for the CPU check")
    from rayapp.logs import setup_logging

    setup_logging(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/gpu_suite.py" + (" --smoke" if args.smoke else "")
    started = time.perf_counter()
    report = {"command": command, "profile": profile.name, "environment": environment(profile),
              "goals": GOALS, "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as work:
        for name in args.sections:
            report["sections"][name] = run_section(name, profile, Path(work))
            report["total_seconds"] = time.perf_counter() - started
            write_report(report, out)  # after every section: a later crash keeps what was measured
    report["figures"] = {k: v for sec in report["sections"].values() for k, v in sec.get("figures", {}).items()}
    report["failed"] = [name for name, sec in report["sections"].items() if sec["status"] != "ok"]
    report["total_seconds"] = time.perf_counter() - started
    write_report(report, out)
    for key, value in report["figures"].items():
        print(f"{key:40s} {value:12.4g}")
    print(f"[gpu_suite] {report['total_seconds']:.0f} s; wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}"
          + (f"; FAILED: {', '.join(report['failed'])}" if report["failed"] else ""), flush=True)
    return 1 if report["failed"] else 0


def write_report(report: dict, out: Path) -> None:
    """gpu_suite.json and gpu_suite.md under `out`."""
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_suite.md").write_text(markdown({"total_seconds": 0.0, **report}))


if __name__ == "__main__":
    sys.exit(main())
