"""The parts of a latent text-to-image pipeline that training and sampling drive, with the pipeline family
as data.

SD 1.x/2.x and SDXL run the same code: text encoders -> `Conditioning` (the UNet's keyword arguments) ->
`unet(latents, t, **conditioning.unet_kwargs())` -> VAE decode. What differs between them is a handful of
values in `PipelineFamily`:

    family  encoders                   context                         added conditioning    VAE in fp16
    sd      text_encoder               last hidden state (final LN)    none                  as is
    sdxl    text_encoder(+_2), concat  penultimate hidden states       pooled text_embeds,   fp32 when the VAE
                                                                       size/crop time_ids    says force_upcast
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineFamily:
    """How one diffusers pipeline class conditions its denoiser, samples and decodes its latents."""

    name: str
    pipeline_class: str  # the diffusers class an exported full pipeline loads with
    text_encoders: tuple[str, ...]  # CLIP component names, in the order their states are concatenated
    tokenizers: tuple[str, ...]
    hidden_state: str  # "last": last_hidden_state (after the final LN); "penultimate": hidden_states[-2]; "none"
    pooled: str  # "none"; "last" (the last projected encoder's text_embeds); "concat" (every encoder's text_embeds,
    #              concatenated); "pooler" (the first encoder's pooler_output)
    size_conditioning: bool  # pass (original size, crop top-left, target size) as added_cond_kwargs["time_ids"]
    vae_fp32_in_fp16: bool  # decode in fp32 when the frozen modules are fp16 and the VAE asks (force_upcast)
    default_lora_rank: int  # LoRA rank when the config leaves it unset (0 = the full denoiser)
    denoiser: str = "unet"  # the trained component: "unet" (called as unet(x, t, ...)) or "transformer"
    flow_matching: bool = False  # velocity prediction on x_t = (1 - sigma) x0 + sigma noise, Euler sampler
    t5_encoder: str | None = None  # T5 component whose last hidden states are the token context
    t5_tokenizer: str | None = None
    t5_optional: bool = False  # without it the T5 states are zeros (diffusers' SD3 with text_encoder_3=None)
    t5_max_length: int = 0  # the pipeline's default max_sequence_length
    timestep_divisor: float = 1.0  # the denoiser's timestep = scheduler timestep / this (FLUX: 1000)
    packed_latents: bool = False  # FLUX: 2x2 latent patches packed into tokens, with positional image ids
    embedded_guidance: bool = False  # the guidance scale is an input of the model (guidance-distilled FLUX)
    patch_size_key: str | None = None  # denoiser config key of the patch size (its latent side must divide)
    default_sample_size: int = 0  # latent pixels when the denoiser config has no sample_size (FLUX: 128)
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # peft target modules (attention)

    @property
    def latent_multiple(self) -> int:
        """Latent pixels per side must be a multiple of this (2x2 packing or patches; 1 for UNets)."""
        return 2 if self.packed_latents or self.patch_size_key else 1


SD = PipelineFamily(name="sd", pipeline_class="StableDiffusionPipeline", text_encoders=("text_encoder",),
                    tokenizers=("tokenizer",), hidden_state="last", pooled="none",
                    size_conditioning=False, vae_fp32_in_fp16=False, default_lora_rank=0)
SDXL = PipelineFamily(name="sdxl", pipeline_class="StableDiffusionXLPipeline",
                      text_encoders=("text_encoder", "text_encoder_2"), tokenizers=("tokenizer", "tokenizer_2"),
                      hidden_state="penultimate", pooled="last", size_conditioning=True,
                      vae_fp32_in_fp16=True, default_lora_rank=4)
# Joint-attention projections of the image and the text stream (flow-GRPO's SD3 LoRA targets).
TRANSFORMER_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out")
SD3 = PipelineFamily(name="sd3", pipeline_class="StableDiffusion3Pipeline",
                     text_encoders=("text_encoder", "text_encoder_2"), tokenizers=("tokenizer", "tokenizer_2"),
                     hidden_state="penultimate", pooled="concat", size_conditioning=False, vae_fp32_in_fp16=False,
                     default_lora_rank=32, denoiser="transformer", flow_matching=True, t5_encoder="text_encoder_3",
                     t5_tokenizer="tokenizer_3", t5_optional=True, t5_max_length=256, patch_size_key="patch_size",
                     lora_targets=TRANSFORMER_LORA_TARGETS)
FLUX = PipelineFamily(name="flux", pipeline_class="FluxPipeline", text_encoders=("text_encoder",),
                      tokenizers=("tokenizer",), hidden_state="none", pooled="pooler", size_conditioning=False,
                      vae_fp32_in_fp16=False, default_lora_rank=32, denoiser="transformer", flow_matching=True,
                      t5_encoder="text_encoder_2", t5_tokenizer="tokenizer_2", t5_max_length=512,
                      timestep_divisor=1000.0, packed_latents=True, embedded_guidance=True, default_sample_size=128,
                      lora_targets=TRANSFORMER_LORA_TARGETS)
FAMILIES = {family.pipeline_class: family for family in (SD, SDXL, SD3, FLUX)}


def family_of(pipeline_class: str) -> PipelineFamily:
    """The family of a diffusers pipeline class name; an unsupported one is an error naming the supported."""
    family = FAMILIES.get(pipeline_class)
    if family is None:
        names = ", ".join(f"{f.pipeline_class} ({f.name})" for f in FAMILIES.values())
        raise ValueError(f"ReFL supports the pipeline classes {names}, not {pipeline_class!r} "
                         "(`rayapp generate` loads any text-to-image pipeline)")
    return family


@dataclass
class Conditioning:
    """Text conditioning of a batch, as the denoiser's keyword arguments."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)  # UNet added conditioning (SDXL)
    pooled_projections: torch.Tensor | None = None  # SD3 / FLUX pooled text embedding
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # not batched: FLUX's txt_ids

    def unet_kwargs(self) -> dict:
        """`denoiser(latents, t, **kwargs)` arguments."""
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        if self.pooled_projections is not None:
            kwargs["pooled_projections"] = self.pooled_projections
        kwargs.update(self.shared)
        return kwargs

    def cat(self, other: Conditioning) -> Conditioning:
        """This batch followed by `other`'s (classifier-free guidance runs [uncond, cond] in one call)."""
        pooled = None
        if self.pooled_projections is not None:
            pooled = torch.cat([self.pooled_projections, other.pooled_projections])
        return Conditioning(torch.cat([self.encoder_hidden_states, other.encoder_hidden_states]),
                            {k: torch.cat([v, other.added_cond_kwargs[k]]) for k, v in self.added_cond_kwargs.items()},
                            pooled, dict(self.shared))

    def to(self, dtype: torch.dtype) -> Conditioning:
        """Every tensor in `dtype` (fp16 engines take no fp32 inputs)."""
        return Conditioning(self.encoder_hidden_states.to(dtype),
                            {k: v.to(dtype) for k, v in self.added_cond_kwargs.items()},
                            None if self.pooled_projections is None else self.pooled_projections.to(dtype),
                            {k: v.to(dtype) for k, v in self.shared.items()})

    def zeros_like(self) -> Conditioning:
        """The same shapes, all zeros except the size/crop ids (SDXL's empty-prompt negative)."""
        added = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(torch.zeros_like(self.encoder_hidden_states), added,
                            None if self.pooled_projections is None else torch.zeros_like(self.pooled_projections),
                            dict(self.shared))

    def __len__(self) -> int:
        return int(self.encoder_hidden_states.shape[0])


