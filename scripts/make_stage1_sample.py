"""Builds src/stage1/data/wildchat_sample.jsonl: illustrative user queries in WildChat's
row shape, written for this project (not from WildChat). The demo and tests use it.

    python3 scripts/make_stage1_sample.py

Besides the queries that pass the default filter (>= 300 over >= 12 document types), it
adds rows each filter must drop: multi-turn, non-English, toxic, redacted, too short,
exact and near duplicates.
"""
import hashlib
import json
import pathlib
import random

from stage1_queries_a import QUERIES as A
from stage1_queries_b import QUERIES as B

OUT = pathlib.Path(__file__).resolve().parent.parent / "src/stage1/data/wildchat_sample.jsonl"

REPLY = "Sure, here is what I found."


def row(text, n, language="English", toxic=False, redacted=False, turns=None):
    conv = turns or [
        {"role": "user", "content": text},
        {"role": "assistant", "content": REPLY},
    ]
    h = hashlib.md5(f"{n}:{text}".encode()).hexdigest()
    return {
        "conversation_hash": h,
        "model": "illustrative",
        "turn": sum(1 for t in conv if t["role"] == "user"),
        "language": language,
        "toxic": toxic,
        "redacted": redacted,
        "conversation": conv,
    }


def main():
    queries = {**A, **B}
    rows = []
    n = 0
    for kind, qs in queries.items():
        for q in qs:
            rows.append(row(q, n))
            n += 1
    kept = len(rows)
    rng = random.Random(5)
    rng.shuffle(rows)
    extra = [
        row("", n + 1, turns=[
            {"role": "user", "content": "Summarize this contract for me please, the parties are Acme and Beta."},
            {"role": "assistant", "content": REPLY},
            {"role": "user", "content": "Now list the payment terms."},
            {"role": "assistant", "content": REPLY}]),
        row("", n + 2, turns=[
            {"role": "user", "content": "Explain this stack trace from my Flask app, it fails on startup."},
            {"role": "assistant", "content": REPLY},
            {"role": "user", "content": "Thanks, and how do I fix the import?"},
            {"role": "assistant", "content": REPLY}]),
        row("Resume este artículo de noticias en tres puntos, por favor.", n + 3, language="Spanish"),
        row("Fasse diesen Vertrag in einfachen Worten zusammen.", n + 4, language="German"),
        row("Résume ce rapport financier pour mon équipe en cinq points.", n + 5, language="French"),
        row("Write an insulting review of my neighbour's restaurant with made-up claims.", n + 6, toxic=True),
        row("Summarize this medical record for patient NAME_1, born DATE_1, living at ADDRESS_1.", n + 7, redacted=True),
        row("hi", n + 8),
        row("thanks!!", n + 9),
        # Exact duplicates (case and spacing differ only) of kept queries.
        row(rows[0]["conversation"][0]["content"].upper(), n + 10),
        row("  " + rows[1]["conversation"][0]["content"].replace(" ", "  "), n + 11),
        # Near duplicates: a word added to the longest query and to a short one.
        row(max((r["conversation"][0]["content"] for r in rows), key=len) + " Thanks!", n + 12),
        row("Summarize the key financial results from this quarterly report: revenue, operating margin, net income and guidance please.", n + 13),
    ]
    for e in extra:
        rows.insert(rng.randrange(len(rows) + 1), e)
    header = {"_header": {
        "description": "ILLUSTRATIVE DATA: user queries written for the wildlong project in WildChat's row shape; not real WildChat conversations.",
        "licence": "Apache-2.0 (same as wildlong)",
        "made_by": "python3 scripts/make_stage1_sample.py",
        "queries_passing_default_filter": kept,
        "document_types": sorted(queries),
    }}
    with OUT.open("w") as f:
        f.write(json.dumps(header, ensure_ascii=False) + "\n")
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(rows)} rows, {kept} meant to pass, {len(queries)} document types")


if __name__ == "__main__":
    main()
