"""The reference `hpsv2` 1.2.0 in its own virtualenv, for the HPS parity tests (tests/test_scorers_pickscore_hps.py).

    .venv/bin/python tools/hpsv2_reference.py      # scripts/setup.sh runs it; idempotent

hpsv2's own pins (protobuf<4, pytest 7.2) clash with ours, so it goes in with --no-deps beside the few modules it
imports that we lack; a .pth puts this interpreter's site-packages (torch, transformers, ...) after its own. PyPI's
hpsv2 1.2.0 wheel lacks the CLIP BPE file its bundled open_clip opens at import; it is copied from open-clip-torch's
wheel (the same file). The install happens here, at set-up time, so the tests need no network.
"""
from __future__ import annotations

import json
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

PACKAGES = ["hpsv2==1.2.0", "torchvision==0.28.0", "open-clip-torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.5",
            "clint==0.5.1", "args==0.1.0"]
VENV = Path(__file__).resolve().parents[1] / ".venv" / "hpsv2-reference"  # inside .venv: ignored, made by setup
STAMP = VENV / "ready.json"


def ready() -> bool:
    """True when the reference venv holds exactly PACKAGES."""
    return (VENV / "bin" / "python").exists() and STAMP.is_file() and json.loads(STAMP.read_text()) == PACKAGES


def build() -> None:
    """Make the reference venv (a no-op when it is ready)."""
    if ready():
        return
    python = VENV / "bin" / "python"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", "--without-pip", str(VENV)], check=True, timeout=120)
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    ours = site.getsitepackages()[0] if hasattr(site, "getsitepackages") else sysconfig.get_paths()["purelib"]
    (target / "zz_rayapp_base.pth").write_text(ours + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--disable-pip-version-check", *PACKAGES], check=True, timeout=600)
    bpe = "bpe_simple_vocab_16e6.txt.gz"
    (target / "hpsv2" / "src" / "open_clip" / bpe).write_bytes((target / "open_clip" / bpe).read_bytes())
    STAMP.write_text(json.dumps(PACKAGES))


if __name__ == "__main__":
    build()
    print(f"reference hpsv2 venv ready: {VENV}")
