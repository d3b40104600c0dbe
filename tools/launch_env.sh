# Sourced by train.sh, evaluate.sh and train_slurm.sh (which set USAGE first).
# REPO: the repository (main.py, tools/). PYTHON: $PYTHON if set, else the repository's
# .venv (what `make quickstart` / `make test` create) if it is there, else `python`.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python; fi
fi
# A python without the requirements would end in a ModuleNotFoundError traceback: one line instead, exit 2.
if ! MISSING=$("$PYTHON" -c 'import importlib.util as u
print(", ".join(m for m in ("torch", "timm", "yacs") if u.find_spec(m) is None))' 2>/dev/null); then
  PROBLEM="cannot run $PYTHON"
elif [ -n "$MISSING" ]; then
  PROBLEM="$PYTHON has no $MISSING"
fi
if [ -n "${PROBLEM:-}" ]; then
  echo "$(basename "$0"): $PROBLEM: run \`make venv\` (or \`make quickstart\`) first, or set PYTHON to a python" \
    "with requirements.txt installed" >&2
  exit 2
fi

# usage_error WHAT: the script's usage and what is wrong, on one line; exit 2 (a user mistake)
usage_error() {
  echo "$USAGE: $1" >&2
  exit 2
}

# require_count NAME VALUE: VALUE must be a positive integer
require_count() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || usage_error "$1 must be a positive integer, got '$2'"
}
