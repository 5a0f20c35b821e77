"""Copy serve_configs/*.yaml to their packaged copies (rayapp/serve/configs/) and serve_configs/rm.yaml into
deploy/kuberay/rayservice.yaml's serveConfigV2, verbatim.

    python deploy/sync_serve_config.py          # after editing anything in serve_configs/
    python deploy/sync_serve_config.py --check  # exit 1 if a copy differs (tests check the same)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = REPO / "serve_configs"
SERVE_CONFIG = SERVE_CONFIGS / "rm.yaml"
PACKAGED = REPO / "rayapp" / "serve" / "configs"  # package data: `rayapp serve --config NAME` in an installed wheel
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


def wanted_files() -> dict[Path, str]:
    """Every copy's path and the text it should hold."""
    wanted = {PACKAGED / source.name: source.read_text() for source in sorted(SERVE_CONFIGS.glob("*.yaml"))}
    wanted[RAYSERVICE] = render(RAYSERVICE.read_text(), SERVE_CONFIG.read_text())
    return wanted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether every copy is in sync")
    args = parser.parse_args()
    stale = [path for path, text in wanted_files().items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of sync with {SERVE_CONFIGS}; run python deploy/sync_serve_config.py")
        return 1 if stale else 0
    for path, text in wanted_files().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
