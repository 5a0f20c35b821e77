"""Stand-in for the WebUI's `modules.script_loading`: import a script file by path."""
from __future__ import annotations

import importlib.util
import os


def load_module(path: str):
    """Import the file as a fresh module named after it, as the WebUI does for scripts/*.py."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
