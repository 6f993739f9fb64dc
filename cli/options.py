"""Options several commands share (``anyverse run/chat/...`` and ``anyverse batch ...``), declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anyverse.types import Modality

Profile = Annotated[str | None, typer.Option(
    "--profile", "-p", help="profile name (tiny, toyworld, default) or a YAML config file [default: tiny]")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="config override, e.g. output.mode=signal")]
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps")]
Dtype = Annotated[str | None, typer.Option(help="auto, fp32, fp16 or bf16")]
Mode = Annotated[str | None, typer.Option("--mode", help="how the LLM asks for media: meta or signal")]
Seed = Annotated[int | None, typer.Option(help="seed for sampling and generation")]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object instead of text")]
Generator = Annotated[str | None, typer.Option(
    "--generator", "-g", help="a configured generator, a plugin, or a capability (generate, edit, speech)")]
GeneratorOptions = Annotated[list[str] | None, typer.Option(
    "--option", help="generator option key=value (repeatable), validated by the plugin, e.g. strength=0.8")]


def config_overrides(overrides: list[str] | None, device: str | None, dtype: str | None,
                     mode: str | None) -> list[str]:
    """``--set`` values plus the config keys the shortcut options stand for."""
    extra = [f"runtime.device={device}"] * bool(device) + [f"runtime.dtype={dtype}"] * bool(dtype)
    return [*(overrides or []), *extra, *([f"output.mode={mode}"] if mode else [])]


def parse_options(pairs: list[str] | None) -> dict[str, object]:
    """``--option key=value`` pairs, each value read as YAML (numbers, booleans, strings)."""
    import yaml

    options: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {pair!r}: expected key=value")
        options[key.strip()] = yaml.safe_load(raw)
    return options


def attachment(spec: str) -> tuple[Path, Modality | None]:
    """``PATH``, or ``depth:PATH`` / ``thermal:PATH`` for those image kinds (``--attach``, ``/attach``)."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in (Modality.DEPTH.value, Modality.THERMAL.value):
        return Path(rest).expanduser(), Modality(kind)
    return Path(spec).expanduser(), None
