"""Stand-in for ComfyUI `folder_paths.py`: the models, output and temp folders (set by the tests)."""
from __future__ import annotations

import os

models_dir = ""
output_directory = ""


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return os.path.join(output_directory, "temp")


def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
    """folder_paths.get_save_image_path: folder, file name, next counter, subfolder, prefix."""
    full_output_folder = os.path.join(output_dir, os.path.dirname(filename_prefix))
    filename = os.path.basename(filename_prefix)
    os.makedirs(full_output_folder, exist_ok=True)
    taken = [name for name in os.listdir(full_output_folder) if name.startswith(filename + "_")]
    counter = len(taken) + 1
    return full_output_folder, filename, counter, os.path.dirname(filename_prefix), filename_prefix
