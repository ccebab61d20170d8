# Writes tests/fixtures/rope_hf.json: inverse frequencies and attention factors computed by
# Hugging Face transformers' own RoPE init functions (ROPE_INIT_FUNCTIONS) for each scaling type.
#   python3 scripts/make_rope_fixture.py   (made with transformers 5.24.0, torch 2.15.0)
import json, torch, transformers
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

cases = [
    ("default", dict(rope_theta=10000.0), None, None),
    ("default_theta_1e5", dict(rope_theta=100000.0), None, None),
    ("linear", dict(rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}), None, None),
    ("dynamic_short", dict(rope_theta=10000.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 100, None),
    ("dynamic_long", dict(rope_theta=10000.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 3000, None),
    ("yarn", dict(rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                                     "original_max_position_embeddings": 512}), None, None),
    ("yarn_betas_mscale", dict(rope_theta=500000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0,
        "original_max_position_embeddings": 256, "beta_fast": 16, "beta_slow": 2, "mscale": 0.707,
        "mscale_all_dim": 1.0}), None, None),
    ("llama3", dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), None, None),
]
out = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": []}
for name, kw, seq_len, _ in cases:
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32, max_position_embeddings=1024, **kw)
    rope = dict(getattr(cfg, "rope_parameters", None) or cfg.rope_scaling or {})
    kind = rope.get("rope_type", "default")
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        inv, attn = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg, device="cpu")
    else:
        inv, attn = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=seq_len)
    pos = torch.tensor([[0, 1, 7, 100, 2047]], dtype=torch.float32)
    freqs = (inv[None, :, None].float() @ pos[:, None, :]).transpose(1, 2)
    out["cases"].append({"name": name, "head_dim": 32, "max_position_embeddings": 1024,
                         "rope_theta": kw["rope_theta"], "rope_scaling": kw.get("rope_scaling"), "seq_len": seq_len,
                         "inv_freq": inv.tolist(), "attention_factor": float(attn),
                         "positions": pos[0].int().tolist(),
                         "cos": (freqs.cos() * attn)[0].tolist(), "sin": (freqs.sin() * attn)[0].tolist()})
json.dump(out, open("tests/fixtures/rope_hf.json", "w"))
print("wrote tests/fixtures/rope_hf.json with", len(out["cases"]), "cases")
