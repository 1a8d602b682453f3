#!/usr/bin/env bash
# Create .venv and install requirements.txt (and requirements-nodeps.txt without dependencies) into it; a no-op when
# neither has changed since.
# Run it, then activate: scripts/setup_env.sh && . .venv/bin/activate
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want="$(cat "$root/requirements.txt" "$root/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment in $venv" >&2
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setup: installing requirements.txt (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/requirements.txt"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$root/requirements-nodeps.txt"
  echo "$want" > "$stamp"
fi
