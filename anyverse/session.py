"""One conversation: context -> LLM stream -> parse -> route -> generate -> save -> splice back.

``Anyverse`` is the public entry point, diffusers-like: build it from a profile, a config file or a checkpoint,
then call ``turn`` (a typed result) or ``stream`` (events as they happen).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anyverse.checkpoint import checkpoint_config
from anyverse.config import AnyverseConfig, anyverse_home, load_config
from anyverse.decoding import GenerationStream, RequestConstraints, grammar_processor, request_closer
from anyverse.devices import resolve_device, resolve_dtype
from anyverse.encoders.imagebind import check_encoder_weights
from anyverse.llm import check_llm_weights
from anyverse.media import (
    MediaError,
    decode_image,
    load_media,
    media_from_bytes,
    save_audio,
    save_image,
    save_video,
)
from anyverse.model import AnyverseModel, Context
from anyverse.plugins import GeneratedMedia, GenerationCancelled, Progress, validate_options
from anyverse.pool import GeneratorPool
from anyverse.quiet import quiet_libraries
from anyverse.signals import REQUEST_OPEN, StreamParser
from anyverse.types import (
    OUTPUT_MODALITIES,
    Event,
    GenerationOptions,
    Media,
    MediaProduced,
    MediaProgress,
    MediaRequest,
    MediaRequested,
    Message,
    Modality,
    Notice,
    RequestOptions,
    TextDelta,
    TurnFinished,
    TurnResult,
)
from anyverse.weights import MissingWeightsError, collect_missing

log = logging.getLogger(__name__)

Attachment = str | Path | bytes | Media


class Anyverse:
    """The any-to-any assistant. Generators load lazily, on the first request for their modality."""

    def __init__(self, config: AnyverseConfig, output_dir: str | Path = "anyverse-out",
                 check_base: Callable[[dict[str, Any]], None] | None = None, model: AnyverseModel | None = None):
        """``model`` reuses an already loaded model (evaluation during training); ``config`` still picks the
        output mode and decoding settings."""
        self.config = config
        if config.runtime.threads:
            torch.set_num_threads(config.runtime.threads)
        self.device = resolve_device(config.runtime.device)
        self.dtype = resolve_dtype(config.runtime.dtype, self.device)
        self.generators = GeneratorPool.from_config(config, self.device, self.dtype)
        self._model, self._check_base = model, check_base
        self.output_dir = Path(output_dir)
        self.history: list[Message] = []

    @property
    def model(self) -> AnyverseModel:
        """Encoder, LLM and projectors, loaded on first use: generating alone needs none of their weights."""
        if self._model is None:
            self._model = self._load_model()
        return self._model

    def _load_model(self) -> AnyverseModel:
        """Check every piece's weights (one error listing all missing ones), then load."""
        config = self.config
        try:
            collect_missing([lambda: check_encoder_weights(config.encoder), lambda: check_llm_weights(config.llm),
                             self.generators.check_weights, self._check_projectors])
        except MissingWeightsError as err:
            if config.profile != "toyworld":
                raise
            raise MissingWeightsError(["toyworld: not built on this machine yet; `anyverse train toyworld` "
                                       "makes every piece below (CPU only, no downloads)", *err.missing]) from None
        with quiet_libraries():
            specs = self.generators.conditioning_specs() if config.output.mode == "signal" else {}
            return AnyverseModel.from_config(config, self.device, self.dtype, specs, self._check_base,
                                             merge_adapter=True)

    @classmethod
    def from_profile(cls, name: str = "tiny", overrides: list[str] | None = None, **kwargs) -> Anyverse:
        """``Anyverse.from_profile("tiny", ["output.mode=signal"])``; a YAML file path works too."""
        return cls(load_config(name, overrides), **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | Path, overrides: list[str] | None = None, **kwargs) -> Anyverse:
        """Load a training checkpoint (or a run directory's newest one) onto the base it names, verified."""
        config, check = checkpoint_config(Path(path), overrides)
        session = cls(config, check_base=check, **kwargs)
        _ = session.model  # verified against its base now, not at the first turn
        return session

    def _check_projectors(self) -> None:
        real = self.config.encoder.tiny is None or self.config.llm.tiny is None
        if real and not self.config.projector_weights:
            raise MissingWeightsError(["projectors: real encoder/LLM but no trained projectors (projector_weights). "
                                       "Train them with `anyverse train` or point projector_weights at a "
                                       "projectors.safetensors; random projectors would make media meaningless."])

    # ---- the conversation ----------------------------------------------------------------------------------

    @property
    def media(self) -> dict[str, Media]:
        """Every media item of the conversation by id (ids derive from the history)."""
        return media_by_id(self.history)

    def reset(self) -> None:
        self.history = []

    def undo(self) -> bool:
        """Drop the last exchange (user message and reply); False when there is none."""
        last_user = max((i for i, m in enumerate(self.history) if m.role == "user"), default=None)
        if last_user is None:
            return False
        del self.history[last_user:]
        return True

    def restore(self, messages: Sequence[Message]) -> list[str]:
        """Replace the history with ``messages``, re-validating every media file against its recorded sha256.

        A vanished or changed file is left out (its id is not reused by others); the notices say which.
        """
        notices: list[str] = []
        restored: list[Message] = []
        for message in messages:
            kept = []
            for item in message.media:
                try:
                    loaded = load_media(item.path, self.config.caps, item.modality)
                except MediaError as err:
                    notices.append(f"{item.id}: left out ({err.reason})")
                    continue
                if loaded.sha256 != item.sha256:
                    notices.append(f"{item.id}: left out ({item.path} changed since it was logged)")
                    continue
                kept.append(loaded.model_copy(update={"id": item.id, "original_name": item.original_name}))
            restored.append(message.model_copy(update={"media": kept, "text": clean_text(message.text)}))
        self.history = restored
        return notices

    # ---- inputs ---------------------------------------------------------------------------------------------

    def load(self, source: str | Path | bytes, modality: Modality | None = None) -> Media:
        """Validate a file or bytes into a Media (``modality`` marks depth/thermal images). A turn gives it an id."""
        if isinstance(source, bytes):
            return media_from_bytes(source, "upload", self.config.caps, anyverse_home() / "uploads", modality)
        return load_media(source, self.config.caps, modality)

    def prepare(self, text: str, attachments: Sequence[Attachment] = ()) -> Message:
        """Validate text and every attachment (before anything is written), then give the media ids."""
        caps = self.config.caps
        text = clean_text(text)
        if len(text) > caps.max_text_chars:
            raise ValueError(f"message: {len(text)} characters exceeds the {caps.max_text_chars} cap "
                             "(caps.max_text_chars)")
        if len(attachments) > caps.max_attachments:
            raise ValueError(f"{len(attachments)} attachments exceed the cap of {caps.max_attachments}")
        loaded = [a if isinstance(a, Media) else self.load(a) for a in attachments]  # all validated first
        named: list[Media] = []
        for item in loaded:
            named.append(item.with_id(next_id(item.modality, self.history, named)))
        return Message(role="user", text=text, media=named)


    # ---- a turn ---------------------------------------------------------------------------------------------

    def context(self, history: list[Message]) -> Context:
        """Render ``history``, dropping the oldest exchanges if it would not fit the context window (a binary
        search over where the kept part starts, so a long history costs a few renders, not one per message)."""
        budget = self.config.llm.max_context_tokens - self.config.llm.max_new_tokens
        context = self.model.render(history, self.config.output.mode)
        if len(context.ids) <= budget:  # the usual case: everything fits
            return context
        starts = [i for i, m in enumerate(history) if m.role == "user" or i == len(history) - 1][1:] or [0]
        low, high = 0, len(starts) - 1
        fitting: Context | None = None
        while low <= high:  # the smallest start whose rendering fits
            mid = (low + high) // 2
            context = self.model.render(history[starts[mid] :], self.config.output.mode)
            if len(context.ids) <= budget:
                fitting, high = context, mid - 1
            else:
                low = mid + 1
        if fitting is None:
            raise ValueError(f"message: {len(context.ids)} tokens do not fit the {budget}-token context budget")
        return fitting

    def stream(self, text: str, attachments: Sequence[Attachment] = (), *, require: Require = None,
               seed: int | None = None, options: dict[str, Any] | None = None,
               stop: threading.Event | None = None, generator: str | None = None) -> Iterator[Event]:
        """Run one turn, yielding text deltas live, then requests, progress and produced media; the last event is
        ``TurnFinished`` with the typed result. Setting ``stop`` ends the turn early and adds nothing to history.
        ``generator`` (a name, plugin or capability) takes every request of its modality, which the reply must
        then make unless ``require`` says otherwise."""
        started = time.perf_counter()
        timings: dict[str, float] = {}
        steer = self._steer(generator, require)
        require = require or steer
        # 1. Check inputs and give the media ids
        user = self.prepare(text, attachments)
        history = [*self.history, user]
        # 2. Render the conversation and splice in the media's soft tokens
        tick = time.perf_counter()
        embeds = self.model.embed(self.context(history))
        timings["encode"] = time.perf_counter() - tick
        # 3. Decode the reply, streaming its text
        tick = time.perf_counter()
        reply = yield from self.decode(embeds, require, seed, stop, tuple(media_by_id(history)))
        timings["llm"] = time.perf_counter() - tick
        if reply.stopped:
            yield TurnFinished(result=TurnResult(text=reply.text, notices=reply.notices, timings=timings,
                                                 output_dir=self.output_dir, stopped=True))
            return
        # 4. Route each request to its generator and save what it makes
        requests, notices = self.route(reply, embeds)
        for request in requests:
            if steer is not None and request.modality == steer:
                request.generator = generator
        tick = time.perf_counter()
        produced = yield from self.produce(requests, seed, options, history, stop)
        timings["generate"] = time.perf_counter() - tick
        notices = [*reply.notices, *notices, *produced.notices]
        # 5. Splice the reply and its media back into the conversation
        stopped = stop is not None and stop.is_set()
        assistant = Message(role="assistant", text=reply.text, media=[p.media for p in produced.media],
                            requests=[p.request for p in produced.media])
        if not stopped:
            self.history += [user, assistant]
        timings["total"] = time.perf_counter() - started
        result = TurnResult(text=reply.text, media=produced.media, notices=notices, timings=timings,
                            output_dir=self.output_dir, stopped=stopped, user=user, assistant=assistant)
        if not stopped:
            self._record(result)
        yield TurnFinished(result=result)

    def turn(self, text: str, attachments: Sequence[Attachment] = (), *, require: Require = None,
             seed: int | None = None, options: dict[str, Any] | None = None,
             stop: threading.Event | None = None, generator: str | None = None) -> TurnResult:
        """Run one turn to completion (see ``stream``) and return its typed result."""
        for event in self.stream(text, attachments, require=require, seed=seed, options=options, stop=stop,
                                 generator=generator):
            if isinstance(event, TurnFinished):
                return event.result
        raise AssertionError("a turn always ends with TurnFinished")

    def draft(self, history: list[Message], *, require: Require = None,
              seed: int | None = None) -> tuple[str, list[MediaRequest], list[str]]:
        """Decode a reply to ``history`` without generating media or touching the session: text, the parsed
        requests and notices. What evaluation and dry runs need."""
        embeds = self.model.embed(self.context(history))
        reply = yield_return(self.decode(embeds, require, seed, None, tuple(media_by_id(history))))
        return reply.text, reply.requests, reply.notices

    def decode(self, embeds: torch.Tensor, require: Require, seed: int | None, stop: threading.Event | None,
               media_ids: tuple[str, ...]) -> Generator[Event, None, Reply]:
        """Sample the reply and parse it as it streams (events), returning the whole ``Reply``. Malformed
        meta-responses are re-sampled a bounded number of times."""
        out, llm_cfg = self.config.output, self.config.llm
        required = required_set(require)
        parser = StreamParser(self.model.llm.vocab, out.mode, out.max_prompt_chars)
        processors = self.processors(required, media_ids)
        grammar = len(processors) > 1  # a grammar backend constrains the request JSON
        stream = GenerationStream(self.model.llm, embeds, processors, llm_cfg.max_new_tokens,
                                  llm_cfg.temperature, llm_cfg.top_p, seed, stop)
        events: list[Event] = []
        for piece in stream:
            for event in parser.feed(piece):
                events.append(event)
                yield event
        if stop is not None and stop.is_set():
            return Reply.of(events, stream.ids, stopped=True)
        for event in parser.close():
            events.append(event)
            yield event
        if parser.failed_requests and not grammar and out.mode == "meta":
            for event in self._retry_request(embeds, stream.ids, seed):
                events.append(event)
                yield event
        reply = Reply.of(events, stream.ids)
        made = {r.modality for r in reply.requests}
        for modality in sorted(required - made):
            notice = Notice(message=f"the reply made no {modality.value} although it was required")
            reply.notices.append(notice.message)
            yield notice
        return reply

    def processors(self, required: frozenset[Modality], media_ids: tuple[str, ...]) -> list:
        """A reply's logits processors (single-use): in meta mode the request grammar when a backend is installed,
        then the token rules, with the closer that finishes an open request in time."""
        llm, out = self.model.llm, self.config.output
        grammar, closer = None, None
        if out.mode == "meta" and out.constrained != "none":
            routing = ((self.generators.choices(), self.generators.options_schema()) if out.name_generators
                       else ((), None))
            grammar = grammar_processor(llm, out.max_prompt_chars, media_ids, required, *routing)
            if grammar is None and out.constrained == "xgrammar":
                raise ValueError("output.constrained=xgrammar but xgrammar is not installed")
            if grammar is not None:
                closer = request_closer(llm, out.max_prompt_chars, media_ids, required, *routing)
        constraints = RequestConstraints(llm, out.mode, self.config.llm.max_new_tokens, required, self._meta_reserve,
                                         closer)
        return [grammar, constraints] if grammar is not None else [constraints]

    @cached_property
    def _meta_reserve(self) -> int:
        """Tokens a longest meta-response needs, so a required request is started while it still fits."""
        longest = json.dumps({"modality": "image", "prompt": "x" * self.config.output.max_prompt_chars,
                              "source": "img_1000"})
        return len(self.model.llm.tokenizer(longest, add_special_tokens=False).input_ids) + 4

    def _retry_request(self, embeds: torch.Tensor, generated: list[int], seed: int | None) -> Iterator[Event]:
        """Re-sample only the body of a malformed request (no grammar backend), up to ``output.retries`` times."""
        llm, out = self.model.llm, self.config.output
        open_id = llm.token_id(REQUEST_OPEN)
        start = max(i for i, t in enumerate(generated) if t == open_id) + 1
        prefix = torch.cat([embeds, llm.input_embeddings(torch.tensor([generated[:start]], device=embeds.device))], 1)
        for attempt in range(out.retries):
            budget = self._meta_reserve
            constraints = RequestConstraints(llm, "meta", budget)
            parser = StreamParser(llm.vocab, "meta", out.max_prompt_chars)
            stream = GenerationStream(llm, prefix, [constraints], budget, self.config.llm.temperature,
                                      self.config.llm.top_p, None if seed is None else seed + 1000 + attempt)
            events = parser.feed(REQUEST_OPEN) + [e for piece in stream for e in parser.feed(piece)] + parser.close()
            requests = [e for e in events if isinstance(e, MediaRequested)]
            if requests:
                yield requests[0]
                return
        yield Notice(message=f"the media request stayed malformed after {out.retries} retries; no media made")

    def route(self, reply: Reply, embeds: torch.Tensor) -> tuple[list[MediaRequest], list[str]]:
        """The requests to honour: signal requests get their output projector's conditioning; at most
        ``output.max_requests``."""
        requests = reply.requests
        if self.config.output.mode == "signal":
            conditioned = self.model.signal_conditioning(embeds, reply.ids)
            for request, (_, conditioning) in zip(requests, conditioned, strict=False):
                request.conditioning = conditioning
        cap = self.config.output.max_requests
        if len(requests) <= cap:
            return requests, []
        return requests[:cap], [f"only the first {cap} media requests were honoured"]

    def produce(self, requests: list[MediaRequest], seed: int | None, options: dict[str, Any] | None,
                history: list[Message], stop: threading.Event | None = None) -> Generator[Event, None, Produced]:
        """Generate and save each request's media, giving each the next id; failures become notices."""
        known = media_by_id(history)
        made: list[MediaProduced] = []
        notices: list[str] = []
        for index, request in enumerate(requests):
            if stop is not None and stop.is_set():
                break
            request.options = effective_options(request.options, options, seed, index)
            event = yield from self._produce(request, index, known, [p.media for p in made], history, stop)
            if isinstance(event, MediaProduced):
                made.append(event)
                known[str(event.media.id)] = event.media
            else:
                notices.append(event.message)
            yield event
        return Produced(media=made, notices=notices)

    def _produce(self, request: MediaRequest, index: int, known: dict[str, Media], made: list[Media],
                 history: list[Message], stop: threading.Event | None,
                 ) -> Generator[Event, None, MediaProduced | Notice]:
        """Generate and save one item, yielding its progress live (the generator runs in a worker thread); failures
        become notices so finished work is never lost."""
        tick = time.perf_counter()
        updates: queue.Queue[MediaProgress | None] = queue.Queue()
        outcome: dict[str, Any] = {}
        stop = stop or threading.Event()

        def progress(step: int, total: int) -> None:
            updates.put(MediaProgress(index=index, modality=request.modality, generator=request.generator, step=step,
                                      total=total))

        def work() -> None:
            try:
                outcome["made"] = self._make(request, known, progress, stop)
            except BaseException as err:  # surfaced below, as a notice
                outcome["error"] = err
            finally:
                updates.put(None)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            while (update := updates.get()) is not None:
                yield update
        finally:  # also when the consumer stops early (Ctrl-C, a client gone): cancel, and free the generator
            if worker.is_alive():
                stop.set()
            worker.join()
        try:
            if "error" in outcome:
                raise outcome["error"]
            saved = save_generated(outcome["made"], self.output_dir)
        except GenerationCancelled:
            return Notice(message=f"{request.modality.value} generation stopped")
        except Exception as err:  # a generator failure must not lose the reply or earlier media
            log.debug("%s generation failed", request.modality.value, exc_info=err)
            return Notice(message=f"{request.modality.value} generation failed: {err}")
        media = saved.with_id(next_id(saved.modality, history, made))
        return MediaProduced(media=media, request=request, seconds=time.perf_counter() - tick)

    def plan(self, request: MediaRequest, known: dict[str, Media]) -> tuple[str, GeneratedMedia | None]:
        """Route ``request`` to a configured generator (recorded in ``request.generator``), check its options with
        that plugin's ``Options`` before anything loads, and decode the media it edits (``known`` by id; an editor
        given no source edits the latest media it accepts). What batch and serve share with a turn."""
        source = known.get(request.source) if request.source else None
        if request.source and source is None:
            raise ValueError(f"unknown media id {request.source!r}")
        name = self.generators.route(request, None if source is None else source.modality)
        generator = self.generators.peek(name)
        if source is None and "generate" not in generator.capabilities:
            source = next((m for m in reversed(known.values()) if m.modality in generator.accepts_source), None)
        validate_options(generator.Options, request.options.model_dump(exclude_none=True), name)
        request.generator = name
        return name, self._source(request, source, generator.accepts_source)

    def _make(self, request: MediaRequest, known: dict[str, Media], progress: Progress | None,
              cancel: threading.Event | None) -> GeneratedMedia:
        name, source = self.plan(request, known)
        with quiet_libraries():
            return self.generators.get(name).generate([request], [source], progress, cancel)[0]

    def _source(self, request: MediaRequest, media: Media | None, accepted: frozenset[Modality],
                ) -> GeneratedMedia | None:
        """The decoded media a request edits, when its generator can edit that modality (else prompt only)."""
        if media is None or media.modality not in accepted or media.modality != Modality.IMAGE:
            request.source = None
            return None
        request.source = media.id
        pixels = np.asarray(decode_image(media, self.config.caps), dtype=np.float32) / 255.0
        return GeneratedMedia(modality=Modality.IMAGE, data=pixels)

    def _steer(self, generator: str | None, require: Require) -> Modality | None:
        """The modality ``generator`` makes (checked now, before the turn runs); None without one."""
        if generator is None:
            return None
        modality = next(iter(required_set(require)), None) if require else None
        return self.generators.modality(self.generators.resolve(generator, modality))

    def generate(self, prompt: str, *, modality: Modality | str | None = None, generator: str | None = None,
                 source: Attachment | None = None, options: dict[str, Any] | None = None,
                 progress: Progress | None = None, cancel: threading.Event | None = None) -> MediaProduced:
        """A generator alone, no LLM: make one item from ``prompt`` (editing ``source``: a file, or a conversation
        media item), saved in ``output_dir``. ``generator`` is a configured name, a plugin or a capability; without
        it the modality's default runs. Bad options or a failed generation raise ValueError naming the generator."""
        if modality is None and generator is not None:
            modality = self.generators.modality(self.generators.resolve(generator))
        if modality is None:
            raise ValueError("say which modality (image, video, audio) or which generator to use")
        request = MediaRequest(modality=Modality(modality), prompt=prompt, generator=generator,
                               options=validate_options(RequestOptions, options or {}, generator or str(modality)))
        known, added = self.media, []
        if source is not None:
            item = source if isinstance(source, Media) else self.load(source)
            if item.id is None:  # a file: named as the next item of the conversation would be
                item = item.with_id(next_id(item.modality, self.history))
                added.append(item)
            known[str(item.id)] = item
            request.source = item.id
        tick = time.perf_counter()
        saved = save_generated(self._make(request, known, progress, cancel), self.output_dir)
        media = saved.with_id(next_id(saved.modality, self.history, added))
        return MediaProduced(media=media, request=request, seconds=time.perf_counter() - tick)

    def _record(self, result: TurnResult) -> None:
        """Append one line per turn to ``turns.jsonl``; the resolved config is written once, named by its hash."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fingerprint = self._config_fingerprint
        config_file = self.output_dir / f"config-{fingerprint}.json"
        if not config_file.exists():
            config_file.write_text(json.dumps(self.config.model_dump(mode="json"), indent=2))
        record = {"config": fingerprint, "result": result.model_dump(mode="json")}
        with open(self.output_dir / "turns.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    @cached_property
    def _config_fingerprint(self) -> str:
        return self.config.fingerprint()


Require = Modality | Collection[Modality] | None


def required_set(require: Require) -> frozenset[Modality]:
    """``--require``'s forms (none, one modality, several) as one set of generatable modalities."""
    if require is None:
        return frozenset()
    wanted = frozenset([require] if isinstance(require, Modality) else require)
    bad = sorted(m.value for m in wanted if m not in OUTPUT_MODALITIES)
    if bad:
        raise ValueError(f"require {', '.join(bad)}: choose from image, video, audio")
    return wanted


