"""Seconds per ReFL update and peak memory: SD 1.x and SDXL, full UNet and LoRA, each objective.

CPU, through Ray Train + DeepSpeed ZeRO-2 (starts a local Ray or joins RAY_ADDRESS): the tiny SD pipeline with
1 and 2 workers, the tiny SDXL pipeline (LoRA, its family's default) with 1; one Ray run per case, so
bounded by --steps (default 6) and three cases:
    python benchmarks/refl_step.py --mode cpu [--steps 6] [--workers 1 2] [--objective refl]
Objectives, in one process without Ray (the loss, backward and a torch AdamW step; no DeepSpeed): every
objective x {full, LoRA} on the tiny SD and tiny SDXL pipelines (seconds on a CPU):
    python benchmarks/refl_step.py --mode objectives [--steps 4]
GPU, one process, bf16 autocast, torch AdamW: an SD-1.5-sized pipeline at 512 px and an SDXL-base-sized one at
1024 px (UNet, VAE and text encoders from their config dicts below, random weights, no hub) with the full-size
ImageReward architecture (random weights) as the reward; each objective with LoRA rank 4 + gradient
checkpointing, and ReFL also with the full UNet:
    python benchmarks/refl_step.py --mode gpu [--family sd15 sdxl] [--objectives refl draft-k draft-lv alignprop]
Smoke test of the GPU code path on a CPU (toy widths, 64-128 px; not a figure):
    python benchmarks/refl_step.py --mode gpu --mini-cpu --steps 2 --inference-steps 6
Prints one line per case: seconds per update (median after a warm-up update), peak memory, and the gradient
plan (AlignProp: the mean truncation K). 40 sampling steps on the GPU; DRaFT-K with K = 2, DRaFT-LV with N = 2,
AlignProp with K drawn from [1, 40] (the whole chain).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OBJECTIVES = ("refl", "draft-k", "draft-lv", "alignprop")
PROMPT = "one large red circle on a white background"

# SD 1.5 and SDXL base component configs (their hub config.json values), written out so nothing is fetched.
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280))
SDXL_UNET = dict(
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu")
CLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu", projection_dim=1280)
# The same structures at toy widths (--mini-cpu).
MINI = {
    "unet": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
    "sdxl_unet": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                      transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
                      addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
    "vae": dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}


def cpu_mode(steps: int, workers: list[int], objective: str) -> None:
    """Ray Train + DeepSpeed runs of the offline presets: tiny SD with each worker count, tiny SDXL with one."""
    from rayapp.refl import ReFLConfig, run_refl

    cases = [("offline", "tiny sd", n) for n in workers] + [("offline-sdxl", "tiny sdxl", 1)]
    for preset, label, n in cases:
        with tempfile.TemporaryDirectory(prefix="refl-bench-") as out:
            cfg = ReFLConfig.from_preset(preset, max_steps=steps, eval_every=0, pretrain_weight=0.0, num_workers=n,
                                         objective=objective, eval_prompts=("one red circle",), eval_seeds=(0,),
                                         output_dir=out, run_name=f"bench-{preset}-{n}w")
            result = run_refl(cfg)
        m = result.metrics
        lora = f"LoRA {result.config.lora_rank}" if result.config.lora_rank else "full"
        print(f"cpu {label:9s} {lora:7s} {objective:9s} workers={n} batch={cfg.train_batch_size}/worker "
              f"{cfg.num_inference_steps} sampling steps: {m['train_step_seconds_median']:.3f} s/update (median of "
              f"{steps - 1} after warm-up), peak RSS rank0 {m['peak_memory_mb']:.0f} MiB", flush=True)


def run_case(label: str, parts, rm, cfg, device, steps: int, batch: int, memory) -> None:
    """Timed updates (the first a warm-up) of one (pipeline, objective, LoRA/full, checkpointing) case."""
    import torch

    from rayapp.refl.models import prepare_unet_for_training
    from rayapp.refl.objective import autocast_for, reward_loss_step

    precision = "bf16" if device.type == "cuda" else "fp32"
    unet = prepare_unet_for_training(parts.unet, cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    times, ks = [], []
    memory.reset()
    try:
        for step in range(steps):
            memory.sync()
            t0 = time.perf_counter()
            with autocast_for(precision, device):  # the engine's autocast, without DeepSpeed
                loss, stats = reward_loss_step(unet, unet, parts, rm, [PROMPT] * batch, cfg, device, precision, step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            memory.sync()
            times.append(time.perf_counter() - t0)
            ks.append(stats["grad_steps"])
        print(f"{label} {cfg.objective:9s} {'LoRA 4' if cfg.lora_rank else 'full':6s}"
              f"{' +gc' if cfg.gradient_checkpointing else '    '} batch={batch} {cfg.num_inference_steps} steps: "
              f"{statistics.median(times[1:] or times):.3f} s/update, peak {memory.peak():s}, gradient through "
              f"{statistics.mean(ks):.1f} UNet call(s) per sample "
              f"({sum(p.numel() for p in params) / 1e6:.3f}M trainable)", flush=True)
    except torch.cuda.OutOfMemoryError:
        print(f"{label} {cfg.objective:9s} {'LoRA 4' if cfg.lora_rank else 'full':6s} batch={batch}: out of memory",
              flush=True)
    finally:
        del optimizer, params
        memory.release()


class Memory:
    """Peak GPU memory (allocated) on CUDA; peak RSS of the process on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def sync(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def peak(self) -> str:
        import torch

        if self.cuda:
            return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB RSS"

    def release(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def build_pipeline(family: str, device, mini: bool):
    """An SD-1.5- or SDXL-base-sized pipeline from configs (random weights), or its toy-width twin."""
    import torch
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from rayapp.diffusion.pipelines import make_scheduler
    from rayapp.diffusion.tiny import build_tiny_clip_tokenizer

    tokenizer = build_tiny_clip_tokenizer()
    ids = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vae_config = {**SD_VAE, **(MINI["vae"] if mini else {})}
    if family == "sdxl":
        vae_config.update(scaling_factor=0.13025, force_upcast=True)
    with torch.device(device):  # random init on the device: seconds instead of minutes for billions of weights
        vae = AutoencoderKL(**vae_config)
        if family == "sd15":
            unet = UNet2DConditionModel(**{**SD15_UNET, **(dict(MINI["unet"], sample_size=8, cross_attention_dim=32)
                                                            if mini else {})})
            text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **ids) if not mini else
                                 CLIPTextConfig(**MINI["text"], **ids))
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                           scheduler=make_scheduler("ddim"), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        else:
            unet = UNet2DConditionModel(**{**SDXL_UNET, **(dict(MINI["sdxl_unet"], sample_size=16) if mini else {})})
            text = CLIPTextModel(CLIPTextConfig(**(MINI["text"] if mini else CLIP_L_TEXT), **ids))
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
                **({**MINI["text"], "projection_dim": 32} if mini else CLIP_BIGG_TEXT), **ids))
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                             tokenizer_2=tokenizer, unet=unet, scheduler=make_scheduler("ddim"),
                                             add_watermarker=False)
    return pipe


