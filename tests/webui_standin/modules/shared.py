"""Stand-in for the WebUI's `modules.shared`: settings (`opts`), job state and command-line options.

Modelled on AUTOMATIC1111 v1.10.1 `modules/options.py` (Options: attribute access over `data`, `set`,
`get_default`) and `modules/shared_state.py` (State: interrupted / skipped flags, interrupt(), skip()).
"""
from __future__ import annotations

from types import SimpleNamespace

# The settings the generation and saving flow reads, with the WebUI's defaults (modules/shared_options.py).
DEFAULTS = {
    "samples_save": True,
    "samples_format": "png",
    "samples_filename_pattern": "",
    "save_images_add_number": True,
    "save_images_replace_action": "Replace",
    "save_to_dirs": False,
    "grid_save_to_dirs": True,
    "directories_filename_pattern": "[date]",
    "outdir_samples": "",
    "enable_pnginfo": True,
    "save_txt": False,
    "save_incomplete_images": False,
    "return_grid": True,
    "grid_save": True,
    "grid_format": "png",
    "grid_extended_filename": False,
    "grid_only_if_multiple": True,
    "overlay_inpaint": True,
    "return_mask": False,
    "return_mask_composite": False,
    "save_mask": False,
    "save_mask_composite": False,
    "img2img_batch_use_original_name": False,
    "img2img_batch_show_results_limit": 32,
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

    def set(self, key, value, is_api=False, run_callbacks=True) -> bool:
        """modules/options.py Options.set: store a value (what process_images does for override_settings)."""
        self.data[key] = value
        return True

    def get_default(self, key):
        """modules/options.py Options.get_default: the registered default of a setting."""
        info = self.data_labels.get(key)
        return DEFAULTS.get(key) if info is None else info.default

    def add_option(self, key: str, info: OptionInfo) -> None:
        """Register a setting (what on_ui_settings callbacks do)."""
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def reset(self) -> None:
        """Back to the defaults with no registered settings (tests call this between cases)."""
        self.data.clear()
        self.data.update(DEFAULTS)
        self.data_labels.clear()


class State:
    """modules/shared_state.py State: the job flags the generation loop reads."""

    def __init__(self):
        self.begin()

    def begin(self) -> None:
        """State.begin: a new job starts with the flags cleared."""
        self.interrupted = False
        self.skipped = False
        self.stopping_generation = False
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.job_timestamp = "20000101000000"

    def interrupt(self) -> None:
        """State.interrupt: the Interrupt button."""
        self.interrupted = True

    def skip(self) -> None:
        """State.skip: the Skip button (the current batch ends early, the next one runs)."""
        self.skipped = True

    def nextjob(self) -> None:
        self.job_no += 1


opts = Options(DEFAULTS)
state = State()
cmd_opts = SimpleNamespace(lowvram=False, medvram=False, no_half=False, no_prompt_history=True)
