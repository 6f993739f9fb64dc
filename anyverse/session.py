"""One conversation: context -> LLM stream -> parse -> route -> generate -> save -> splice back.

``Anyverse`` is the public entry point, diffusers-like: build it from a profile, a config file or a checkpoint,
then call ``turn`` (a typed result) or ``stream`` (events as they happen).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
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
from anyverse.media import decode_image, load_media, media_from_bytes, save_audio, save_image, save_video
from anyverse.model import AnyverseModel, Context
from anyverse.plugins import GeneratedMedia, GeneratorPool
from anyverse.signals import REQUEST_OPEN, StreamParser
from anyverse.types import (
    Event,
    Media,
    MediaProduced,
    MediaRequest,
    MediaRequested,
    Message,
    Modality,
    Notice,
    TextDelta,
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
        self.generators = GeneratorPool(config.generators, self.device, self.dtype, config.runtime.generator_memory_gb)
        if model is None:
            try:
                collect_missing([lambda: check_encoder_weights(config.encoder),
                                 lambda: check_llm_weights(config.llm), self.generators.check_weights,
                                 self._check_projectors])
            except MissingWeightsError as err:
                if config.profile != "toyworld":
                    raise
                raise MissingWeightsError(["toyworld: not built on this machine yet; `anyverse train toyworld` "
                                           "makes every piece below (CPU only, no downloads)", *err.missing]) from None
            specs = self.generators.conditioning_specs() if config.output.mode == "signal" else {}
            model = AnyverseModel.from_config(config, self.device, self.dtype, specs, check_base)
        self.model = model
        self.output_dir = Path(output_dir)
        self.history: list[Message] = []
        self.media: dict[str, Media] = {}
        self._ids: Counter[str] = Counter()

    @classmethod
    def from_profile(cls, name: str = "tiny", overrides: list[str] | None = None, **kwargs) -> Anyverse:
        """``Anyverse.from_profile("tiny", ["output.mode=signal"])``; a YAML file path works too."""
        return cls(load_config(name, overrides), **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | Path, overrides: list[str] | None = None, **kwargs) -> Anyverse:
        """Load a training checkpoint (or a run directory's newest one) onto the base it names, verified."""
        config, check = checkpoint_config(Path(path), overrides)
        return cls(config, check_base=check, **kwargs)

    def _check_projectors(self) -> None:
        real = self.config.encoder.tiny is None or self.config.llm.tiny is None
        if real and not self.config.projector_weights:
            raise MissingWeightsError(["projectors: real encoder/LLM but no trained projectors (projector_weights). "
                                       "Train them with `anyverse train` or point projector_weights at a "
                                       "projectors.safetensors; random projectors would make media meaningless."])

    # ---- inputs ---------------------------------------------------------------------------------------------

    def load(self, source: str | Path | bytes, modality: Modality | None = None) -> Media:
        """Validate a file or bytes into a Media (``modality`` marks depth/thermal images). A turn gives it an id."""
        if isinstance(source, bytes):
            return media_from_bytes(source, "upload", self.config.caps, anyverse_home() / "uploads", modality)
        return load_media(source, self.config.caps, modality)

    def _register(self, media: Media) -> Media:
        label = media.modality.label
        self._ids[label] += 1
        media = media.with_id(f"{label}_{self._ids[label]}")
        self.media[str(media.id)] = media
        return media

    def user_message(self, text: str, attachments: Sequence[Attachment]) -> Message:
        """Validate text and every attachment (before anything is written), then give the media ids."""
        caps = self.config.caps
        if len(text) > caps.max_text_chars:
            raise ValueError(f"message: {len(text)} characters exceeds the {caps.max_text_chars} cap "
                             "(caps.max_text_chars)")
        if len(attachments) > caps.max_attachments:
            raise ValueError(f"{len(attachments)} attachments exceed the cap of {caps.max_attachments}")
        loaded = [a if isinstance(a, Media) else self.load(a) for a in attachments]  # all validated first
        return Message(role="user", text=text, media=[self._register(m) for m in loaded])

    # ---- a turn ---------------------------------------------------------------------------------------------

    def context(self, history: list[Message]) -> Context:
        """Render ``history``, dropping the oldest turns if it would not fit the context window."""
        budget = self.config.llm.max_context_tokens - self.config.llm.max_new_tokens
        while True:
            context = self.model.render(history, self.config.output.mode)
            if len(context.ids) <= budget or len(history) <= 1:
                break
            history = history[1:]
        if len(context.ids) > budget:
            raise ValueError(f"message: {len(context.ids)} tokens do not fit the {budget}-token context budget")
        return context

    def stream(self, text: str, attachments: Sequence[Attachment] = (), *, require: Modality | None = None,
               seed: int | None = None) -> Iterator[Event]:
        """Run one turn, yielding text deltas live, then requests and produced media.

        At the end the typed result is in ``last_result`` and ``turn.json`` (inputs, resolved config, outputs) is
        written to ``output_dir``.
        """
        started = time.perf_counter()
        timings: dict[str, float] = {}
        user = self.user_message(text, attachments)
        context = self.context([*self.history, user])
        tick = time.perf_counter()
        embeds = self.model.embed(context)
        timings["encode"] = time.perf_counter() - tick

        tick = time.perf_counter()
        generated: list[int] = []
        decoded: list[Event] = []
        for event in self._decode(embeds, require, seed, generated):
            decoded.append(event)
            yield event
        timings["llm"] = time.perf_counter() - tick
        requests = [e.request for e in decoded if isinstance(e, MediaRequested)]
        if self.config.output.mode == "signal":
            for request, (_, conditioning) in zip(requests, self.model.signal_conditioning(embeds, generated),
                                                  strict=False):
                request.conditioning = conditioning

        produced: list[MediaProduced] = []
        notices = [e.message for e in decoded if isinstance(e, Notice)]
        tick = time.perf_counter()
        for index, request in enumerate(requests[: self.config.output.max_requests]):
            if request.options.seed is None and seed is not None:
                request.options = request.options.model_copy(update={"seed": seed + index})
            event = self._produce(request)
            if isinstance(event, MediaProduced):
                produced.append(event)
            elif isinstance(event, Notice):
                notices.append(event.message)
            yield event
        if len(requests) > self.config.output.max_requests:
            dropped = Notice(message=f"only the first {self.config.output.max_requests} media requests were honoured")
            notices.append(dropped.message)
            yield dropped
        timings["generate"] = time.perf_counter() - tick
        text = "".join(e.text for e in decoded if isinstance(e, TextDelta)).strip()
        self.history += [user, Message(role="assistant", text=text, media=[p.media for p in produced])]
        timings["total"] = time.perf_counter() - started
        self.last_result = TurnResult(text=text, media=produced, notices=notices, timings=timings,
                                      output_dir=self.output_dir)
        self._write_manifest(self.last_result, user.media)

    def draft(self, history: list[Message], *, require: Modality | None = None,
              seed: int | None = None) -> tuple[str, list[MediaRequest], list[str]]:
        """Decode a reply to ``history`` without generating media or touching the session: text, the parsed
        requests and notices. What evaluation and dry runs need."""
        embeds = self.model.embed(self.context(history))
        generated: list[int] = []
        events = list(self._decode(embeds, require, seed, generated))
        text = "".join(e.text for e in events if isinstance(e, TextDelta)).strip()
        return (text, [e.request for e in events if isinstance(e, MediaRequested)],
                [e.message for e in events if isinstance(e, Notice)])

    def _decode(self, embeds: torch.Tensor, require: Modality | None, seed: int | None,
                generated: list[int]) -> Iterator[Event]:
        """Sample the reply and parse it as it streams; retry malformed meta-responses a bounded number of times."""
        out = self.config.output
        llm_cfg = self.config.llm
        parser = StreamParser(self.model.llm.vocab, out.mode, out.max_prompt_chars)
        processors: list = []
        grammar = None
        if out.mode == "meta" and out.constrained != "none":
            grammar = grammar_processor(self.model.llm, out.max_prompt_chars, tuple(self.media), require)
            if grammar is None and out.constrained == "xgrammar":
                raise ValueError("output.constrained=xgrammar but xgrammar is not installed")
            if grammar is not None:
                processors.append(grammar)
        closer = request_closer(self.model.llm, out.max_prompt_chars, tuple(self.media), require) if grammar else None
        processors.append(RequestConstraints(self.model.llm, out.mode, llm_cfg.max_new_tokens, require,
                                             self._meta_reserve, closer))
        stream = GenerationStream(self.model.llm, embeds, processors, llm_cfg.max_new_tokens,
                                  llm_cfg.temperature, llm_cfg.top_p, seed)
        for piece in stream:
            yield from parser.feed(piece)
        yield from parser.close()
        generated += stream.ids
        if parser.failed_requests and grammar is None and out.mode == "meta":
            yield from self._retry_request(embeds, stream.ids, seed)

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

    def _produce(self, request: MediaRequest) -> MediaProduced | Notice:
        """Generate and save one item; failures become notices so finished work is never lost."""
        tick = time.perf_counter()
        try:
            generator = self.generators.get(request.modality)
            source = self._source(request, generator.accepts_source)
            media = self._register(save_generated(generator.generate(request, source), self.output_dir))
        except Exception as err:  # a generator failure must not lose the reply or earlier media
            log.debug("%s generation failed", request.modality.value, exc_info=True)
            return Notice(message=f"{request.modality.value} generation failed: {err}")
        return MediaProduced(media=media, request=request, seconds=time.perf_counter() - tick)

    def _source(self, request: MediaRequest, accepted: frozenset[Modality]) -> GeneratedMedia | None:
        """The decoded media a request edits, when its generator can edit that modality (else prompt only)."""
        if request.source is None:
            return None
        media = self.media.get(request.source)
        if media is None:
            raise ValueError(f"unknown media id {request.source!r}")
        if media.modality not in accepted or media.modality != Modality.IMAGE:
            request.source = None
            return None
        pixels = np.asarray(decode_image(media, self.config.caps), dtype=np.float32) / 255.0
        return GeneratedMedia(modality=Modality.IMAGE, data=pixels)

    def turn(self, text: str, attachments: Sequence[Attachment] = (), *, require: Modality | None = None,
             seed: int | None = None) -> TurnResult:
        """Run one turn to completion (see ``stream``) and return its typed result."""
        for _ in self.stream(text, attachments, require=require, seed=seed):
            pass
        return self.last_result

    def _write_manifest(self, result: TurnResult, inputs: list[Media]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        manifest = {
            "inputs": [m.model_dump(mode="json") for m in inputs],
            "result": result.model_dump(mode="json"),
            "config": self.config.model_dump(mode="json"),
        }
        (self.output_dir / "turn.json").write_text(json.dumps(manifest, indent=2))


def save_generated(result: GeneratedMedia, output_dir: Path) -> Media:
    """Write generated media under a content-hash name the program chooses (PNG, MP4, WAV)."""
    if result.modality == Modality.IMAGE:
        return save_image(result.data, output_dir)
    if result.modality == Modality.VIDEO:
        return save_video(result.data, result.fps or 8, output_dir)
    return save_audio(result.data, result.sample_rate or 16000, output_dir)
