"""ComfyUI nodes that score images with ImageReward through rayapp: Loader, Score and Filter.

Images arrive as ComfyUI IMAGE batches, float tensors [B, H, W, C] in 0-1. They are turned into 8-bit
pictures exactly as ComfyUI's own SaveImage does (clip(255 * x, 0, 255) then truncation to uint8), so
a score here equals what `rayapp score` (or `model.score`) gives for the PNG that SaveImage writes.
Nothing heavy is imported until a Loader runs; with an endpoint URL only the standard library and
Pillow are used (rayapp.serve.client).

Inside ComfyUI the in-process model is registered with ComfyUI's model management (wrapped in a
`comfy.model_patcher.ModelPatcher`, loaded with `load_models_gpu` before each scoring), so it follows
`get_torch_device()` and is offloaded with the other models when ComfyUI frees memory. A Filter that
keeps nothing blocks its downstream nodes with an `ExecutionBlocker` instead of handing them an empty
batch. Node keys carry the `Rayapp` prefix; the unprefixed keys of earlier releases stay as aliases
where no other pack has them.
"""
from __future__ import annotations

import importlib
import io
import logging
import math
import os
import re
import sys

import numpy as np
from PIL import Image

MODEL_TYPE = "IMAGEREWARD_MODEL"
CATEGORY = "ImageReward"
DEVICES = ["auto", "cpu", "cuda", "mps"]
DTYPES = ["float32", "bfloat16", "float16"]
MODELS_SUBDIR = "image_reward"  # ComfyUI/models/image_reward/<name> is searched for bare names

logger = logging.getLogger(__name__)


def comfy_images_to_pil(images) -> list[Image.Image]:
    """ComfyUI IMAGE [B, H, W, C] in 0-1 -> PIL images, pixel for pixel what SaveImage would write."""
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[0] < 1 or shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"ImageReward: images must be a ComfyUI IMAGE batch of shape [B, H, W, C] with B >= 1 and C = 1, 3 "
            f"or 4, got shape {list(shape) if shape else type(images).__name__}; connect an IMAGE output "
            "(e.g. VAE Decode or Load Image)."
        )
    pictures = []
    for image in images:
        if hasattr(image, "detach"):
            image = image.detach().cpu()
            if str(image.dtype) == "torch.bfloat16":  # numpy has no bfloat16
                image = image.float()
            image = image.numpy()
        pixels = np.clip(255.0 * np.asarray(image), 0, 255).astype(np.uint8)
        pictures.append(Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels))
    return pictures


def check_prompt(prompt, node: str) -> str:
    """A non-empty prompt string, or an error naming the node's input."""
    if not isinstance(prompt, str):
        raise TypeError(f"ImageReward {node}: prompt must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"ImageReward {node}: the prompt is empty; type or connect the prompt the images were "
                         "generated from")
    return prompt


def _comfy_models_dir() -> str | None:
    """ComfyUI's models folder when running inside ComfyUI."""
    try:
        import folder_paths  # ComfyUI's own module
    except ImportError:
        return None
    return getattr(folder_paths, "models_dir", None)


def resolve_model(name: str) -> str:
    """A path as given, a bare name under ComfyUI/models/image_reward/, or a hub name for rayapp.load."""
    name = (name or "").strip()
    if not name:
        raise ValueError("ImageReward Loader: model is empty; give ImageReward-v1.0, a path to ImageReward.pt "
                         "or a rayapp save_pretrained directory")
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return os.path.abspath(path)
    models_dir = _comfy_models_dir()
    if models_dir and os.path.exists(os.path.join(models_dir, MODELS_SUBDIR, name)):
        return os.path.join(models_dir, MODELS_SUBDIR, name)
    return name  # a hub name, or rayapp.load says what is wrong with it


def _comfy_model_management():
    """ComfyUI's model management modules (model_management, model_patcher), or None outside ComfyUI."""
    try:
        import comfy.model_management as management  # ComfyUI's own modules
        import comfy.model_patcher as patcher
    except ImportError:
        return None
    return management, patcher


def _managed_module(reward_model):
    """An nn.Module holding the reward model, for ModelPatcher (which sets `.device` on what it moves)."""
    import torch

    class RewardModelHolder(torch.nn.Module):
        def __init__(self, reward):
            super().__init__()
            self.reward = reward
            self.device = reward.device

    return RewardModelHolder(reward_model)


