# Loads the PEFT adapters `wildlong` exported in tests/fixtures/train/peft/ with Python `peft`
# onto their bases (a tiny safetensors Llama, tiny Qwen2 and Qwen3 (tests/fixtures/arch), and the default GGUF model dequantized by
# transformers) and compares the logits with the engine's, stored beside them.
#   python3 scripts/check_peft_adapter.py [tests/fixtures/train/peft] [models/SmolLM2-135M-Instruct.Q4_1.gguf]
# Needs torch, transformers, peft, gguf, safetensors. The fixture is (re)made by
#   WILDLONG_WRITE_FIXTURES=1 cargo test --test integration the_peft_fixtures_hold_the_engines_logits
import os, sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import PeftModel

root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/train/peft"
gguf = sys.argv[2] if len(sys.argv) > 2 else "models/SmolLM2-135M-Instruct.Q4_1.gguf"
torch.set_grad_enabled(False)
worst = 0.0
for name, tol in [("tiny", 1e-4), ("qwen2", 1e-4), ("qwen3", 1e-4), ("smollm2", 2e-3)]:
    want = load_file(os.path.join(root, name, "logits.safetensors"))
    if name == "tiny":
        base = AutoModelForCausalLM.from_pretrained(os.path.join(root, "tiny/base"), torch_dtype=torch.float32)
    elif name.startswith("qwen"):  # the bases of tests/fixtures/arch
        base = AutoModelForCausalLM.from_pretrained(os.path.join(root, "../../arch", name), torch_dtype=torch.float32)
    else:
        d, f = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
        base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    plain = base(want["tokens"].long()[None]).logits[0]
    model = PeftModel.from_pretrained(base, os.path.join(root, name, "adapter")).eval()
    got = model(want["tokens"].long()[None]).logits[0, :, : want["logits"].shape[1]]
    diff = (got - want["logits"]).abs().max().item()
    moved = (plain[:, : want["logits"].shape[1]] - want["logits"]).abs().max().item()
    print(f"{name}: peft vs wildlong max |diff| = {diff:.2e} (tolerance {tol:g}); the adapter moves logits by {moved:.2f}")
    assert moved > 10 * tol, f"{name}: the adapter changes nothing; the check would be empty"
    worst = max(worst, diff / tol)
sys.exit(0 if worst <= 1 else 1)
