"""Stand-in for the WebUI's `modules.images`: save_image with its file names and PNG info, and image_grid.

Modelled on AUTOMATIC1111 v1.10.1 `modules/images.py`: `FilenameGenerator` (the tokens below, and
`apply` dropping the text before a token that yields NOTHING_AND_SKIP_PREVIOUS_TEXT),
`get_next_sequence_number`, `save_image` (file decoration from `samples_filename_pattern`, the number
prefix, `before_image_saved` callbacks, `save_images_replace_action`, `.txt` sidecar) and
`save_image_with_geninfo` (every pnginfo item as a PNG text chunk when `enable_pnginfo`).
"""
from __future__ import annotations

import math
import os
import re

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from modules import script_callbacks
from modules.shared import opts

NOTHING_AND_SKIP_PREVIOUS_TEXT = object()
_PATTERN = re.compile(r"(.*?)(?:\[([^\[\]]+)\]|$)")


def _sanitize(text: str, replace_spaces: bool = True) -> str:
    """images.sanitize_filename_part: no characters a file system refuses, at most 128 characters."""
    if replace_spaces:
        text = text.replace(" ", "_")
    return re.sub(r'[\\/:*?"<>|\n\r\t]', "", text)[:128].strip()


class FilenameGenerator:
    """images.FilenameGenerator: [token]s of a file-name pattern filled from p, seed and prompt."""

    replacements = {
        "seed": lambda self: self.seed if self.seed is not None else "",
        "prompt_spaces": lambda self: _sanitize(self.prompt or "", replace_spaces=False),
        "prompt": lambda self: _sanitize(self.prompt or ""),
        "steps": lambda self: self.p and self.p.steps,
        "batch_number": lambda self: (NOTHING_AND_SKIP_PREVIOUS_TEXT if self.p.batch_size == 1
                                      else self.p.batch_index + 1),
        "batch_size": lambda self: self.p.batch_size,
        "generation_number": lambda self: (NOTHING_AND_SKIP_PREVIOUS_TEXT
                                           if self.p.n_iter == 1 and self.p.batch_size == 1
                                           else self.p.iteration * self.p.batch_size + self.p.batch_index + 1),
        "date": lambda self: "2000-01-01",
    }

    def __init__(self, p, seed, prompt, image, basename=""):
        self.p = p
        self.seed = seed
        self.prompt = prompt
        self.image = image
        self.basename = basename

    def apply(self, pattern: str) -> str:
        result = ""
        for match in _PATTERN.finditer(pattern):
            text, token = match.groups()
            if token is None:
                result += text
                continue
            fun = self.replacements.get(token.lower())
            if fun is not None:
                replacement = fun(self)
                if replacement is NOTHING_AND_SKIP_PREVIOUS_TEXT:
                    continue
                if replacement is not None:
                    result += text + str(replacement)
                    continue
            result += f"{text}[{token}]"
        return result


def get_next_sequence_number(path: str, basename: str) -> int:
    """images.get_next_sequence_number: 1 + the highest leading number among files starting with basename."""
    result = -1
    prefix = f"{basename}-" if basename != "" else ""
    for name in os.listdir(path):
        if name.startswith(prefix):
            first = os.path.splitext(name[len(prefix):])[0].split("-")[0]
            try:
                result = max(int(first), result)
            except ValueError:
                pass
    return result + 1


def save_image_with_geninfo(image, geninfo, filename, extension, existing_pnginfo=None,
                            pnginfo_section_name="parameters"):
    """images.save_image_with_geninfo: PNG text chunks from pnginfo; other formats (EXIF here omitted)."""
    if extension.lower() == ".png":
        chunks = None
        if opts.enable_pnginfo:
            existing_pnginfo = existing_pnginfo or {}
            existing_pnginfo[pnginfo_section_name] = geninfo
            chunks = PngInfo()
            for key, value in existing_pnginfo.items():
                chunks.add_text(key, str(value))
        image.save(filename, format="PNG", pnginfo=chunks)
    else:
        image.convert("RGB").save(filename, format=Image.registered_extensions()[extension])


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name="parameters", p=None, existing_info=None,
               forced_filename=None, suffix="", save_to_dirs=None):
    """images.save_image: the WebUI's file name, the before/after callbacks, PNG info; (path, txt path)."""
    namegen = FilenameGenerator(p, seed, prompt, image, basename=basename)
    if save_to_dirs is None:
        save_to_dirs = (grid and opts.grid_save_to_dirs) or (not grid and opts.save_to_dirs and not no_prompt)
    if save_to_dirs:
        path = os.path.join(path, namegen.apply(opts.directories_filename_pattern or "[prompt_words]").strip())
    os.makedirs(path, exist_ok=True)

    if forced_filename is None:
        if short_filename or seed is None:
            decoration = ""
        elif opts.save_to_dirs:
            decoration = opts.samples_filename_pattern or "[seed]"
        else:
            decoration = opts.samples_filename_pattern or "[seed]-[prompt_spaces]"
        decoration = namegen.apply(decoration) + suffix
        add_number = opts.save_images_add_number or decoration == ""
        if decoration != "" and add_number:
            decoration = f"-{decoration}"
        if add_number:
            count = get_next_sequence_number(path, basename)
            for i in range(500):
                stem = f"{count + i:05}" if basename == "" else f"{basename}-{count + i:04}"
                fullfn = os.path.join(path, f"{stem}{decoration}.{extension}")
                if not os.path.exists(fullfn):
                    break
        else:
            fullfn = os.path.join(path, f"{decoration}.{extension}")
    else:
        fullfn = os.path.join(path, f"{forced_filename}.{extension}")

    pnginfo = existing_info or {}
    if info is not None:
        pnginfo[pnginfo_section_name] = info
    params = script_callbacks.ImageSaveParams(image, p, fullfn, pnginfo)
    script_callbacks.before_image_saved_callback(params)
    image = params.image
    fullfn = params.filename
    info = params.pnginfo.get(pnginfo_section_name, None)

    stem, ext = os.path.splitext(fullfn)
    temp = f"{stem}.tmp"
    save_image_with_geninfo(image, info, temp, ext, existing_pnginfo=params.pnginfo,
                            pnginfo_section_name=pnginfo_section_name)
    target = stem + ext
    if opts.save_images_replace_action != "Replace":
        n = 0
        while os.path.exists(target):
            n += 1
            target = f"{stem}-{n}{ext}"
    os.replace(temp, target)
    image.already_saved_as = fullfn

    txt_fullfn = None
    if opts.save_txt and info is not None:
        txt_fullfn = f"{stem}.txt"
        with open(txt_fullfn, "w", encoding="utf8") as fh:
            fh.write(f"{info}\n")
    script_callbacks.image_saved_callback(params)
    return fullfn, txt_fullfn


def image_grid(imgs, batch_size=1, rows=None):
    """Tile the images, batch_size per row when rows is not given."""
    if rows is None:
        rows = max(1, math.ceil(len(imgs) / max(1, batch_size)))
    cols = math.ceil(len(imgs) / rows)
    width, height = imgs[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for i, img in enumerate(imgs):
        grid.paste(img.convert("RGB"), ((i % cols) * width, (i // cols) * height))
    return grid


def read(path):
    """images.read: open an image file."""
    with Image.open(path) as img:
        img.load()
        return img.copy()
