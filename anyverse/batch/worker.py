"""One worker: loads the pipeline once, then turns batches of job lines into result lines.

A batch runs in phases over all its jobs at once: prepare (parse, validate media, render), encode (one encoder
call per input modality, cache hits skipped), decode (one padded LLM batch), generate (each generator gets its
modality's requests together). A job that fails in any phase is recorded with its reason; the rest go on.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anyverse.batch.decode import Row, decode_batch
from anyverse.batch.jobs import Format, JobError, Task, parse_line
from anyverse.config import AnyverseConfig, anyverse_home, load_config
from anyverse.media import MediaError
from anyverse.model import Context
from anyverse.plugins import GeneratedMedia
from anyverse.session import Anyverse, Reply, effective_options, media_by_id, next_id, save_generated
from anyverse.signals import StreamParser
from anyverse.types import Media, MediaProduced, MediaRequest, Message, Modality

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """What every worker of a run needs (plain values, so Ray can ship it)."""

    profile: str
    overrides: tuple[str, ...]
    out: Path
    root: Path
    format: Format
    seed: int

    def config(self) -> AnyverseConfig:
        """The profile with caps.allowed_roots narrowed to the job root (and where inline media are stored)."""
        config = load_config(self.profile, list(self.overrides))
        config.caps = config.caps.model_copy(update={"allowed_roots": [self.root, anyverse_home() / "uploads"]})
        return config


@dataclass
class JobRun:
    """One job's way through a batch."""

    line: int
    id: str
    task: Task | None = None
    messages: list[Message] = field(default_factory=list)  # the conversation rendered: the job's user turn last
    context: Context | None = None
    embeds: torch.Tensor | None = None
    reply: Reply | None = None
    requests: list[MediaRequest] = field(default_factory=list)
    made: list[MediaProduced] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    reason: str | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def fail(self, reason: str, error: str) -> None:
        self.reason, self.error = reason, error

    @property
    def media(self) -> list[Media]:
        return [m for message in self.messages for m in message.media]

    @property
    def prompt_tokens(self) -> int:
        return len(self.context.ids) if self.context else 0

    @property
    def live(self) -> bool:
        return self.error is None


_loaded: dict[tuple[str, tuple[str, ...]], Anyverse] = {}


def _session(settings: Settings) -> Anyverse:
    """The pipeline for this profile, loaded once per process (a second run in it reuses the models), pointed at
    this run's folder and root."""
    key = (settings.profile, settings.overrides)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = Anyverse(settings.config(), output_dir=settings.out / "media")
    session = _loaded[key]
    session.config.caps = settings.config().caps
    session.output_dir = settings.out / "media"
    return session


def job_seed(run_seed: int, task: Task) -> int:
    """The job's own seed, else one derived from the run seed and the job id (never from a batch position)."""
    if task.options.seed is not None:
        return task.options.seed
    return int.from_bytes(hashlib.sha256(f"{run_seed}:{task.id}".encode()).digest()[:4], "big") & 0x7FFFFFFF


