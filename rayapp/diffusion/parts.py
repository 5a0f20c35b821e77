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

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineFamily:
    """How one diffusers pipeline class conditions its UNet and decodes its latents."""

    name: str
    pipeline_class: str  # the diffusers class an exported full pipeline loads with
    text_encoders: tuple[str, ...]  # pipeline component names, in the order their states are concatenated
    tokenizers: tuple[str, ...]
    hidden_state: str  # "last": last_hidden_state (after the final layer norm); "penultimate": hidden_states[-2]
    pooled_text_embeds: bool  # pass the projected pooled embedding as added_cond_kwargs["text_embeds"]
    size_conditioning: bool  # pass (original size, crop top-left, target size) as added_cond_kwargs["time_ids"]
    vae_fp32_in_fp16: bool  # decode in fp32 when the frozen modules are fp16 and the VAE asks (force_upcast)
    default_lora_rank: int  # LoRA rank when the config leaves it unset (0 = the full UNet)


SD = PipelineFamily(name="sd", pipeline_class="StableDiffusionPipeline", text_encoders=("text_encoder",),
                    tokenizers=("tokenizer",), hidden_state="last", pooled_text_embeds=False,
                    size_conditioning=False, vae_fp32_in_fp16=False, default_lora_rank=0)
SDXL = PipelineFamily(name="sdxl", pipeline_class="StableDiffusionXLPipeline",
                      text_encoders=("text_encoder", "text_encoder_2"), tokenizers=("tokenizer", "tokenizer_2"),
                      hidden_state="penultimate", pooled_text_embeds=True, size_conditioning=True,
                      vae_fp32_in_fp16=True, default_lora_rank=4)
FAMILIES = {family.pipeline_class: family for family in (SD, SDXL)}


def family_of(pipeline_class: str) -> PipelineFamily:
    """The family of a diffusers pipeline class name; an unsupported one is an error naming the supported."""
    family = FAMILIES.get(pipeline_class)
    if family is None:
        raise ValueError(f"ReFL supports the pipeline classes {sorted(FAMILIES)}, not {pipeline_class!r} "
                         "(`rayapp generate` loads any text-to-image pipeline)")
    return family


@dataclass
class Conditioning:
    """Text conditioning of a batch, as the UNet's keyword arguments."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    def unet_kwargs(self) -> dict:
        """`unet(latents, t, **kwargs)` arguments."""
        kwargs = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs

    def cat(self, other: Conditioning) -> Conditioning:
        """This batch followed by `other`'s (classifier-free guidance runs [uncond, cond] in one UNet call)."""
        return Conditioning(torch.cat([self.encoder_hidden_states, other.encoder_hidden_states]),
                            {k: torch.cat([v, other.added_cond_kwargs[k]]) for k, v in self.added_cond_kwargs.items()})

    def __len__(self) -> int:
        return int(self.encoder_hidden_states.shape[0])


@dataclass
class DiffusionParts:
    """A pipeline's modules as training uses them (UNet trained, the rest frozen) plus its sampling scheduler."""

    family: PipelineFamily
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler: object  # the sampler training differentiates through (DDIM or DDPM)
    resolution: int  # output pixels (square)
    latent_size: int  # latent pixels = resolution / VAE factor
    latent_channels: int
    zero_negative: bool = False  # the pipeline's empty-prompt embedding is zeros (SDXL force_zeros_for_empty_prompt)

    @property
    def text_encoder(self):
        """The first text encoder (what SD 1.x calls `text_encoder`)."""
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device) -> Conditioning:
        """The UNet's conditioning for `prompts` (frozen text encoders, no gradient)."""
        family = self.family
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=family.hidden_state == "penultimate")
            states.append(out.last_hidden_state if family.hidden_state == "last" else out.hidden_states[-2])
            if getattr(out, "text_embeds", None) is not None:  # a CLIPTextModelWithProjection's pooled output
                pooled = out.text_embeds
        added: dict[str, torch.Tensor] = {}
        if family.pooled_text_embeds:
            if pooled is None:
                raise ValueError(f"a {family.pipeline_class} needs a text encoder with a projection "
                                 "(CLIPTextModelWithProjection) for its pooled embedding")
            added["text_embeds"] = pooled
        if family.size_conditioning:
            added["time_ids"] = self.time_ids(len(prompts), device)
        return Conditioning(torch.cat(states, dim=-1), added)

    def encode_negative(self, count: int, device: torch.device) -> Conditioning:
        """The unconditional branch of classifier-free guidance for `count` samples, as the pipeline builds it."""
        empty = self.encode_prompts([""] * count, device)
        if not self.zero_negative:
            return empty
        zeroed = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in empty.added_cond_kwargs.items()}
        return Conditioning(torch.zeros_like(empty.encoder_hidden_states), zeroed)

    def time_ids(self, count: int, device: torch.device) -> torch.Tensor:
        """SDXL micro-conditioning: (original h, w, crop top, left, target h, w), uncropped at the resolution."""
        size = float(self.resolution)
        row = torch.tensor([size, size, 0.0, 0.0, size, size], device=device)
        return row.expand(count, 6).clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0,1] (float32), differentiable through the frozen VAE decoder."""
        scaled = latents / self.vae.config.scaling_factor
        decoded = self.vae.decode(scaled.to(self.vae.dtype)).sample
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Images in [-1,1] -> scaled latents (one draw from the VAE posterior; frozen VAE), float32."""
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(device=dist.mean.device, dtype=dist.mean.dtype)
        return (dist.mean + dist.std * eps).float() * self.vae.config.scaling_factor


