"""`rayapp generate`: any diffusers text-to-image pipeline -> N images per prompt -> ImageReward score (in
process, or through a Serve endpoint) -> keep >= --min-score -> sort -> PNGs carrying their generation
parameters and `ImageReward Score: x.xxxx` + a contact sheet.

    rayapp generate --pipeline CompVis/stable-diffusion-v1-4 --prompt "a red car" -n 8 --out gen/
    rayapp generate --pipeline stabilityai/stable-diffusion-xl-base-1.0 --prompt "a red car" --out gen/
    rayapp generate --pipeline tiny --scorer path/to/tiny-rm --prompt "a red circle" -n 4 --min-score -9 --out gen/
    rayapp generate --pipeline tiny-sdxl --endpoint http://127.0.0.1:8000 --prompt "a red circle" --out gen/

Pipelines load with diffusers' `AutoPipelineForText2Image` (SD 1.x/2.x, SDXL, SD3, Flux, PixArt, ... whatever
the installed diffusers maps), or are the offline tiny pipelines ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux").

The text chunk is the SD-WebUI `parameters` layout (prompt line, `Negative prompt:` line, then
`Steps: .., Sampler: .., CFG scale: .., Seed: .., Size: WxH, Model: .., ImageReward Score: x.xxxx`), so
WebUI's PNG Info and `PIL.Image.open(path).text["parameters"]` show it; the score is also stored alone
under `ImageReward Score`. Nothing heavy is imported until the command runs.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCORE_KEY = "ImageReward Score"


@dataclass
class GeneratedImage:
    prompt_index: int
    prompt: str
    seed: int
    score: float
    file: str | None = None  # set when kept and saved
    parameters: str = ""


@dataclass
class GenerateResult:
    out_dir: str
    generated: int
    kept: list[GeneratedImage] = field(default_factory=list)
    dropped: list[GeneratedImage] = field(default_factory=list)
    contact_sheet: str | None = None


def parameters_text(prompt: str, negative: str | None, steps: int, sampler: str, guidance: float, seed: int,
                    width: int, height: int, model: str, score: float) -> str:
    """WebUI-style generation info with the ImageReward score appended (what PNG Info shows)."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(f"Steps: {steps}, Sampler: {sampler}, CFG scale: {guidance:g}, Seed: {seed}, Size: {width}x{height}, "
                 f"Model: {model}, {SCORE_KEY}: {score:.4f}")
    return "\n".join(lines)


def read_score(path: str | Path) -> float | None:
    """The ImageReward score stored in a PNG written here (or by the WebUI extension), else None."""
    from PIL import Image

    with Image.open(path) as img:
        text = getattr(img, "text", {}) or {}
    if SCORE_KEY in text:
        return float(text[SCORE_KEY])
    match = re.search(rf"{SCORE_KEY}: (-?\d+(?:\.\d+)?)", text.get("parameters", ""))
    return float(match.group(1)) if match else None


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def contact_sheet(items: list[tuple[object, str]], columns: int, thumb: int = 160):
    """A grid of (PIL image, caption) with the caption drawn under each thumbnail."""
    from PIL import Image, ImageDraw

    rows = max(1, -(-len(items) // columns))
    caption_h = 28
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, caption) in enumerate(items):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + caption_h)
        sheet.paste(img.convert("RGB").resize((thumb, thumb)), (x, y))
        draw.text((x + 4, y + thumb + 4), caption, fill="black")
    return sheet


def pipeline_call_kwargs(pipe, **values) -> dict:
    """The generation arguments this pipeline's __call__ takes; None values are left to its defaults.

    A negative prompt given to a pipeline without one is an error (dropping it silently would mislead)."""
    import inspect

    accepted = set(inspect.signature(pipe.__call__).parameters)
    if values.get("negative_prompt") and "negative_prompt" not in accepted:
        raise ValueError(f"{type(pipe).__name__} takes no negative prompt; drop --negative-prompt")
    return {k: v for k, v in values.items() if v is not None and k in accepted}


class EndpointScorer:
    """Scores through a running `rayapp.serve` endpoint (RewardClient) instead of a model in this process."""

    def __init__(self, url: str):
        from rayapp.serve.client import RewardClient

        self.url = url
        self.client = RewardClient(url)

    def score(self, prompt: str, images: list, batch_size: int = 16) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(images), batch_size):
            scores += [float(s) for s in self.client.score(prompt, list(images[start:start + batch_size]))]
        return scores


def load_reward(scorer: str, endpoint: str | None, *, device: str, dtype: str | None, tokenizer: str | None):
    """The scorer in process, or the endpoint's client when `endpoint` is set."""
    if endpoint:
        return EndpointScorer(endpoint)
    from rayapp.eval.scorers import load_scorer

    return load_scorer(scorer, device=device, dtype=dtype, tokenizer=tokenizer)


