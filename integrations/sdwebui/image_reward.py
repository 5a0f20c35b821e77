"""ImageReward human-preference scores in the Stable Diffusion WebUI (AUTOMATIC1111), computed by rayapp.

Install: copy this file into the WebUI's `scripts/` folder and `pip install rayapp` into the WebUI's
Python (README.md beside this file). In txt2img or img2img pick "ImageReward - generate human
preference scores" in the Script dropdown.

Every generated image is scored against its prompt. The score goes into the image's infotext (on the
generation-parameters line, so PNG Info -> Send to txt2img still parses it) and into the saved file:
the WebUI's own saving is held back during generation and done once the score is known, through the
WebUI's `images.save_image` (its file names, formats and .txt sidecars). Optionally images below a
lower limit are dropped from the result; the survivors come back sorted by score, best first.

Scoring runs in the WebUI process (rayapp loaded on the first run, kept on `modules.shared` across
Reload UI, freed by the Unload button) or, when Settings > ImageReward > endpoint URL is set, through a
rayapp Serve endpoint. In endpoint mode this file imports only the standard library, Pillow and
`rayapp.serve` (stdlib-only), never torch or the model.
"""
from __future__ import annotations

import gc
import io
import logging
import math
import re
import sys

from modules import images, script_callbacks, scripts, shared
from modules.processing import Processed, process_images

try:
    from rayapp.serve.annotate import SCORE_KEY, score_line
except ImportError as import_error:
    raise ImportError(
        "ImageReward script: the rayapp package is not installed in the WebUI's Python environment. Install it "
        "with that environment's pip: `pip install rayapp` (in-process scoring), or `pip install --no-deps rayapp` "
        "when scoring only through a rayapp Serve endpoint."
    ) from import_error

logger = logging.getLogger(__name__)

TITLE = "ImageReward - generate human preference scores"
FILTER_LABEL = "Filter out images with low scores"
LIMIT_LABEL = "Lower score limit"
UNLOAD_LABEL = "Unload Model From Memory"

OPT_MODEL = "imagereward_model"
OPT_ENDPOINT = "imagereward_endpoint"
OPT_DEVICE = "imagereward_device"
OPT_DTYPE = "imagereward_dtype"
SETTINGS_SECTION = ("imagereward", "ImageReward")
SETTINGS = {
    OPT_MODEL: ("ImageReward-v1.0", ("Model for in-process scoring: ImageReward-v1.0 (Hugging Face cache), "
                                     "a path to ImageReward.pt, or a rayapp save_pretrained directory")),
    OPT_ENDPOINT: ("", ("rayapp Serve endpoint URL, e.g. http://127.0.0.1:8000 "
                        "(empty: score in the WebUI process; set: nothing heavy is loaded here)")),
    OPT_DEVICE: ("auto", "Device for in-process scoring: auto (CUDA when there is a GPU), cpu, cuda, cuda:1, mps"),
    OPT_DTYPE: ("float32", ("Precision for in-process scoring: float32 (the library's scores, ~1.6 GB), "
                            "bfloat16 or float16 (half the memory, scores differ in the 2nd-3rd decimal)")),
}

# Kept on modules.shared because the WebUI re-imports scripts on Reload UI while `shared` lives on.
HELD_SCORER_ATTR = "rayapp_image_reward"
# Extra-network tags such as <lora:name:0.8> name weights to apply, not what the picture shows.
EXTRA_NETWORK_TAG = re.compile(r"<[\w-]+:[^<>]*>")
# A `key: value` item of the WebUI's generation-parameters line (the last line of an infotext).
PARAM_ITEM = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _register_settings() -> None:
    """Add Settings > ImageReward (model, endpoint URL, device, precision)."""
    for key, (default, label) in SETTINGS.items():
        shared.opts.add_option(key, shared.OptionInfo(default, label, section=SETTINGS_SECTION))


script_callbacks.on_ui_settings(_register_settings)