@dataclass
class Reply:
    """What decoding returns: the reply text, its parsed requests and notices, the generated ids."""

    text: str
    requests: list[MediaRequest]
    notices: list[str]
    ids: list[int]
    stopped: bool = False

    @classmethod
    def of(cls, events: list[Event], ids: list[int], stopped: bool = False) -> Reply:
        return cls(text="".join(e.text for e in events if isinstance(e, TextDelta)).strip(),
                   requests=[e.request for e in events if isinstance(e, MediaRequested)],
                   notices=[e.message for e in events if isinstance(e, Notice)], ids=list(ids), stopped=stopped)


@dataclass
class Produced:
    media: list[MediaProduced]
    notices: list[str]


def yield_return(events: Generator[Event, None, Reply]) -> Reply:
    """Drain a phase's events and return its value."""
    while True:
        try:
            next(events)
        except StopIteration as done:
            return done.value


def media_by_id(history: Sequence[Message]) -> dict[str, Media]:
    return {str(m.id): m for message in history for m in message.media}


def next_id(modality: Modality, history: Sequence[Message], pending: Sequence[Media] = ()) -> str:
    """The next id of a modality: one past the highest in the history (and media not yet in it), so ids survive
    restoring a log with a vanished file, and an id freed by ``undo`` is given again."""
    label = modality.label
    taken = [m.id for message in history for m in message.media] + [m.id for m in pending]
    numbers = [int(i.rsplit("_", 1)[1]) for i in taken if i and i.startswith(f"{label}_")]
    return f"{label}_{max(numbers, default=0) + 1}"