@dataclass
class DiffusionParts:
    """A pipeline's modules as training uses them (the denoiser trained, the rest frozen) plus its sampler.

    `unet` is the denoiser whatever its kind (a UNet, or SD3's / FLUX's transformer)."""

    family: PipelineFamily
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler: object  # the sampler training differentiates through (DDIM / DDPM, or flow-matching Euler)
    resolution: int  # output pixels (square)
    latent_size: int  # latent pixels = resolution / VAE factor
    latent_channels: int
    zero_negative: bool = False  # the pipeline's empty-prompt embedding is zeros (SDXL force_zeros_for_empty_prompt)
    t5: tuple | None = None  # (tokenizer, encoder) of the T5 context, or None (SD3 without text_encoder_3)

    @property
    def text_encoder(self):
        """The first text encoder (what SD 1.x calls `text_encoder`)."""
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def flow_matching(self) -> bool:
        return self.family.flow_matching

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        """The denoiser's conditioning for `prompts` (frozen text encoders, no gradient)."""
        family = self.family
        states, projected, poolers = [], [], []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=family.hidden_state == "penultimate")
            if family.hidden_state == "last":
                states.append(out.last_hidden_state)
            elif family.hidden_state == "penultimate":
                states.append(out.hidden_states[-2])
            if getattr(out, "text_embeds", None) is not None:  # a CLIPTextModelWithProjection's pooled output
                projected.append(out.text_embeds)
            if getattr(out, "pooler_output", None) is not None:
                poolers.append(out.pooler_output)
        context = torch.cat(states, dim=-1) if states else None
        if family.t5_encoder:
            t5 = self.t5_states(prompts, device, like=context if context is not None else poolers[0])
            if context is not None:  # SD3: CLIP states zero-padded to the T5 width, then the T5 tokens
                context = torch.cat([F.pad(context, (0, t5.shape[-1] - context.shape[-1])), t5], dim=-2)
            else:
                context = t5
        return Conditioning(context, self.added_conditioning(projected, len(prompts), device),
                            self.pooled_projections(projected, poolers), self.shared_conditioning(context))

    def added_conditioning(self, projected: list, count: int, device: torch.device) -> dict[str, torch.Tensor]:
        """A UNet's added_cond_kwargs (SDXL: the pooled text_embeds and size/crop time_ids)."""
        added: dict[str, torch.Tensor] = {}
        if self.family.denoiser == "unet" and self.family.pooled == "last":
            if not projected:
                raise ValueError(f"a {self.family.pipeline_class} needs a text encoder with a projection "
                                 "(CLIPTextModelWithProjection) for its pooled embedding")
            added["text_embeds"] = projected[-1]
        if self.family.size_conditioning:
            added["time_ids"] = self.time_ids(count, device)
        return added

    def pooled_projections(self, projected: list, poolers: list) -> torch.Tensor | None:
        """A transformer's pooled_projections: SD3 both projections concatenated, FLUX the CLIP pooler output."""
        if self.family.denoiser != "transformer":
            return None
        if self.family.pooled == "concat":
            if len(projected) != len(self.text_encoders):
                raise ValueError(f"a {self.family.pipeline_class} needs projected CLIP encoders "
                                 "(CLIPTextModelWithProjection) for its pooled embedding")
            return torch.cat(projected, dim=-1)
        return poolers[0]

    def shared_conditioning(self, context: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unbatched inputs: FLUX's text position ids (zeros, one row per token)."""
        if not self.family.packed_latents:
            return {}
        return {"txt_ids": torch.zeros(context.shape[1], 3, device=context.device, dtype=context.dtype)}

    def t5_states(self, prompts: list[str], device: torch.device, like: torch.Tensor) -> torch.Tensor:
        """The T5 encoder's last hidden states at the family's sequence length; zeros without a T5 (SD3)."""
        length = self.family.t5_max_length
        if self.t5 is None:
            width = int(self.unet.config.joint_attention_dim)
            return torch.zeros(len(prompts), length, width, device=device, dtype=like.dtype)
        tokenizer, encoder = self.t5
        ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        return encoder(ids)[0]

    def encode_negative(self, count: int, device: torch.device) -> Conditioning:
        """The unconditional branch of classifier-free guidance for `count` samples, as the pipeline builds it."""
        empty = self.encode_prompts([""] * count, device)
        return empty.zeros_like() if self.zero_negative else empty

    def time_ids(self, count: int, device: torch.device) -> torch.Tensor:
        """SDXL micro-conditioning: (original h, w, crop top, left, target h, w), uncropped at the resolution."""
        size = float(self.resolution)
        row = torch.tensor([size, size, 0.0, 0.0, size, size], device=device)
        return row.expand(count, 6).clone()

    def denoise(self, model, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        """The denoiser's output for [B,C,H,W] latents at scheduler timestep value `t` (0-d or [B]), in the same
        layout; `model` is the denoiser or its training engine. FLUX: packed, with image ids and `guidance`."""
        family = self.family
        if family.denoiser == "unet":
            return model(latents, t, **cond.unet_kwargs()).sample
        batch = latents.shape[0]
        timestep = t.to(latents.device).expand(batch).to(latents.dtype) / family.timestep_divisor
        kwargs = cond.unet_kwargs()
        if not family.packed_latents:
            return model(hidden_states=latents, timestep=timestep, **kwargs).sample
        if self.unet.config.get("guidance_embeds", False):
            kwargs["guidance"] = torch.full((batch,), float(guidance or 1.0), device=latents.device,
                                            dtype=torch.float32)
        _, channels, height, width = latents.shape
        kwargs["img_ids"] = image_ids(height // 2, width // 2, latents.device, latents.dtype)
        out = model(hidden_states=pack_latents(latents), timestep=timestep, **kwargs).sample
        return unpack_latents(out, channels, height, width)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0,1] (float32), differentiable through the frozen VAE decoder."""
        scaled = latents / self.vae.config.scaling_factor + (self.vae.config.get("shift_factor") or 0.0)
        decoded = self.vae.decode(scaled.to(self.vae.dtype)).sample
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Images in [-1,1] -> scaled latents (one draw from the VAE posterior; frozen VAE), float32:
        (z - shift) x scale (SD 1.x/SDXL: no shift)."""
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(device=dist.mean.device, dtype=dist.mean.dtype)
        shift = self.vae.config.get("shift_factor") or 0.0
        return ((dist.mean + dist.std * eps).float() - shift) * self.vae.config.scaling_factor

    def set_timesteps(self, steps: int, device: torch.device) -> None:
        """The sampler's N-step schedule as the family's pipeline sets it (flow matching: the timestep shift,
        resolution-dependent when the scheduler says use_dynamic_shifting; FLUX's linear sigmas)."""
        if not self.flow_matching:
            self.scheduler.set_timesteps(steps, device=device)
            return
        config = self.scheduler.config
        tokens = (self.latent_size // 2) ** 2  # image tokens: 2x2 patches (SD3) or packed 2x2 latents (FLUX)
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = low + (high - low) * (tokens - base) / (top - base)
        kwargs = {"mu": mu} if config.get("use_dynamic_shifting", False) else {}
        if self.family.packed_latents:
            kwargs["sigmas"] = np.linspace(1.0, 1.0 / steps, steps)
        self.scheduler.set_timesteps(steps, device=device, **kwargs)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B,C,H,W] -> [B, H/2 x W/2, 4C] tokens of 2x2 latent patches (FLUX's layout)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents`."""
    b = tokens.shape[0]
    grid = tokens.view(b, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, channels, height, width)


def image_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX's positional ids of packed latent tokens: (0, row, column) per token, row-major."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def native_resolution(family: PipelineFamily, denoiser_config: dict, vae_config: dict) -> int:
    """The pipeline's own output size from its configs: denoiser sample_size (FLUX: 128) x 2^(VAE levels - 1)."""
    sample = denoiser_config.get("sample_size") or family.default_sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_resolution(resolution: int, factor: int, source: str, family: PipelineFamily | None = None,
                     denoiser_config: dict | None = None) -> None:
    """A square output size must be a positive multiple of the VAE's downsampling factor (x 2 where the
    transformer takes 2x2 patches or packed latents), within SD3's positional-embedding grid."""
    multiple = factor * (family.latent_multiple if family else 1)
    if resolution <= 0 or resolution % multiple:
        what = f"its VAE factor {factor}" if multiple == factor else (
            f"{multiple} (VAE factor {factor} x the transformer's 2x2 latent patches)")
        raise ValueError(f"resolution {resolution} does not suit {source}: use a positive multiple of {what}")
    limit = (denoiser_config or {}).get("pos_embed_max_size")
    if family is not None and family.patch_size_key and limit:
        patch = int(denoiser_config.get(family.patch_size_key, 2))
        if resolution // factor // patch > int(limit):
            raise ValueError(f"resolution {resolution} does not suit {source}: its transformer's positional "
                             f"embedding covers at most {int(limit) * patch * factor} px "
                             f"(pos_embed_max_size {limit} patches of {patch} latent pixels)")


def vae_dtype_for(family: PipelineFamily, vae, frozen_dtype: torch.dtype) -> torch.dtype:
    """fp32 where the family's VAE overflows in fp16 (SDXL's says force_upcast); else the frozen dtype."""
    if frozen_dtype == torch.float16 and family.vae_fp32_in_fp16 and vae.config.get("force_upcast", False):
        return torch.float32
    return frozen_dtype


def _move(module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module; cast only when its dtype differs (diffusers warns on every dtype cast)."""
    current = next(module.parameters()).dtype
    module.to(device=device) if current == dtype else module.to(device=device, dtype=dtype)


def missing_text_encoders(family: PipelineFamily, present) -> list[str]:
    """The family's required text encoder components that `present(name)` says are absent."""
    required = list(family.text_encoders)
    if family.t5_encoder and not family.t5_optional:
        required.append(family.t5_encoder)
    return [name for name in required if not present(name)]


def parts_from_pipeline(pipe, *, device: torch.device, frozen_dtype: torch.dtype, scheduler: str = "ddim",
                        resolution: int | None = None) -> DiffusionParts:
    """Split a loaded pipeline into training parts: frozen modules moved to `device` in `frozen_dtype` (the VAE
    in fp32 where the family needs it), the denoiser moved to `device` as it is, the sampler (DDIM / DDPM for
    the epsilon / v families; the pipeline's own flow-matching Euler scheduler for SD3 and FLUX)."""
    from .pipelines import make_scheduler, vae_scale_factor

    family = family_of(type(pipe).__name__)
    encoders = [getattr(pipe, name, None) for name in family.text_encoders]
    tokenizers = [getattr(pipe, name, None) for name in family.tokenizers]
    pairs = [(t, e) for t, e in zip(tokenizers, encoders) if e is not None]  # SDXL refiners have text_encoder_2 only
    if not pairs:
        raise ValueError(f"{family.pipeline_class} without text encoders")
    if family.denoiser == "transformer":
        missing = missing_text_encoders(family, lambda name: getattr(pipe, name, None) is not None)
        if missing:
            raise ValueError(f"this {family.pipeline_class} lacks the text encoder(s) {missing}; ReFL needs them")
    unet, vae = getattr(pipe, family.denoiser), pipe.vae
    factor = vae_scale_factor(vae)
    resolution = int(resolution or native_resolution(family, unet.config, vae.config))
    check_resolution(resolution, factor, f"this {family.pipeline_class}", family, unet.config)
    for _, encoder in pairs:
        _move(encoder.requires_grad_(False).eval(), device, frozen_dtype)
    t5 = None
    if family.t5_encoder and getattr(pipe, family.t5_encoder, None) is not None:
        t5 = (getattr(pipe, family.t5_tokenizer), getattr(pipe, family.t5_encoder))
        _move(t5[1].requires_grad_(False).eval(), device, frozen_dtype)
    _move(vae.requires_grad_(False).eval(), device, vae_dtype_for(family, vae, frozen_dtype))
    unet.to(device)
    if family.flow_matching:
        sampler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        channels = int(vae.config.latent_channels)
    else:
        sampler = make_scheduler(scheduler, pipe.scheduler.config)
        channels = int(unet.config.in_channels)
    return DiffusionParts(
        family=family, unet=unet, vae=vae, text_encoders=[e for _, e in pairs], tokenizers=[t for t, _ in pairs],
        scheduler=sampler, resolution=resolution, latent_size=resolution // factor, latent_channels=channels,
        zero_negative=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)), t5=t5,
    )


def load_diffusion_parts(pretrained: str | os.PathLike, *, device: torch.device, frozen_dtype: torch.dtype,
                         scheduler: str = "ddim", resolution: int | None = None, tiny_seed: int = 0,
                         use_t5: bool = True) -> DiffusionParts:
    """Load (or build, for the tiny names) a pipeline in fp32 and split it with `parts_from_pipeline`;
    `use_t5=False` leaves SD3's optional T5 encoder out."""
    from .pipelines import load_pipeline

    pipe = load_pipeline(pretrained, dtype=torch.float32, seed=tiny_seed, use_t5=use_t5)
    return parts_from_pipeline(pipe, device=device, frozen_dtype=frozen_dtype, scheduler=scheduler,
                               resolution=resolution)


def family_and_resolution(pretrained: str | os.PathLike, resolution: int | None = None,
                          use_t5: bool = True) -> tuple[PipelineFamily, int]:
    """(family, output size) of a pipeline from its configs alone (no weights): what the driver plans with.
    Refuses an unsupported pipeline class, a resolution the VAE / patching cannot take, a missing text
    encoder, and use_t5=False for a family whose T5 is not optional."""
    from .pipelines import TINY_PIPELINES, pipeline_class_name, tiny_geometry

    source = os.fspath(pretrained)
    family = family_of(pipeline_class_name(source))
    if not use_t5 and family.t5_encoder and not family.t5_optional:
        raise ValueError(f"{family.pipeline_class} needs its T5 text encoder ({family.t5_encoder}); use_t5=false "
                         "applies to SD3 only")
    if source in TINY_PIPELINES:
        native, factor, denoiser_config = tiny_geometry(source)
    else:
        import diffusers
        from diffusers import AutoencoderKL, DiffusionPipeline

        index = DiffusionPipeline.load_config(source)
        missing = missing_text_encoders(family, lambda name: (index.get(name) or [None, None])[-1] is not None)
        if missing:
            raise ValueError(f"{source}: a {family.pipeline_class} without the text encoder(s) {missing} "
                             "(model_index.json); ReFL needs them")
        denoiser_class = getattr(diffusers, index[family.denoiser][-1])
        denoiser_config = dict(denoiser_class.load_config(source, subfolder=family.denoiser))
        vae_config = AutoencoderKL.load_config(source, subfolder="vae")
        native = native_resolution(family, denoiser_config, vae_config)
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    resolution = int(resolution or native)
    check_resolution(resolution, factor, source, family, denoiser_config)
    return family, resolution
