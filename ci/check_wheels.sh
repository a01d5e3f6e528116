#!/usr/bin/env bash
# Install each method wheel alone with core in a clean venv, import it and run its CLI --help.
set -euo pipefail
DIST=${1:-dist}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
core_wheel=$(ls "$DIST"/diffalign_core-*.whl)
for wheel in "$DIST"/diffalign_*.whl; do
  name=$(basename "$wheel" | cut -d- -f1)
  dist=${name//_/-}
  venv=$(mktemp -d)/venv
  $PYTHON -m venv "$venv"
  "$venv/bin/pip" install --quiet "$TORCH_SPEC"
  "$venv/bin/pip" install --quiet "$core_wheel" "$wheel"
  module="diffalign.${name#diffalign_}"
  HF_HUB_OFFLINE=1 "$venv/bin/python" -c "import $module, sys; print('$dist', $module.__version__)"
  if [ "$dist" = "diffalign-core" ]; then
    HF_HUB_OFFLINE=1 "$venv/bin/diffalign" --help >/dev/null
  else
    HF_HUB_OFFLINE=1 "$venv/bin/$dist" --help >/dev/null
    HF_HUB_OFFLINE=1 "$venv/bin/diffalign" --help | grep -q "${dist#diffalign-}"
  fi
  echo "ok: $dist installs alone with core"
  rm -rf "$(dirname "$venv")"
done
