# Sourced by scripts/fedtune and scripts/test: make sure .venv exists and holds exactly
# the locked dependency set (requirements.lock, refreshed only by scripts/lock) plus
# the project, re-creating it when the lock, pyproject.toml or this file changed.
# Sets VENV.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDTUNE_VENV:-$root/.venv}"
PYTHON="${PYTHON:-python3}"
want="$(cat "$root/requirements.lock" "$root/pyproject.toml" "$root/scripts/bootstrap.sh" \
  | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.fedtune-installed" 2>/dev/null)" != "$want" ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "fedtune: the locked set is for Python 3.11 (requirements.lock); set" \
      "PYTHON=/path/to/python3.11, or install into your own environment with" \
      "\`pip install torch==2.13.0 && pip install -e .\` (pyproject.toml's ranges)" >&2
    exit 1
  fi
  echo "fedtune: setting up $VENV from requirements.lock (first run only, a minute or two)..." >&2
  clear=()
  # Start from an empty environment when it is ours, so no package of an older lock stays.
  [ -f "$VENV/.fedtune-installed" ] && clear=(--clear)
  "$PYTHON" -m venv "${clear[@]}" "$VENV"
  # Every package at the locked version and hash; CPU PyTorch is in the lock as
  # torch==2.13.0+cpu, which pip takes from the local wheel folder (no multi-GB CUDA build).
  "$VENV/bin/python" -m pip install -q --require-hashes --no-deps -r "$root/requirements.lock"
  # The project itself, built with the locked setuptools (no isolated build env to float).
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root"
  "$VENV/bin/python" -m pip check >/dev/null || { "$VENV/bin/python" -m pip check >&2; exit 1; }
  echo "$want" > "$VENV/.fedtune-installed"
fi
# Financial PhraseBank lives next to the repository in this workplace (never inside it).
if [ -z "${FEDTUNE_DATA_DIR:-}" ] && [ -d "$root/../shared/data/financial_phrasebank" ]; then
  FEDTUNE_DATA_DIR="$(cd "$root/../shared/data" && pwd)"
  export FEDTUNE_DATA_DIR
fi
export TOKENIZERS_PARALLELISM=false
