#!/usr/bin/env bash
# Run each method's tests against the oldest core its range admits (the last tagged core release) and
# against current core. Without a tagged core release yet, only current core is tested (said so).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
last_core_tag=$(git tag --list 'diffalign-core==*' --sort=-v:refname | head -n 1 || true)
targets=("current")
[ -n "$last_core_tag" ] && targets+=("$last_core_tag")
[ -z "$last_core_tag" ] && echo "no tagged diffalign-core release yet: testing against current core only"
for target in "${targets[@]}"; do
  work=$(mktemp -d)
  if [ "$target" = current ]; then core_src=packages/core; else
    git worktree add --detach "$work/core-src" "$target" >/dev/null
    core_src="$work/core-src/packages/core"
  fi
  for pkg in listener-reward selma di-star mlcm ecad; do
    $PYTHON -m venv "$work/venv-$pkg"
    "$work/venv-$pkg/bin/pip" install --quiet "$TORCH_SPEC"
    "$work/venv-$pkg/bin/pip" install --quiet "$core_src" -e "packages/$pkg" pytest pytest-timeout
    echo "== $pkg against core $target"
    HF_HUB_OFFLINE=1 "$work/venv-$pkg/bin/python" -m pytest -q "packages/$pkg/tests"
  done
  [ "$target" != current ] && git worktree remove --force "$work/core-src"
  rm -rf "$work"
done
