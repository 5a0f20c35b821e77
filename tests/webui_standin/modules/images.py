"""Stand-in for the WebUI's `modules.images`: save_image (with PNG info) and image_grid."""
from __future__ import annotations

import math
import os
import re

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from modules import script_callbacks
from modules.shared import opts


def _next_number(path: str, basename: str) -> int:
    """1 + the highest leading sequence number among the folder's files with this basename."""
    highest = -1
    prefix = f"{basename}-" if basename else ""
    for name in os.listdir(path):
        if not name.startswith(prefix):
            continue
        match = re.match(r"(\d+)", name[len(prefix):])
        if match:
            highest = max(highest, int(match.group(1)))
    return highest + 1


def save_image(image, path, basename, seed=None, prompt=None, extension="png", info=None, short_filename=False,
               no_prompt=False, grid=False, pnginfo_section_name="parameters", p=None, existing_info=None,
               forced_filename=None, suffix="", save_to_dirs=None):
    """Write the image as the WebUI does: numbered name, PNG text chunks, `already_saved_as`; (path, txt path)."""
    os.makedirs(path, exist_ok=True)
    if forced_filename is not None:
        stem = forced_filename
    else:
        number = _next_number(path, basename)
        stem = f"{number:05}" if basename == "" else f"{basename}-{number:04}"
        if seed is not None and not short_filename:
            stem += f"-{seed}"
        stem += suffix
    fullfn = os.path.join(path, f"{stem}.{extension}")

    pnginfo = dict(existing_info or {})
    if info is not None:
        pnginfo[pnginfo_section_name] = info
    params = script_callbacks.ImageSaveParams(image, p, fullfn, pnginfo)

    if extension.lower() == "png":
        chunks = None
        if opts.enable_pnginfo:
            chunks = PngInfo()
            for key, value in params.pnginfo.items():
                chunks.add_text(key, str(value))
        image.save(fullfn, format="PNG", pnginfo=chunks)
    else:
        # The real WebUI puts the info in EXIF here; the stand-in only writes the pixels.
        image.convert("RGB").save(fullfn)
    image.already_saved_as = fullfn

    txt_fullfn = None
    if opts.save_txt and info is not None:
        txt_fullfn = os.path.join(path, f"{stem}.txt")
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
        grid.paste(img, ((i % cols) * width, (i // cols) * height))
    return grid