def setting(key: str) -> str:
    """A Settings > ImageReward value, its default when unset or blank."""
    value = getattr(shared.opts, key, None)
    text = "" if value is None else str(value).strip()
    return text or SETTINGS[key][0]


def parse_lower_limit(value) -> float:
    """The 'Lower score limit' field as a finite number, or a ValueError that says what to type."""
    text = "" if value is None else str(value).strip()
    hint = f"type a number such as 0 or -0.5 (scores are roughly standard normal), or untick '{FILTER_LABEL}'"
    if not text:
        raise ValueError(f"ImageReward: '{LIMIT_LABEL}' is empty; {hint}.")
    try:
        limit = float(text)
    except ValueError:
        comma = " with a dot as the decimal separator" if "," in text else ""
        raise ValueError(f"ImageReward: '{LIMIT_LABEL}' must be a number{comma}, got {text!r}; {hint}.") from None
    if not math.isfinite(limit):
        raise ValueError(f"ImageReward: '{LIMIT_LABEL}' must be a finite number, got {text!r}; {hint}.")
    return limit


def scoring_prompt(prompt: str) -> str:
    """The prompt the image is scored against: its own prompt without extra-network tags."""
    return EXTRA_NETWORK_TAG.sub("", prompt or "").strip()


def infotext_with_score(infotext: str, score: float) -> str:
    """The infotext with 'ImageReward Score: x.xxxx' added where the WebUI's PNG Info parser keeps it.

    On the generation-parameters line it is one more `key: value` item; a separate last line would be
    read back by the WebUI as part of the negative prompt.
    """
    item = score_line(score)
    if not infotext:
        return item
    last_line = infotext.rsplit("\n", 1)[-1]
    if len(PARAM_ITEM.findall(last_line)) >= 3:
        return f"{infotext}, {item}"
    return f"{infotext}\n{item}"


def _png_bytes(image) -> bytes:
    """Lossless bytes of the image, so the endpoint decodes exactly these pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class LocalScorer:
    """The reward model in the WebUI process (rayapp.load), created on the first run."""

    def __init__(self, model: str, device: str, dtype: str):
        import rayapp

        self.key = (model, device, dtype)
        logger.info("ImageReward: loading %s on %s (%s)", model, device, dtype)
        try:
            # 'auto' leaves the device to the library: the GPU when there is one.
            self.model = rayapp.load(model, device=None if device == "auto" else device, dtype=dtype)
        except Exception as err:  # any failure is reported with the settings that caused it
            raise RuntimeError(
                f"ImageReward: cannot load the model {model!r} on {device!r} as {dtype!r} "
                f"(Settings > ImageReward: model, device, precision): {err}"
            ) from err
        self.where = f"{model} on {self.model.device}, {dtype}"

    def score_pairs(self, prompts: list[str], pictures: list) -> list[float]:
        """The library's scores of pictures[i] under prompts[i]."""
        return [float(s) for s in self.model.score_pairs(prompts, pictures)]