class LocalScorer:
    """The reward model in the ComfyUI process (rayapp.load), under ComfyUI's model management there."""

    def __init__(self, model: str, device: str, dtype: str):
        import torch

        import rayapp

        comfy = _comfy_model_management()
        if comfy is not None:
            management, patcher = comfy
            load_device = management.get_torch_device() if device == "auto" else torch.device(device)
            first_device = management.unet_offload_device()  # ComfyUI moves it to load_device when scoring
        else:
            load_device = None
            first_device = None if device == "auto" else device  # the library's default: CUDA when available
        try:
            self.model = rayapp.load(model, device=first_device, dtype=dtype)
        except Exception as err:  # any failure is reported with the inputs that caused it
            raise RuntimeError(f"ImageReward Loader: cannot load {model!r} on {device!r} as {dtype!r}: {err}") from err
        self.patcher = None
        if comfy is not None:
            self.patcher = patcher.ModelPatcher(_managed_module(self.model), load_device=load_device,
                                                offload_device=management.unet_offload_device())
            self._load_models_gpu = management.load_models_gpu
        shown = load_device if load_device is not None else self.model.device
        self.where = f"{os.path.basename(model.rstrip('/')) or model} on {shown}, {dtype}"

    def score(self, prompt: str, pictures: list[Image.Image]) -> list[float]:
        """The library's score of each picture under the prompt (loaded onto ComfyUI's device first)."""
        if self.patcher is not None:
            self._load_models_gpu([self.patcher])
        return [float(s) for s in self.model.score(prompt, list(pictures))]


