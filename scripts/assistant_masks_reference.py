# HF transformers' assistant masks (apply_chat_template(..., return_assistant_tokens_mask=True))
# for tests/integration/train_model.rs: the tiny Qwen3 tokenizer (tests/fixtures/arch/qwen3)
# with a ChatML template whose replies sit in {% generation %} blocks, and the Qwen3 template's
# own rendering of a multi-turn chat; recorded as tests/fixtures/train/masks/reference.json.
#   python3 scripts/assistant_masks_reference.py > tests/fixtures/train/masks/reference.json
# (made with transformers 5.25.0 and jinja2 3.1.6; torch is not needed)
import json
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained("tests/fixtures/arch/qwen3")
gen = open("tests/fixtures/train/masks/generation_template.jinja").read()
chat = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And a fruit?"},
    {"role": "assistant", "content": "A ripe pear, sliced."},
]
out = tok.apply_chat_template(chat, chat_template=gen, tokenize=True, return_dict=True,
                              return_assistant_tokens_mask=True)
qwen3_text = tok.apply_chat_template(chat, tokenize=False)
json.dump({"chat": chat, "input_ids": list(out["input_ids"]), "assistant_masks": list(out["assistant_masks"]),
           "qwen3_text": qwen3_text}, __import__("sys").stdout, indent=1)
