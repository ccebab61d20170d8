# Reference logits and token ids of the default model, computed by HF transformers from the
# same GGUF file (transformers dequantizes Q4_1 to f32 and un-permutes q/k to its own layout).
#   python3 scripts/make_smollm2_fixture.py models/SmolLM2-135M-Instruct.Q4_1.gguf
# Made with transformers 5.24.0, torch 2.15.0, gguf 0.17 (CPU, f32). Writes:
#   tests/fixtures/smollm2_logits.safetensors  (prompt ids, full last-position logits,
#       all-position logits at 512 fixed vocabulary ids, all-position top-16)
#   tests/fixtures/smollm2_tokens.json         (HF tokenizer ids for golden strings)
import json, os, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()

strings = ["Hello world", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n", "The year 2024 had 12345 items.",
           " Hello world", "  leading spaces and\ttabs\n\nnewlines", "naïve café — 東京 🚀", "don't I'll we've",
           "x=1;y=[2,3];print(x+y[0])"]
golden = [{"text": s, "ids": tok(s, add_special_tokens=True)["input_ids"]} for s in strings]
messages = [{"role": "user", "content": "What is the capital of France?"}]
chat_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
chat_ids = tok(chat_text, add_special_tokens=False)["input_ids"]
json.dump({"transformers_tokenizer_from_gguf": True, "strings": golden,
           "chat": {"messages": messages, "text": chat_text, "ids": chat_ids}},
          open("tests/fixtures/smollm2_tokens.json", "w"), ensure_ascii=False, indent=1)

ids = torch.tensor([chat_ids])
with torch.no_grad():
    logits = model(ids).logits[0].float()  # (t, vocab)
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
vocab = logits.shape[1]
sample = torch.arange(0, vocab, vocab // 512)[:512]
top = logits.topk(16, dim=-1)
save_file({"input_ids": ids[0].to(torch.int64), "last_logits": logits[-1].contiguous(),
           "sample_ids": sample.to(torch.int64), "sample_logits": logits[:, sample].contiguous(),
           "topk_ids": top.indices.to(torch.int64).contiguous(), "topk_logits": top.values.contiguous(),
           "greedy_ids": greedy.to(torch.int64).contiguous()},
          "tests/fixtures/smollm2_logits.safetensors")
print("prompt tokens", len(chat_ids), "greedy:", repr(tok.decode(greedy)))
