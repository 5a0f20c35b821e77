"""ImageReward human-preference scores in the Stable Diffusion WebUI (AUTOMATIC1111), computed by rayapp.

Install: copy this file into the WebUI's `scripts/` folder (README.md beside this file). It adds an
"ImageReward" section to txt2img and img2img (an always-on script with an Enable box).

Supported: AUTOMATIC1111 v1.9.0 to v1.10.1 (the `postprocess_image_after_composite` hook, callable
infotext parameters) and forks that keep that `modules` API.

Every generated image is scored against its prompt inside the generation, right before the WebUI saves
it, so the WebUI's own saving writes the score: on the infotext's generation-parameters line
(`ImageReward Score: 0.1234`) and in an `ImageReward Score` PNG chunk. File names, override settings
(img2img Batch, API) and Interrupt / Skip behave as without the script. When the WebUI assembles its
result, images below an optional lower limit are dropped and the rest sorted best first, their
infotexts, prompts and seeds moved with them; masks and composites pass through unscored.

Scoring runs through a rayapp Serve endpoint (the default; this file then needs only the standard
library, Pillow and the WebUI's `modules`, and runs on the WebUI's Python 3.10) or, where the WebUI's
Python is >= 3.11 with torch >= 2.6, transformers >= 5 and Pillow >= 10, in the WebUI process.
"""
from __future__ import annotations

import base64
import gc
import io
import json
import logging
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request

from modules import script_callbacks, scripts, shared

logger = logging.getLogger(__name__)

TITLE = "ImageReward"
ENABLE_LABEL = "Score every image with ImageReward"
FILTER_LABEL = "Filter out images with low scores"
LIMIT_LABEL = "Lower score limit"
UNLOAD_LABEL = "Unload Model From Memory"
SCORE_KEY = "ImageReward Score"  # infotext item and PNG text chunk, as rayapp.serve.annotate writes them

OPT_MODE = "imagereward_mode"
OPT_ENDPOINT = "imagereward_endpoint"
OPT_MODEL = "imagereward_model"
OPT_DEVICE = "imagereward_device"
OPT_DTYPE = "imagereward_dtype"
ENDPOINT_MODE = "endpoint"
IN_PROCESS_MODE = "in-process"
SETTINGS_SECTION = ("imagereward", "ImageReward")
SETTINGS = {
    OPT_MODE: (ENDPOINT_MODE, ("Where scores are computed: endpoint (a rayapp Serve endpoint beside the WebUI) or "
                               "in-process (needs Python >= 3.11, torch >= 2.6, transformers >= 5, Pillow >= 10)")),
    OPT_ENDPOINT: ("http://127.0.0.1:8000", "rayapp Serve endpoint URL (endpoint mode)"),
    OPT_MODEL: ("ImageReward-v1.0", ("In-process model: ImageReward-v1.0 (Hugging Face cache), a path to "
                                     "ImageReward.pt, or a rayapp save_pretrained directory")),
    OPT_DEVICE: ("auto", "In-process device: auto (CUDA when there is a GPU), cpu, cuda, cuda:1, mps"),
    OPT_DTYPE: ("float32", ("In-process precision: float32 (the library's scores, ~1.6 GB), bfloat16 or float16 "
                            "(half the memory, scores differ in the 2nd-3rd decimal)")),
}
SERVE_COMMAND = "serve run rayapp.serve.app:build_app model=ImageReward-v1.0"
# What in-process scoring needs (rayapp's own requirements); the WebUI 1.x pins older torch, transformers, Pillow.
IN_PROCESS_PYTHON = (3, 11)
IN_PROCESS_PACKAGES = {"rayapp": (0, 1), "torch": (2, 6), "transformers": (5, 0), "pillow": (10, 0)}

# Kept on modules.shared because the WebUI re-imports scripts on Reload UI while `shared` lives on.
HELD_SCORER_ATTR = "rayapp_image_reward"
# This run's scoring state, kept on the processing object between the script's hooks.
RUN_ATTR = "rayapp_image_reward_run"
# Extra-network tags such as <lora:name:0.8> name weights to apply, not what the picture shows.
EXTRA_NETWORK_TAG = re.compile(r"<[\w-]+:[^<>]*>")


def _register_settings() -> None:
    """Add Settings > ImageReward (mode, endpoint URL, in-process model, device, precision)."""
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


