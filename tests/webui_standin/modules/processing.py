"""Stand-in for the WebUI's `modules.processing`: the processing object, Processed and process_images.

The flow of `process_images` follows the WebUI's: fix the seed, one prompt and seed per image, draw
each batch, save every image during generation unless `p.do_not_save_samples`, keep its infotext in
`image.info["parameters"]`, put a grid first when several images were made. The drawing itself is the
stand-in's: coloured shapes from each image's seed instead of a diffusion model.
"""
from __future__ import annotations

import json
import random

from PIL import Image, ImageDraw

from modules import images
from modules.shared import opts, state

_COLOURS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]


class StableDiffusionProcessing:
    """The settings of one generation, with the fields the WebUI fills while generating."""

    def __init__(self, prompt="", negative_prompt="", seed=-1, subseed=-1, subseed_strength=0.0, styles=None,
                 batch_size=1, n_iter=1, steps=20, sampler_name="Euler a", cfg_scale=7.0, width=64, height=64,
                 outpath_samples=None, outpath_grids=None, do_not_save_samples=False, do_not_save_grid=False,
                 extra_generation_params=None):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.subseed = subseed
        self.subseed_strength = subseed_strength
        self.styles = styles or []
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.steps = steps
        self.sampler_name = sampler_name
        self.cfg_scale = cfg_scale
        self.width = width
        self.height = height
        self.outpath_samples = outpath_samples
        self.outpath_grids = outpath_grids
        self.do_not_save_samples = do_not_save_samples
        self.do_not_save_grid = do_not_save_grid
        self.extra_generation_params = dict(extra_generation_params or {})
        self.comments = {}
        self.all_prompts = None
        self.all_negative_prompts = None
        self.all_seeds = None
        self.all_subseeds = None
        self.iteration = 0
        self.restore_faces = False

    def comment(self, text: str) -> None:
        """A note shown under the generation info."""
        self.comments[text] = 1

    def setup_prompts(self) -> None:
        """One prompt and one negative prompt per image to generate."""
        count = self.batch_size * self.n_iter
        self.all_prompts = list(self.prompt) if isinstance(self.prompt, list) else [self.prompt] * count
        negative = self.negative_prompt
        self.all_negative_prompts = list(negative) if isinstance(negative, list) else [negative] * len(self.all_prompts)

    def save_samples(self) -> bool:
        """Whether generated images are written to disk during generation."""
        finished = not state.interrupted and not state.skipped
        return opts.samples_save and not self.do_not_save_samples and (opts.save_incomplete_images or finished)

    def draw(self, seed: int, prompt: str) -> Image.Image:
        """The stand-in sampler: a picture decided by the seed alone."""
        rng = random.Random(seed)
        img = Image.new("RGB", (self.width, self.height), rng.choice(_COLOURS))
        pen = ImageDraw.Draw(img)
        for _ in range(rng.randint(1, 3)):
            x, y = rng.randrange(self.width), rng.randrange(self.height)
            r = rng.randint(4, max(5, self.width // 3))
            pen.ellipse((x - r, y - r, x + r, y + r), fill=rng.choice(_COLOURS))
        return img


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """txt2img settings."""


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """img2img settings (the init images are not used by the stand-in)."""

    def __init__(self, init_images=None, denoising_strength=0.75, **kwargs):
        super().__init__(**kwargs)
        self.init_images = init_images or []
        self.denoising_strength = denoising_strength


class Processed:
    """The result a script returns: images, their infotexts, and the generation's prompts and seeds."""

    def __init__(self, p, images_list, seed=-1, info="", subseed=None, all_prompts=None, all_negative_prompts=None,
                 all_seeds=None, all_subseeds=None, index_of_first_image=0, infotexts=None, comments=""):
        self.images = images_list
        self.prompt = p.prompt if not isinstance(p.prompt, list) else p.prompt[0]
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.subseed = subseed
        self.info = info
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.width = p.width
        self.height = p.height
        self.batch_size = p.batch_size
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_negative_prompts = all_negative_prompts or p.all_negative_prompts or [self.negative_prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.all_subseeds = all_subseeds or p.all_subseeds or [self.subseed]
        self.infotexts = infotexts or [info]

    def js(self) -> str:
        """The generation info the page keeps as JSON (seed reuse reads all_seeds[index])."""
        return json.dumps({
            "prompt": self.all_prompts[0], "all_prompts": self.all_prompts, "seed": self.seed,
            "all_seeds": self.all_seeds, "infotexts": self.infotexts,
            "index_of_first_image": self.index_of_first_image,
        })


def create_infotext(p, index: int = 0, use_main_prompt: bool = False) -> str:
    """'prompt\\nNegative prompt: ...\\nSteps: .., Sampler: .., CFG scale: .., Seed: .., Size: WxH[, extras]'."""
    if use_main_prompt:
        index = 0
    params = {
        "Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": p.all_seeds[index],
        "Size": f"{p.width}x{p.height}", **p.extra_generation_params,
    }
    params_line = ", ".join(f"{key}: {value}" for key, value in params.items() if value is not None)
    negative = p.all_negative_prompts[index]
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{p.all_prompts[index]}{negative_line}\n{params_line}".strip()


def process_images(p) -> Processed:
    """Generate p.batch_size * p.n_iter images the way the WebUI's main loop does."""
    seed = p.seed if p.seed not in (-1, None, "") else random.randrange(4294967294)
    subseed = p.subseed if p.subseed not in (-1, None, "") else random.randrange(4294967294)
    p.setup_prompts()
    p.all_seeds = [int(seed) + i for i in range(len(p.all_prompts))]
    p.all_subseeds = [int(subseed) + i for i in range(len(p.all_prompts))]

    infotexts, output_images = [], []
    for n in range(p.n_iter):
        p.iteration = n
        if state.interrupted:
            break
        save = p.save_samples()
        for i in range(p.batch_size):
            index = n * p.batch_size + i
            if index >= len(p.all_prompts):
                break
            image = p.draw(p.all_seeds[index], p.all_prompts[index])
            text = create_infotext(p, index)
            if save:
                images.save_image(image, p.outpath_samples, "", p.all_seeds[index], p.all_prompts[index],
                                  opts.samples_format, info=text, p=p)
            infotexts.append(text)
            if opts.enable_pnginfo:
                image.info["parameters"] = text
            output_images.append(image)

    index_of_first_image = 0
    unwanted_grid = len(output_images) < 2 and opts.grid_only_if_multiple
    if output_images and (opts.return_grid or opts.grid_save) and not p.do_not_save_grid and not unwanted_grid:
        grid = images.image_grid(output_images, p.batch_size)
        text = create_infotext(p, use_main_prompt=True)
        if opts.return_grid:
            infotexts.insert(0, text)
            if opts.enable_pnginfo:
                grid.info["parameters"] = text
            output_images.insert(0, grid)
            index_of_first_image = 1
        if opts.grid_save:
            images.save_image(grid, p.outpath_grids, "grid", p.all_seeds[0], p.all_prompts[0], opts.grid_format,
                              info=text, short_filename=True, p=p, grid=True)

    return Processed(p, output_images, seed=p.all_seeds[0], info=infotexts[0] if infotexts else "",
                     subseed=p.all_subseeds[0], index_of_first_image=index_of_first_image, infotexts=infotexts)
