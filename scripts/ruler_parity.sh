#!/usr/bin/env bash
# Records tests/fixtures/ruler_parity/: what NVIDIA/RULER's own `prepare.py` writes for the
# 13 tasks when it runs on this project's sources, so that tests/integration/ruler.rs
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
# - the QA sets src/eval/ruler/data/qa_{squad,hotpotqa}.json (SQuAD v2 / HotpotQA format),
# - a byte-level BPE tokenizer with 1,000 tokens trained here on essays.txt (HF tokenizers
#   0.23.3, deterministic; written beside the samples as tokenizer/), RULER's `hf` tokenizer
#   type, base template, seed 42. (The test fixtures' 500-token tokenizers are too coarse:
#   RULER's variable tracking cannot fit its in-context example into 500 of their tokens
#   and loops forever.)
# Needs python3 (3.11) with venv and pip, git, and network access to PyPI.
set -euo pipefail

RULER_COMMIT=c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a
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
  pyyaml==6.0.4 tenacity==9.2.1 transformers==5.25.0 tokenizers==0.23.3 scipy==1.17.1

punkt=$work/nltk_data/tokenizers/punkt_tab/english
mkdir -p "$punkt" "$work/nltk_data/tokenizers/punkt"
cp "$root"/src/eval/ruler/data/punkt_english/* "$punkt/"
"$work/venv/bin/python" -c 'import json, sys; json.dump({"text": open(sys.argv[1]).read()}, open(sys.argv[2], "w"))' \
  "$root/src/eval/ruler/data/essays.txt" "$work/RULER/scripts/data/synthetic/json/PaulGrahamEssays.json"
# The QA sets: the built-in SQuAD- and HotpotQA-format files.
cp "$root/src/eval/ruler/data/qa_squad.json" "$work/RULER/scripts/data/synthetic/json/squad.json"
cp "$root/src/eval/ruler/data/qa_hotpotqa.json" "$work/RULER/scripts/data/synthetic/json/hotpotqa.json"
# common_words_extraction.py loads english_words.json (a Git LFS file) at start but draws
# from it only beyond its ~8,000 wonderwords words, which these lengths never reach.
echo '{}' >"$work/RULER/scripts/data/synthetic/json/english_words.json"

out=$root/tests/fixtures/ruler_parity
rm -rf "$out"
mkdir -p "$out/tokenizer"
"$work/venv/bin/python" - "$root/src/eval/ruler/data/essays.txt" "$out/tokenizer" <<'PY'
import json, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train([sys.argv[1]], trainers.BpeTrainer(
    vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
tok.save(sys.argv[2] + "/tokenizer.json")
json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, open(sys.argv[2] + "/tokenizer_config.json", "w"))
PY
run() { # samples length task...
  local samples=$1 len=$2
  shift 2
  mkdir -p "$out/$len"
  for task in "$@"; do
    (cd "$work/RULER/scripts/data" &&
      PATH="$work/venv/bin:$PATH" NLTK_DATA="$work/nltk_data" python prepare.py \
        --save_dir "$work/out/$len" --benchmark synthetic --task "$task" \
        --tokenizer_path "$out/tokenizer" --tokenizer_type hf \
        --max_seq_length "$len" --model_template_type base --num_samples "$samples" >/dev/null)
    test -s "$work/out/$len/$task/validation.jsonl" || { echo "RULER wrote nothing for $task @ $len" >&2; exit 1; }
    cp "$work/out/$len/$task/validation.jsonl" "$out/$len/$task.jsonl"
    echo "$task @ $len: $(wc -l <"$out/$len/$task.jsonl") samples"
  done
}
# All 13 tasks at 2048, two samples each (the second drawn from where the first left the
# random stream); at 4096 once more the tasks whose generators change there (25- and
# 10-line steps, larger common-words lists).
run 2 2048 niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 \
  niah_multikey_3 niah_multivalue niah_multiquery vt cwe fwe qa_1 qa_2
run 1 4096 niah_single_1 niah_multikey_2 niah_multikey_3 vt cwe fwe
cat >"$out/README.md" <<EOF
Written by \`scripts/ruler_parity.sh\` (NVIDIA/RULER $RULER_COMMIT, \`prepare.py\`, seed 42,
base template, the tokenizer in \`tokenizer/\` (trained by the script), essays
\`src/eval/ruler/data/essays.txt\`, QA sets \`src/eval/ruler/data/qa_*.json\`):
RULER's own \`validation.jsonl\` lines, unchanged, under \`LENGTH/TASK.jsonl\`.
EOF