def _png_bytes(image) -> bytes:
    """Lossless bytes of the image, so the endpoint decodes exactly these pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- endpoint
class EndpointError(RuntimeError):
    """The endpoint answered with an error status; the message carries its `detail`."""


class EndpointScorer:
    """A rayapp Serve endpoint, reached with the standard library only (no rayapp in the WebUI)."""

    def __init__(self, url: str, timeout: float = 120.0, max_retries: int = 3):
        if not re.match(r"^https?://[^\s/]+", url):
            raise ValueError(f"ImageReward: the endpoint URL {url!r} (Settings > ImageReward) must look like "
                             "http://127.0.0.1:8000")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.token = os.environ.get("RAYAPP_SERVE_TOKEN") or None
        try:
            info = self._call("/v1/models")
        except (OSError, ValueError, EndpointError) as err:
            raise RuntimeError(
                f"ImageReward: the endpoint {self.url} does not answer ({err}). Start the reward server beside "
                f"the WebUI (`{SERVE_COMMAND}`) or fix Settings > ImageReward > endpoint URL."
            ) from err
        limits = info.get("limits") or {} if isinstance(info, dict) else {}
        self.max_images = max(1, int(limits.get("max_images", 32)))
        # JSON carries base64 (4 bytes per 3) plus the prompts; keep well inside the request limit.
        self.max_payload = int(limits.get("max_request_bytes", 64 << 20)) * 7 // 10
        models = (info.get("models") if isinstance(info, dict) else None) or [{}]
        self.where = f"endpoint {self.url} ({models[0].get('id', 'unknown model')})"

    def _call(self, path: str, payload: dict | None = None) -> dict:
        """One JSON request; 503 is retried (honouring Retry-After), other errors raise EndpointError."""
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method="GET" if data is None else "POST")
        for attempt in range(self.max_retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                body = err.read().decode("utf-8", "replace")
                if err.code == 503 and attempt < self.max_retries:
                    time.sleep(_retry_delay(err.headers.get("Retry-After"), attempt))
                    continue
                raise EndpointError(f"HTTP {err.code}: {_error_detail(body)}") from None
        raise AssertionError("unreachable")

    def score_pairs(self, prompts: list[str], pictures: list) -> list[float]:
        """The endpoint's scores of pictures[i] under prompts[i], in as few requests as its limits allow."""
        blobs = [base64.b64encode(_png_bytes(picture)).decode("ascii") for picture in pictures]
        scores: list[float] = []
        start = 0
        while start < len(blobs):
            stop, size = start, 0
            while stop < len(blobs) and stop - start < self.max_images and (
                    stop == start or size + len(blobs[stop]) + 4 * len(prompts[stop]) <= self.max_payload):
                size += len(blobs[stop]) + 4 * len(prompts[stop])
                stop += 1
            answer = self._call("/v1/score_pairs", {"prompts": prompts[start:stop], "images": blobs[start:stop]})
            got = answer.get("scores") if isinstance(answer, dict) else None
            if not isinstance(got, list) or len(got) != stop - start:
                raise EndpointError(f"expected {stop - start} scores from {self.url}, got {str(answer)[:200]}")
            scores += [float(s) for s in got]
            start = stop
        return scores


def _retry_delay(retry_after: str | None, attempt: int) -> float:
    """Seconds to wait before retrying a 503: the server's Retry-After (capped), else a short backoff."""
    if retry_after and retry_after.strip().isdigit():
        return min(float(retry_after.strip()), 10.0)
    return 0.5 * 2 ** attempt