class Worker:
    """Models load once, in ``__init__``; ``run`` takes (line number, line text) pairs and returns result lines."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.session = _session(settings)

    def run(self, lines: list[tuple[int, str]], on_stage: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
        """``on_stage`` hears each phase's name as it starts (a progress line)."""
        jobs = [self._prepare(line, text) for line, text in lines]
        for phase in (self._encode, self._decode, self._generate):
            tick = time.perf_counter()
            live = [job for job in jobs if job.live]
            if on_stage is not None:
                on_stage(phase.__name__.strip("_"))
            if live:
                phase(live)
            for job in live:
                job.timings[phase.__name__.strip("_")] = round(time.perf_counter() - tick, 4)
        return [render(job, self.settings) for job in jobs]

    # ---- phases ---------------------------------------------------------------------------------------------

    def _prepare(self, line: int, text: str) -> JobRun:
        """Parse the line again (files may have changed since validation), validate its media, render it."""
        job = JobRun(line=line, id=f"line-{line}")
        try:
            job.task = parse_line(text, line, self.settings.format, self.settings.root, self.session.config.caps)
            job.id = job.task.id
            job.messages = job.task.messages or [self.session.prepare(job.task.prompt, job.task.inputs)]
            job.context = self.session.context(job.messages)
        except JobError as err:
            job.fail("invalid job", str(err))
        except MediaError as err:
            job.fail(f"input: {err.group}", str(err))
        except ValueError as err:
            job.fail("input", str(err))
        except Exception as err:  # anything else still fails only this job
            log.debug("job on line %d failed to prepare", line, exc_info=True)
            job.fail("error", f"{type(err).__name__}: {err}")
        return job

    def _encode(self, jobs: list[JobRun]) -> None:
        """One encoder call per input modality for the whole batch (it fills the embedding cache), then each
        job's context is embedded from the cache. A failing call is retried item by item to find the bad ones."""
        model = self.session.model
        items: defaultdict[Modality, dict[str, Media]] = defaultdict(dict)
        for job in jobs:
            for media in job.media:
                items[media.modality][media.sha256] = media
        bad: dict[str, str] = {}
        for group in items.values():
            try:
                model.encoder.encode(list(group.values()), self.session.config.caps)
            except Exception:
                for sha, media in group.items():
                    try:
                        model.encoder.encode([media], self.session.config.caps)
                    except Exception as err:
                        bad[sha] = str(err)
        for job in jobs:
            broken = [bad[m.sha256] for m in job.media if m.sha256 in bad]
            if broken:
                job.fail("input: does not decode", broken[0])
                continue
            assert job.context is not None
            try:
                job.embeds = model.embed(job.context)
            except Exception as err:
                job.fail("input: does not decode", str(err))

    def _decode(self, jobs: list[JobRun]) -> None:
        """The batch's replies decoded together, each row with its own rules and random stream; if the batch
        fails, each row is decoded alone, so only the job that breaks it fails."""
        config = self.session.config
        try:
            rows = [self._row(job) for job in jobs]
            decode_batch(self.session.model.llm, rows, config.llm.max_new_tokens, config.llm.temperature,
                         config.llm.top_p)
        except Exception:
            for job in jobs:
                try:
                    row = self._row(job)
                    decode_batch(self.session.model.llm, [row], config.llm.max_new_tokens, config.llm.temperature,
                                 config.llm.top_p)
                    self._route(job, row)
                except Exception as err:
                    log.debug("job %s failed to decode", job.id, exc_info=True)
                    job.fail("decode", f"{type(err).__name__}: {err}")
            return
        for job, row in zip(jobs, rows, strict=True):
            try:
                self._route(job, row)
            except Exception as err:
                job.fail("decode", f"{type(err).__name__}: {err}")

    def _row(self, job: JobRun) -> Row:
        session, config = self.session, self.session.config
        llm, out = session.model.llm, config.output
        assert job.task is not None and job.embeds is not None
        processors = session.processors(frozenset(job.task.outputs), tuple(str(m.id) for m in job.media))
        return Row(job.embeds, processors, StreamParser(llm.vocab, out.mode, out.max_prompt_chars),
                   job_seed(self.settings.seed, job.task), job.task.outputs)

    def _route(self, job: JobRun, row: Row) -> None:
        """The reply's requests as the session routes them (signal conditioning, the per-reply cap)."""
        assert job.embeds is not None
        job.reply = Reply.of(row.events, row.ids)
        job.requests, capped = self.session.route(job.reply, job.embeds)
        job.notices += job.reply.notices + capped

    def _generate(self, jobs: list[JobRun]) -> None:
        """Each generator gets the requests routed to it from the whole batch together, in one batched call."""
        groups: dict[str, list[tuple[JobRun, MediaRequest, GeneratedMedia | None]]] = defaultdict(list)
        for job in jobs:
            assert job.task is not None
            seed = job_seed(self.settings.seed, job.task)
            known = media_by_id(job.messages)
            for index, request in enumerate(job.requests):
                try:
                    request.options = effective_options(
                        request.options, job.task.options.for_modality(request.modality), seed, index)
                    name, source = self.session.plan(request, known)
                except Exception as err:  # a bad option or source costs this request only
                    job.notices.append(f"{request.modality.value} generation failed: {err}")
                    continue
                groups[name].append((job, request, source))
        for name, group in groups.items():
            self._generate_group(name, group)

    def _generate_group(self, name: str, group: list[tuple[JobRun, MediaRequest, GeneratedMedia | None]]) -> None:
        """One generator's requests from the whole batch in one call; if that call fails, each request is tried
        alone, so one job's failure never costs the others their media."""
        try:
            generator = self.session.generators.get(name)
        except Exception as err:
            for job, request, _ in group:
                job.notices.append(f"{request.modality.value} generation failed: {err}")
            return
        tick = time.perf_counter()
        try:
            outputs = generator.generate([r for _, r, _ in group], [s for _, _, s in group])
        except Exception:
            outputs = None
        for index, (job, request, source) in enumerate(group):
            modality = request.modality
            try:
                result = outputs[index] if outputs is not None else generator.generate([request], [source])[0]
                saved = save_generated(result, self.session.output_dir)
            except Exception as err:
                log.debug("%s generation failed for job %s", modality.value, job.id, exc_info=True)
                job.notices.append(f"{modality.value} generation failed: {err}")
                continue
            media = saved.with_id(next_id(modality, job.messages, [p.media for p in job.made]))
            seconds = (time.perf_counter() - tick) / len(group)
            job.made.append(MediaProduced(media=media, request=request, seconds=seconds))


def render(job: JobRun, settings: Settings) -> dict[str, Any]:
    """The job's result line in its file's format; a required output that was not made fails the job."""
    if job.live and job.task is not None:
        missing = sorted(m.value for m in job.task.outputs - {p.media.modality for p in job.made})
        if missing:
            job.fail("output missing", f"no {', '.join(missing)} was made: {'; '.join(job.notices) or 'no request'}")
    if settings.format == "openai":
        from anyverse.batch.openai import openai_record

        return openai_record(job, settings)
    return anyverse_record(job, settings.out)


def media_entries(job: JobRun, out: Path) -> list[dict[str, Any]]:
    """Produced media: id, modality, path relative to the run folder, and the request that made it."""
    return [{"id": p.media.id, "modality": p.media.modality.value, "path": str(p.media.path.relative_to(out)),
             "sha256": p.media.sha256, "request": p.request.model_dump(mode="json")} for p in job.made]


def bookkeeping(job: JobRun) -> dict[str, Any]:
    """What resume and status read back from a result line, in both formats."""
    return {"status": "failed" if job.error else "ok", "reason": job.reason, "line": job.line,
            "job_digest": job.task.digest if job.task else None, "timings": job.timings}


def anyverse_record(job: JobRun, out: Path) -> dict[str, Any]:
    reply = job.reply
    return {"id": job.id, **bookkeeping(job), "text": reply.text if reply else None,
            "media": media_entries(job, out), "notices": job.notices, "error": job.error}
