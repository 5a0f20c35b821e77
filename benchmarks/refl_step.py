"""Seconds per ReFL update and peak memory.

CPU, tiny preset, through Ray Train + DeepSpeed ZeRO-2 with 1 and 2 workers (starts a local Ray or joins
RAY_ADDRESS):
    python benchmarks/refl_step.py --mode cpu [--steps 6] [--workers 1 2]
GPU, an SD-1.5-sized UNet (860M parameters, 512 px, 64x64x4 latents), SD-1.5 VAE and a CLIP-L-sized text
encoder built from configs with random weights (no hub), the full-size ImageReward architecture (random
weights) as the reward; one process, bf16 autocast, torch AdamW; full UNet vs LoRA, with and without
gradient checkpointing:
    python benchmarks/refl_step.py --mode gpu [--steps 5] [--batch 1] [--inference-steps 40]
Smoke test of the GPU code path on a CPU (toy widths, 128 px; not a figure):
    python benchmarks/refl_step.py --mode gpu --mini-cpu --steps 2 --inference-steps 12
Prints one line per case: seconds per update (median after a warm-up update) and peak memory.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_mode(steps: int, workers: list[int]) -> None:
    from rayapp.train.common import local_ray_init
    from rayapp.train.refl import run_refl
    from rayapp.train.refl_config import ReFLConfig

    local_ray_init()
    for n in workers:
        with tempfile.TemporaryDirectory(prefix="refl-bench-") as out:
            cfg = ReFLConfig(num_inference_steps=8, grad_step_min=3, grad_step_max=7, max_steps=steps,
                             eval_every=0, pretrain_weight=0.0, num_workers=n, train_batch_size=2,
                             eval_prompts=("one red circle",), eval_seeds=(0,), output_dir=out,
                             run_name=f"bench-{n}w")
            result = run_refl(cfg)
        m = result.metrics
        print(f"cpu tiny  workers={n} batch=2/worker 8 sampling steps: "
              f"{m['train_step_seconds_median']:.3f} s/update (median of {steps - 1} after warm-up), "
              f"peak RSS rank0 {m['peak_memory_mb']:.0f} MiB", flush=True)


def sd15_parts(device, dtype, mini: bool = False):
    """SD-1.5-shaped modules from configs (random weights) + the tiny BPE tokenizer.

    mini: the same block structure at toy widths and 128 px (a CPU smoke test of the GPU code path)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rayapp.diffusion.tiny import build_tiny_clip_tokenizer, make_scheduler
    from rayapp.train.refl import DiffusionParts

    tokenizer = build_tiny_clip_tokenizer()
    width = 32 if mini else 320
    hidden = 64 if mini else 768
    latent = 16 if mini else 64
    unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=hidden, attention_head_dim=8,
                                block_out_channels=(width, 2 * width, 4 * width, 4 * width), layers_per_block=2)
    vae_width = 32 if mini else 128
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=latent * 8, layers_per_block=2,
                        block_out_channels=(vae_width, 2 * vae_width, 4 * vae_width, 4 * vae_width),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                                        num_hidden_layers=2 if mini else 12, num_attention_heads=4 if mini else 12,
                                        max_position_embeddings=77))
    vae.requires_grad_(False).eval().to(device=device, dtype=dtype)
    text.requires_grad_(False).eval().to(device=device, dtype=dtype)
    unet.to(device)
    return DiffusionParts(unet, vae, text, tokenizer, make_scheduler("ddim"), latent * 8, latent, 4)


def gpu_mode(steps: int, batch: int, inference_steps: int, mini_cpu: bool = False) -> None:
    import torch

    import rayapp
    from rayapp.model.tokenizer import build_wordpiece_tokenizer
    from rayapp.train.refl import RM_TINY_WORDS, add_lora, reward_loss_step
    from rayapp.train.refl_config import ReFLConfig

    device = torch.device("cpu" if mini_cpu else "cuda")
    cuda = device.type == "cuda"
    cases = [("full", 0, False), ("full+gc", 0, True), ("lora4", 4, False), ("lora4+gc", 4, True)]
    rm = rayapp.create_model("tiny" if mini_cpu else "imagereward-v1",
                             tokenizer=build_wordpiece_tokenizer(RM_TINY_WORDS), seed=0)
    rm.to(device).set_dtype(torch.bfloat16).eval().requires_grad_(False)
    label = "cpu mini-sd 128px" if mini_cpu else "gpu sd1.5-size 512px"
    prompts = ["one large red circle on a white background"] * batch
    for name, rank, checkpointing in cases:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        parts = sd15_parts(device, torch.bfloat16, mini=mini_cpu)
        cfg = ReFLConfig(num_inference_steps=inference_steps, grad_step_min=inference_steps - 10,
                         grad_step_max=inference_steps - 1, lora_rank=rank, gradient_checkpointing=checkpointing,
                         pretrain_weight=0.0)
        unet = parts.unet
        if rank:
            add_lora(unet, cfg)
        else:
            unet.requires_grad_(True)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        times = []
        try:
            for step in range(steps):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss, _ = reward_loss_step(unet, unet, parts, rm, prompts, cfg, device, "bf16", step)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            print(f"{label} {name:9s} batch={batch} {inference_steps} sampling steps: "
                  f"{statistics.median(times[1:] or times):.3f} s/update, peak {peak:.1f} GiB "
                  f"({sum(p.numel() for p in params) / 1e6:.1f}M trainable)", flush=True)
        except torch.cuda.OutOfMemoryError:
            print(f"{label} {name:9s} batch={batch}: out of memory", flush=True)
        del parts, unet, opt, params
        if cuda:
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--steps", type=int, default=6, help="updates per case (the first is a warm-up)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cpu mode: worker counts")
    parser.add_argument("--batch", type=int, default=1, help="gpu mode: prompts per update")
    parser.add_argument("--inference-steps", type=int, default=40, help="gpu mode: sampling steps")
    parser.add_argument("--mini-cpu", action="store_true",
                        help="gpu mode's code path at toy widths on the CPU (a smoke test, not a figure)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.mode == "cpu":
        cpu_mode(args.steps, args.workers)
    else:
        gpu_mode(args.steps, args.batch, args.inference_steps, mini_cpu=args.mini_cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
