#!/usr/bin/env bash
# Install each method wheel alone with core in a clean venv, import it, run its CLI --help and --version,
# check the wheel carries LICENSE and its recipes, and run one tiny built-in shapes recipe BY NAME from the
# installed wheel (cwd is a temporary folder, so nothing is read from the checkout).
set -euo pipefail
# (grep -c, not grep -q, after a pipe: -q stops reading at the first match, and under pipefail the writer's
# SIGPIPE then fails the check, as it did for the ecad wheel listing)
DIST=$(cd "${1:-dist}" && pwd)
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
RUN_RECIPES=${RUN_RECIPES:-1}
core_wheel=$(ls "$DIST"/diffalign_core-*.whl)

# One tiny run per wheel: a built-in shapes recipe shrunk with --set (seconds to a few minutes on a CPU).
tiny_run() {
  local dist=$1 bin=$2 out=$3
  case "$dist" in
    diffalign-core)
      "$bin/diffalign" world sample -p "a red circle" --n 1 --steps 2 --out "$out/world.png" --no-score
      test -s "$out/world.png" ;;
    diffalign-mlcm)
      "$bin/diffalign" mlcm distill shapes_unet --run-dir "$out/run" --set stage1.iterations=2 \
        --set stage2.iterations=1 --set reward.iterations=1 --set distill.batch_size=2 \
        --set data.shapes_prompts_per_skill=2 --set checkpoint.every=1 ;;
    diffalign-di-star)
      "$bin/diffalign" di-star train shapes_unet --run-dir "$out/run" --set training.max_steps=1 \
        --set data.batch_size=2 --set data.num_prompts=8 ;;
    diffalign-ecad)
      "$bin/diffalign" ecad search shapes_dit --run-dir "$out/run" --set search.generations=1 \
        --set search.population_size=4 --set calibration.num_prompts=2 --set calibration.num_seeds=1 \
        --set search.seed_heuristics=false --set sampling.batch_size=2 ;;
    diffalign-selma)
      "$bin/diffalign" selma run shapes_unet --run-dir "$out/run" --set "skills=[{name: count, max_words: 12}]" \
        --set prompts.n_per_skill=2 --set train.steps=1 --set train.batch_size=2 --set train.checkpoint_every=1 \
        --set images.num_inference_steps=2 --set eval.n_per_skill=1 --set eval.num_inference_steps=2 ;;
    diffalign-listener-reward)
      DIFFALIGN_LISTENER_SHAPES_DIR="$out/models" "$bin/diffalign" listener-reward build-models shapes \
        --listener-steps 2 --listener-pairs 8 --listener-batch 4 --base-steps 0
      DIFFALIGN_LISTENER_SHAPES_DIR="$out/models" "$bin/diffalign" listener-reward sft shapes \
        --run-dir "$out/sft" --set sft.max_steps=1 --set sft.batch_size=2 ;;
  esac
}

for wheel in "$DIST"/diffalign_*.whl; do
  name=$(basename "$wheel" | cut -d- -f1)
  dist=${name//_/-}
  method=${dist#diffalign-}
  work=$(mktemp -d)
  venv=$work/venv
  $PYTHON -m venv "$venv"
  "$venv/bin/pip" install --quiet "$TORCH_SPEC"
  "$venv/bin/pip" install --quiet "$core_wheel" "$wheel"
  module="diffalign.${name#diffalign_}"
  python3 -m zipfile -l "$wheel" | grep -c "dist-info/licenses/LICENSE\|dist-info/LICENSE" >/dev/null \
    || { echo "error: $dist wheel has no LICENSE"; exit 1; }
  cd "$work"
  export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
  "$venv/bin/python" -c "import $module, sys; print('$dist', $module.__version__)"
  "$venv/bin/diffalign" --version | grep -c "diffalign-core" >/dev/null
  if [ "$dist" = "diffalign-core" ]; then
    "$venv/bin/diffalign" --help >/dev/null
  else
    python3 -m zipfile -l "$wheel" | grep -c "diffalign/${name#diffalign_}/recipes/" >/dev/null \
      || { echo "error: $dist wheel has no recipes"; exit 1; }
    "$venv/bin/$dist" --help >/dev/null
    "$venv/bin/$dist" --version | grep -c "$dist" >/dev/null
    "$venv/bin/diffalign" --help | grep -c "$method" >/dev/null
    "$venv/bin/diffalign" "$method" recipes --paths | grep "site-packages" >/dev/null \
      || { echo "error: $dist recipes are not read from the installed wheel"; exit 1; }
    for recipe in $("$venv/bin/diffalign" "$method" recipes | cut -d' ' -f1); do
      "$venv/bin/diffalign" config validate "$method" "$recipe" >/dev/null
    done
  fi
  if [ "$RUN_RECIPES" = 1 ]; then
    tiny_run "$dist" "$venv/bin" "$work/out" >"$work/tiny.log" 2>&1 || { cat "$work/tiny.log"; echo "error: $dist tiny recipe run failed"; exit 1; }
    echo "ok: $dist ran a built-in shapes recipe from the installed wheel"
  fi
  echo "ok: $dist installs alone with core"
  cd - >/dev/null
  rm -rf "$work"
done
