"""JSON lines stay one line for every reader, whatever text the model wrote."""

from __future__ import annotations

import json

from anyverse.jsonl import json_line


def test_unicode_line_ends_in_text_are_escaped_and_the_value_round_trips() -> None:
    value = {"text": "a\x85b\u2028c\u2029d\ne é ✓", "n": 1}
    line = json_line(value)
    assert line.splitlines() == [line] and "\n" not in line
    assert "é ✓" in line  # other non-ASCII stays readable
    assert json.loads(line) == value
