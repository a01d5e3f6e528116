#!/usr/bin/env bash
# Dependency floors: install every package with the LOWEST versions the pyprojects declare for diffusers,
# transformers, peft, accelerate and trl (and torch, see below) in a clean venv, and run a smoke subset
# that loads the shapes teachers (loading reports checked), samples, trains a LoRA step, merges, builds a
# tiny VLM and imports TRL's GRPO trainer. A failure means a floor is false: raise it in every pyproject.
#
#   bash ci/floors.sh                 # floors read from packages/*/pyproject.toml
#   FLOOR_OVERRIDES="transformers==5.10.1" bash ci/floors.sh    # try other pins (bisecting a floor)
#   VENV=/tmp/floors KEEP=1 bash ci/floors.sh                  # keep / reuse one venv between tries
#
# torch: the declared floor is installed only when TORCH_SPEC says so (e.g. TORCH_SPEC=torch==2.4.0 with
# PIP_INDEX_URL pointing at a CPU wheel index); by default the local CPU wheel torch==2.13.0 is used, because
# older torch releases on the default index are CUDA builds of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
KEEP=${KEEP:-0}
LIBS="diffusers transformers peft accelerate trl"
pins=$($PYTHON - "$LIBS" <<'PY'
import re, sys
from pathlib import Path
libs = sys.argv[1].split()
floors = {}
for pyproject in sorted(Path("packages").glob("*/pyproject.toml")):
    for lib, low in re.findall(r'"(' + "|".join(libs) + r')>=([0-9][0-9.]*)', pyproject.read_text()):
        floors.setdefault(lib, set()).add(low)
for lib in libs:
    lows = sorted(floors.get(lib, ()), key=lambda v: tuple(int(x) for x in v.split(".")))
    if len(lows) > 1:
        sys.exit(f"{lib}: packages declare different floors {lows}; declare one")
    if lows:
        print(f"{lib}=={lows[0]}")
PY
)
for override in ${FLOOR_OVERRIDES:-}; do
  pins=$(printf '%s\n' $pins | grep -v "^${override%%[=<>]*}==" || true; echo "$override")
done
pins=$(printf '%s\n' $pins | sort)
work=$(mktemp -d)
venv=${VENV:-$work/venv}
trap '[ "$KEEP" = 1 ] || rm -rf "$work"' EXIT  # a VENV you pass is never removed
printf '%s\n' $pins > "$work/constraints.txt"
echo "floors under test: $TORCH_SPEC $(tr '\n' ' ' < "$work/constraints.txt")"
[ -x "$venv/bin/python" ] || $PYTHON -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet "$TORCH_SPEC"
# the pins as requirements too, so a reused venv moves to them
"$py" -m pip install --quiet $(cat "$work/constraints.txt")
"$py" -m pip install --quiet -c "$work/constraints.txt" \
  -e packages/core -e packages/listener-reward -e packages/selma -e packages/di-star -e packages/mlcm \
  -e packages/ecad pytest pytest-timeout
"$py" -m pip list 2>/dev/null | grep -E -i "^(torch|diffusers|transformers|peft|accelerate|trl) "
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
"$py" -m pytest -q -x --timeout 900 -p no:cacheprovider \
  packages/core/tests/test_loading_report.py \
  "tests/integration/test_pip_user.py::test_readme_block_runs" \
  "tests/integration/test_pip_user.py::test_config_validate_accepts_every_shipped_recipe" \
  packages/listener-reward/tests/test_vlm.py \
  packages/listener-reward/tests/test_train.py \
  packages/selma/tests/test_merge.py \
  packages/mlcm/tests/test_scheduler.py
"$py" -c "from trl import GRPOConfig, GRPOTrainer; print('trl GRPOTrainer imports')"
echo "ok: the declared floors pass the smoke subset"
