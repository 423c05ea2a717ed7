#!/usr/bin/env bash
# Set up (once) and run the whole test suite: bash scripts/test.sh [pytest arguments]
# Creates .venv beside this checkout if it is missing and installs the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,slurm]'
set +e
# One worker per core; each test file stays on one worker (module fixtures such as the SLURM cluster start once).
.venv/bin/python -m pytest -n auto --dist loadfile "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
