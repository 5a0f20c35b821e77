"""Copy serve_configs/rm.yaml into deploy/kuberay/rayservice.yaml's serveConfigV2, verbatim.

    python deploy/sync_serve_config.py          # after editing serve_configs/rm.yaml
    python deploy/sync_serve_config.py --check  # exit 1 if they differ (tests/test_deploy.py checks the same)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO / "serve_configs" / "rm.yaml"
RAYSERVICE = REPO / "deploy" / "kuberay" / "rayservice.yaml"
KEY = "  serveConfigV2: |"
INDENT = " " * 4


def render(manifest: str, serve_config: str) -> str:
    """The manifest with its serveConfigV2 block replaced by `serve_config`, indented as a YAML block scalar."""
    lines = manifest.splitlines()
    try:
        start = lines.index(KEY) + 1
    except ValueError:
        raise SystemExit(f"{RAYSERVICE}: no line {KEY!r}") from None
    end = start
    # The block runs until the next line indented less than the block (the next key of `spec`).
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(INDENT)):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    block = [INDENT + line if line.strip() else "" for line in serve_config.rstrip("\n").splitlines()]
    return "\n".join(lines[:start] + block + lines[end:]) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the manifest is in sync")
    args = parser.parse_args()
    current = RAYSERVICE.read_text()
    wanted = render(current, SERVE_CONFIG.read_text())
    if args.check:
        if current != wanted:
            print(f"{RAYSERVICE} is out of sync with {SERVE_CONFIG}; run python deploy/sync_serve_config.py")
            return 1
        return 0
    RAYSERVICE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
