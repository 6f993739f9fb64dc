"""Job files: one schema for anyverse's own lines, the OpenAI Batch API's lines, and validation with line numbers.

A file is streamed, never read whole: ``scan`` checks every line and keeps only each valid job's offset, id and
digest; ``read_lines`` re-reads the lines a window of work needs. The format is detected once per file, from its
first JSON object (``custom_id`` means OpenAI).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from anyverse.config import Caps
from anyverse.types import GenerationOptions, Message, Modality, RequestOptions

Format = Literal["anyverse", "openai"]
OutputName = Literal["text", "image", "audio", "video"]

MAX_LINE_BYTES = 64 * 1024**2  # an OpenAI line may inline its media as base64
MAX_JOBS = 1_000_000
MAX_ID_CHARS = 256
MAX_PROBLEMS_SHOWN = 20
OPENAI_URLS = ("/v1/chat/completions", "/chat/completions")


class JobOptions(GenerationOptions):
    """Generation options for every request the job makes, with per-modality ones on top."""

    image: RequestOptions | None = None  # plugin-specific keys too; the chosen generator's Options checks them
    audio: RequestOptions | None = None
    video: RequestOptions | None = None

    def for_modality(self, modality: Modality) -> dict[str, Any]:
        """The options of one output modality: the job-wide ones overridden by that modality's."""
        shared = self.model_dump(exclude_none=True, exclude={"image", "audio", "video"})
        own = getattr(self, modality.value, None)
        return {**shared, **(own.model_dump(exclude_none=True) if own is not None else {})}


class Job(BaseModel):
    """One line of anyverse's own job format (``anyverse batch schema`` prints it as JSON Schema)."""

    model_config = ConfigDict(extra="forbid", title="anyverse batch job")

    id: str = Field(min_length=1, max_length=MAX_ID_CHARS, description="unique within the file; never a path")
    prompt: str = Field(default="", description="what to do with the inputs")
    inputs: list[str] = Field(default_factory=list, description="media files, relative to --root (default: the "
                              "job file's folder); nothing outside the root is read")
    outputs: list[OutputName] = Field(default_factory=lambda: list[OutputName](["text"]),
                                      description="what the reply must make; text always comes back")
    options: JobOptions = Field(default_factory=JobOptions, description="generation options (seed, steps, ...), "
                                "per output modality under its name")


@dataclass
class Task:
    """A validated job, whatever its line format: what a worker runs."""

    line: int
    id: str
    format: Format
    prompt: str
    inputs: list[Path]
    outputs: frozenset[Modality]
    options: JobOptions
    digest: str
    messages: list[Message] | None = None  # an OpenAI line's conversation, media validated and given ids
    model: str | None = None  # an OpenAI line's model: recorded, the loaded profile runs


@dataclass(frozen=True)
class JobRef:
    """Where a valid job is in its file, and what it needs (the batching key)."""

    line: int
    offset: int
    id: str
    digest: str
    key: tuple[str, ...]


@dataclass(frozen=True)
class Problem:
    line: int
    message: str
    id: str | None = None

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class Scan:
    """A whole file checked: its format, valid jobs, problems and sha256."""

    path: Path
    format: Format
    refs: list[JobRef] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    sha256: str = ""

    def report(self) -> str:
        """The problems, one per line, the first ``MAX_PROBLEMS_SHOWN`` of them."""
        shown = [f"{self.path}:{p.line}: {p.message}" for p in self.problems[:MAX_PROBLEMS_SHOWN]]
        more = len(self.problems) - MAX_PROBLEMS_SHOWN
        return "\n".join(shown + ([f"... and {more} more"] if more > 0 else []))


class JobError(ValueError):
    """A line that cannot run, with the job id when the line got that far."""

    def __init__(self, message: str, job_id: str | None = None):
        super().__init__(message)
        self.job_id = job_id


def _lines(path: Path, start: int = 0) -> Iterator[tuple[int, bytes | None]]:
    """(byte offset, raw line) from ``start``; a line over ``MAX_LINE_BYTES`` comes back as None (and is skipped)."""
    with open(path, "rb") as f:
        f.seek(start)
        while True:
            offset = f.tell()
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                yield offset, None
                continue
            yield offset, raw


