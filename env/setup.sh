#!/usr/bin/env bash
# Builds the project's Python environment in .venv (or $LMFORGE_VENV): pinned stack, lmforge itself.
# torch is installed first and pinned, so no later requirement pulls in a CUDA build on CPU machines;
# on a GPU cluster set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>").
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LMFORGE_VENV:-.venv}"
stamp="$venv/.lmforge-requirements.sha256"
wanted="$(cat env/requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
  exit 0  # already built from these requirements
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# shellcheck disable=SC2086
"$venv/bin/pip" install -q ${TORCH_SPEC:-torch==2.13.0}
"$venv/bin/pip" install -q -r env/requirements.txt
"$venv/bin/pip" install -q --no-deps -e .
echo "$wanted" > "$stamp"
echo "environment ready: $venv"
