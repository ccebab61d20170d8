"""Writes the Parquet fixtures of tests/integration/stage1.rs (needs pyarrow):

    pip install pyarrow && python3 scripts/make_stage1_fixtures.py

wildchat_tiny.parquet has WildChat-1M's column layout (conversation as a list of structs with
extra per-turn fields, plus columns the reader must ignore); wrong_columns.parquet has none
of them.
"""
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/stage1"


def turn(role, content):
    return {"content": content, "role": role, "language": "English", "toxic": False,
            "redacted": False, "turn_identifier": 1, "country": None, "timestamp": None}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    rows = [
        ("h1", [turn("user", "Summarize the attached lease agreement and list the tenant's obligations."),
                turn("assistant", "Here is a summary.")], "English", False, False),
        ("h2", [turn("user", "Explain what this Python traceback means: KeyError: 'id' in handler.py line 12."),
                turn("assistant", "It means...")], "English", False, False),
        ("h3", [turn("user", "Résume cet article de presse en trois points."),
                turn("assistant", "Voici...")], "French", False, False),
        ("h4", [turn("user", "Write the minutes of this meeting transcript with action items and owners."),
                turn("assistant", "Minutes:"), turn("user", "Add deadlines too."),
                turn("assistant", "Done.")], "English", False, False),
        ("h5", [turn("user", "Rate these customer reviews of our blender from one to five stars."),
                turn("assistant", "Ratings:")], "English", True, False),
    ]
    table = pa.table({
        "conversation_hash": [r[0] for r in rows],
        "model": ["gpt-4-0314"] * len(rows),
        "conversation": [r[1] for r in rows],
        "turn": [sum(t["role"] == "user" for t in r[1]) for r in rows],
        "language": [r[2] for r in rows],
        "openai_moderation": [[{"flagged": r[3]}] for r in rows],
        "toxic": [r[3] for r in rows],
        "redacted": [r[4] for r in rows],
    })
    pq.write_table(table, OUT / "wildchat_tiny.parquet", compression="snappy")
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), OUT / "wrong_columns.parquet")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
