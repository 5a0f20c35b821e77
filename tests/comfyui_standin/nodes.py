"""Stand-in for ComfyUI `nodes.py`: the core SaveImage / PreviewImage nodes and custom-node loading.

Modelled on ComfyUI (2026-01) `nodes.py`: `SaveImage.save_images` asks folder_paths for a path sized by
`images[0]` (so an empty batch raises IndexError) and writes each image as clip(255 * x) truncated to
uint8; `PreviewImage` is a SaveImage into the temp folder; `load_custom_node` imports a custom-node
folder by path under its folder name (registered in sys.modules), then copies its
NODE_CLASS_MAPPINGS into the global one (a key already there from another pack is silently replaced;
only the built-in keys in `ignore` are protected) and its NODE_DISPLAY_NAME_MAPPINGS.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import folder_paths
import numpy as np
from PIL import Image


class SaveImage:
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    CATEGORY = "image"

    def __init__(self):
        self.output_dir = folder_paths.get_output_directory()
        self.prefix_append = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        filename_prefix += self.prefix_append
        full_output_folder, filename, counter, subfolder, filename_prefix = folder_paths.get_save_image_path(
            filename_prefix, self.output_dir, images[0].shape[1], images[0].shape[0])
        results = []
        for image in images:
            pixels = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
            file = f"{filename}_{counter:05}_.png"
            Image.fromarray(pixels).save(os.path.join(full_output_folder, file), compress_level=4)
            results.append({"filename": file, "subfolder": subfolder, "type": "output"})
            counter += 1
        return {"ui": {"images": results}}


class PreviewImage(SaveImage):
    def __init__(self):
        self.output_dir = folder_paths.get_temp_directory()
        self.prefix_append = "_temp_preview"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}


NODE_CLASS_MAPPINGS = {"SaveImage": SaveImage, "PreviewImage": PreviewImage}
NODE_DISPLAY_NAME_MAPPINGS = {"SaveImage": "Save Image", "PreviewImage": "Preview Image"}
BUILT_IN_NODES = frozenset(NODE_CLASS_MAPPINGS)


def load_custom_node(module_path: str, ignore=BUILT_IN_NODES, module_parent="custom_nodes") -> bool:
    """nodes.load_custom_node: import a custom-node folder as ComfyUI does and register its nodes."""
    module_name = os.path.basename(module_path)
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(module_path, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if mappings is None:
        return False
    for name, node_cls in mappings.items():
        if name not in ignore:
            NODE_CLASS_MAPPINGS[name] = node_cls
            node_cls.RELATIVE_PYTHON_MODULE = f"{module_parent}.{module_name}"
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {})
    return True
