# Sourced by scripts/fedtune and scripts/test: make sure .venv exists and holds the
# project (CPU PyTorch first, so pip never pulls a multi-GB CUDA build), re-installing
# when pyproject.toml changed. Sets VENV.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDTUNE_VENV:-$root/.venv}"
PYTHON="${PYTHON:-python3}"
want="$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.fedtune-installed" 2>/dev/null)" != "$want" ]; then
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "fedtune needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  echo "fedtune: setting up $VENV (first run only, a minute or two)..." >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -e "$root[dev]"
  echo "$want" > "$VENV/.fedtune-installed"
fi
# Financial PhraseBank lives next to the repository in this workplace (never inside it).
if [ -z "${FEDTUNE_DATA_DIR:-}" ] && [ -d "$root/../shared/data/financial_phrasebank" ]; then
  FEDTUNE_DATA_DIR="$(cd "$root/../shared/data" && pwd)"
  export FEDTUNE_DATA_DIR
fi
export TOKENIZERS_PARALLELISM=false
