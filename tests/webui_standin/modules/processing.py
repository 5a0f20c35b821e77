"""Stand-in for the WebUI's `modules.processing`: the processing object, Processed and process_images.

Modelled on AUTOMATIC1111 v1.10.1 `modules/processing.py`; each piece names the function it follows.
The drawing is the stand-in's own: coloured shapes from each image's seed instead of a diffusion model
(`StableDiffusionProcessing.sample`), so the same seed gives the same pixels.
"""
from __future__ import annotations

import json
import random

from PIL import Image, ImageDraw

from modules import images, scripts
from modules.shared import opts, state

_COLOURS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]


class StableDiffusionProcessing:
    """The settings of one generation, with the fields the WebUI fills while generating."""

    def __init__(self, prompt="", negative_prompt="", seed=-1, subseed=-1, subseed_strength=0.0, styles=None,
                 batch_size=1, n_iter=1, steps=20, sampler_name="Euler a", cfg_scale=7.0, width=64, height=64,
                 outpath_samples=None, outpath_grids=None, do_not_save_samples=False, do_not_save_grid=False,
                 extra_generation_params=None, override_settings=None, override_settings_restore_afterwards=True):
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
        self.override_settings = dict(override_settings or {})
        self.override_settings_restore_afterwards = override_settings_restore_afterwards
        self.comments = {}
        self.scripts = None
        self.script_args = []
        self.all_prompts = self.all_negative_prompts = self.all_seeds = self.all_subseeds = None
        self.prompts = self.negative_prompts = self.seeds = self.subseeds = None
        self.main_prompt = self.main_negative_prompt = None
        self.iteration = 0
        self.batch_index = 0
        self.restore_faces = False
        self.mask_for_overlay = None

    def comment(self, text: str) -> None:
        """A note shown under the generation info."""
        self.comments[text] = 1

    def setup_prompts(self) -> None:
        """StableDiffusionProcessing.setup_prompts: one prompt and negative prompt per image."""
        if isinstance(self.prompt, list):
            self.all_prompts = list(self.prompt)
        else:
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        negative = self.negative_prompt
        self.all_negative_prompts = list(negative) if isinstance(negative, list) else [negative] * len(self.all_prompts)
        self.main_prompt = self.all_prompts[0]
        self.main_negative_prompt = self.all_negative_prompts[0]

    def save_samples(self) -> bool:
        """StableDiffusionProcessing.save_samples: written during generation unless interrupted or skipped."""
        return opts.samples_save and not self.do_not_save_samples and (
            opts.save_incomplete_images or not state.interrupted and not state.skipped)

    def sample(self, seeds, prompts) -> list:
        """The stand-in sampler: one picture per seed, decided by the seed alone."""
        pictures = []
        for seed in seeds:
            rng = random.Random(seed)
            img = Image.new("RGB", (self.width, self.height), rng.choice(_COLOURS))
            pen = ImageDraw.Draw(img)
            for _ in range(rng.randint(1, 3)):
                x, y = rng.randrange(self.width), rng.randrange(self.height)
                r = rng.randint(4, max(5, self.width // 3))
                pen.ellipse((x - r, y - r, x + r, y + r), fill=rng.choice(_COLOURS))
            pictures.append(img)
        return pictures

    def init(self) -> None:
        """Per-generation preparation (the img2img stand-in makes its inpainting mask here)."""


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """txt2img settings."""


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """img2img settings; with image_mask it is an inpainting run (the init images only set the size here)."""

    def __init__(self, init_images=None, denoising_strength=0.75, mask=None, **kwargs):
        super().__init__(**kwargs)
        self.init_images = init_images or []
        self.denoising_strength = denoising_strength
        self.image_mask = mask

    def init(self) -> None:
        """StableDiffusionProcessingImg2Img.init: an inpainting mask becomes p.mask_for_overlay."""
        if self.image_mask is not None:
            self.mask_for_overlay = self.image_mask.convert("L").resize((self.width, self.height))
        self.extra_generation_params["Denoising strength"] = self.denoising_strength


class Processed:
    """processing.Processed: the result of a generation (images, infotexts, per-image prompts and seeds)."""

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
        # v1.10.1: an empty or missing infotexts list becomes one `info` per image (none for no image).
        self.infotexts = infotexts or [info] * len(images_list)

    def js(self) -> str:
        """Processed.js: the generation info the page keeps (reuse-seed reads all_seeds[index - first])."""
        return json.dumps({
            "prompt": self.all_prompts[0], "all_prompts": self.all_prompts, "seed": self.seed,
            "all_seeds": self.all_seeds, "infotexts": self.infotexts,
            "index_of_first_image": self.index_of_first_image,
            "extra_generation_params": self.extra_generation_params,
        }, default=lambda o: None)

    def infotext(self, p, index):
        """Processed.infotext: the infotext of image `index` of the whole job."""
        return create_infotext(p, self.all_prompts, self.all_seeds, self.all_subseeds,
                               position_in_batch=index % self.batch_size, iteration=index // self.batch_size)


def create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    """processing.create_infotext: 'prompt\\nNegative prompt: ..\\nSteps: .., Seed: .., [extras]'.

    As in the WebUI, an extra_generation_params value that is a list is indexed by `index`, and a callable
    is called with this function's locals() (p, index, use_main_prompt, ...); None leaves the key out.
    """
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    if all_negative_prompts is None:
        all_negative_prompts = p.all_negative_prompts
    prompt_text = p.main_prompt if use_main_prompt else all_prompts[index]
    negative_prompt = p.main_negative_prompt if use_main_prompt else all_negative_prompts[index]
    generation_params = {
        "Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale,
        "Seed": p.all_seeds[0] if use_main_prompt else all_seeds[index], "Size": f"{p.width}x{p.height}",
        **p.extra_generation_params,
    }
    for key, value in generation_params.items():
        if isinstance(value, list):
            generation_params[key] = value[index]
        elif callable(value):
            generation_params[key] = value(**locals())
    params_line = ", ".join(f"{key}: {value}" for key, value in generation_params.items() if value is not None)
    negative_line = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt_text}{negative_line}\n{params_line}".strip()


def process_images(p) -> Processed:
    """processing.process_images: override_settings applied to opts, then restored afterwards."""
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored_opts = {k: opts.data[k] if k in opts.data else opts.get_default(k)
                   for k in p.override_settings if k in opts.data}
    try:
        for key, value in p.override_settings.items():
            opts.set(key, value, is_api=True, run_callbacks=False)
        result = process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for key, value in stored_opts.items():
                setattr(opts, key, value)
    return result


def process_images_inner(p) -> Processed:
    """processing.process_images_inner: the batch loop, its script hooks, saving, masks and the grid."""
    seed = p.seed if p.seed not in (-1, None, "") else random.randrange(4294967294)
    subseed = p.subseed if p.subseed not in (-1, None, "") else random.randrange(4294967294)
    p.setup_prompts()
    p.all_seeds = [int(seed) + (i if p.subseed_strength == 0 else 0) for i in range(len(p.all_prompts))]
    p.all_subseeds = [int(subseed) + i for i in range(len(p.all_prompts))]
    if p.scripts is not None:
        p.scripts.process(p)

    infotexts, output_images = [], []
    p.init()
    for n in range(p.n_iter):
        p.iteration = n
        if state.skipped:  # Skip ends one batch; the next one starts afresh
            state.skipped = False
        if state.interrupted or state.stopping_generation:
            break
        p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.negative_prompts = p.all_negative_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
        p.subseeds = p.all_subseeds[n * p.batch_size:(n + 1) * p.batch_size]
        if p.scripts is not None:
            p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
        if len(p.prompts) == 0:
            break
        if p.scripts is not None:
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)

        samples = p.sample(p.seeds, p.prompts)  # an Interrupt / Skip during sampling ends it early
        state.nextjob()
        if p.scripts is not None:
            batch_params = scripts.PostprocessBatchListArgs(list(samples))
            p.scripts.postprocess_batch_list(p, batch_params, batch_number=n)
            samples = batch_params.images

        def infotext(index=0, use_main_prompt=False):
            return create_infotext(p, p.prompts, p.seeds, p.subseeds, use_main_prompt=use_main_prompt, index=index,
                                   all_negative_prompts=p.negative_prompts)

        save_samples = p.save_samples()  # decided once per batch, after sampling
        for i, sample in enumerate(samples):
            p.batch_index = i
            image = sample
            if p.scripts is not None:
                pp = scripts.PostprocessImageArgs(image)
                p.scripts.postprocess_image(p, pp)
                image = pp.image
            mask_for_overlay = getattr(p, "mask_for_overlay", None)
            if mask_for_overlay is not None:  # inpainting: the result composited over the original
                original_denoised_image = image.copy()
                image = Image.composite(image, Image.new("RGB", image.size, "gray"), mask_for_overlay)
            if p.scripts is not None:
                pp = scripts.PostprocessImageArgs(image)
                p.scripts.postprocess_image_after_composite(p, pp)
                image = pp.image
            if save_samples:
                images.save_image(image, p.outpath_samples, "", p.seeds[i], p.prompts[i], opts.samples_format,
                                  info=infotext(i), p=p)
            text = infotext(i)
            infotexts.append(text)
            if opts.enable_pnginfo:
                image.info["parameters"] = text
            output_images.append(image)

            # Masks and composites join the images without an infotext of their own.
            if mask_for_overlay is not None:
                if opts.return_mask or opts.save_mask:
                    image_mask = mask_for_overlay.convert("RGB")
                    if save_samples and opts.save_mask:
                        images.save_image(image_mask, p.outpath_samples, "", p.seeds[i], p.prompts[i],
                                          opts.samples_format, info=infotext(i), p=p, suffix="-mask")
                    if opts.return_mask:
                        output_images.append(image_mask)
                if opts.return_mask_composite or opts.save_mask_composite:
                    composite = Image.composite(original_denoised_image.convert("RGBA"),
                                                Image.new("RGBA", image.size), mask_for_overlay).convert("RGBA")
                    if save_samples and opts.save_mask_composite:
                        images.save_image(composite, p.outpath_samples, "", p.seeds[i], p.prompts[i],
                                          opts.samples_format, info=infotext(i), p=p, suffix="-mask-composite")
                    if opts.return_mask_composite:
                        output_images.append(composite)

    if not infotexts:
        infotexts.append(Processed(p, []).infotext(p, 0))

    index_of_first_image = 0
    unwanted_grid = len(output_images) < 2 and opts.grid_only_if_multiple
    if (opts.return_grid or opts.grid_save) and not p.do_not_save_grid and not unwanted_grid:
        grid = images.image_grid(output_images, p.batch_size)
        text = create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, use_main_prompt=True)
        if opts.return_grid:
            infotexts.insert(0, text)
            if opts.enable_pnginfo:
                grid.info["parameters"] = text
            output_images.insert(0, grid)
            index_of_first_image = 1
        if opts.grid_save:
            images.save_image(grid, p.outpath_grids, "grid", p.all_seeds[0], p.all_prompts[0], opts.grid_format,
                              info=text, short_filename=not opts.grid_extended_filename, p=p, grid=True)

    result = Processed(p, output_images, seed=p.all_seeds[0], info=infotexts[0], subseed=p.all_subseeds[0],
                       index_of_first_image=index_of_first_image, infotexts=infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, result)
    return result