def _error_detail(body: str) -> str:
    """The `detail` of the endpoint's error body {detail, field, request_id}, else the body itself."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300]
    if not isinstance(data, dict):
        return body[:300]
    detail = str(data.get("detail", body))
    return detail + (f" (field {data['field']})" if data.get("field") else "")


# --------------------------------------------------------------------------------------------- in-process
def _installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _version_tuple(text: str) -> tuple[int, ...]:
    """'2.1.2+cu121' -> (2, 1, 2): the leading numbers of a version string."""
    numbers = []
    for part in text.split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
    return tuple(numbers)


def in_process_problems(python: tuple = tuple(sys.version_info[:3]), version_of=_installed_version) -> list[str]:
    """What keeps in-process scoring from working in this Python (empty when nothing does)."""
    problems = []
    if tuple(python[:2]) < IN_PROCESS_PYTHON:
        problems.append(f"Python >= {'.'.join(map(str, IN_PROCESS_PYTHON))} (this WebUI runs "
                        f"{'.'.join(map(str, python))})")
    for name, minimum in IN_PROCESS_PACKAGES.items():
        found = version_of(name)
        wanted = ".".join(map(str, minimum))
        if found is None:
            problems.append(f"{name} >= {wanted} (not installed)")
        elif _version_tuple(found) < minimum:
            problems.append(f"{name} >= {wanted} (this WebUI has {found})")
    return problems


class LocalScorer:
    """The reward model in the WebUI process (rayapp.load), created on the first run."""

    def __init__(self, model: str, device: str, dtype: str):
        problems = in_process_problems()
        if problems:
            raise RuntimeError(
                "ImageReward: in-process scoring needs " + "; ".join(problems) + ". Use endpoint mode instead: run "
                f"the reward server beside the WebUI (`{SERVE_COMMAND}` in rayapp's own environment) and set "
                "Settings > ImageReward > mode to endpoint. Nothing needs installing into the WebUI."
            )
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


def get_scorer():
    """The endpoint client in endpoint mode, else the in-process model (loaded once, kept on shared)."""
    mode = setting(OPT_MODE)
    if mode == ENDPOINT_MODE:
        return EndpointScorer(setting(OPT_ENDPOINT))
    if mode != IN_PROCESS_MODE:
        raise ValueError(f"ImageReward: Settings > ImageReward > mode must be {ENDPOINT_MODE!r} or "
                         f"{IN_PROCESS_MODE!r}, got {mode!r}")
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


# ------------------------------------------------------------------------------------------- one generation
class Generation:
    """One generated image of this run: its picture, index in the job, and score (None: not scored)."""

    # A plain class, not a dataclass: the WebUI imports scripts without registering them in sys.modules,
    # which dataclasses need when annotations are strings.
    def __init__(self, image, index: int, score: float | None):
        self.image = image
        self.index = index
        self.score = score


class Run:
    """The scoring state of one process_images call, kept on p between the script's hooks."""

    def __init__(self, scorer, limit: float | None):
        self.scorer = scorer
        self.limit = limit
        self.scores: dict[tuple[int, int], float] = {}  # (iteration, position in batch) -> score
        self.generations: dict[int, Generation] = {}  # id(image) -> the generation (the image kept alive)
        self.batch_incomplete = False
        self.failure: str | None = None
        self.unscored = 0

    def infotext_value(self, p=None, index=0, use_main_prompt=False, **_):
        """The infotext's 'ImageReward Score' item (create_infotext calls this): the image's score, or None."""
        if use_main_prompt or p is None:
            return None  # the grid's infotext
        score = self.scores.get((p.iteration, index))
        return None if score is None else f"{score:.4f}"

    def score_image(self, p, image) -> None:
        """Score the current image of the batch, once it is final and before the WebUI saves it."""
        position = p.batch_index
        index = p.iteration * p.batch_size + position
        score = None
        if not self.batch_incomplete and self.failure is None:
            prompt = scoring_prompt(_item(p.all_prompts, index, p.prompt))
            try:
                score = self.scorer.score_pairs([prompt], [image])[0]
            except Exception as err:  # the generation goes on; later images are left unscored
                logger.exception("ImageReward: scoring failed")
                self.failure = str(err) or type(err).__name__
        if score is None:
            self.unscored += 1
        else:
            self.scores[(p.iteration, position)] = score
            image.info[SCORE_KEY] = f"{score:.4f}"
        self.generations[id(image)] = Generation(image, index, score)


def _item(values, index: int, fallback):
    """values[index] when the list has it (the WebUI's per-image prompts and seeds), else fallback."""
    return values[index] if values and 0 <= index < len(values) else fallback


def _add_score_chunk(params) -> None:
    """before_image_saved: a scored image's file also gets the score alone in an 'ImageReward Score' chunk."""
    score = getattr(params.image, "info", {}).get(SCORE_KEY)
    if score is not None and params.pnginfo is not None:
        params.pnginfo[SCORE_KEY] = score


script_callbacks.on_before_image_saved(_add_score_chunk)


