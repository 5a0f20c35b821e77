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
# The reference hpsv2 package in a venv of its own, for the HPS parity tests (installed here: tests use no network).
.venv/bin/python tools/hpsv2_reference.py \
  || echo "setup: could not install the reference hpsv2 package; its parity tests will be skipped" >&2

# System tools some tests drive, installed in one apt run when we may (CI runs as root): `ip` and curl for
# the multi-host tests' network namespaces, Debian's Chromium for the web-page test.
missing=""
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || echo "setup: could not install$missing; the tests that need them will be skipped" >&2
  else
    echo "setup: not found:$missing (install them, e.g. apt-get install$missing, to run the multi-host and" \
         "browser tests)" >&2
  fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch, ray; print("torch", torch.__version__, "ray", ray.__version__)'))"
