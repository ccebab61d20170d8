"""Builds src/stage2/data/corpus.jsonl: the sample corpus of real long documents for stage 2's
demo and tests, each public domain or permissively licensed, with its source and licence.

    python3 scripts/make_stage2_corpus.py

Sources (all read from files a Debian/Ubuntu machine with Python 3.11 and this project's
cargo dependencies has; paths are searched, nothing is downloaded):
- legal texts: licence documents from /usr/share/common-licenses (verbatim copying is
  permitted by each licence's own notice);
- novel: episodes of James Joyce's *Ulysses* (public domain), from llguidance's test data
  (tests/data/ulysses.md in the llguidance crate), first ~30K characters of each;
- technical manual: sections of the Python language reference (pydoc_data.topics, PSF
  License 2.0);
- source code: Python standard-library modules (PSF License 2.0).
Not used: Sherlock Holmes (it is the RULER haystack; decontamination would reject it).
Each document keeps 16K–40K characters (at least 4096 tokens, tested; GPL-2 and MPL-2.0
are just short of that), cut at a paragraph break.
"""
import glob
import hashlib
import inspect
import json
import os
import pathlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "src/stage2/data/corpus.jsonl"
MAX = 40_000
MIN = 16_000


def cut(text, limit=MAX):
    if len(text) <= limit:
        return text.strip()
    at = text.rfind("\n\n", 0, limit)
    return text[: at if at > limit // 2 else limit].strip()


def doc(kind, title, text, source, licence):
    text = cut(text)
    if len(text) < MIN:
        raise SystemExit(f"{title}: only {len(text)} characters")
    h = hashlib.sha256(text.encode()).hexdigest()[:12]
    return {"id": f"{kind.replace(' ', '-')}-{h}", "title": title, "document_type": kind,
            "source": source, "licence": licence, "text": text}


def main():
    docs = []
    for name, title in [("GPL-3", "GNU General Public License v3"),
                        ("LGPL-2.1", "GNU Lesser General Public License v2.1"),
                        ("MPL-1.1", "Mozilla Public License 1.1"),
                        ("GFDL-1.3", "GNU Free Documentation License 1.3")]:
        text = pathlib.Path("/usr/share/common-licenses", name).read_text()
        docs.append(doc("legal contract", title, text, f"/usr/share/common-licenses/{name}",
                        "verbatim copying permitted by the licence text's own notice"))

    uly = glob.glob(os.path.expanduser("~/.cargo/registry/src/*/llguidance-*/tests/data/ulysses.md"))[0]
    parts = pathlib.Path(uly).read_text().split("\n### [ ")[1:]
    for p in parts[:8]:
        num, body = p.split(" ]", 1)
        docs.append(doc("novel", f"Ulysses, episode {num}", body, "James Joyce, Ulysses (1922), via llguidance tests/data/ulysses.md",
                        "public domain"))

    import pydoc_data.topics as topics
    for key in ["specialnames", "compound", "types", "formatstrings", "string-methods", "typesseq", "debugger"]:
        docs.append(doc("technical manual", f"The Python Language Reference: {key}", topics.topics[key],
                        f"Python 3.11 pydoc_data.topics[{key!r}]", "PSF License 2.0"))

    import fractions, heapq, textwrap, uuid, pprint, calendar
    for mod in [fractions, heapq, textwrap, uuid, pprint, calendar]:
        docs.append(doc("source code", f"Python standard library: {mod.__name__}.py", inspect.getsource(mod),
                        f"CPython 3.11 Lib/{mod.__name__}.py", "PSF License 2.0"))

    header = {"_header": {"description": "Sample corpus of real long documents for wildlong stage 2 (demo and tests).",
                          "made_by": "python3 scripts/make_stage2_corpus.py", "documents": len(docs)}}
    with OUT.open("w") as f:
        f.write(json.dumps(header) + "\n")
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"{OUT}: {len(docs)} documents, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
