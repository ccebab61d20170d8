# A tiny random Llama checkpoint (HF safetensors + config.json + byte-level tokenizer.json) and
# the logits HF transformers computes with it under every RoPE scaling type and with Mistral's
# sliding window. The Rust tests load the same folder through our safetensors path.
#   python3 scripts/make_tiny_fixture.py      (made with transformers 5.24.0, torch 2.15.0)
# Writes tests/fixtures/tiny/{model.safetensors, tokenizer.json, config.<variant>.json, logits.safetensors}
import json, os, torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

out = "tests/fixtures/tiny"
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
base = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16, rope_theta=10000.0, rms_norm_eps=1e-5,
            initializer_range=0.3, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
variants = {
    "default": (LlamaConfig, LlamaForCausalLM, {}),
    "linear": (LlamaConfig, LlamaForCausalLM, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "dynamic": (LlamaConfig, LlamaForCausalLM, {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "yarn": (LlamaConfig, LlamaForCausalLM, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                              "original_max_position_embeddings": 16}}),
    "llama3": (LlamaConfig, LlamaForCausalLM, {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3",
               "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
    "mistral_window": (MistralConfig, MistralForCausalLM, {"sliding_window": 8}),
}
ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
cfg0 = LlamaConfig(**base)
model0 = LlamaForCausalLM(cfg0).eval()
state = {k: v.contiguous() for k, v in model0.state_dict().items()}
save_file(state, f"{out}/model.safetensors", metadata={"format": "pt"})
logits = {"input_ids": ids[0].to(torch.int64)}
for name, (C, M, extra) in variants.items():
    kw = dict(base); kw.update(extra)
    cfg = C(**kw, attn_implementation="eager")
    m = M(cfg).eval()
    m.load_state_dict(state)
    with torch.no_grad():
        logits[name] = m(ids).logits[0].float().contiguous()
    d = cfg.to_dict()
    d["architectures"] = [M.__name__]
    # Keep the checkpoint's own field names (rope_scaling) as HF configs on the Hub have them.
    d.pop("rope_parameters", None)
    if "rope_scaling" in extra:
        d["rope_scaling"] = extra["rope_scaling"]
    d["rope_theta"] = kw["rope_theta"]
    json.dump(d, open(f"{out}/config.{name}.json", "w"), indent=1, default=str)
save_file(logits, f"{out}/logits.safetensors")
byte_vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
byte_vocab = {c: i for i, c in enumerate(sorted(byte_vocab, key=lambda c: ord(c)))}
tk = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tk.decoder = decoders.ByteLevel()
tk.save(f"{out}/tokenizer.json")
diff = (logits["mistral_window"] - logits["default"]).abs().max().item()
print("variants", list(variants), "window changes logits by", diff,
      "yarn vs default", (logits["yarn"] - logits["default"]).abs().max().item())
