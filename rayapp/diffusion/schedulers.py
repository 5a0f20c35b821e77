"""The samplers the pipelines and ReFL use: DDIM / DDPM over a pipeline's beta schedule, and SDXL base's Euler
settings. Only diffusers is imported (inside the functions), so every pipeline module can use this one."""
from __future__ import annotations

import inspect


def make_scheduler(kind: str = "ddim", config: dict | None = None):
    """A DDIM or DDPM scheduler; `config` (e.g. a pipeline's scheduler.config, any scheduler class) supplies
    the beta schedule, timestep spacing and prediction type; SD's defaults otherwise."""
    from diffusers import DDIMScheduler, DDPMScheduler

    base = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "epsilon",
    }
    kinds = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    cls = kinds.get(kind.lower())
    if cls is None:
        raise ValueError(f"unknown scheduler {kind!r}; use 'ddim' or 'ddpm'")
    if config is not None:
        # Keep only what this class takes: another class's settings (Euler's sigmas, PNDM's PRK steps) do not
        # apply and would only be logged as ignored.
        accepted = set(inspect.signature(cls.__init__).parameters)
        base.update({k: v for k, v in dict(config).items() if k in accepted})
    return cls.from_config(base)


def sdxl_scheduler_config() -> dict:
    """SDXL base's scheduler settings (Euler, scaled-linear 0.00085..0.012, "leading" spacing, offset 1)."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
            "interpolation_type": "linear", "use_karras_sigmas": False}
