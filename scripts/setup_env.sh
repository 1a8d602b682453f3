#!/usr/bin/env bash
# Create .venv and install requirements.txt into it; a no-op when requirements.txt has not changed since.
# Source it (". scripts/setup_env.sh") so that the venv's python is first on PATH afterwards.
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${VENV_DIR:-$_root/.venv}"
_stamp="$_venv/.requirements.sha256"
_want="$(sha256sum "$_root/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$_venv/bin/python" ]; then
  echo "setup: creating virtual environment in $_venv" >&2
  python3 -m venv "$_venv"
fi
if [ "$(cat "$_stamp" 2>/dev/null || true)" != "$_want" ]; then
  echo "setup: installing requirements.txt (first run takes a few minutes)" >&2
  "$_venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$_root/requirements.txt"
  echo "$_want" > "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
# Nothing here may reach the Hugging Face hub; fail fast instead of hanging on a download.
export HF_HUB_DISABLE_TELEMETRY=1
unset _root _venv _stamp _want
