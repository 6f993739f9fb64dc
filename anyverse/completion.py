"""The shortest text that turns a prefix of compact JSON into a value valid under a JSON schema.

Decoding uses it to close a media request when the token budget runs out. It reads the layout xgrammar writes
with ``any_whitespace=False`` (``{"a": 1, "b": [2, 3]}``), properties in schema order, and the schema subset
pydantic emits (``$ref``, ``anyOf``, ``enum``/``const``, object, array, string, integer, number, boolean, null).
The prefix is text with one character per byte (latin-1), so an unfinished UTF-8 character can be finished too.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

_NUMBER = re.compile(r"-?[0-9]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?")
_INTEGER_FORM = re.compile(r"-?(?:0|[1-9][0-9]*)")
_NUMBER_FORM = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


class Incomplete(Exception):
    """The prefix is not the start of a valid value (or uses a schema feature this module does not read)."""


def shortest_completion(prefix: str, schema: dict[str, Any]) -> str:
    """Text to append to ``prefix`` so that it is a complete value valid under ``schema``."""
    reader = _Reader(prefix, schema)
    rest = reader.value(schema)
    if rest is None and reader.pos != len(prefix):
        raise Incomplete(f"text after the value at byte {reader.pos}")
    return rest or ""


class _Reader:
    """Recursive descent over the prefix: each method consumes one value and returns None when the value ended
    inside the prefix, or the shortest completion of that value when the prefix ended inside it."""

    def __init__(self, text: str, root: dict[str, Any]):
        self.text, self.pos, self.root = text, 0, root

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            node: Any = self.root
            for part in schema["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            schema = node
        return schema

    def _literal(self, options: list[str]) -> str | None:
        """Consume one of ``options`` (exact texts); the shortest option the prefix may still become otherwise."""
        rest = self.text[self.pos :]
        for option in options:
            if rest.startswith(option):
                self.pos += len(option)
                return None
        started = [o[len(rest) :] for o in options if o.startswith(rest)]
        if not started:
            raise Incomplete(f"expected one of {options} at byte {self.pos}")
        self.pos = len(self.text)
        return min(started, key=len)

    def value(self, schema: dict[str, Any]) -> str | None:
        schema = self._resolve(schema)
        if self.pos == len(self.text):
            return self.minimal(schema)
        if "anyOf" in schema:
            return self._any_of(schema["anyOf"])
        if "enum" in schema or "const" in schema:
            values = schema.get("enum", [schema.get("const")])
            return self._literal([json.dumps(v, ensure_ascii=False) for v in values])
        kind = schema.get("type")
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            return self._array(schema)
        if kind == "string":
            return self._string(schema)
        if kind in ("integer", "number"):
            return self._number(schema)
        if kind == "boolean":
            return self._literal(["true", "false"])
        if kind == "null":
            return self._literal(["null"])
        raise Incomplete(f"unsupported schema {schema}")

    def _any_of(self, branches: list[dict[str, Any]]) -> str | None:
        start, endings = self.pos, []
        for branch in branches:
            self.pos = start
            try:
                rest = self.value(branch)
            except Incomplete:
                continue
            if rest is None:
                return None
            endings.append(rest)
        if not endings:
            raise Incomplete(f"no alternative matches at byte {start}")
        self.pos = len(self.text)
        return min(endings, key=len)

    def _object(self, schema: dict[str, Any]) -> str | None:
        names = list(schema.get("properties", {}))
        required = set(schema.get("required", ()))
        self._literal(["{"])  # value() handled an empty rest, so this consumes "{" or raises
        first = True
        while True:
            if self.pos == len(self.text):
                return self._members(schema, names, required, first)
            if not required.intersection(names) and self.text[self.pos] == "}":
                self.pos += 1
                return None
            if not first and (rest := self._literal([", "])) is not None:
                return rest + self._one_member(schema, names, required)
            if (rest := self._literal(['"'])) is not None:
                return rest + self._one_member(schema, names, required)[1:]
            key_start = self.pos - 1
            end = self.text.find('"', self.pos)
            allowed = self._next_names(names, required)
            if end < 0:
                typed = self.text[key_start:]
                endings = [self._member(schema, names, required, n)[len(typed):] for n in allowed
                           if json.dumps(n).startswith(typed)]
                if not endings:
                    raise Incomplete(f"no property starts {typed!r}")
                self.pos = len(self.text)
                return min(endings, key=len)
            name = json.loads(self.text[key_start : end + 1])
            if name not in allowed:
                raise Incomplete(f"property {name!r} not allowed here")
            self.pos = end + 1
            names = names[names.index(name) + 1 :]
            required.discard(name)
            if (rest := self._literal([": "])) is not None:
                return rest + self.minimal(schema["properties"][name]) + self._members(schema, names, required, False)
            if (rest := self.value(schema["properties"][name])) is not None:
                return rest + self._members(schema, names, required, False)
            first = False

    def _next_names(self, names: list[str], required: set[str]) -> list[str]:
        """Properties that may come next, in schema order: up to and including the first required one."""
        allowed = []
        for name in names:
            allowed.append(name)
            if name in required:
                break
        return allowed

    def _member(self, schema: dict[str, Any], names: list[str], required: set[str], name: str) -> str:
        """``"name": <shortest value>`` and the shortest close of the object after it."""
        after = names[names.index(name) + 1 :]
        return (json.dumps(name) + ": " + self.minimal(schema["properties"][name])
                + self._members(schema, after, required - {name}, False))

    def _one_member(self, schema: dict[str, Any], names: list[str], required: set[str]) -> str:
        endings = [self._member(schema, names, required, n) for n in self._next_names(names, required)]
        if not endings:
            raise Incomplete("no property may follow")
        return min(endings, key=len)

    def _members(self, schema: dict[str, Any], names: list[str], required: set[str], first: bool) -> str:
        """The required properties still missing, then ``}``."""
        parts = [json.dumps(n) + ": " + self.minimal(schema["properties"][n]) for n in names if n in required]
        return ("" if first or not parts else ", ") + ", ".join(parts) + "}"

    def _array(self, schema: dict[str, Any]) -> str | None:
        items, low = schema.get("items", {}), schema.get("minItems", 0)
        self._literal(["["])
        count = 0
        while True:
            if self.pos == len(self.text):
                return self._items_rest(items, low, count)
            if count >= low and self.text[self.pos] == "]":
                self.pos += 1
                return None
            if count and (rest := self._literal([", "])) is not None:
                return rest + self._items_rest(items, max(low, count + 1), count)[2:]
            if (rest := self.value(items)) is not None:
                return rest + self._items_rest(items, low, count + 1)
            count += 1

    def _items_rest(self, items: dict[str, Any], low: int, count: int) -> str:
        missing = [self.minimal(items)] * max(0, low - count)
        return ("" if count == 0 or not missing else ", ") + ", ".join(missing) + "]"

    def _string(self, schema: dict[str, Any]) -> str | None:
        self._literal(['"'])
        chars = 0
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == '"':
                self.pos += 1
                return None
            if char == "\\":
                escape = self.text[self.pos + 1 : self.pos + 6]
                if not escape or (escape[0] == "u" and len(escape) < 5):
                    self.pos = len(self.text)
                    return ("n" if not escape else "0" * (5 - len(escape))) + self._string_end(schema, chars + 1)
                self.pos += 6 if escape[0] == "u" else 2
            else:
                width = _utf8_width(char)
                if self.pos + width > len(self.text):
                    tail = self.text[self.pos :]
                    self.pos = len(self.text)
                    return _finish_utf8(tail, width) + self._string_end(schema, chars + 1)
                self.pos += width
            chars += 1
        return self._string_end(schema, chars)

    def _string_end(self, schema: dict[str, Any], chars: int) -> str:
        return "x" * max(0, schema.get("minLength", 0) - chars) + '"'

    def _number(self, schema: dict[str, Any]) -> str | None:
        match = _NUMBER.match(self.text, self.pos)
        typed = match.group(0) if match else ""
        self.pos += len(typed)
        if self.pos < len(self.text):
            if not _number_ok(typed, schema):
                raise Incomplete(f"invalid number {typed!r}")
            return None
        return _number_tail(typed, schema)

    def minimal(self, schema: dict[str, Any]) -> str:
        """The shortest text of a whole value valid under ``schema``."""
        schema = self._resolve(schema)
        if "anyOf" in schema:
            return min((self.minimal(b) for b in schema["anyOf"]), key=len)
        if "enum" in schema or "const" in schema:
            return min((json.dumps(v, ensure_ascii=False) for v in schema.get("enum", [schema.get("const")])), key=len)
        kind = schema.get("type")
        if kind == "object":
            names, required = list(schema.get("properties", {})), set(schema.get("required", ()))
            return "{" + self._members(schema, names, required, True)
        if kind == "array":
            return "[" + self._items_rest(schema.get("items", {}), schema.get("minItems", 0), 0)
        if kind == "string":
            return '"' + self._string_end(schema, 0)
        if kind in ("integer", "number"):
            return _number_tail("", schema)
        if kind in ("boolean", "null"):
            return "true" if kind == "boolean" else "null"
        raise Incomplete(f"unsupported schema {schema}")


def _number_tail(typed: str, schema: dict[str, Any]) -> str:
    """The fewest characters that make ``typed`` a number within the schema's bounds (up to 4 are tried)."""
    for size in range(5):
        for tail in itertools.product("0123456789.", repeat=size):
            if _number_ok(typed + "".join(tail), schema):
                return "".join(tail)
    raise Incomplete(f"no short completion of the number {typed!r}")


def _number_ok(text: str, schema: dict[str, Any]) -> bool:
    form = _INTEGER_FORM if schema.get("type") == "integer" else _NUMBER_FORM
    if not form.fullmatch(text):
        return False
    value = float(text)
    return (value >= schema.get("minimum", float("-inf")) and value <= schema.get("maximum", float("inf"))
            and value > schema.get("exclusiveMinimum", float("-inf"))
            and value < schema.get("exclusiveMaximum", float("inf")))


def _utf8_width(char: str) -> int:
    lead = ord(char)
    return 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


def _finish_utf8(tail: str, width: int) -> str:
    """Continuation bytes that complete an unfinished UTF-8 character (the lead byte limits the first one)."""
    first = {"\xe0": "\xa0", "\xed": "\x80", "\xf0": "\x90", "\xf4": "\x80"}.get(tail[0], "\x80")
    missing = width - len(tail)
    return (first if len(tail) == 1 else "\x80") + "\x80" * (missing - 1)
