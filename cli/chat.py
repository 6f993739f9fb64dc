"""``anyverse chat``: a REPL over one ``Anyverse`` session, with staged attachments, commands and a persistent log.

``Chat`` knows the commands and the conversation; a front end (``TerminalIO`` under a TTY, ``PlainIO`` for pipes,
``JsonIO`` for scripts) reads messages and shows events. Nothing here decides what the model does.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from anyverse.cli.options import attachment
from rich.markup import escape

from anyverse.logs import ConversationLog, keep_media
from anyverse.media import MediaError, sniff
from anyverse.session import Anyverse, clean_text, required_set
from anyverse.types import (
    Event,
    Media,
    MediaProduced,
    MediaProgress,
    MediaRequested,
    Modality,
    Notice,
    TextDelta,
    TurnFinished,
)

MULTI_START = ("/multi", '"""')
MULTI_END = ("/end", '"""')
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_PATH_TOKEN = re.compile(r"""'([^']+)'|"([^"]+)"|((?:[^\s'"\\]|\\.)+)""")


# ---------------------------------------------------------------------------------------------- front ends


class PlainIO:
    """Pipes and CI: lines are messages, replies are plain text with no control codes."""

    def __init__(self) -> None:
        if hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="surrogateescape")  # undecodable bytes reach clean_text, not a traceback

    def read(self) -> str | None:
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\n")

    def read_more(self) -> str | None:
        return self.read()

    def show(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            typer.echo(printable(event.text), nl=False)
        elif isinstance(event, MediaProduced):
            typer.echo(f"\n[{event.media.id}] {event.media.modality.value}: {event.media.path}")
        elif isinstance(event, Notice):
            typer.echo(f"\n[note] {event.message}", err=True)
        elif isinstance(event, TurnFinished):
            typer.echo("")

    def info(self, text: str) -> None:
        typer.echo(text)

    def error(self, text: str) -> None:
        typer.echo(f"anyverse: error: {text}", err=True)


class JsonIO(PlainIO):
    """``--json``: one JSON object per line, the API's events plus ``info`` and ``error`` lines."""

    def show(self, event: Event) -> None:
        typer.echo(event.model_dump_json())

    def info(self, text: str) -> None:
        typer.echo(_json({"kind": "info", "text": text}))

    def error(self, text: str) -> None:
        typer.echo(_json({"kind": "error", "message": text}))


class ResultIO(JsonIO):
    """``run --json``: the turn's result as one JSON object."""

    def show(self, event: Event) -> None:
        if isinstance(event, TurnFinished):
            typer.echo(event.result.model_dump_json())


class TerminalIO:
    """A TTY: prompt_toolkit line editing, history and completion; rich rendering with a live progress line."""

    def __init__(self, history_file: Path | None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from rich.console import Console

        keys = KeyBindings()

        @keys.add("c-c")
        def _(event: Any) -> None:  # Ctrl-C clears a typed line; at an empty prompt it exits
            if event.current_buffer.text:
                event.current_buffer.reset()
            else:
                event.app.exit(exception=EOFError)

        if history_file is not None:
            history_file.parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(history_file)) if history_file is not None else InMemoryHistory()
        self.prompt: PromptSession[str] = PromptSession(history=history, completer=_completer(), key_bindings=keys,
                                    complete_while_typing=False)
        self.console = Console(highlight=False)
        self.progress = False

    def read(self) -> str | None:
        try:
            return self.prompt.prompt("> ")
        except EOFError:
            return None

    def read_more(self) -> str | None:
        try:
            return self.prompt.prompt("… ")
        except EOFError:
            return None

    def show(self, event: Event) -> None:
        print_ = self.console.print
        if isinstance(event, TextDelta):
            print_(printable(event.text), end="", markup=False, soft_wrap=True)
        elif isinstance(event, MediaRequested):
            print_(f"\n[dim]{event.request.modality.value} requested[/dim]", end="")
        elif isinstance(event, MediaProgress):
            name = " · ".join(dict.fromkeys(filter(None, [event.modality.value, event.generator])))
            print_(f"\r{name} · step {event.step}/{event.total}", end="", markup=False)
            self.progress = True
        elif isinstance(event, MediaProduced):
            path = event.media.path
            print_(f"\n[bold]{event.media.id}[/bold] {event.media.modality.value}: [link=file://{path}]{path}[/link]"
                   f" [dim]({event.seconds:.1f} s)[/dim]", end="", soft_wrap=True)
        elif isinstance(event, Notice):
            print_(f"\n[yellow]note:[/yellow] {escape(event.message)}", end="", soft_wrap=True)
        elif isinstance(event, TurnFinished):
            print_("")

    def info(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def error(self, text: str) -> None:
        self.console.print(f"[red]error:[/red] {escape(text)}", soft_wrap=True)


def _completer() -> Any:
    """Paths after ``/attach``, command names after a leading ``/``."""
    from prompt_toolkit.completion import Completer, PathCompleter, WordCompleter
    from prompt_toolkit.document import Document

    paths, words = PathCompleter(expanduser=True), WordCompleter(sorted(COMMANDS), sentence=True)

    class ChatCompleter(Completer):
        def get_completions(self, document: Any, complete_event: Any) -> Iterator[Any]:
            text = document.text_before_cursor
            if text.startswith("/attach "):
                yield from paths.get_completions(Document(text.removeprefix("/attach ")), complete_event)
            elif text.startswith("/") and " " not in text:
                yield from words.get_completions(document, complete_event)

    return ChatCompleter()


def printable(text: str) -> str:
    """Model text without terminal control characters (an escape sequence could rewrite the screen)."""
    return _CONTROL.sub("\ufffd", text)


def _json(data: dict[str, Any]) -> str:
    from anyverse.jsonl import json_line

    return json_line(data)


# ---------------------------------------------------------------------------------------------- the chat


@dataclass
class Settings:
    """What ``/set`` changes: the turn seed, generation option defaults, required outputs."""

    seed: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    require: set[Modality] = field(default_factory=set)
    generator: str | None = None  # `run --generator`: requests of its modality go to it


class Chat:
    """One conversation: staged attachments, commands, turns, and the log that keeps it."""

    def __init__(self, session: Anyverse, io: Any, log: ConversationLog | None, cid: str | None,
                 settings: Settings, store: Path, start_log: Callable[[], str]):
        self.session, self.io, self.log, self.cid = session, io, log, cid
        self.settings, self.store, self.start_log = settings, store, start_log
        self.staged: list[Media] = []

    # ---- reading

    def loop(self) -> None:
        while (line := self.io.read()) is not None:
            line = clean_text(line)
            if line.strip() in MULTI_START:
                line = self._read_block(line.strip())
                if line is None:
                    break
            elif line.strip() == "/edit":
                line = self._edit()
            if not self.handle(line):
                break

    def _read_block(self, opener: str) -> str | None:
        ends = ('"""',) if opener == '"""' else ("/end",)
        lines: list[str] = []
        while (more := self.io.read_more()) is not None:
            if more.strip() in ends:
                return "\n".join(lines)
            lines.append(clean_text(more))
        return None

    def _edit(self) -> str:
        editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
        with tempfile.NamedTemporaryFile("w+", suffix=".md", delete=False) as f:
            name = f.name
        try:
            subprocess.run([*editor.split(), name], check=False)
            return clean_text(Path(name).read_text(errors="replace")).strip()
        finally:
            os.unlink(name)

    def handle(self, line: str) -> bool:
        """One line: a command, or a message (with any pasted media paths staged). False ends the chat."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not Path(text.split(" ", 1)[0]).expanduser().is_file():
            name, _, arg = text.partition(" ")
            command = COMMANDS.get(name)
            if command is None:
                self.io.error(f"unknown command {name}; /help lists the commands")
                return True
            return command.run(self, arg.strip()) is not False
        text, paths = split_media_paths(text)
        for path in paths:
            _attach(self, path)
        if text or self.staged:
            self.send(text, self.staged)
            self.staged = []
        return True

    # ---- doing

    def stage(self, spec: str) -> Media:
        """Validate now (raising MediaError), send with the next message; ``depth:``/``thermal:`` mark those image
        kinds. A logged chat keeps a copy in the media store, so the log outlives the user's file."""
        media = self.session.load(*attachment(spec))
        if self.log is not None:
            media = keep_media(media, self.store)
        self.staged.append(media)
        return media

    def send(self, text: str, media: list[Media], seed: int | None = None) -> None:
        stop = threading.Event()
        seed = self.settings.seed if seed is None else seed
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C stops the reply, whatever SIGINT handler the process started with (a script's background job
            # starts with it ignored) and prompt_toolkit put back at the OS level after the prompt
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            events = self.session.stream(text, media, require=self.settings.require, seed=seed,
                                         options=self.settings.options, stop=stop, generator=self.settings.generator)
            for event in events:
                self.io.show(event)
                if isinstance(event, TurnFinished) and not event.result.stopped:
                    self._log(event)
        except KeyboardInterrupt:
            stop.set()
            self.io.info("\n[stopped: the conversation is as it was before this message]")
        except (MediaError, ValueError) as err:
            self.io.error(str(err))

    def _log(self, done: TurnFinished) -> None:
        result = done.result
        if self.log is None or result.user is None or result.assistant is None:
            return
        if self.cid is None:
            self.cid = self.start_log()
        self.log.append(self.cid, result.user, result.assistant, result.timings)

    def undo(self) -> bool:
        if not self.session.undo():
            return False
        if self.log is not None and self.cid is not None:
            self.log.pop(self.cid)
        return True


def chat_for(conversation: Any, io: Any, settings: Settings) -> Chat:
    """A Chat over an opened conversation (see ``cli/app.py``); restore notices are shown first."""
    from anyverse.config import anyverse_home

    for notice in conversation.notices:
        io.error(notice)
    return Chat(conversation.session, io, conversation.log, conversation.cid, settings, anyverse_home() / "media",
                conversation.start)


# ---------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    run: Callable[[Chat, str], bool | None]
    usage: str


def _attach(chat: Chat, arg: str) -> None:
    if not arg:
        chat.io.error("/attach needs a path")
        return
    try:
        media = chat.stage(_unquote(arg))
    except (MediaError, ValueError) as err:
        chat.io.error(str(err))
        return
    chat.io.info(f"attached {media.modality.value} {media.original_name} to the next message")


def _media(chat: Chat, arg: str) -> None:
    rows = [(m.id, m.modality.value, message.role, str(m.path)) for message in chat.session.history
            for m in message.media]
    if not rows:
        chat.io.info("no media in this conversation yet")
    for row in rows:
        chat.io.info("  ".join(str(c) for c in row))


def _open(chat: Chat, arg: str) -> None:
    media = chat.session.media.get(arg)
    if media is None:
        chat.io.error(f"/open {arg}: no such media id; /media lists them")
        return
    viewer = shutil.which("xdg-open") or shutil.which("open")
    if viewer and sys.stdout.isatty() and (os.environ.get("DISPLAY") or sys.platform == "darwin"):
        subprocess.Popen([viewer, str(media.path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chat.io.info(str(media.path))


def _undo(chat: Chat, arg: str) -> None:
    chat.io.info("dropped the last exchange" if chat.undo() else "nothing to undo")


def _retry(chat: Chat, arg: str) -> None:
    history = chat.session.history
    if len(history) < 2 or history[-2].role != "user":
        chat.io.info("nothing to retry")
        return
    user = history[-2]
    chat.undo()
    seed = secrets.randbelow(2**31)
    chat.io.info(f"retrying with seed {seed}")
    chat.send(user.text, [m.model_copy(update={"id": None}) for m in user.media], seed=seed)


_SETTABLE = {"seed": int, "steps": int, "guidance": float}


def _set(chat: Chat, arg: str) -> None:
    key, _, value = arg.partition(" ")
    value = value.strip()
    try:
        if key == "require":
            names = [] if value in ("", "none") else [v for v in re.split(r"[\s,]+", value) if v]
            chat.settings.require = set(required_set([Modality(n) for n in names]))
        elif key == "mode":
            chat.io.error("the output mode is fixed for a session; restart with --mode meta|signal")
            return
        elif key in _SETTABLE:
            parsed = None if value in ("", "none") else _SETTABLE[key](value)
            if key == "seed":
                chat.settings.seed = parsed  # type: ignore[assignment]
            else:
                chat.settings.options[key] = parsed
        else:
            chat.io.error(f"/set {key}: choose seed, steps, guidance or require")
            return
    except ValueError as err:
        chat.io.error(f"/set {arg}: {err}")
        return
    chat.io.info(f"{key} = {value or 'none'}")


def _show(chat: Chat, arg: str) -> None:
    if arg != "config":
        chat.io.error("/show config is the only view")
        return
    chat.io.info(chat.session.config.to_yaml().rstrip())
    settings = chat.settings
    chat.io.info(f"# chat: seed={settings.seed} options={settings.options} "
                 f"require={sorted(m.value for m in settings.require)} conversation={chat.cid or 'new'}")


def _clear(chat: Chat, arg: str) -> None:
    chat.session.reset()
    chat.staged, chat.cid = [], None
    chat.io.info("new conversation")


def _help(chat: Chat, arg: str) -> None:
    for name, command in COMMANDS.items():
        chat.io.info(f"{name:<8} {command.usage}")
    chat.io.info('/multi … /end or """ … """: a multi-line message; a pasted media path is attached')


def _exit(chat: Chat, arg: str) -> bool:
    return False


COMMANDS: dict[str, Command] = {
    "/attach": Command(_attach, "PATH  attach media to the next message (depth:PATH, thermal:PATH)"),
    "/media": Command(_media, "list the conversation's media: id, modality, who made it, file"),
    "/open": Command(_open, "ID  open a media item in the system viewer (or print its path)"),
    "/undo": Command(_undo, "drop the last exchange"),
    "/retry": Command(_retry, "send the last message again with a new seed"),
    "/set": Command(_set, "seed|steps|guidance|require VALUE  (require: image,audio or none)"),
    "/show": Command(_show, "config  the resolved config and chat settings"),
    "/clear": Command(_clear, "start a new conversation"),
    "/edit": Command(lambda chat, arg: None, "write the next message in $EDITOR"),
    "/multi": Command(lambda chat, arg: None, "start a multi-line message, ended by /end"),
    "/help": Command(_help, "this list"),
    "/exit": Command(_exit, "leave (also /quit, Ctrl-D, Ctrl-C at an empty prompt)"),
    "/quit": Command(_exit, "leave"),
}


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return re.sub(r"\\(.)", r"\1", text)


def split_media_paths(line: str) -> tuple[str, list[str]]:
    """Media files pasted or dragged into a message (quoted, or with escaped spaces), found by sniffing their
    bytes, and the message without them."""
    paths: list[str] = []
    kept: list[str] = []
    cursor = 0
    for match in _PATH_TOKEN.finditer(line):
        raw = match.group(1) or match.group(2) or re.sub(r"\\(.)", r"\1", match.group(3))
        if ("/" in raw or raw.startswith("~")) and _is_media_file(Path(raw).expanduser()):
            kept.append(line[cursor : match.start()])
            cursor = match.end()
            paths.append(raw)
    if not paths:
        return line, []
    kept.append(line[cursor:])
    return re.sub(r"\s+", " ", "".join(kept)).strip(), paths


def _is_media_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return path.is_file() and sniff(f.read(4096)) is not None
    except OSError:
        return False
