#!/usr/bin/env bash
# Per-package test matrix: each method's tests in a venv holding only core and that method.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
for pkg in ${PACKAGES:-core listener-reward selma di-star mlcm ecad}; do
  venv=$(mktemp -d)/venv
  $PYTHON -m venv "$venv"
  "$venv/bin/pip" install --quiet "$TORCH_SPEC"
  extra=""
  [ "$pkg" != core ] && extra="-e packages/$pkg"
  "$venv/bin/pip" install --quiet -e packages/core $extra pytest pytest-timeout
  HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q "packages/$pkg/tests"
  rm -rf "$(dirname "$venv")"
done
