"""Stand-in for the WebUI's `modules.script_callbacks`: the settings and image-saving hooks.

Modelled on AUTOMATIC1111 v1.10.1 `modules/script_callbacks.py` (ImageSaveParams, on_ui_settings,
on_before_image_saved, on_image_saved).
"""
from __future__ import annotations

_ui_settings = []
_before_image_saved = []
_image_saved = []


class ImageSaveParams:
    """What image-saving callbacks receive; before_image_saved callbacks may change pnginfo and filename."""

    def __init__(self, image, p, filename, pnginfo):
        self.image = image
        self.p = p
        self.filename = filename
        self.pnginfo = pnginfo


def on_ui_settings(callback, *, name=None):
    """Register a function that adds settings (run when the Settings tab is built)."""
    _ui_settings.append(callback)


def ui_settings_callback():
    """Run every registered settings function."""
    for callback in _ui_settings:
        callback()


def on_before_image_saved(callback, *, name=None):
    """Register a function called by images.save_image before the file is written."""
    _before_image_saved.append(callback)


def before_image_saved_callback(params: ImageSaveParams):
    for callback in _before_image_saved:
        callback(params)


def on_image_saved(callback, *, name=None):
    """Register a function called after images.save_image wrote a file."""
    _image_saved.append(callback)


def image_saved_callback(params: ImageSaveParams):
    for callback in _image_saved:
        callback(params)


def clear_callbacks():
    """What the WebUI does before re-importing scripts on Reload UI."""
    _ui_settings.clear()
    _before_image_saved.clear()
    _image_saved.clear()
