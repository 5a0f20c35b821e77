"""Stand-in for the WebUI's `modules.scripts`: the Script base class and the runner that calls its hooks.

Modelled on AUTOMATIC1111 v1.10.1 `modules/scripts.py`: `Script` (the hooks below), `AlwaysVisible`,
`PostprocessImageArgs`, `PostprocessBatchListArgs`, and `ScriptRunner`, whose always-on hooks receive
`p.script_args[script.args_from:script.args_to]` and report an exception instead of raising it
(`errors.report(...)`), so a failing hook never stops the generation. `run` is the Script dropdown: it
returns None when no selectable script is chosen and process_images then runs.
"""
from __future__ import annotations

import traceback

AlwaysVisible = object()

# What ScriptRunner's try/except reported (errors.report prints to the console in the WebUI).
reported_errors: list[str] = []


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


class Script:
    """A script: the WebUI lists `title()`, builds `ui()`, and calls the hooks with the ui values."""

    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False

    def title(self) -> str:
        raise NotImplementedError

    def ui(self, is_img2img: bool):
        return []

    def show(self, is_img2img: bool):
        return True

    def run(self, p, *args):
        return None

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        pass

    def postprocess_image(self, p, pp, *args):
        pass

    def postprocess_image_after_composite(self, p, pp, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def describe(self) -> str:
        return ""


class ScriptRunner:
    """The txt2img or img2img tab's scripts: always-on ones run their hooks on every generation."""

    def __init__(self):
        self.scripts = []
        self.alwayson_scripts = []
        self.selectable_scripts = []
        self.inputs = [None]  # index 0: the Script dropdown's value

    def add(self, script: Script, is_img2img: bool = False) -> list:
        """Register a loaded script and build its ui; its ui values occupy inputs[args_from:args_to]."""
        script.is_img2img = is_img2img
        script.is_txt2img = not is_img2img
        visibility = script.show(is_img2img)
        script.alwayson = visibility is AlwaysVisible
        controls = list(script.ui(is_img2img) or [])
        script.args_from = len(self.inputs)
        script.args_to = script.args_from + len(controls)
        self.inputs.extend(controls)
        self.scripts.append(script)
        (self.alwayson_scripts if script.alwayson else self.selectable_scripts).append(script)
        return controls

    def _each(self, hook: str, p, *args, **kwargs) -> None:
        for script in self.alwayson_scripts:
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, hook)(p, *args, *script_args, **kwargs)
            except Exception:
                reported_errors.append(f"Error running {hook}: {script.filename}\n{traceback.format_exc()}")

    def run(self, p, *args):
        """The selected dropdown script's run(); None when the dropdown is on 'None'."""
        index = args[0] if args else 0
        if not index:
            return None
        script = self.selectable_scripts[index - 1]
        return script.run(p, *args[script.args_from:script.args_to])

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)

    def postprocess_batch_list(self, p, pp, **kwargs):
        self._each("postprocess_batch_list", p, pp, **kwargs)

    def postprocess_image(self, p, pp):
        self._each("postprocess_image", p, pp)

    def postprocess_image_after_composite(self, p, pp):
        self._each("postprocess_image_after_composite", p, pp)

    def postprocess(self, p, processed):
        self._each("postprocess", p, processed)
