"""Command-line options shared by several commands (and sub-apps), declared once."""

from __future__ import annotations

from typing import Annotated

import typer

Profile = Annotated[str | None, typer.Option(
    "--profile", "-p", help="profile name (tiny, toyworld, default) or a YAML config file [default: tiny]")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="config override, e.g. output.mode=signal")]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object instead of text")]
Generator = Annotated[str | None, typer.Option(
    "--generator", "-g", help="a configured generator, a plugin, or a capability (generate, edit, speech)")]
GeneratorOptions = Annotated[list[str] | None, typer.Option(
    "--option", help="generator option key=value (repeatable), validated by the plugin, e.g. strength=0.8")]


def parse_options(pairs: list[str] | None) -> dict[str, object]:
    """``key=value`` pairs, each value read as YAML (numbers, booleans, strings)."""
    import yaml

    options: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {pair!r}: expected key=value")
        options[key.strip()] = yaml.safe_load(raw)
    return options
