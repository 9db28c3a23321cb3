"""Small valid training files the API tests upload."""

from __future__ import annotations

import json


def chat_jsonl(rows: int) -> bytes:
    """`rows` one-turn conversations in OpenAI chat JSONL."""
    return b"".join(
        json.dumps(
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        ).encode()
        + b"\n"
        for i in range(rows)
    )
