"""One JSON value a line (results files, ``--json`` event streams), safe for any line reader."""

from __future__ import annotations

import json
from typing import Any

# line ends json.dumps leaves raw inside strings; str.splitlines and JavaScript split on them and would tear a line
_LINE_ENDS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(value: Any) -> str:
    """``value`` as JSON on one line (no trailing newline), non-ASCII text kept readable."""
    return json.dumps(value, ensure_ascii=False).translate(_LINE_ENDS)
