#!/usr/bin/env bash
# The one check command: lint, types, the layer contract, then every test.
# Integration tests start the real server on the real vLLM engine once per session.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bin=.venv/bin
echo "== ruff";        "$bin/ruff" check steer tests loadtests scripts
echo "== mypy";        "$bin/mypy"
echo "== import contract"; "$bin/lint-imports"
echo "== pytest"
# pytest exits 5 when it collected no test: that is a failure here too.
"$bin/pytest" "$@"