class EndpointScorer:
    """A rayapp Serve endpoint, reached with the standard library (rayapp.serve.client)."""

    def __init__(self, url: str, timeout: float = 120.0):
        from rayapp.serve.client import RewardClient, RewardServiceError

        if not re.match(r"^https?://[^\s/]+", url):
            raise ValueError(f"ImageReward: the endpoint URL {url!r} (Settings > ImageReward) must look like "
                             "http://127.0.0.1:8000")
        self.client = RewardClient(url, timeout=timeout)
        try:
            info = self.client.models()
        except (OSError, ValueError, RewardServiceError) as err:
            raise RuntimeError(
                f"ImageReward: the endpoint {url} does not answer ({err}). Start it, e.g. `serve run "
                "rayapp.serve.app:build_app model=...`, or clear Settings > ImageReward > endpoint URL to score "
                "in the WebUI process."
            ) from err
        limits = info.get("limits", {}) if isinstance(info, dict) else {}
        self.max_images = int(limits.get("max_images", 32))
        # JSON carries base64 (4 bytes per 3) plus the prompts; keep well inside the request limit.
        self.max_payload = int(limits.get("max_request_bytes", 64 << 20)) * 7 // 10
        models = info.get("models") or [{}]
        self.where = f"endpoint {url} ({models[0].get('id', 'unknown model')})"

    def score_pairs(self, prompts: list[str], pictures: list) -> list[float]:
        """The endpoint's scores of pictures[i] under prompts[i], in as few requests as its limits allow."""
        blobs = [_png_bytes(picture) for picture in pictures]
        sizes = [len(blob) * 4 // 3 + 4 * len(prompt) + 64 for blob, prompt in zip(blobs, prompts)]
        scores: list[float] = []
        from rayapp.serve.client import request_chunks

        for start, stop in request_chunks(sizes, self.max_images, self.max_payload):
            scores += self.client.score_pairs(prompts[start:stop], blobs[start:stop])
        return [float(s) for s in scores]


def get_scorer():
    """The endpoint client when a URL is set, else the in-process model (loaded once, kept on shared)."""
    url = setting(OPT_ENDPOINT)
    if url:
        return EndpointScorer(url)
    key = (setting(OPT_MODEL), setting(OPT_DEVICE), setting(OPT_DTYPE))
    held = getattr(shared, HELD_SCORER_ATTR, None)
    if held is not None and held.key == key:
        return held
    unload_model()  # settings changed: free the old model before the new one takes memory
    held = LocalScorer(*key)
    setattr(shared, HELD_SCORER_ATTR, held)
    return held


def unload_model() -> str:
    """Drop the in-process model and hand its memory back (Python objects, then the CUDA / MPS cache)."""
    held = getattr(shared, HELD_SCORER_ATTR, None)
    if held is None:
        return "ImageReward: no model is loaded."
    delattr(shared, HELD_SCORER_ATTR)
    del held
    gc.collect()
    torch = sys.modules.get("torch")  # a loaded model means torch is loaded; never import it just for this
    if torch is not None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available() and hasattr(torch, "mps"):
            torch.mps.empty_cache()
    logger.info("ImageReward: model unloaded")
    return "ImageReward: model unloaded."


class ScoredImage:
    """One generated image: its position in the generation, picture, infotext and score."""

    # A plain class, not a dataclass: the WebUI imports scripts without registering them in sys.modules,
    # which dataclasses need when annotations are strings.
    def __init__(self, index: int, image, infotext: str):
        self.index = index
        self.image = image
        self.infotext = infotext
        self.score: float | None = None


def _item(values, index: int, fallback):
    """values[index] when the list has it (the WebUI's per-image prompts and seeds), else fallback."""
    return values[index] if values and index < len(values) else fallback


def _generate(p):
    """process_images with the WebUI's sample saving held back, so files are written with their score."""
    wanted = p.do_not_save_samples
    p.do_not_save_samples = True
    try:
        return process_images(p)
    finally:
        p.do_not_save_samples = wanted


def _saving_wanted(p) -> bool:
    """Whether the WebUI would have saved the samples itself (settings, p, interruption)."""
    if hasattr(p, "save_samples"):
        return bool(p.save_samples())
    return bool(shared.opts.samples_save) and not p.do_not_save_samples


def _save(p, proc, entry: ScoredImage) -> None:
    """Write one image through the WebUI's own saver, the score in its infotext and its own PNG chunk."""
    extra = {SCORE_KEY: f"{entry.score:.4f}"} if entry.score is not None else None
    images.save_image(
        entry.image, p.outpath_samples, "", _item(proc.all_seeds, entry.index, proc.seed),
        _item(proc.all_prompts, entry.index, proc.prompt), shared.opts.samples_format,
        info=entry.infotext, p=p, existing_info=extra,
    )


def _result(p, proc, kept: list[ScoredImage]) -> Processed:
    """A Processed of the kept images, with prompts, seeds and infotexts reordered to match them."""
    def reorder(values, fallback):
        return [_item(values, entry.index, fallback) for entry in kept]

    result = Processed(
        p, [entry.image for entry in kept], seed=proc.seed, info=kept[0].infotext, subseed=proc.subseed,
        all_prompts=reorder(proc.all_prompts, proc.prompt), all_seeds=reorder(proc.all_seeds, proc.seed),
        all_subseeds=reorder(proc.all_subseeds, proc.subseed), index_of_first_image=0,
        infotexts=[entry.infotext for entry in kept],
    )
    if getattr(proc, "all_negative_prompts", None):
        result.all_negative_prompts = reorder(proc.all_negative_prompts, proc.negative_prompt)
    return result


class Script(scripts.Script):
    """Score, annotate, filter and sort every image the WebUI generates."""

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        import gradio as gr

        with gr.Group():
            gr.Markdown("**Tip**: the first generation also loads the ImageReward model (about 1.6 GB in "
                        "float32). Model, device, precision and an optional rayapp Serve endpoint are in "
                        "Settings > ImageReward.")
            with gr.Row():
                filter_out_low_scores = gr.Checkbox(value=False, label=FILTER_LABEL)
                lower_score_limit = gr.Textbox(value="0", label=LIMIT_LABEL)
            with gr.Row():
                unload_button = gr.Button(value=UNLOAD_LABEL)
                unload_status = gr.Markdown(value="")
            unload_button.click(fn=unload_model, inputs=[], outputs=[unload_status])
        return [filter_out_low_scores, lower_score_limit]

    def run(self, p, filter_out_low_scores=False, lower_score_limit="0"):
        # Settings and the model are checked before generating, so a mistake costs no generation time.
        limit = parse_lower_limit(lower_score_limit) if filter_out_low_scores else None
        scorer = get_scorer()
        proc = _generate(p)

        first = proc.index_of_first_image  # a grid comes first; it is not a generation and is left out
        entries = [ScoredImage(k, image, text)
                   for k, (image, text) in enumerate(zip(proc.images[first:], proc.infotexts[first:]))]
        if not entries:
            return proc
        save = _saving_wanted(p)
        prompts = [scoring_prompt(_item(proc.all_prompts, e.index, proc.prompt)) for e in entries]
        try:
            scores = scorer.score_pairs(prompts, [e.image for e in entries])
        except Exception as err:  # the generation is kept whatever went wrong
            logger.exception("ImageReward: scoring failed")
            for entry in entries if save else []:
                _save(p, proc, entry)
            proc.comments = f"{proc.comments}ImageReward: scoring failed, images are unscored and unsorted: {err}\n"
            return proc

        for entry, score in zip(entries, scores):
            entry.score = score
            entry.infotext = infotext_with_score(entry.infotext, score)
            entry.image.info["score"] = score
            if shared.opts.enable_pnginfo:
                entry.image.info["parameters"] = entry.infotext
            if save:
                _save(p, proc, entry)

        kept = [e for e in entries if limit is None or e.score >= limit]
        kept.sort(key=lambda e: e.score, reverse=True)
        if not kept:
            best = max(e.score for e in entries)
            info = (f"ImageReward: all {len(entries)} images scored below the lower limit {limit:g} "
                    f"(best {best:.4f}); lower the limit or untick '{FILTER_LABEL}'."
                    + (" They were saved with their scores." if save else ""))
            return Processed(p, [], seed=proc.seed, info=info, subseed=proc.subseed, infotexts=[info])
        rule = f"kept {len(kept)} of {len(entries)} with score >= {limit:g}" if limit is not None \
            else f"scored {len(entries)} images"
        p.comment(f"ImageReward ({scorer.where}): {rule}, best first.")
        return _result(p, proc, kept)