def generate_and_filter(*, pipeline: str, prompts: list[str], out_dir: str | Path, num_images: int = 4,
                        scorer: str = "ImageReward", min_score: float | None = 0.0, steps: int = 30,
                        guidance: float = 7.5, seed: int = 0, negative_prompt: str | None = None,
                        height: int | None = None, width: int | None = None, device: str | None = None,
                        dtype: str | None = None, tokenizer: str | None = None, batch_size: int = 16,
                        progress: bool = True, endpoint: str | None = None) -> GenerateResult:
    """Generate, score, filter (score >= min_score; None keeps all), sort, save. Seeds are seed + k per prompt.

    `endpoint`: score through a `rayapp.serve` endpoint at this URL (RewardClient) instead of loading `scorer`."""
    import torch
    from PIL.PngImagePlugin import PngInfo
    from tqdm.auto import tqdm

    from rayapp.diffusion import load_pipeline
    from rayapp.model.scoring import default_device

    if not prompts:
        raise ValueError("no prompts given")
    if num_images < 1:
        raise ValueError("--num-images must be >= 1")
    device = device or default_device()
    pipe = load_pipeline(pipeline, dtype=dtype, device=device)
    reward = load_reward(scorer, endpoint, device=device, dtype=dtype, tokenizer=tokenizer)
    sampler = type(pipe.scheduler).__name__
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = GenerateResult(str(out), 0)
    sheet_items = []
    for p_index, prompt in enumerate(tqdm(prompts, desc="prompts", unit="prompt", disable=not progress)):
        seeds = [seed + k for k in range(num_images)]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        kwargs = pipeline_call_kwargs(pipe, num_inference_steps=steps, guidance_scale=guidance,
                                      negative_prompt=negative_prompt, num_images_per_prompt=num_images,
                                      generator=generators, height=height, width=width, output_type="pil")
        images = pipe(prompt, **kwargs).images
        result.generated += len(images)
        scores = reward.score(prompt, list(images), batch_size=batch_size)
        ranked = sorted(zip(scores, seeds, images), key=lambda t: -t[0])
        for rank, (score, img_seed, img) in enumerate(ranked, start=1):
            entry = GeneratedImage(p_index, prompt, img_seed, float(score))
            entry.parameters = parameters_text(prompt, negative_prompt, steps, sampler, guidance, img_seed,
                                               img.width, img.height, pipeline, score)
            if min_score is not None and score < min_score:
                result.dropped.append(entry)
                continue
            info = PngInfo()
            info.add_text("parameters", entry.parameters)
            info.add_text(SCORE_KEY, f"{score:.4f}")
            path = out / f"{p_index:03d}-{rank:02d}-{_slug(prompt)}-seed{img_seed}.png"
            img.save(path, pnginfo=info)
            entry.file = str(path)
            result.kept.append(entry)
            sheet_items.append((img, f"#{p_index} s{img_seed} {score:+.4f}"))
    if sheet_items:
        sheet = contact_sheet(sheet_items, columns=min(num_images, 8))
        result.contact_sheet = str(out / "contact_sheet.png")
        sheet.save(result.contact_sheet)
    manifest = {**asdict(result), "min_score": min_score, "pipeline": pipeline, "pipeline_class": type(pipe).__name__,
                "scorer": f"endpoint {endpoint}" if endpoint else scorer}
    (out / "generate.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return result


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            prompts += [p["prompt"] if isinstance(p, dict) else str(p) for p in json.loads(text)]
        elif path.suffix == ".jsonl":
            prompts += [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
        else:
            prompts += [line.strip() for line in text.splitlines() if line.strip()]
    return prompts


def _handle(args) -> int:
    """Print what was kept (bad input: see rayapp.cli.main)."""
    result = generate_and_filter(
        pipeline=args.pipeline, prompts=_read_prompts(args), out_dir=args.out, num_images=args.num_images,
        scorer=args.scorer, min_score=None if args.keep_all else args.min_score, steps=args.steps,
        guidance=args.guidance, seed=args.seed, negative_prompt=args.negative_prompt, height=args.height,
        width=args.width, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
        batch_size=args.batch_size, progress=not args.quiet, endpoint=args.endpoint,
    )
    if not result.kept:
        best = max((d.score for d in result.dropped), default=float("nan"))
        print(f"no image reached --min-score {args.min_score} (best of {result.generated} scored {best:.4f}); "
              f"nothing saved in {result.out_dir}")
        return 0
    floor = args.min_score if not args.keep_all else "-inf"
    print(f"kept {len(result.kept)} of {result.generated} images (score >= {floor}):")
    for entry in result.kept:
        print(f"  {entry.score:+.4f}  {entry.file}")
    print(f"contact sheet -> {result.contact_sheet}")
    return 0


def register(subparsers) -> None:
    """Add `generate` to the `rayapp` parser."""
    gen = subparsers.add_parser("generate", help="generate with diffusers, score with ImageReward, filter, sort, save")
    gen.add_argument("--pipeline", default="CompVis/stable-diffusion-v1-4",
                     help="any diffusers text-to-image pipeline (hub name or local dir: SD 1.x/2.x, SDXL, SD3, Flux, "
                          "...); 'tiny', 'tiny-sdxl', 'tiny-sd3', 'tiny-flux' build the tiny offline pipelines")
    gen.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    gen.add_argument("--prompts-file", help="a .txt (one per line), .jsonl or .json list of prompts / {prompt}")
    gen.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (default 4)")
    gen.add_argument("--scorer", default="ImageReward",
                     help="reward model spec: ImageReward (hub), a saved dir, or a baseline (default ImageReward)")
    gen.add_argument("--endpoint", metavar="URL",
                     help="score through this rayapp Serve endpoint (e.g. http://127.0.0.1:8000; token from "
                          "RAYAPP_SERVE_TOKEN) instead of loading --scorer here")
    gen.add_argument("--min-score", type=float, default=0.0, help="keep images scoring >= this (default 0)")
    gen.add_argument("--keep-all", action="store_true", help="no filtering, only sorting")
    gen.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    gen.add_argument("--seed", type=int, default=0, help="image k of each prompt uses seed + k (default 0)")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--out", required=True, help="output directory for PNGs, contact_sheet.png, generate.json")
    gen.add_argument("--device")
    gen.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    gen.add_argument("--tokenizer", help="tokenizer for a reward model saved without one")
    gen.add_argument("--batch-size", type=int, default=16, help="images per scoring call")
    gen.add_argument("--quiet", action="store_true")
    gen.set_defaults(func=_handle)
