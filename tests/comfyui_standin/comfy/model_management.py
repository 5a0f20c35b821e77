"""Stand-in for ComfyUI `comfy/model_management.py`: the device choice and the loaded-model ledger.

Modelled on ComfyUI (2026-01): `get_torch_device`, `unet_offload_device`, `module_size`, `LoadedModel`
(a ledger entry for one ModelPatcher: model_load moves it to its load device, model_unload back to its
offload device), `current_loaded_models` (most recently loaded first), `free_memory(memory_required,
device, keep_loaded)` (unloads models on that device, least recently used first, until enough is free)
and `load_models_gpu(models, memory_required)` (frees room, loads what is not loaded yet). Device memory
is simulated: `device_memory` bytes, of which loaded models' sizes are in use.
"""
from __future__ import annotations

import torch

torch_device = torch.device("cpu")  # what get_torch_device() answers; tests may point it elsewhere
device_memory = 1 << 40
current_loaded_models: list = []


def get_torch_device():
    return torch_device


def unet_offload_device():
    return torch.device("cpu")


def module_size(module) -> int:
    """model_management.module_size: bytes of a module's state dict."""
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def get_free_memory(device=None) -> int:
    used = sum(m.model_memory() for m in current_loaded_models if m.device == device)
    return device_memory - used


class LoadedModel:
    """model_management.LoadedModel: one ModelPatcher in the ledger."""

    def __init__(self, model):
        self.model = model
        self.device = model.load_device
        self.currently_used = True

    def model_memory(self) -> int:
        return self.model.model_size()

    def model_load(self):
        self.model.patch_model(device_to=self.device)
        return self.model.model

    def model_unload(self, memory_to_free=None, unpatch_weights=True) -> bool:
        self.model.detach(unpatch_all=unpatch_weights)
        return True

    def __eq__(self, other):
        return self.model is other.model


def free_memory(memory_required, device, keep_loaded=()):
    """model_management.free_memory: unload models on `device` (oldest first) until enough memory is free."""
    unloaded = []
    for i in range(len(current_loaded_models) - 1, -1, -1):
        if get_free_memory(device) > memory_required:
            break
        loaded = current_loaded_models[i]
        if loaded.device == device and loaded not in keep_loaded:
            loaded.model_unload()
            unloaded.append(current_loaded_models.pop(i))
    return unloaded


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    """model_management.load_models_gpu: make the models resident on their load devices."""
    to_load = []
    for model in models:
        loaded = LoadedModel(model)
        if loaded in current_loaded_models:
            index = current_loaded_models.index(loaded)
            current_loaded_models.insert(0, current_loaded_models.pop(index))  # most recently used first
        else:
            to_load.append(loaded)
    for loaded in to_load:
        free_memory(loaded.model_memory() + memory_required, loaded.device, keep_loaded=to_load)
        loaded.model_load()
        current_loaded_models.insert(0, loaded)


def unload_all_models():
    free_memory(1 << 62, get_torch_device())
