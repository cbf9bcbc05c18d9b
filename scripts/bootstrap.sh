# Sourced by scripts/fedtune and scripts/test: make sure .venv exists and holds exactly
# the locked dependency set (requirements.lock, refreshed only by scripts/lock) plus
# the project, re-creating it when the lock, pyproject.toml or this file changed.
# Sets VENV.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEDTUNE_VENV:-$root/.venv}"
PYTHON="${PYTHON:-python3}"
want="$(cat "$root/requirements.lock" "$root/pyproject.toml" "$root/scripts/bootstrap.sh" \
  | sha256sum | cut -c1-16)"
_fedtune_setup() {
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "fedtune: the locked set is for Python 3.11 (requirements.lock); set" \
      "PYTHON=/path/to/python3.11, or install into your own environment with" \
      "\`pip install torch==2.13.0 && pip install -e .\` (pyproject.toml's ranges)" >&2
    return 1
  fi
  if [ -e "$VENV" ] && [ ! -f "$VENV/.fedtune-installed" ] && [ ! -f "$VENV/.fedtune-building" ]; then
    echo "fedtune: $VENV exists but is not a virtualenv these scripts set up; remove it," \
      "or set FEDTUNE_VENV to a new folder" >&2
    return 1
  fi
  # Catalog models added with `fedtune models install` live in the old environment:
  # note them, to install them again into the new one.
  local models=""
  if [ -f "$VENV/.fedtune-installed" ]; then
    models="$("$VENV/bin/python" -c 'from fedtune.catalog import CATALOG
print(" ".join(n for n, e in CATALOG.items() if e.packages and e.installed()))' 2>/dev/null || true)"
  fi
  echo "fedtune: setting up $VENV from requirements.lock (first run only, under a minute with uv)..." >&2
  # Always from empty: no package of an older lock, or of a half-finished setup, stays.
  "$PYTHON" -m venv --clear "$VENV" || return 1
  touch "$VENV/.fedtune-building"
  # Every package at the locked version and hash. CPU PyTorch is in the lock as
  # torch==2.13.0+cpu: pip takes it from the local wheel folder (never the CUDA build).
  local wheels="${FEDTUNE_TORCH_WHEELS:-/opt/wheels}" links=""
  [ -d "$wheels" ] && links="--find-links=$wheels"
  # The installer: uv, at the lock's own version and hashes (it is there for flwr),
  # put beside the packages first; it installs the lock in about 15 s where pip takes
  # two minutes. pip where uv does not install (no wheel for this machine, no registry).
  local install=("$VENV/bin/python" -m pip install -q)
  sed -n '/^uv==/,/^    # via/p' "$root/requirements.lock" | grep -v '# via' >"$VENV/.fedtune-uv.txt"
  if "$VENV/bin/python" -m pip install -q --disable-pip-version-check --require-hashes \
      --no-deps --target "$VENV/.fedtune-uv" -r "$VENV/.fedtune-uv.txt" >/dev/null 2>&1 \
      && "$VENV/.fedtune-uv/bin/uv" --version >/dev/null 2>&1; then
    install=("$VENV/.fedtune-uv/bin/uv" pip install -q --python "$VENV/bin/python")
  else
    echo "fedtune: uv did not install here; installing with pip (slower)" >&2
  fi
  "${install[@]}" --require-hashes --no-deps $links -r "$root/requirements.lock" || return 1
  # The project itself, built with the locked setuptools (no isolated build env to float).
  "${install[@]}" --no-deps --no-build-isolation -e "$root" || return 1
  "$VENV/bin/python" -m pip check >/dev/null || { "$VENV/bin/python" -m pip check >&2; return 1; }
  for name in $models; do
    echo "fedtune: installing catalog model $name again (it was in the old environment)" >&2
    "$VENV/bin/fedtune" models install "$name" || return 1
  done
  rm -f "$VENV/.fedtune-building"
  echo "$want" > "$VENV/.fedtune-installed"
}
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.fedtune-installed" 2>/dev/null)" != "$want" ]; then
  mkdir -p "$(dirname "$VENV")"
  # One setup at a time (two commands started together would clear each other's).
  exec 9>"$VENV.lock"
  command -v flock >/dev/null && flock 9
  if [ "$(cat "$VENV/.fedtune-installed" 2>/dev/null)" != "$want" ]; then
    _fedtune_setup || { exec 9>&-; exit 1; }
  fi
  exec 9>&-
fi
# Financial PhraseBank lives next to the repository in this workplace (never inside it).
if [ -z "${FEDTUNE_DATA_DIR:-}" ] && [ -d "$root/../shared/data/financial_phrasebank" ]; then
  FEDTUNE_DATA_DIR="$(cd "$root/../shared/data" && pwd)"
  export FEDTUNE_DATA_DIR
fi
export TOKENIZERS_PARALLELISM=false
