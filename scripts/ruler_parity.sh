#!/usr/bin/env bash
# Records tests/fixtures/ruler_parity/: what NVIDIA/RULER's own `prepare.py` writes for the
# NIAH tasks when it runs on this project's sources, so that tests/integration/ruler.rs
# can check that `--protocol ruler` reproduces it byte for byte.
#
#   scripts/ruler_parity.sh [RULER]    # RULER: a git URL or a (bare) clone
#                                      # [default: https://github.com/NVIDIA/RULER]
#
# RULER runs at commit $RULER_COMMIT, in a fresh venv with the versions pinned below, on:
# - PaulGrahamEssays.json := {"text": src/eval/ruler/data/essays.txt} (RULER's essays may
#   not be redistributed; the generator is what is compared),
# - NLTK's punkt_tab/english := src/eval/ruler/data/punkt_english/ (the same parameters our
#   Punkt port reads),
# - wonderwords 3.0.1's word lists (the ones in src/eval/ruler/data/),
# - the tokenizer tests/fixtures/arch/llama32 (RULER's `hf` tokenizer type), base template,
#   seed 42.
# Needs python3 (3.11) with venv and pip, git, and network access to PyPI.
set -euo pipefail

RULER_COMMIT=c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a
SAMPLES=2
root=$(cd "$(dirname "$0")/.." && pwd)
src=${1:-https://github.com/NVIDIA/RULER}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -d "$src" ]; then
  git_dir=$(git -C "$src" rev-parse --git-dir)
  case $git_dir in /*) ;; *) git_dir=$src/$git_dir ;; esac
else
  git clone -q --bare "$src" "$work/ruler.git"
  git_dir=$work/ruler.git
fi
mkdir -p "$work/RULER"
git --git-dir="$git_dir" archive "$RULER_COMMIT" scripts | tar -x -C "$work/RULER"

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q nltk==3.10.4 wonderwords==3.0.1 numpy==2.4.6 tqdm==4.70.1 \
  pyyaml==6.0.4 tenacity==9.2.1 transformers==5.25.0 tokenizers==0.23.3

punkt=$work/nltk_data/tokenizers/punkt_tab/english
mkdir -p "$punkt" "$work/nltk_data/tokenizers/punkt"
cp "$root"/src/eval/ruler/data/punkt_english/* "$punkt/"
"$work/venv/bin/python" -c 'import json, sys; json.dump({"text": open(sys.argv[1]).read()}, open(sys.argv[2], "w"))' \
  "$root/src/eval/ruler/data/essays.txt" "$work/RULER/scripts/data/synthetic/json/PaulGrahamEssays.json"

out=$root/tests/fixtures/ruler_parity
rm -rf "$out"
run() { # length task...
  local len=$1
  shift
  mkdir -p "$out/$len"
  for task in "$@"; do
    (cd "$work/RULER/scripts/data" &&
      PATH="$work/venv/bin:$PATH" NLTK_DATA="$work/nltk_data" python prepare.py \
        --save_dir "$work/out/$len" --benchmark synthetic --task "$task" \
        --tokenizer_path "$root/tests/fixtures/arch/llama32" --tokenizer_type hf \
        --max_seq_length "$len" --model_template_type base --num_samples "$SAMPLES" >/dev/null)
    test -s "$work/out/$len/$task/validation.jsonl" || { echo "RULER wrote nothing for $task @ $len" >&2; exit 1; }
    cp "$work/out/$len/$task/validation.jsonl" "$out/$len/$task.jsonl"
    echo "$task @ $len: $(wc -l <"$out/$len/$task.jsonl") samples"
  done
}
# Every NIAH task at 4096 (essay, noise and needle haystacks; 25-line steps); the line
# haystacks again below 4096, where RULER steps by 5 lines.
run 4096 niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 \
  niah_multikey_3 niah_multivalue niah_multiquery
run 2048 niah_single_1 niah_multikey_2
cat >"$out/README.md" <<EOF
Written by \`scripts/ruler_parity.sh\` (NVIDIA/RULER $RULER_COMMIT, \`prepare.py\`, seed 42,
$SAMPLES samples, base template, tokenizer \`tests/fixtures/arch/llama32\`, essays
\`src/eval/ruler/data/essays.txt\`): RULER's own \`validation.jsonl\` lines, unchanged.
EOF