def effective_options(options: GenerationOptions, defaults: dict[str, Any] | None, seed: int | None,
                      index: int) -> GenerationOptions:
    """A request's own options over the turn's defaults; the seed is always set (and so recorded): the request's,
    else the turn seed plus the request's index, else a fresh random one."""
    merged = {**(defaults or {}), **options.model_dump(exclude_none=True)}
    if merged.get("seed") is None:
        merged["seed"] = seed + index if seed is not None else secrets.randbelow(2**31)
    return RequestOptions.model_validate(merged)  # plugin-specific options ride along to the plugin


def clean_text(text: str) -> str:
    """Lone surrogates (undecodable argv/stdin bytes, JSON escapes) become U+FFFD, so tokenizers never see them."""
    return _SURROGATES.sub("\ufffd", text)


_SURROGATES = re.compile("[\ud800-\udfff]")


def save_generated(result: GeneratedMedia, output_dir: Path) -> Media:
    """Write generated media under a content-hash name the program chooses (PNG, MP4, WAV)."""
    if result.modality == Modality.IMAGE:
        return save_image(result.data, output_dir)
    if result.modality == Modality.VIDEO:
        return save_video(result.data, result.fps or 8, output_dir)
    return save_audio(result.data, result.sample_rate or 16000, output_dir)
