"""The ``anyverse`` command: thin typed commands over the Python API; heavy imports happen inside commands."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from anyverse.cli.batch import batch_app
from anyverse.cli.data import data_app
from anyverse.cli.errors import fail_cleanly
from anyverse.cli.eval import eval_app
from anyverse.cli.options import Device, Dtype, Mode, Overrides, Profile, Seed
from anyverse.cli.options import config_overrides as _overrides
from anyverse.cli.train import train_app

app = typer.Typer(help="Any-to-any multimodal assistant: chat in text, image, audio and video.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
debug_app = typer.Typer(help="Inspect the parser and the assembled prompt.", no_args_is_help=True)
convert_app = typer.Typer(help="Convert official checkpoints to safetensors.", no_args_is_help=True)
app.add_typer(debug_app, name="debug")
app.add_typer(convert_app, name="convert")
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(train_app, name="train")
app.add_typer(batch_app, name="batch")

Attach = Annotated[list[str] | None, typer.Option(
    "--attach", "-a", help="media file (repeatable); prefix depth: or thermal: for those image kinds")]
Out = Annotated[Path, typer.Option("--out", "-o", help="directory for media and turns.jsonl")]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object instead of text")]
Require = Annotated[list[str] | None, typer.Option(help="the reply must make this modality (repeatable)")]
Checkpoint = Annotated[Path | None, typer.Option(
    help="trained checkpoint (or run directory: its newest) to use instead of --profile")]


def _session(profile: str, overrides: list[str], out: Path, checkpoint: Path | None = None):
    from anyverse.session import Anyverse

    if checkpoint is not None:
        return Anyverse.from_checkpoint(checkpoint, overrides, output_dir=out)
    return Anyverse.from_profile(profile, overrides, output_dir=out)


def _attachments(session, specs: list[str] | None) -> list:  # type: ignore[no-untyped-def]
    """``PATH`` or ``depth:PATH`` / ``thermal:PATH``, validated before the turn starts."""
    from anyverse.types import Modality

    loaded = []
    for spec in specs or []:
        kind, sep, path = spec.partition(":")
        if sep and kind in (Modality.DEPTH.value, Modality.THERMAL.value):
            loaded.append(session.load(path, Modality(kind)))
        else:
            loaded.append(session.load(spec))
    return loaded


def _modality(name: str):
    from anyverse.types import OUTPUT_MODALITIES, Modality

    if name not in {m.value for m in OUTPUT_MODALITIES}:
        raise ValueError(f"--require {name}: choose image, video or audio")
    return Modality(name)


def _required(names: list[str] | None) -> set:
    return {_modality(n) for n in names or []}


def _print_events(events, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    from anyverse.types import MediaProduced, Notice, TextDelta

    for event in events:
        if as_json:
            continue
        if isinstance(event, TextDelta):
            typer.echo(event.text, nl=False)
        elif isinstance(event, MediaProduced):
            typer.echo(f"\n[{event.media.id}] {event.media.modality.value}: {event.media.path}")
        elif isinstance(event, Notice):
            typer.echo(f"\n[note] {event.message}", err=True)
    if not as_json:
        typer.echo("")


@app.command()
@fail_cleanly
def run(
    prompt: Annotated[str, typer.Argument(help="what to say")],
    attach: Attach = None,
    profile: Profile = "tiny",
    overrides: Overrides = None,
    out: Out = Path("anyverse-out"),
    as_json: Json = False,
    require: Require = None,
    seed: Seed = None,
    device: Device = None,
    dtype: Dtype = None,
    mode: Mode = None,
    checkpoint: Checkpoint = None,
) -> None:
    """One turn: text and media in, text and media out (media and turns.jsonl go to --out)."""
    session = _session(profile, _overrides(overrides, device, dtype, mode), out, checkpoint)
    media = _attachments(session, attach)
    if as_json:
        result = session.turn(prompt, media, require=_required(require), seed=seed)
        typer.echo(result.model_dump_json())
        return
    _print_events(session.stream(prompt, media, require=_required(require), seed=seed), False)


@app.command()
@fail_cleanly
def chat(
    profile: Profile = "tiny",
    overrides: Overrides = None,
    out: Out = Path("anyverse-out"),
    seed: Seed = None,
    device: Device = None,
    dtype: Dtype = None,
    mode: Mode = None,
    checkpoint: Checkpoint = None,
) -> None:
    """Interactive chat. Lines are messages; '/attach PATH' adds media to the next one; '/quit' ends."""
    from anyverse.media import MediaError

    session = _session(profile, _overrides(overrides, device, dtype, mode), out, checkpoint)
    pending: list[str] = []
    for line in sys.stdin:
        text = line.strip()
        if text == "/quit":
            break
        if text.startswith("/attach "):
            pending.append(text.removeprefix("/attach ").strip())
            continue
        if not text:
            continue
        try:
            _print_events(session.stream(text, _attachments(session, pending), seed=seed), False)
        except (MediaError, ValueError) as err:
            typer.echo(f"anyverse: error: {err}", err=True)
        pending = []


@app.command()
@fail_cleanly
def generate(
    modality: Annotated[str, typer.Argument(help="image, video or audio")],
    prompt: Annotated[str, typer.Argument(help="what to generate")],
    profile: Profile = "tiny",
    overrides: Overrides = None,
    out: Out = Path("anyverse-out"),
    seed: Seed = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps")] = None,
    as_json: Json = False,
    device: Device = None,
    dtype: Dtype = None,
) -> None:
    """Generate media directly with a generator plugin, without the LLM. Writes PNG, MP4 (H.264) or WAV."""
    from anyverse.config import load_config
    from anyverse.devices import resolve_device, resolve_dtype
    from anyverse.plugins import GeneratorPool
    from anyverse.session import save_generated
    from anyverse.types import GenerationOptions, MediaRequest

    config = load_config(profile, _overrides(overrides, device, dtype, None))
    target = _modality(modality)
    torch_device = resolve_device(config.runtime.device)
    pool = GeneratorPool(config.generators, torch_device, resolve_dtype(config.runtime.dtype, torch_device),
                         config.runtime.generator_memory_gb)
    request = MediaRequest(modality=target, prompt=prompt, options=GenerationOptions(seed=seed, steps=steps))
    media = save_generated(pool.get(target).generate(request), out)
    typer.echo(media.model_dump_json() if as_json else str(media.path))


@debug_app.command("parse")
@fail_cleanly
def debug_parse(
    mode: Annotated[str, typer.Option(help="meta or signal")] = "meta",
    profile: Profile = "tiny",
    overrides: Overrides = None,
    chunk: Annotated[int, typer.Option(help="characters fed per step, to see streaming behaviour")] = 16,
) -> None:
    """Read raw model output on stdin; print the parser's events as JSON lines."""
    from anyverse.config import load_config
    from anyverse.signals import SignalVocabulary, StreamParser

    if mode not in ("meta", "signal"):
        raise ValueError(f"--mode {mode}: choose meta or signal")
    config = load_config(profile, overrides)
    parser_mode: Literal["meta", "signal"] = "meta" if mode == "meta" else "signal"
    parser = StreamParser(SignalVocabulary(config.output.signal_tokens), parser_mode, config.output.max_prompt_chars)
    raw = sys.stdin.read()
    events = [e for i in range(0, len(raw), chunk) for e in parser.feed(raw[i : i + chunk])] + parser.close()
    for event in events:
        typer.echo(event.model_dump_json())