class EndpointScorer:
    """A rayapp Serve endpoint, reached with the standard library (rayapp.serve.client)."""

    def __init__(self, url: str, timeout: float = 120.0):
        from rayapp.serve.client import RewardClient, RewardServiceError

        if not re.match(r"^https?://[^\s/]+", url):
            raise ValueError(f"ImageReward Loader: endpoint_url {url!r} must look like http://127.0.0.1:8000")
        self.client = RewardClient(url, timeout=timeout)
        try:
            info = self.client.models()
        except (OSError, ValueError, RewardServiceError) as err:
            raise RuntimeError(f"ImageReward Loader: the endpoint {url} does not answer ({err}); start it (e.g. "
                               "`serve run rayapp.serve.app:build_app model=...`) or clear endpoint_url") from err
        limits = info.get("limits", {}) if isinstance(info, dict) else {}
        self.max_images = int(limits.get("max_images", 32))
        # JSON carries base64 (4 bytes per 3) plus the prompt; keep well inside the request limit.
        self.max_payload = int(limits.get("max_request_bytes", 64 << 20)) * 7 // 10
        models = info.get("models") or [{}]
        self.where = f"endpoint {url} ({models[0].get('id', 'unknown model')})"

    def score(self, prompt: str, pictures: list[Image.Image]) -> list[float]:
        """The endpoint's score of each picture (sent as lossless PNG), in as few requests as its limits allow."""
        blobs = []
        for picture in pictures:
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG", compress_level=1)
            blobs.append(buffer.getvalue())
        sizes = [len(blob) * 4 // 3 + 4 * len(prompt) + 64 for blob in blobs]
        scores: list[float] = []
        from rayapp.serve.client import request_chunks

        for start, stop in request_chunks(sizes, self.max_images, self.max_payload):
            scores += self.client.score_pairs([prompt] * (stop - start), blobs[start:stop])
        return [float(s) for s in scores]


def _scorer_input(scorer, node: str):
    if not hasattr(scorer, "score"):
        raise ValueError(f"ImageReward {node}: connect the output of an 'ImageReward Loader' node to imagereward")
    return scorer


def _summary(scorer, prompt: str, scores: list[float], order: list[int], header: str) -> str:
    """Readable lines: which scorer, the prompt, then each image (by input index) best first."""
    short = prompt if len(prompt) <= 80 else prompt[:77] + "..."
    lines = [f"ImageReward ({scorer.where}) for {short!r}: {header}"]
    lines += [f"#{rank} image {i}: {scores[i]:.4f}" for rank, i in enumerate(order, start=1)]
    if scores:
        lines.append(f"mean {sum(scores) / len(scores):.4f}")
    return "\n".join(lines)


class ImageRewardLoader:
    """Load the reward model (name, .pt or save_pretrained dir) or connect to a rayapp Serve endpoint."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("STRING", {"default": "ImageReward-v1.0", "multiline": False}),
                "device": (DEVICES, {"default": "auto"}),
                "dtype": (DTYPES, {"default": "float32"}),
            },
            "optional": {
                "endpoint_url": ("STRING", {"default": "", "multiline": False}),
            },
        }

    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("imagereward",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "ImageReward model in this process, or a rayapp Serve endpoint when endpoint_url is set."

    def load(self, model, device="auto", dtype="float32", endpoint_url=""):
        url = (endpoint_url or "").strip()
        if url:
            return (EndpointScorer(url),)
        if device not in DEVICES and not re.match(r"^(cuda|xpu):\d+$", str(device)):
            raise ValueError(f"ImageReward Loader: device {device!r} is not one of {DEVICES} (or cuda:N)")
        if dtype not in DTYPES:
            raise ValueError(f"ImageReward Loader: dtype {dtype!r} is not one of {DTYPES}")
        return (LocalScorer(resolve_model(model), device, dtype),)


# The inputs every scoring node takes: the loaded scorer, ComfyUI's image batch, the prompt.
SCORING_INPUTS = {
    "imagereward": (MODEL_TYPE,),
    "images": ("IMAGE",),
    "prompt": ("STRING", {"default": "", "multiline": True}),
}


class ImageRewardScore:
    """Score every image of a batch against the prompt; an output node, so its summary shows without wiring."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(SCORING_INPUTS)}

    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("scores", "summary")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_NODE = True
    FUNCTION = "score"
    CATEGORY = CATEGORY
    DESCRIPTION = ("One ImageReward score per image (in batch order) and a text summary, best first. An output "
                   "node: a workflow may end here; the summary is shown on the node and can feed a Preview Any.")

    def score(self, imagereward, images, prompt):
        scorer = _scorer_input(imagereward, "Score")
        prompt = check_prompt(prompt, "Score")
        scores = scorer.score(prompt, comfy_images_to_pil(images))
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        summary = _summary(scorer, prompt, scores, order, f"{len(scores)} images, best first")
        return {"ui": {"text": [summary]}, "result": (scores, summary)}


class ImageRewardFilter:
    """Keep the images scoring at least lower_limit, best first, at most top_k of them (0 = no cap)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **SCORING_INPUTS,
                "lower_limit": ("FLOAT", {"default": 0.0, "min": -100.0, "max": 100.0, "step": 0.01}),
                "top_k": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 1}),
            },
        }

    RETURN_TYPES = ("IMAGE", "FLOAT", "BOOLEAN", "STRING")
    RETURN_NAMES = ("images", "scores", "kept", "summary")
    OUTPUT_IS_LIST = (False, True, True, False)
    FUNCTION = "filter"
    CATEGORY = CATEGORY
    DESCRIPTION = ("The surviving images sorted best first with their scores; kept[i] tells whether input image i "
                   "survived. When none survive, the nodes using images and scores are blocked (not run) and "
                   "ComfyUI shows the summary's reason.")

    def filter(self, imagereward, images, prompt, lower_limit=0.0, top_k=0):
        scorer = _scorer_input(imagereward, "Filter")
        prompt = check_prompt(prompt, "Filter")
        if isinstance(lower_limit, bool) or not isinstance(lower_limit, (int, float)) or not math.isfinite(lower_limit):
            raise ValueError(f"ImageReward Filter: lower_limit must be a finite number, got {lower_limit!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"ImageReward Filter: top_k must be a whole number >= 0 (0 = no cap), got {top_k!r}")
        scores = scorer.score(prompt, comfy_images_to_pil(images))
        order = sorted((i for i in range(len(scores)) if scores[i] >= lower_limit), key=lambda i: -scores[i])
        if top_k:
            order = order[:top_k]
        chosen = set(order)
        kept = [i in chosen for i in range(len(scores))]
        if not order:
            header = (f"none of the {len(scores)} images scored >= {lower_limit:g} (best {max(scores):.4f}); "
                      "the nodes using images and scores were not run: lower lower_limit")
            summary = _summary(scorer, prompt, scores, order, header)
            return (nothing_passed(summary), [nothing_passed(None)], kept, summary)
        header = f"kept {len(order)} of {len(scores)} (score >= {lower_limit:g}" + \
                 (f", top {top_k}" if top_k else "") + "), best first"
        return (images[order], [scores[i] for i in order], kept, _summary(scorer, prompt, scores, order, header))


def nothing_passed(message: str | None):
    """What a Filter that kept nothing hands on: ComfyUI's ExecutionBlocker, so e.g. Save Image is not run.

    `message` is shown once as "Execution Blocked: ..."; None blocks silently. ComfyUI before the
    execution model that added ExecutionBlocker (2024-08) cannot skip nodes: the workflow stops here.
    """
    for module in ("comfy_execution.graph_utils", "comfy_execution.graph"):
        try:
            return importlib.import_module(module).ExecutionBlocker(message)
        except (ImportError, AttributeError):
            continue
    raise RuntimeError(f"ImageReward Filter: no image passed, and this ComfyUI cannot skip the nodes after it "
                       f"(it predates ExecutionBlocker); the workflow stops here. {message or ''}".strip())


NODES = {
    "RayappImageRewardLoader": (ImageRewardLoader, "ImageReward Loader (rayapp)", "ImageRewardLoader"),
    "RayappImageRewardScore": (ImageRewardScore, "ImageReward Score (rayapp)", "ImageRewardScore"),
    "RayappImageRewardFilter": (ImageRewardFilter, "ImageReward Filter (rayapp)", "ImageRewardFilter"),
}


def _alias(cls: type) -> type:
    """A node class for an old key: the same node, marked deprecated so ComfyUI lists only the prefixed one."""
    return type(cls.__name__ + "Alias", (cls,), {"DEPRECATED": True})


def node_mappings(registered: dict) -> tuple[dict, dict]:
    """NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS: the prefixed keys, plus each old key as an alias
    unless `registered` (ComfyUI's nodes loaded so far) already has it from another pack."""
    classes, names = {}, {}
    for key, (cls, title, old_key) in NODES.items():
        classes[key], names[key] = cls, title
        if old_key in registered:
            logger.warning("ImageReward: the key %r belongs to another node pack; this pack's node stays under "
                           "%r only", old_key, key)
        else:
            classes[old_key], names[old_key] = _alias(cls), f"{title} [old name]"
    return classes, names


# ComfyUI's registry (its top-level `nodes` module) holds the packs loaded before this one.
NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = node_mappings(
    getattr(sys.modules.get("nodes"), "NODE_CLASS_MAPPINGS", None) or {})
