#!/usr/bin/env bash
# Does a change leave the members it makes as they were? Makes the same two MiniLM families with the code
# at REV and with the working tree, and compares every member's pruning.json and weights byte for byte:
# a one-shot family (targets 1.5, 2, 3, 5) and a gradual one at 100k tokens per member (1.5, 2, 3).
# `--max-replans 0` ships each first plan, so the members depend on the seed, table and data alone, not on
# how fast the machine happened to be while verifying.
#   bash scripts/same_members.sh REV [OUT]      (about 15 minutes per side on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:?usage: same_members.sh REV [OUT]}"
out="$(realpath -m "${2:-runs/same-members}")"
python="$(realpath "${ZIPLM_VENV:-.venv}")/bin/python"
data="$(realpath ../shared/data/stsb/sts-train.csv)"
rm -rf "$out" && mkdir -p "$out"
git worktree add --detach "$out/code-before" "$rev" >/dev/null
trap 'git worktree remove --force "$out/code-before"' EXIT

families() {  # CODE SIDE: both families made with the package in CODE
  local code=$1 side="$out/$2"
  mkdir -p "$side"
  (cd "$code" && export PYTHONPATH="$code" && for family in oneshot gradual; do
    case $family in
      oneshot) extra=(--targets 1.5,2,3,5) ;;
      gradual) extra=(--targets 1.5,2,3 --recovery gradual --train-tokens 100000) ;;
    esac
    echo "$2: $family" >&2
    "$python" -m ziplm_planner compress minilm --profile profiles/minilm-cpu2-onnxruntime-b8s128.json \
      --calib "$data" --max-replans 0 --verify-rounds 4 "${extra[@]}" \
      --cache-dir "$side/cache-$family" -o "$side/$family" >"$side/$family.log" 2>&1
  done)
}

families "$out/code-before" before
families "$PWD" after
status=0
for member in "$out"/before/*/*/pruning.json; do
  folder=$(dirname "$member") && relative=${folder#"$out/before/"}
  for file in pruning.json model.safetensors; do
    if cmp -s "$folder/$file" "$out/after/$relative/$file"; then echo "same       $relative/$file"
    else echo "DIFFERENT  $relative/$file"; status=1; fi
  done
done
exit $status
