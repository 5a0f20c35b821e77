"""Stand-in for the WebUI's `modules.script_loading`: import a script file by path.

Modelled on AUTOMATIC1111 v1.10.1 `modules/script_loading.py` `load_module`: the module is named after
the file (extension included) and is not registered in sys.modules.
"""
from __future__ import annotations

import importlib.util
import os


def load_module(path: str):
    """Import the file as a fresh module, as the WebUI does for scripts/*.py (again on Reload UI)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
