"""The ``anyverse`` command: thin typed commands over the Python API; heavy imports happen inside commands."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from anyverse.cli.batch import batch_app
from anyverse.cli.data import data_app
from anyverse.cli.errors import fail_cleanly
from anyverse.cli.eval import eval_app
from anyverse.cli.generators import generators_app
from anyverse.cli.logs import logs_app
from anyverse.cli.options import (
    Device,
    Dtype,
    Generator,
    GeneratorOptions,
    Json,
    Mode,
    Overrides,
    Profile,
    Seed,
    attachment,
    parse_options,
)
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
app.add_typer(logs_app, name="logs")
app.add_typer(generators_app, name="generators")
app.add_typer(batch_app, name="batch")

Attach = Annotated[list[str] | None, typer.Option(
    "--attach", "-a", help="media file (repeatable); prefix depth: or thermal: for those image kinds")]
Out = Annotated[Path, typer.Option("--out", "-o", help="directory for media and turns.jsonl")]
Require = Annotated[list[str] | None, typer.Option(help="the reply must make this modality (repeatable)")]
Continue = Annotated[bool, typer.Option("--continue", "-c", help="continue the latest logged conversation")]
Cid = Annotated[str | None, typer.Option("--cid", help="continue the logged conversation with this id")]
NoLog = Annotated[bool, typer.Option("--no-log", help="keep nothing on disk: no conversation log, no input history")]
Checkpoint = Annotated[Path | None, typer.Option(
    help="trained checkpoint (or run directory: its newest) to use instead of --profile")]


def _session(profile: str, overrides: list[str], out: Path, checkpoint: Path | None = None):
    from anyverse.session import Anyverse

    if checkpoint is not None:
        return Anyverse.from_checkpoint(checkpoint, overrides, output_dir=out)
    return Anyverse.from_profile(profile, overrides, output_dir=out)


@dataclass
class Conversation:
    """A session plus the log that keeps it: a continued one (``-c``/``--cid``) or a new one, started lazily."""

    session: Any
    log: Any
    cid: str | None
    notices: list[str]
    start: Callable[[], str]


def _conversation(profile: str | None, overrides: list[str], out: Path | None, checkpoint: Path | None,
                  resume: bool, cid: str | None, no_log: bool) -> Conversation:
    """Open the log, pick the conversation to continue (its profile, checkpoint and overrides unless given
    again), load the session and restore the history, re-validating its media."""
    from anyverse.config import anyverse_home
    from anyverse.logs import ConversationLog, check_compatible

    log = None if no_log else ConversationLog(anyverse_home() / "logs.db")
    logged = None
    if resume or cid:
        if log is None:
            raise ValueError("-c/--cid continue a logged conversation; drop --no-log")
        logged = log.get(cid) if cid else log.latest()
        profile = profile or logged.profile
        checkpoint = checkpoint or (Path(logged.checkpoint) if logged.checkpoint else None)
        overrides = overrides or logged.overrides
    profile = profile or "tiny"
    session = _session(profile, overrides, out or anyverse_home() / "media", checkpoint)
    _ = session.model  # a conversation needs the model: missing or mismatched weights fail here, before any turn
    notices: list[str] = []
    if logged is not None and log is not None:
        check_compatible(logged, session.model.base_fingerprint())
        notices = session.restore(log.history(logged.id))

    def start() -> str:
        assert log is not None, "a chat without a log never starts one"
        return log.create(profile, str(checkpoint) if checkpoint else None, overrides,
                          session.config.model_dump(mode="json"), session.config.fingerprint(),
                          session.model.base_fingerprint())

    return Conversation(session, log, logged.id if logged else None, notices, start)


def _attachments(session, specs: list[str] | None) -> list:  # type: ignore[no-untyped-def]
    """Each ``--attach`` spec validated before the turn starts."""
    return [session.load(*attachment(spec)) for spec in specs or []]


def _modality(name: str):
    from anyverse.types import OUTPUT_MODALITIES, Modality

    if name not in {m.value for m in OUTPUT_MODALITIES}:
        raise ValueError(f"--require {name}: choose image, video or audio")
    return Modality(name)


def _required(names: list[str] | None) -> set:
    return {_modality(n) for n in names or []}


@app.command()
@fail_cleanly
def run(
    prompt: Annotated[str, typer.Argument(help="what to say")],
    attach: Attach = None,
    profile: Profile = None,
    overrides: Overrides = None,
    out: Out = Path("anyverse-out"),
    as_json: Json = False,
    require: Require = None,
    seed: Seed = None,
    device: Device = None,
    dtype: Dtype = None,
    mode: Mode = None,
    checkpoint: Checkpoint = None,
    resume: Continue = False,
    cid: Cid = None,
    no_log: NoLog = False,
    generator: Generator = None,
) -> None:
    """One turn: text and media in, text and media out (media and turns.jsonl go to --out); logged, and with -c
    it continues the latest conversation."""
    from anyverse.cli.chat import PlainIO, ResultIO, Settings, chat_for

    chat = chat_for(_conversation(profile, _overrides(overrides, device, dtype, mode), out, checkpoint, resume, cid,
                                  no_log), ResultIO() if as_json else PlainIO(),
                   Settings(seed, {}, _required(require), generator))
    for spec in attach or []:
        chat.stage(spec)
    chat.send(prompt, chat.staged)


@app.command()
@fail_cleanly
def chat(
    attach: Attach = None,
    profile: Profile = None,
    overrides: Overrides = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="directory for generated media "
                                             "(default: $ANYVERSE_HOME/media)")] = None,
    as_json: Json = False,
    require: Require = None,
    seed: Seed = None,
    device: Device = None,
    dtype: Dtype = None,
    mode: Mode = None,
    checkpoint: Checkpoint = None,
    resume: Continue = False,
    cid: Cid = None,
    no_log: NoLog = False,
) -> None:
    """Chat in the terminal with any media: /attach PATH (or paste a path), /media, /retry, /undo, /help.
    Conversations are logged and continue with -c; piped stdin gives one message per line."""
    from anyverse.cli.chat import JsonIO, PlainIO, Settings, TerminalIO, chat_for

    from anyverse.config import anyverse_home

    if as_json:
        io: Any = JsonIO()
    elif sys.stdin.isatty() and sys.stdout.isatty():
        io = TerminalIO(None if no_log else anyverse_home() / "chat-history")
    else:
        io = PlainIO()
    conversation = _conversation(profile, _overrides(overrides, device, dtype, mode), out, checkpoint, resume, cid,
                                 no_log)
    repl = chat_for(conversation, io, Settings(seed, {}, _required(require)))
    if isinstance(io, TerminalIO):
        io.info(f"anyverse chat · profile {repl.session.config.profile} · conversation "
                f"{conversation.cid or 'new'} · /help lists commands, Ctrl-D leaves")
    for spec in attach or []:
        repl.handle(f"/attach {spec}")
    repl.loop()


@app.command()
@fail_cleanly
def generate(
    modality: Annotated[str, typer.Argument(help="image, video or audio")],
    prompt: Annotated[str, typer.Argument(help="what to generate, or how to change --source")],
    generator: Generator = None,
    option: GeneratorOptions = None,
    source: Annotated[Path | None, typer.Option(help="media file to edit (for generators that edit)")] = None,
    profile: Profile = "tiny",
    overrides: Overrides = None,
    out: Out = Path("anyverse-out"),
    seed: Seed = None,
    steps: Annotated[int | None, typer.Option(help="denoising steps")] = None,
    as_json: Json = False,
    device: Device = None,
    dtype: Dtype = None,
) -> None:
    """Generate media with a generator plugin alone, without the LLM (no LLM or encoder weights needed). Writes PNG,
    MP4 (H.264) or WAV."""
    session = _session(profile or "tiny", _overrides(overrides, device, dtype, None), out)
    options = {**parse_options(option), **({"seed": seed} if seed is not None else {}),
               **({"steps": steps} if steps is not None else {})}
    made = session.generate(prompt, modality=_modality(modality), generator=generator, source=source, options=options)
    typer.echo(made.model_dump_json() if as_json else str(made.media.path))


@app.command()
@fail_cleanly
def serve(
    profile: Profile = "tiny",
    overrides: Overrides = None,
    checkpoint: Checkpoint = None,
    out: Out = Path("anyverse-out"),
    host: Annotated[str, typer.Option(help="address to bind; other than loopback needs an API key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="ANYVERSE_API_KEY", help="required Bearer key")] = None,
    served_model_name: Annotated[str, typer.Option(help="the model name clients ask for")] = "anyverse",
    max_queue: Annotated[int, typer.Option(min=1, help="requests that may wait; more get 429")] = 16,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="largest request body")] = 64.0,
    media_ttl: Annotated[float, typer.Option(min=1, help="seconds media URLs and audio ids stay valid")] = 3600.0,
    allow_remote_media: Annotated[bool, typer.Option(help="fetch http(s) media URLs (size and time capped)")] = False,
    device: Device = None,
    dtype: Dtype = None,
    mode: Mode = None,
) -> None:
    """OpenAI-compatible server: /v1/chat/completions (media in and out), /v1/images/*, /v1/models, /health."""
    from anyverse.serve import check_host, run, settings

    check_host(host, api_key)
    server = settings(profile or "tiny", _overrides(overrides, device, dtype, mode), checkpoint, out,
                      served_model_name=served_model_name, api_key=api_key, max_queue=max_queue,
                      max_body_mb=max_body_mb, media_ttl=media_ttl, allow_remote_media=allow_remote_media)
    typer.echo(f"anyverse: serving {served_model_name!r} at http://{host}:{port}/v1", err=True)
    run(server, host, port)


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
    from anyverse.session import clean_text
    from anyverse.signals import SignalVocabulary, StreamParser

    if mode not in ("meta", "signal"):
        raise ValueError(f"--mode {mode}: choose meta or signal")
    config = load_config(profile or "tiny", overrides)
    parser_mode: Literal["meta", "signal"] = "meta" if mode == "meta" else "signal"
    parser = StreamParser(SignalVocabulary(config.output.signal_tokens), parser_mode, config.output.max_prompt_chars)
    raw = clean_text(sys.stdin.buffer.read().decode("utf-8", "replace"))
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
    session = _session(profile or "tiny", _overrides(overrides, device, dtype, mode), Path("anyverse-out"))
    context = session.context([session.prepare(text, _attachments(session, attach))])
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


@convert_app.command("nextgpt")
@fail_cleanly
def convert_nextgpt(
    src: Annotated[Path, typer.Argument(help="NExT-GPT's delta checkpoint: pytorch_model.pt (7b_tiva_v0)")],
    dst: Annotated[Path, typer.Argument(help="output directory (adapter/, projectors.safetensors, manifests)")],
    added_tokens: Annotated[Path | None, typer.Option(help="the checkpoint's added_tokens.json (token ids)")] = None,
) -> None:
    """Convert NExT-GPT's released checkpoint (loaded with weights_only=True) for the nextgpt profile."""
    from anyverse.nextgpt import convert

    result = convert(src, dst, added_tokens)
    for line in result.lines:
        typer.echo(line)
    typer.echo(str(result.directory))


def main() -> None:
    # Quiet by default: the CLI owns the terminal (progress bars and library chatter go unless asked for).
    for key, value in {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                       "DIFFUSERS_VERBOSITY": "error"}.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # `python -m anyverse.cli.app`, as `accelerate launch -m` runs it
    main()