def objective_config(base, objective: str, lora: bool, checkpointing: bool):
    """The benchmark's setting of one objective (K = 2 for DRaFT-K, N = 2 for DRaFT-LV, AlignProp's full range)."""
    return replace(base, objective=objective, lora_rank=4 if lora else 0, gradient_checkpointing=checkpointing,
                   draft_k=min(2, base.num_inference_steps), draft_lv_samples=2)


def objectives_mode(steps: int) -> None:
    """Every objective x {full, LoRA} on the tiny SD and SDXL pipelines, in this process."""
    import torch

    from rayapp.diffusion import load_diffusion_parts
    from rayapp.refl import ReFLConfig
    from rayapp.refl.rewards import load_reward_model

    device = torch.device("cpu")
    memory = Memory(device)
    for pretrained in ("tiny", "tiny-sdxl"):
        base = ReFLConfig.from_preset("offline", pretrained=pretrained, pretrain_weight=0.0)
        rm = load_reward_model(base, device, torch.float32)
        for objective in OBJECTIVES:
            for lora in (False, True):
                parts = load_diffusion_parts(pretrained, device=device, frozen_dtype=torch.float32)
                run_case(f"cpu {pretrained:9s}", parts, rm, objective_config(base, objective, lora, False), device,
                         steps, 2, memory)


def gpu_mode(steps: int, batch: int, inference_steps: int, families: list[str], objectives: list[str],
             mini_cpu: bool = False) -> None:
    """Full-size (or --mini-cpu toy) SD 1.5 at 512 px and SDXL at 1024 px: each objective, LoRA + checkpointing;
    ReFL also full UNet + checkpointing."""
    import torch

    import rayapp
    from rayapp.data.synth import vocabulary
    from rayapp.diffusion.parts import parts_from_pipeline
    from rayapp.model.tokenizer import build_wordpiece_tokenizer
    from rayapp.refl import ReFLConfig

    device = torch.device("cpu" if mini_cpu else "cuda")
    memory = Memory(device)
    frozen = torch.float32 if mini_cpu else torch.bfloat16
    rm = rayapp.create_model("tiny" if mini_cpu else "imagereward-v1",
                             tokenizer=build_wordpiece_tokenizer(vocabulary()), seed=0)
    rm.to(device).set_dtype(None if mini_cpu else torch.bfloat16)
    rm.eval().requires_grad_(False)
    base = ReFLConfig(num_inference_steps=inference_steps, grad_step_min=max(0, inference_steps - 10),
                      grad_step_max=inference_steps - 1, pretrain_weight=0.0, learning_rate=1e-5,
                      use_gpu=not mini_cpu, output_dir="unused")
    for family in families:
        size = "mini" if mini_cpu else {"sd15": "512px", "sdxl": "1024px"}[family]
        cases = [(obj, True, True) for obj in objectives] + ([("refl", False, True)] if "refl" in objectives else [])
        for objective, lora, checkpointing in cases:
            pipe = build_pipeline(family, device, mini_cpu)
            parts = parts_from_pipeline(pipe, device=device, frozen_dtype=frozen, scheduler="ddim")
            del pipe
            run_case(f"{device.type} {family}-size {size}", parts, rm,
                     objective_config(base, objective, lora, checkpointing), device, steps, batch, memory)
            del parts
            memory.release()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("cpu", "objectives", "gpu"), default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="updates per case, the first a warm-up (cpu 6, "
                                                                 "objectives 4, gpu 3)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cpu mode: worker counts (tiny SD)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="refl", help="cpu mode: the objective")
    parser.add_argument("--family", nargs="+", choices=("sd15", "sdxl"), default=["sd15", "sdxl"],
                        help="gpu mode: pipeline sizes")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES),
                        help="gpu mode: objectives")
    parser.add_argument("--batch", type=int, default=1, help="gpu mode: prompts per update")
    parser.add_argument("--inference-steps", type=int, default=40, help="gpu mode: sampling steps")
    parser.add_argument("--mini-cpu", action="store_true",
                        help="gpu mode's code path at toy widths on the CPU (a smoke test, not a figure)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.mode == "cpu":
        cpu_mode(args.steps or 6, args.workers, args.objective)
    elif args.mode == "objectives":
        objectives_mode(args.steps or 4)
    else:
        gpu_mode(args.steps or 3, args.batch, args.inference_steps, args.family, args.objectives,
                 mini_cpu=args.mini_cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
