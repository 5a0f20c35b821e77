"""Stand-in for the WebUI's `modules.img2img`: the Batch tab's loop over an input folder.

Modelled on AUTOMATIC1111 v1.10.1 `modules/img2img.py` `process_batch`: one process_images per input
file with the same p; `save_to_dirs` and, with "use original name", `samples_filename_pattern` set as
override settings (so they hold only during that generation); results appended image by image and
infotext by infotext.
"""
from __future__ import annotations

import os
from pathlib import Path

from modules import images, processing
from modules.shared import opts, state


def process_batch(p, input_dir: str, output_dir: str, args) -> processing.Processed | None:
    """Generate from every image of input_dir into output_dir; the collected results."""
    batch_images = sorted(os.path.join(input_dir, name) for name in os.listdir(input_dir))
    batch_results = None
    for image_file in batch_images:
        if state.skipped:
            state.skipped = False
        if state.interrupted or state.stopping_generation:
            break
        img = images.read(image_file)
        p.init_images = [img] * p.batch_size
        image_path = Path(image_file)
        if output_dir:
            p.outpath_samples = output_dir
            p.override_settings["save_to_dirs"] = False
        if opts.img2img_batch_use_original_name:
            pattern = f"{image_path.stem}-[generation_number]" if p.n_iter > 1 or p.batch_size > 1 \
                else f"{image_path.stem}"
            p.override_settings["samples_filename_pattern"] = pattern
        result = p.scripts.run(p, *args) if p.scripts is not None else None
        if result is None:
            result = processing.process_images(p)
        if result:
            if batch_results:
                batch_results.images.extend(result.images)
                batch_results.infotexts.extend(result.infotexts)
            else:
                batch_results = result
    return batch_results
