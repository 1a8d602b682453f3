#!/usr/bin/env bash
# Set up the environment (venv + requirements.txt) and run the whole test suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh
. .venv/bin/activate
exec python -m pytest tests "$@"
