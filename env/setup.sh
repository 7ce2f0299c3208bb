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
# The interpreter: $PYTHON (e.g. PYTHON=python3.11 bash env/setup.sh), else the first python3.X found that is
# 3.11 or newer: Snakemake 9 needs 3.11.
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      python="$candidate"
      break
    fi
  done
fi
if [[ -z "$python" ]] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "env/setup.sh: needs Python 3.11 or newer (Snakemake 9); found ${python:-none}. Set PYTHON=<interpreter>," \
    "e.g. after \`module load python/3.11\`." >&2
  exit 1
fi
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
# shellcheck disable=SC2086
"$venv/bin/pip" install -q ${TORCH_SPEC:-torch==2.13.0}
"$venv/bin/pip" install -q -r env/requirements.txt
"$venv/bin/pip" install -q --no-deps -e .
# DeepSpeed's CPU op, compiled once into the environment (lmforge.ops), so that no job compiles it.
"$venv/bin/python" -m lmforge.ops ||
  echo "env/setup.sh: warning: DeepSpeed's CPU op did not build (no compiler?); the first CPU training job builds it" >&2
echo "$wanted" > "$stamp"
echo "environment ready: $venv"