def assemble(processed, run: Run) -> None:
    """Filter and sort the generations of `processed` in place, keeping infotexts, prompts and seeds in step.

    Masks, composites and anything else that is not a generation of this run pass through unfiltered,
    after the kept generations, each paired with the infotext of the generation it came with.
    """
    first = processed.index_of_first_image
    outputs = processed.images[first:]
    texts = processed.infotexts[first:]
    paired = len(texts) == len(outputs)  # else: generations carry texts in order, masks none (WebUI 1.x)
    kept, passing, dropped = [], [], []
    text_iter = iter(texts)
    current_text, current_index = processed.info, 0
    for position, image in enumerate(outputs):
        generation = run.generations.get(id(image))
        if paired:
            text = texts[position]
        elif generation is not None:
            text = next(text_iter, current_text)
        else:
            text = current_text
        if generation is None:
            passing.append((image, text, current_index))
            continue
        current_text, current_index = text, generation.index
        if run.limit is not None and generation.score is not None and generation.score < run.limit:
            dropped.append(generation)
        else:
            kept.append((image, text, generation))
    kept.sort(key=lambda item: (item[2].score is None, -(item[2].score or 0.0)))
    rows = [(image, text, generation.index) for image, text, generation in kept] + passing

    keep_grid = first == 1 and not dropped
    head_images = processed.images[:1] if keep_grid else []
    head_texts = processed.infotexts[:1] if keep_grid else []
    processed.images = head_images + [image for image, _, _ in rows]
    processed.infotexts = head_texts + [text for _, text, _ in rows]
    processed.index_of_first_image = len(head_images)
    for name in ("all_prompts", "all_negative_prompts", "all_seeds", "all_subseeds"):
        values = getattr(processed, name, None)
        if values:
            setattr(processed, name, [_item(values, index, values[0]) for _, _, index in rows] or values[:1])

    scored = [g for g in run.generations.values() if g.score is not None]
    notes = []
    if run.limit is None:
        notes.append(f"scored {len(scored)} images, best first")
    else:
        notes.append(f"kept {len(scored) - len(dropped)} of {len(scored)} with score >= {run.limit:g}, best first")
    if run.unscored:
        why = f"scoring failed: {run.failure}" if run.failure else "interrupted or skipped before finishing"
        notes.append(f"{run.unscored} not scored ({why})")
    if processed.images:
        processed.info = processed.infotexts[0]
    elif dropped:
        best = max(g.score for g in scored)
        processed.info = (f"ImageReward: all {len(scored)} images scored below the lower limit {run.limit:g} "
                          f"(best {best:.4f}); lower the limit or untick '{FILTER_LABEL}'. Saved images keep "
                          "their scores.")
    processed.comments = f"{processed.comments}ImageReward ({run.scorer.where}): {'; '.join(notes)}.\n"


def check_webui_version() -> None:
    """Refuse a WebUI without the hook this script scores in (AUTOMATIC1111 before v1.9.0)."""
    runner = getattr(scripts, "ScriptRunner", None)
    if runner is not None and not hasattr(runner, "postprocess_image_after_composite"):
        raise RuntimeError("ImageReward: this WebUI has no postprocess_image_after_composite script hook; the "
                           "script supports AUTOMATIC1111 v1.9.0 to v1.10.1. Update the WebUI.")


class Script(scripts.Script):
    """Score every image the WebUI generates; optionally filter and sort the result."""

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr

        with gr.Accordion(TITLE, open=False):
            gr.Markdown("Scores come from a rayapp Serve endpoint running beside the WebUI "
                        f"(`{SERVE_COMMAND}`); mode, URL and the in-process model are in Settings > ImageReward.")
            enabled = gr.Checkbox(value=False, label=ENABLE_LABEL)
            with gr.Row():
                filter_out_low_scores = gr.Checkbox(value=False, label=FILTER_LABEL)
                lower_score_limit = gr.Number(value=0.0, label=LIMIT_LABEL)
            with gr.Row():
                unload_button = gr.Button(value=UNLOAD_LABEL)
                unload_status = gr.Markdown(value="")
            unload_button.click(fn=unload_model, inputs=[], outputs=[unload_status])
        return [enabled, filter_out_low_scores, lower_score_limit]

    def process(self, p, enabled=False, filter_out_low_scores=False, lower_score_limit=0.0, *_):
        p.extra_generation_params.pop(SCORE_KEY, None)
        setattr(p, RUN_ATTR, None)
        if not enabled:
            return
        # Settings and the scorer are checked before the first batch, so a mistake costs no generation time.
        try:
            check_webui_version()
            limit = parse_lower_limit(lower_score_limit) if filter_out_low_scores else None
            scorer = get_scorer()
        except Exception as err:  # the WebUI only logs a hook's exception: say it in the result and stop
            message = str(err) if str(err).startswith("ImageReward") else f"ImageReward: {err}"
            logger.error("%s", message)
            p.comment(f"{message} The generation was stopped before it began.")
            shared.state.interrupt()
            return
        run = Run(scorer, limit)
        setattr(p, RUN_ATTR, run)
        p.extra_generation_params[SCORE_KEY] = run.infotext_value

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        run = getattr(p, RUN_ATTR, None)
        if run is not None:
            # What p.save_samples() sees next: a batch cut short by Interrupt / Skip is neither saved nor scored.
            run.batch_incomplete = bool(shared.state.interrupted or shared.state.skipped)

    def postprocess_image_after_composite(self, p, pp, *args):
        run = getattr(p, RUN_ATTR, None)
        if run is not None:
            run.score_image(p, pp.image)

    def postprocess(self, p, processed, *args):
        run = getattr(p, RUN_ATTR, None)
        if run is not None:
            assemble(processed, run)
