#!/usr/bin/env bash
# Sets up .venv with everything rayapp and its tests need (idempotent; ~3 minutes on a fresh machine).
#
#   bash scripts/setup.sh
#
# torch is installed first from constraints.txt's pin so that pip keeps it: on machines with a local
# CPU wheel (like CI) that is the CPU build; elsewhere pip brings PyPI's default (CUDA on Linux).
# Installing your own torch build into .venv before running this is respected.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check "$(grep '^torch==' constraints.txt)"
$PIP install -q --disable-pip-version-check -c constraints.txt -e ".[test]"

# The multi-host tests build network namespaces with `ip` and talk to them with curl; install when we may.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=""
  command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
  command -v curl >/dev/null 2>&1 || missing="$missing curl"
  if [ -n "$missing" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || echo "setup: could not install$missing; the multi-host tests will be skipped" >&2
  fi
fi

# The web-page test drives Debian's Chromium headless; install it when we may (CI runs as root).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the browser test will be skipped" >&2
  else
    echo "setup: chromium not found; install it (e.g. apt-get install chromium) to run the browser test" >&2
  fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
