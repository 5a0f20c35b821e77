"""Synthetic comparison set: procedurally drawn scenes, their captions and a fixed ranking rule.

Scene and caption. A prompt describes COUNT objects of one SHAPE, COLOUR and SIZE on a plain
BACKGROUND, e.g. "two large red circles on a gray background". Counts 1-3, sizes small / large,
6 colours, 3 shapes, 3 backgrounds. Objects sit in distinct cells of a 2x2 grid (jittered) so they never
overlap; every shape has the same area for a given size, and a large object has ~5x the area of a small
one, so size shows in every single object.

Candidates. Each prompt gets K images; candidate k has a faithfulness f and a quality q:
  f = 2  the image shows exactly the caption;
  f = 1  one of the varied attributes (chosen uniformly) is wrong;
  f = 0  two of them are wrong (one if only one attribute is varied).
  q = 2  clean;
  q = 1  mild: Gaussian blur of radius 1.2 px OR grey Gaussian noise of sigma 24/255 (coin flip);
  q = 0  heavy: blur of radius 2.0 px AND grey noise of sigma 36/255   (radii scale with image_size / 64).
The varied attributes default to colour and size (DEFAULT_ATTRIBUTES); count is drawn and captioned but
only made wrong when asked for (`attributes=("colour", "count", "size")`, `--attributes colour,count,size`).
Why: colour and size are local (a patch or two shows them), count is a global sum over the image, and
the tiny preset does not learn to count within the CPU budget: in three runs of ~1600 updates (the
learning test's budget) on sets varying all three, it ordered clean count-only caption pairs right 0.45-0.66
of the time (chance: 0.5), colour-only 0.82-0.98 and size-only 1.0 (tools/recipe_probe.py prints this
split). Full-size presets can take the harder set.
Shape and background are always right. A wrong value is drawn uniformly among the other values, so over
the set faithful and unfaithful images have the same attribute distribution: an image-only view cannot
tell f, only the caption can. The first candidate drawn is always (f=2, q=2); the other K-1 draw f and q
independently and uniformly, so every faithfulness level comes with every quality level (quality pairs
always point the same way) and equal (f, q) draws make ties. Candidate order is then shuffled.

Ranking rule (fixed): utility u = 3 * f + q, i.e. faithfulness first, quality breaks ties between equal
faithfulness. ranking = dense rank of -u (1 = best); equal (f, q) gives equal rank. So the best-ranked
candidates are exactly the faithful, clean ones.

Pair kinds (for tests and evaluation): "caption" = equal q, different f (only the caption decides);
"quality" = equal f, different q; "both" = both differ.

Determinism: prompt i is drawn from numpy's generator seeded with (seed, i) alone, so a set is a pure
function of (seed, prompts, per_prompt, image_size, attributes); splits are index ranges of that stream.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 35),
    "purple": (145, 55, 195),
    "orange": (245, 135, 25),
}
BACKGROUNDS = {"white": (240, 240, 240), "gray": (128, 128, 128), "black": (18, 18, 18)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SIZES = ("small", "large")
VARIABLE_ATTRIBUTES = ("colour", "count", "size")  # the ones a candidate may be asked to get wrong
DEFAULT_ATTRIBUTES = ("colour", "size")  # the ones it gets wrong by default (module docstring)

# Object "radius" at 64 px: the radius of the circle of equal area; other shapes get the same area.
RADIUS_64 = {"small": 4.0, "large": 9.0}
MILD_BLUR_64, HEAVY_BLUR_64 = 1.2, 2.0  # px at 64 px
# grey (luminance) noise: degrades quality while keeping hue, so colour stays decidable
MILD_NOISE, HEAVY_NOISE = 24.0, 36.0  # sigma in 0..255 units

FAITHFULNESS_LEVELS = (0, 1, 2)
QUALITY_LEVELS = (0, 1, 2)


@dataclass(frozen=True)
class Scene:
    """What one image shows (or what a caption asks for)."""

    count: int
    size: str
    colour: str
    shape: str
    background: str

    def caption(self) -> str:
        noun = self.shape + ("s" if self.count != 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {noun} on a {self.background} background"


def vocabulary() -> list[str]:
    """Every word a caption can contain (the synthetic tokenizer's vocabulary)."""
    words = {"on", "a", "background", *COUNT_WORDS.values(), *SIZES, *COLOURS, *BACKGROUNDS}
    words.update(SHAPES)
    words.update(s + "s" for s in SHAPES)
    return sorted(words)


def utility(faithfulness: int, quality: int) -> int:
    """The rule's score: faithfulness first, quality second."""
    return 3 * faithfulness + quality


def rank_by_rule(faithfulness: list[int], quality: list[int]) -> list[int]:
    """Dense ranking (1 = best) of u = 3f + q; equal (f, q) share a rank."""
    utilities = [utility(f, q) for f, q in zip(faithfulness, quality)]
    order = sorted(set(utilities), reverse=True)
    return [order.index(u) + 1 for u in utilities]


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        count=int(rng.choice(list(COUNT_WORDS))),
        size=str(rng.choice(SIZES)),
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        background=str(rng.choice(list(BACKGROUNDS))),
    )


