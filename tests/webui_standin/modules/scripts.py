"""Stand-in for the WebUI's `modules.scripts`: the base class custom scripts derive from."""
from __future__ import annotations

AlwaysVisible = object()


class Script:
    """A selectable script: the WebUI lists `title()`, builds `ui()`, and calls `run(p, *ui values)`."""

    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False

    def title(self) -> str:
        """Name shown in the Script dropdown."""
        raise NotImplementedError

    def ui(self, is_img2img: bool):
        """Gradio components whose values are passed to run()."""
        return []

    def show(self, is_img2img: bool):
        """True to list the script in this tab, AlwaysVisible for always-on scripts."""
        return True

    def run(self, p, *args):
        """Generate with processing object p; returns a Processed."""
        raise NotImplementedError

    def describe(self) -> str:
        """Unused by the WebUI today; kept for signature parity."""
        return ""
