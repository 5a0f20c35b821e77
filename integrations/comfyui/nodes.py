"""ComfyUI nodes that score images with ImageReward through rayapp: Loader, Score and Filter.

Images arrive as ComfyUI IMAGE batches, float tensors [B, H, W, C] in 0-1. They are turned into 8-bit
pictures exactly as ComfyUI's own SaveImage does (clip(255 * x, 0, 255) then truncation to uint8), so
a score here equals what `rayapp score` (or `model.score`) gives for the PNG that SaveImage writes.
Nothing heavy is imported until a Loader runs; with an endpoint URL only the standard library and
Pillow are used (rayapp.serve.client).
"""
from __future__ import annotations

import io
import math
import os
import re

import numpy as np
from PIL import Image

MODEL_TYPE = "IMAGEREWARD_MODEL"
CATEGORY = "ImageReward"
DEVICES = ["auto", "cpu", "cuda", "mps"]
DTYPES = ["float32", "bfloat16", "float16"]
MODELS_SUBDIR = "image_reward"  # ComfyUI/models/image_reward/<name> is searched for bare names


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


def _pick_device(choice: str) -> str | None:
    """'auto' -> ComfyUI's own device inside ComfyUI, else None (the library's default: CUDA when available)."""
    if choice != "auto":
        return choice
    try:
        import comfy.model_management as management  # ComfyUI's own module
    except ImportError:
        return None
    return str(management.get_torch_device())


class LocalScorer:
    """The reward model in the ComfyUI process (rayapp.load)."""

    def __init__(self, model: str, device: str, dtype: str):
        import rayapp

        try:
            self.model = rayapp.load(model, device=_pick_device(device), dtype=dtype)
        except Exception as err:  # any failure is reported with the inputs that caused it
            raise RuntimeError(f"ImageReward Loader: cannot load {model!r} on {device!r} as {dtype!r}: {err}") from err
        self.where = f"{os.path.basename(model.rstrip('/')) or model} on {self.model.device}, {dtype}"

    def score(self, prompt: str, pictures: list[Image.Image]) -> list[float]:
        """The library's score of each picture under the prompt."""
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
    """Score every image of a batch against the prompt."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": dict(SCORING_INPUTS)}

    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("scores", "summary")
    OUTPUT_IS_LIST = (True, False)
    FUNCTION = "score"
    CATEGORY = CATEGORY
    DESCRIPTION = "One ImageReward score per image (in batch order) and a text summary, best first."

    def score(self, imagereward, images, prompt):
        scorer = _scorer_input(imagereward, "Score")
        prompt = check_prompt(prompt, "Score")
        scores = scorer.score(prompt, comfy_images_to_pil(images))
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return (scores, _summary(scorer, prompt, scores, order, f"{len(scores)} images, best first"))


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
                   "survived. When none survive, images is an empty batch and the summary says so.")

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
        if order:
            header = f"kept {len(order)} of {len(scores)} (score >= {lower_limit:g}" + \
                     (f", top {top_k}" if top_k else "") + "), best first"
        else:
            header = (f"none of the {len(scores)} images scored >= {lower_limit:g} (best {max(scores):.4f}); "
                      "images is an empty batch: lower lower_limit")
        return (images[order], [scores[i] for i in order], kept, _summary(scorer, prompt, scores, order, header))


NODE_CLASS_MAPPINGS = {
    "ImageRewardLoader": ImageRewardLoader,
    "ImageRewardScore": ImageRewardScore,
    "ImageRewardFilter": ImageRewardFilter,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ImageRewardLoader": "ImageReward Loader",
    "ImageRewardScore": "ImageReward Score",
    "ImageRewardFilter": "ImageReward Filter",
}