@debug_app.command("prompt")
@fail_cleanly
def debug_prompt(
    text: Annotated[str, typer.Argument(help="the user message")],
    attach: Attach = None,
    profile: Profile = "tiny",
    overrides: Overrides = None,
    as_json: Json = False,
    device: Device = None,
    dtype: Dtype = None,
    mode: Mode = None,
) -> None:
    """Show the assembled context: tokens, and where each media item's soft tokens go."""
    session = _session(profile, _overrides(overrides, device, dtype, mode), Path("anyverse-out"))
    context = session.context([session.user_message(text, _attachments(session, attach))])
    tokenizer = session.model.llm.tokenizer
    report = {
        "text": context.text,
        "ids": context.ids,
        "tokens": tokenizer.convert_ids_to_tokens(context.ids),
        "media": [{"id": m.id, "modality": m.modality.value, "sha256": m.sha256, "start": start, "length": k}
                  for m, start, k in context.slots],
    }
    typer.echo(json.dumps(report) if as_json else context.text)


@convert_app.command("imagebind")
@fail_cleanly
def convert_imagebind(
    src: Annotated[Path, typer.Argument(help="official imagebind_huge.pth")],
    dst: Annotated[Path, typer.Argument(help="output directory (config.json + model.safetensors)")],
) -> None:
    """Convert the official ImageBind .pth (loaded with weights_only=True) to safetensors."""
    from anyverse.encoders.imagebind import convert_checkpoint

    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint file")
    typer.echo(str(convert_checkpoint(src, dst)))



def main() -> None:
    # Quiet by default: the CLI owns the terminal (progress bars and library chatter go unless asked for).
    for key, value in {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "DIFFUSERS_VERBOSITY": "error"}.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # `python -m anyverse.cli.app`, as `accelerate launch -m` runs it
    main()
