# Re-quantizes a GGUF with llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize)
# and records llama.cpp's greedy tokens on the result, for the K-quant tests.
#   python llamacpp_quantize.py SRC.gguf OUT_DIR PROMPTS.json NEW_TOKENS TYPE [TYPE ...]
# TYPE: Q4_K_M, Q5_K_M or Q6_K. PROMPTS.json: a list of token-id lists. Writes OUT_DIR/TYPE.gguf
# for each type and prints {"TYPE": {"path": ..., "greedy": [[ids], ...]}} (argmax over the
# last logits, as llamacpp_bench.py decodes; one thread, so the run is deterministic).
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llamacpp_plain  # noqa: F401 (before any Llama is built)
import llama_cpp
import numpy as np
from llama_cpp import Llama

src, out_dir, prompts_path, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
prompts = json.load(open(prompts_path))
FTYPES = {
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
}
result = {}
for name in sys.argv[5:]:
    path = f"{out_dir}/{name}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[name]
    params.nthread = 1
    params.allow_requantize = True  # a source already quantized (the default model's Q4_1)
    rc = llama_cpp.llama_model_quantize(src.encode(), path.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize({name}) returned {rc}")
    llm = Llama(model_path=path, n_ctx=256, n_threads=1, n_threads_batch=1, n_batch=256,
                verbose=False, seed=0)
    greedy = []
    for p in prompts:
        llm.reset()
        llm.eval(p)
        ids = []
        for _ in range(new_tokens):
            # The last position's logits as llama.cpp holds them (llama-cpp-python 0.3.36's
            # `scores` stays zero unless every position's logits are kept).
            last = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            t = int(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)).argmax())
            ids.append(t)
            llm.eval([t])
        greedy.append(ids)
    del llm
    result[name] = {"path": path, "greedy": greedy}
print(json.dumps(result))
