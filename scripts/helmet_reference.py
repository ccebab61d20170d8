# HELMET's own data.py / utils.py on tests/fixtures/helmet: the prompts its loaders build and
# its metrics, recorded as tests/fixtures/helmet/reference.json for tests/integration/helmet.rs.
#   python3 scripts/helmet_reference.py HELMET_CHECKOUT tests/fixtures/helmet > tests/fixtures/helmet/reference.json
# (the many_*.jsonl inputs are written by scripts/helmet_selection_fixtures.py)
# HELMET at 4526dfb (princeton-nlp/HELMET), with datasets and transformers installed (made with
# datasets 5.2.0, transformers 5.25.0); torch, rouge_score and pytrec_eval are stubbed (these code
# paths do not use them).
import sys, types, json
sys.path.insert(0, sys.argv[1])
import datasets, transformers  # before the stubs: they probe for torch
from transformers import AutoTokenizer
for m in ["torch", "torch.utils", "torch.utils.data", "rouge_score", "pytrec_eval"]:
    sys.modules[m] = types.ModuleType(m)
sys.modules["torch.utils.data"].Dataset = object
class _T: pass
sys.modules["torch"].Tensor = _T
sys.modules["torch"].Generator = _T
class _R:
    rouge_types = ["rougeL", "rougeLsum"]
    def score(self, target, prediction):
        z = types.SimpleNamespace(fmeasure=0.0, precision=0.0, recall=0.0)
        return {"rougeL": z, "rougeLsum": z}
sys.modules["rouge_score"].rouge_scorer = types.SimpleNamespace(RougeScorer=lambda *a, **k: _R())
import data as D, utils as U
for m in ["torch", "torch.utils", "torch.utils.data"]:
    del sys.modules[m]
fx = sys.argv[2]
out = {}
kv = D.load_json_kv(fx + "/json_kv.jsonl", shots=2)
out["json_kv"] = kv["prompt_template"].format(**kv["data"][0])
ru = D.load_ruler("ruler_niah_mk_2", fx + "/ruler_niah_mk_2.jsonl")
out["ruler_niah_mk_2"] = ru["prompt_template"].format(**ru["data"][0])
qa = D.load_qa("kilt_nq", fx + "/kilt_nq.jsonl", fx + "/kilt_nq_demos.jsonl", shots=0)
out["kilt_nq_0shot"] = qa["prompt_template"].format(**qa["data"][0])
pop = D.load_qa("kilt_popqa_3", fx + "/kilt_popqa.jsonl", fx + "/kilt_popqa.jsonl", popularity_threshold=3.0, shots=0)
out["popqa_questions"] = [x["question"] for x in pop["data"]]
cases = [("Answer: The Velmora.\nmore", ["Velmora"]), ("I think it is the city of velmora", ["the city of Velmora"]),
         ("Corresponding value: 3d5f1a6b-dd44", ["3d5f1a6b-dd44-4e5f-8a6b-333333333333"]), ("nothing", ["x"])]
out["metrics"] = [U.calculate_metrics(p, a)["substring_exact_match"] for p, a in cases]
out["parse"] = [U.parse_output(p) for p, _ in cases] + [U.parse_output("Corresponding value: 3d5f", "corresponding value:")]
out["normalize"] = [U.normalize_answer(s) for s in ["The  Eiffel-Tower!", "an apple, a day", "Thé café"]]
# Which items max_test_samples keeps and which demonstrations each question gets, on the
# many_*.jsonl files (scripts/helmet_selection_fixtures.py): random.seed(42) first, as eval.py's
# run_test does before load_data; every selected item's prompt, in HELMET's order.
import random
def prompts(d):
    return [d["prompt_template"].format(**x) for x in d["data"]]
sel = {}
random.seed(42)
sel["kilt_nq"] = prompts(D.load_qa("kilt_nq", fx + "/many_kilt_nq.jsonl", fx + "/many_kilt_nq_demos.jsonl", max_test_samples=6, shots=2))
random.seed(42)
sel["kilt_popqa_3"] = prompts(D.load_qa("kilt_popqa_3", fx + "/many_kilt_popqa.jsonl", fx + "/many_kilt_popqa.jsonl", max_test_samples=4, popularity_threshold=3.0, shots=2))
random.seed(42)
sel["json_kv"] = prompts(D.load_json_kv(fx + "/many_json_kv.jsonl", shots=1, max_test_samples=5))
random.seed(42)
sel["ruler_niah_mk_2"] = prompts(D.load_ruler("ruler_niah_mk_2", fx + "/many_ruler_niah_mk_2.jsonl", max_test_samples=4))
out["selection"] = sel
json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
