#!/usr/bin/env bash
# Build every wheel, run twine check --strict, and install each wheel alone with core.
set -euo pipefail
cd "$(dirname "$0")/.."
make wheels
bash ci/check_wheels.sh dist