def corrupt(scene: Scene, n_wrong: int, attributes: tuple[str, ...], rng: np.random.Generator) -> Scene:
    """The scene with `n_wrong` of `attributes` replaced by a uniformly drawn different value."""
    choices = {"colour": list(COLOURS), "count": list(COUNT_WORDS), "size": list(SIZES)}
    picked = rng.choice(len(attributes), size=min(n_wrong, len(attributes)), replace=False)
    changes = {}
    for idx in sorted(picked):
        name = attributes[idx]
        current = getattr(scene, name)
        others = [v for v in choices[name] if v != current]
        value = others[int(rng.integers(len(others)))]
        changes[name] = int(value) if name == "count" else str(value)
    return replace(scene, **changes)


def _shape_points(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]] | None:
    """Polygon of the shape with the area of a circle of `radius` (None for a circle)."""
    if shape == "square":
        half = radius * np.sqrt(np.pi) / 2.0
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        side = radius * np.sqrt(4.0 * np.pi / np.sqrt(3.0))
        height = side * np.sqrt(3.0) / 2.0
        return [(cx, cy - 2 * height / 3), (cx + side / 2, cy + height / 3), (cx - side / 2, cy + height / 3)]
    return None


def draw_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render the scene: objects in distinct jittered cells of a 2x2 grid, colours slightly jittered."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    scale = image_size / 64.0
    cell = image_size / 2.0
    base = np.array(COLOURS[scene.colour])
    colour = tuple(int(c) for c in np.clip(base + rng.integers(-12, 13, size=3), 0, 255))
    for cell_index in rng.choice(4, size=scene.count, replace=False):
        radius = RADIUS_64[scene.size] * scale * float(rng.uniform(0.95, 1.05))
        extent = radius * 1.6  # the triangle's farthest vertex; keeps every shape inside its cell
        slack = max(cell / 2.0 - extent - 1.0, 0.0)
        cx = (cell_index % 2 + 0.5) * cell + float(rng.uniform(-slack, slack))
        cy = (cell_index // 2 + 0.5) * cell + float(rng.uniform(-slack, slack))
        points = _shape_points(scene.shape, cx, cy, radius)
        if points is None:
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        else:
            draw.polygon(points, fill=colour)
    return img


def degrade(img: Image.Image, quality: int, rng: np.random.Generator) -> Image.Image:
    """Apply the quality level's blur and/or noise (see the module docstring)."""
    if quality == 2:
        return img
    scale = img.size[0] / 64.0
    if quality == 1:
        use_blur = bool(rng.integers(2))
        blur, noise = (MILD_BLUR_64 * scale, 0.0) if use_blur else (0.0, MILD_NOISE)
    else:
        blur, noise = HEAVY_BLUR_64 * scale, HEAVY_NOISE
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    if noise:
        grain = rng.normal(0.0, noise, size=(img.size[1], img.size[0], 1))
        arr = np.asarray(img, dtype=np.float32) + grain
        img = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
    return img


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast; PNG output is deterministic
    return buf.getvalue()


def make_record(index: int, *, seed: int = 0, per_prompt: int = 6, image_size: int = 64,
                attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES) -> dict:
    """Prompt number `index` of the set: a row of the synthetic Parquet schema."""
    if per_prompt < 2:
        raise ValueError(f"per_prompt must be >= 2 to make comparisons, got {per_prompt}")
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng)
    specs = [(2, 2)] + [
        (int(rng.choice(FAITHFULNESS_LEVELS)), int(rng.choice(QUALITY_LEVELS))) for _ in range(per_prompt - 1)
    ]
    specs = [specs[i] for i in rng.permutation(per_prompt)]
    images, faithfulness, quality = [], [], []
    for f, q in specs:
        shown = corrupt(scene, 2 - f, attributes, rng) if f < 2 else scene
        images.append(encode_png(degrade(draw_scene(shown, image_size, rng), q, rng)))
        faithfulness.append(f)
        quality.append(q)
    return {
        "id": f"synth-{seed}-{index:06d}",
        "prompt": scene.caption(),
        "images": images,
        "ranking": rank_by_rule(faithfulness, quality),
        "faithfulness": faithfulness,
        "quality": quality,
    }


