#!/usr/bin/env bash
# Set up (once) and run the whole test suite: bash scripts/test.sh [pytest arguments]
# Creates .venv beside this checkout if it is missing and installs the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,slurm]'
set +e
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "scripts/test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
