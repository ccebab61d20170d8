# Writes the HELMET selection fixtures (tests/fixtures/helmet/many_*.jsonl): small files in
# HELMET's formats with enough rows for max_test_samples and the demonstrations to be drawn
# (invented facts; duplicate questions and integer ids included, as HELMET's files have them).
#   python3 scripts/helmet_selection_fixtures.py tests/fixtures/helmet
import json, sys

out = sys.argv[1]
PLACES = ["Velmora", "Tane", "Korri", "Orlin", "Sarn", "Belvue", "Quill", "Dunmere", "Ashtor",
          "Pellin", "Varrow", "Ostrel", "Misk", "Yendle"]

def write(name, rows):
    with open(f"{out}/{name}", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

def ctx(p):
    return [{"title": p, "text": f"{p} is a town on the river {p[::-1].title()}.", "score": 1.0, "has_answer": False}]

# kilt_nq: no ids (HELMET keys by question); rows 4 and 11 ask the same question.
nq = [{"question": f"which river runs through {p}", "answers": [p[::-1].title()], "ctxs": ctx(p)} for p in PLACES]
nq[11] = dict(nq[4], answers=["another answer"])
write("many_kilt_nq.jsonl", nq)
# Its demonstrations: rows 2 and 6 ask the same question.
demos = [{"id": f"d-{i}", "question": f"what is the river of {p}", "answers": [p[::-1].title()], "ctxs": ctx(p)}
         for i, p in enumerate(PLACES[:9])]
demos[6] = dict(demos[2], id="d-6")
write("many_kilt_nq_demos.jsonl", demos)
# kilt_popqa: integer ids (sorted as integers), popularity on both sides of 10^3.
pops = [50, 5000, 120, 999, 20000, 7, 300, 1500, 640, 80, 2, 999999]
write("many_kilt_popqa.jsonl", [
    {"id": i * 7 + 3, "question": f"who founded {p}", "answers": [f"{p} Castell"], "ctxs": ctx(p), "s_pop": s}
    for i, (p, s) in enumerate(zip(PLACES, pops))])
# json_kv: 12 items of one key-value pair each.
write("many_json_kv.jsonl", [
    {"context": "JSON data:\n" + json.dumps({f"key-{i:02d}": f"value-{i:02d}"}), "question": f"key-{i:02d}",
     "answer": f"value-{i:02d}", "num_kvs": 1, "demos": [["demo-key", "demo-value"]]} for i in range(12)])
# A RULER file: 11 one-needle haystacks.
write("many_ruler_niah_mk_2.jsonl", [
    {"context": f"The grass is green.\nOne of the special magic numbers for {p.lower()} is: {1000 + i}.\nThe sky is blue.",
     "query": p.lower(), "type_needle_v": "number", "outputs": [str(1000 + i)]} for i, p in enumerate(PLACES[:11])])