def native_resolution(unet_config: dict, vae_config: dict) -> int:
    """The pipeline's own output size from its configs: UNet sample_size x 2^(VAE levels - 1)."""
    sample = unet_config["sample_size"]
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_resolution(resolution: int, factor: int, source: str) -> None:
    """A square output size must be a positive multiple of the VAE's downsampling factor."""
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"resolution {resolution} does not suit {source}: use a positive multiple of its VAE "
                         f"factor {factor}")


def vae_dtype_for(family: PipelineFamily, vae, frozen_dtype: torch.dtype) -> torch.dtype:
    """fp32 where the family's VAE overflows in fp16 (SDXL's says force_upcast); else the frozen dtype."""
    if frozen_dtype == torch.float16 and family.vae_fp32_in_fp16 and vae.config.get("force_upcast", False):
        return torch.float32
    return frozen_dtype


def _move(module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module; cast only when its dtype differs (diffusers warns on every dtype cast)."""
    current = next(module.parameters()).dtype
    module.to(device=device) if current == dtype else module.to(device=device, dtype=dtype)


def parts_from_pipeline(pipe, *, device: torch.device, frozen_dtype: torch.dtype, scheduler: str = "ddim",
                        resolution: int | None = None) -> DiffusionParts:
    """Split a loaded pipeline into training parts: frozen modules moved to `device` in `frozen_dtype` (the VAE
    in fp32 where the family needs it), the UNet moved to `device` as it is, a DDIM/DDPM sampler."""
    from .pipelines import make_scheduler, vae_scale_factor

    family = family_of(type(pipe).__name__)
    encoders = [getattr(pipe, name, None) for name in family.text_encoders]
    tokenizers = [getattr(pipe, name, None) for name in family.tokenizers]
    pairs = [(t, e) for t, e in zip(tokenizers, encoders) if e is not None]  # SDXL refiners have text_encoder_2 only
    if not pairs:
        raise ValueError(f"{family.pipeline_class} without text encoders")
    unet, vae = pipe.unet, pipe.vae
    factor = vae_scale_factor(vae)
    native = native_resolution(unet.config, vae.config)
    resolution = int(resolution or native)
    check_resolution(resolution, factor, f"this {family.pipeline_class}")
    for _, encoder in pairs:
        _move(encoder.requires_grad_(False).eval(), device, frozen_dtype)
    _move(vae.requires_grad_(False).eval(), device, vae_dtype_for(family, vae, frozen_dtype))
    unet.to(device)
    return DiffusionParts(
        family=family, unet=unet, vae=vae, text_encoders=[e for _, e in pairs], tokenizers=[t for t, _ in pairs],
        scheduler=make_scheduler(scheduler, pipe.scheduler.config), resolution=resolution,
        latent_size=resolution // factor, latent_channels=int(unet.config.in_channels),
        zero_negative=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)),
    )


def load_diffusion_parts(pretrained: str | os.PathLike, *, device: torch.device, frozen_dtype: torch.dtype,
                         scheduler: str = "ddim", resolution: int | None = None, tiny_seed: int = 0) -> DiffusionParts:
    """Load (or build, for the tiny names) a pipeline in fp32 and split it with `parts_from_pipeline`."""
    from .pipelines import load_pipeline

    pipe = load_pipeline(pretrained, dtype=torch.float32, seed=tiny_seed)
    return parts_from_pipeline(pipe, device=device, frozen_dtype=frozen_dtype, scheduler=scheduler,
                               resolution=resolution)


def family_and_resolution(pretrained: str | os.PathLike, resolution: int | None = None) -> tuple[PipelineFamily, int]:
    """(family, output size) of a pipeline from its configs alone (no weights): what the driver plans with."""
    from .pipelines import pipeline_class_name

    source = os.fspath(pretrained)
    family = family_of(pipeline_class_name(source))
    if source in ("tiny", "tiny-sdxl"):
        from .tiny import TINY_IMAGE_SIZE, TINY_VAE_CHANNELS

        native, factor = TINY_IMAGE_SIZE, 2 ** (len(TINY_VAE_CHANNELS) - 1)
    else:
        from diffusers import AutoencoderKL, UNet2DConditionModel

        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet")
        vae_config = AutoencoderKL.load_config(source, subfolder="vae")
        native = native_resolution(unet_config, vae_config)
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    resolution = int(resolution or native)
    check_resolution(resolution, factor, source)
    return family, resolution
