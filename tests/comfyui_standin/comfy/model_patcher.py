"""Stand-in for ComfyUI `comfy/model_patcher.py`: ModelPatcher, the handle model management moves.

Modelled on ComfyUI (2026-01) `ModelPatcher`: the constructor records load/offload devices and sets
bookkeeping attributes on the wrapped module; `patch_model` / `load` move it to the load device and set
`model.device`; `detach` / `unpatch_model` move it to the offload device and set `model.device` again
(so the wrapped module must accept a `device` attribute).
"""
from __future__ import annotations

from comfy import model_management


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.patches = {}
        if not hasattr(self.model, "model_loaded_weight_memory"):
            self.model.model_loaded_weight_memory = 0
        if not hasattr(self.model, "model_lowvram"):
            self.model.model_lowvram = False

    def model_size(self) -> int:
        if self.size > 0:
            return self.size
        self.size = model_management.module_size(self.model)
        return self.size

    def current_loaded_device(self):
        return self.model.device

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        if device_to is not None:
            self.model.to(device_to)
            self.model.device = device_to
            self.model.model_loaded_weight_memory = self.model_size()
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if device_to is not None:
            self.model.to(device_to)
            self.model.device = device_to
            self.model.model_loaded_weight_memory = 0

    def detach(self, unpatch_all=True):
        self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        return self.model