@dataclass
class SynthReport:
    """Where a synthetic set went and what it holds."""

    out_dir: str
    rows: dict  # split -> prompts
    images: int
    pairs: dict  # split -> unequal-rank pairs
    tokenizer_dir: str


def split_sizes(prompts: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Prompt counts per split; val and test get at least one prompt when their fraction is > 0."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= fractions and val + test < 1, got val={val_fraction} test={test_fraction}")
    n_val = max(round(prompts * val_fraction), 1 if val_fraction > 0 else 0)
    n_test = max(round(prompts * test_fraction), 1 if test_fraction > 0 else 0)
    n_train = prompts - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{prompts} prompts leave no training prompts (val {n_val}, test {n_test})")
    return {"train": n_train, "val": n_val, "test": n_test}


def write_synthetic_set(out_dir: str | os.PathLike, *, prompts: int = 1000, per_prompt: int = 6,
                        seed: int = 0, image_size: int = 64, val_fraction: float = 0.1,
                        test_fraction: float = 0.1, attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES,
                        rows_per_shard: int = 256, overwrite: bool = False,
                        progress: bool = True) -> SynthReport:
    """Write DIR/train, DIR/val, DIR/test (Parquet shards), DIR/tokenizer and DIR/synth.json."""
    from tqdm import tqdm

    from rayapp.data.pairs import count_pairs
    from rayapp.data.shards import SYNTH_SCHEMA, ShardWriter, prepare_out_dir
    from rayapp.model.tokenizer import build_wordpiece_tokenizer

    unknown = [a for a in attributes if a not in VARIABLE_ATTRIBUTES]
    if unknown or not attributes:
        raise ValueError(f"attributes must be a non-empty subset of {VARIABLE_ATTRIBUTES}, got {attributes}")
    sizes = split_sizes(prompts, val_fraction, test_fraction)
    out = prepare_out_dir(out_dir, overwrite=overwrite)
    pairs: dict[str, int] = {}
    index = 0
    with tqdm(total=prompts, desc="synth prompts", unit="prompt", disable=not progress) as bar:
        for split, n in sizes.items():
            pairs[split] = 0
            with ShardWriter(out / split, SYNTH_SCHEMA, rows_per_shard) as writer:
                for _ in range(n):
                    record = make_record(index, seed=seed, per_prompt=per_prompt, image_size=image_size,
                                         attributes=tuple(attributes))
                    pairs[split] += count_pairs(record["ranking"])
                    writer.write(record)
                    index += 1
                    bar.update(1)
    tokenizer_dir = out / "tokenizer"
    build_wordpiece_tokenizer(vocabulary(), save_dir=tokenizer_dir)
    report = SynthReport(str(out), sizes, prompts * per_prompt, pairs, str(tokenizer_dir))
    manifest = {
        "generator": "rayapp.data.synth",
        "rule": "u = 3*faithfulness + quality; ranking = dense rank of -u (1 = best)",
        "seed": seed, "prompts": prompts, "per_prompt": per_prompt, "image_size": image_size,
        "attributes": list(attributes), "val_fraction": val_fraction, "test_fraction": test_fraction,
        **asdict(report),
    }
    (out / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return report
