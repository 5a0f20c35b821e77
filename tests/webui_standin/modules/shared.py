"""Stand-in for the WebUI's `modules.shared`: settings (`opts`), job state and command-line options."""
from __future__ import annotations

from types import SimpleNamespace

# The settings the generation and saving flow reads, with the WebUI's defaults.
DEFAULTS = {
    "samples_save": True,
    "samples_format": "png",
    "outdir_samples": "",
    "enable_pnginfo": True,
    "save_txt": False,
    "save_incomplete_images": False,
    "return_grid": True,
    "grid_save": True,
    "grid_format": "png",
    "grid_only_if_multiple": True,
}


class OptionInfo:
    """One registered setting: its default, label and Settings section."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.refresh = refresh


class Options:
    """Settings read as attributes: stored values first, then registered defaults."""

    def __init__(self, defaults: dict):
        object.__setattr__(self, "data", dict(defaults))
        object.__setattr__(self, "data_labels", {})

    def __getattr__(self, key):
        data = object.__getattribute__(self, "data")
        if key in data:
            return data[key]
        labels = object.__getattribute__(self, "data_labels")
        if key in labels:
            return labels[key].default
        raise AttributeError(key)

    def __setattr__(self, key, value):
        self.data[key] = value

    def __delattr__(self, key):
        self.data.pop(key, None)

    def add_option(self, key: str, info: OptionInfo) -> None:
        """Register a setting (what on_ui_settings callbacks do)."""
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def reset(self) -> None:
        """Back to the defaults with no registered settings (tests call this between cases)."""
        self.data.clear()
        self.data.update(DEFAULTS)
        self.data_labels.clear()


opts = Options(DEFAULTS)
state = SimpleNamespace(interrupted=False, skipped=False, job="", job_count=0, job_timestamp="20000101000000")
cmd_opts = SimpleNamespace(lowvram=False, medvram=False, no_half=False)