def _object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except UnicodeDecodeError:
        raise JobError("not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise JobError(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise JobError(f"a job is a JSON object, not {type(value).__name__}")
    return value


def detect_format(value: dict[str, Any]) -> Format:
    return "openai" if "custom_id" in value else "anyverse"


def digest(value: dict[str, Any]) -> str:
    """Hash of a job's canonical JSON: a finished id whose job changed is noticed on resume."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _fields(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in err.errors())


def resolve_input(name: str, root: Path) -> Path:
    """A job's input path inside ``root`` (relative ones resolve against it); symlinks out of it are refused."""
    path = Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise JobError(f"input {name!r} resolves outside the allowed root {root}")
    if not os.path.lexists(path) or not resolved.exists():
        raise JobError(f"input {name!r}: no such file under {root}")
    if not resolved.is_file():
        raise JobError(f"input {name!r} is not a regular file")
    return resolved


def parse_job(value: dict[str, Any], line: int, fmt: Format, root: Path, caps: Caps | None = None) -> Task:
    """Validate one decoded line of the file's format into a Task; JobError says why not. ``caps`` bound the media
    an OpenAI line inlines (decoded here: its parser validates media as it reads them)."""
    if detect_format(value) != fmt:
        raise JobError(f"a {detect_format(value)}-format line in a {fmt}-format file", value.get("id"))
    if fmt == "openai":
        from anyverse.batch.openai import parse_openai_line

        return parse_openai_line(value, line, root, caps)
    job_id = value.get("id") if isinstance(value.get("id"), str) else None
    try:
        job = Job.model_validate(value)
    except ValidationError as err:
        raise JobError(_fields(err), job_id) from None
    try:
        inputs = [resolve_input(name, root) for name in job.inputs]
    except JobError as err:
        raise JobError(str(err), job.id) from None
    outputs = frozenset(Modality(o) for o in job.outputs if o != "text")
    return Task(line=line, id=job.id, format=fmt, prompt=job.prompt, inputs=inputs, outputs=outputs,
                options=job.options, digest=digest(value))


def batch_key(task: Task) -> tuple[str, ...]:
    """What a job needs: its output modalities and the modalities of its inputs (anyverse lines: from names)."""
    from anyverse.media import EXTENSIONS

    if task.messages is not None:
        kinds = [m.modality.value for message in task.messages for m in message.media]
    else:
        kinds = [EXTENSIONS.get(i.suffix.lower(), (Modality.TEXT, ""))[0].value for i in task.inputs]
    return (",".join(sorted(m.value for m in task.outputs)), ",".join(sorted(kinds)))


def scan(path: Path, root: Path) -> Scan:
    """Validate every line of a job file (bad JSON, unknown fields, duplicate ids, missing or out-of-root inputs)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such job file")
    hasher = hashlib.sha256()
    result: Scan | None = None
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for number, (offset, raw) in enumerate(_lines(path), 1):
        hasher.update(raw or b"")
        if raw is None:
            problems.append(Problem(number, f"longer than {MAX_LINE_BYTES:,} bytes"))
            continue
        if not raw.strip():
            continue
        try:
            value = _object(raw)
            if result is None:
                result = Scan(path=path, format=detect_format(value))
            task = parse_job(value, number, result.format, root)
        except JobError as err:
            problems.append(Problem(number, str(err), err.job_id))
            continue
        if task.id in seen:
            problems.append(Problem(number, f"duplicate id {task.id!r} (first on line {seen[task.id]})", None))
            continue
        if len(seen) >= MAX_JOBS:
            raise ValueError(f"{path}: more than {MAX_JOBS:,} jobs; split the file")
        seen[task.id] = number
        result.refs.append(JobRef(number, offset, task.id, task.digest, batch_key(task)))
    if result is None:
        if not problems:
            raise ValueError(f"{path}: the job file is empty")
        result = Scan(path=path, format="anyverse")
    result.problems = problems
    result.sha256 = hasher.hexdigest()
    return result


def read_lines(path: Path, places: Iterable[tuple[int, int]]) -> list[tuple[int, str]]:
    """(line number, text) of the jobs at these (line number, byte offset) places, re-read from the file."""
    out = []
    with open(path, "rb") as f:
        for line, offset in places:
            f.seek(offset)
            out.append((line, f.readline(MAX_LINE_BYTES + 1).decode()))
    return out


def parse_line(text: str, line: int, fmt: Format, root: Path, caps: Caps) -> Task:
    """A worker's view of one line it was handed (validated by ``scan`` before; files may have changed since)."""
    return parse_job(_object(text.encode()), line, fmt, root, caps)


def job_schema() -> dict[str, Any]:
    return Job.model_json_schema()


def map_jobs(prompt: str, files: list[Path], outputs: list[str], out: Path, force: bool) -> tuple[Path, Path]:
    """Write ``out/jobs.jsonl`` with one job per file (absolute paths, ids relative to their common folder, which
    is returned as the root). Rerunning the same map finds the same file and resumes."""
    found = [f.absolute() for f in files if f.is_file()]
    if not found:
        raise ValueError("--inputs matched no files")
    root = Path(os.path.commonpath([f.parent for f in found]))
    try:
        jobs = [Job(id=str(f.relative_to(root)), prompt=prompt, inputs=[str(f)], outputs=outputs)  # type: ignore[arg-type]
                for f in found]
    except ValidationError as err:
        raise ValueError(f"--outputs: {_fields(err)}") from None
    text = "".join(json.dumps(job.model_dump(mode="json", exclude_defaults=True)) + "\n" for job in jobs)
    path = out / "jobs.jsonl"
    if path.is_file() and path.read_text() != text and not force:
        raise ValueError(f"{path} holds other jobs (another map into this --out); use a new --out, or --force")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path, root
