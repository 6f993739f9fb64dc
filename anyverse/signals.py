"""The one owner of the special vocabulary, the meta-response schema and the streaming parser.

Two ways for the LLM to ask for media (``output.mode``):
- ``meta`` (ModaVerse style): ``<|request|>{"modality": "image", "prompt": "...", "source": "img_1"}<|/request|>``,
  validated against :class:`MetaResponse`;
- ``signal`` (NExT-GPT style): the ordered run ``[IMG0][IMG1]..[IMGn-1]``; the hidden states at those positions
  go through the output projector.
The parser turns a token stream into events; malformed requests become :class:`Notice` events, never exceptions.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from anyverse.types import (
    OUTPUT_MODALITIES,
    Event,
    MediaRequest,
    MediaRequested,
    Modality,
    Notice,
    RequestOptions,
    TextDelta,
)

REQUEST_OPEN = "<|request|>"
REQUEST_CLOSE = "<|/request|>"
MEDIA_START = "<|media_start|>"
MEDIA_TOKEN = "<|media|>"
MEDIA_END = "<|media_end|>"
_SIGNAL_PREFIX = {Modality.IMAGE: "IMG", Modality.VIDEO: "VID", Modality.AUDIO: "AUD"}
MEDIA_ID_PATTERN = r"^(?:" + "|".join(m.label for m in Modality) + r")_[1-9][0-9]{0,3}$"


class SignalVocabulary:
    """Every special token anyverse adds to a tokenizer, derived from the signal-token counts in the config."""

    def __init__(self, counts: dict[Modality, int], markers: list[str] | None = None):
        """``markers``: the tokens added before the signal tokens; anyverse's own unless a checkpoint fixes them."""
        self.counts = {m: counts[m] for m in OUTPUT_MODALITIES if m in counts}
        ours = [REQUEST_OPEN, REQUEST_CLOSE, MEDIA_START, MEDIA_TOKEN, MEDIA_END]
        self.markers = ours if markers is None else markers

    def signal_tokens(self, modality: Modality) -> list[str]:
        return [f"[{_SIGNAL_PREFIX[modality]}{i}]" for i in range(self.counts[modality])]

    @property
    def all_signal_tokens(self) -> list[str]:
        return [t for m in self.counts for t in self.signal_tokens(m)]

    @property
    def special_tokens(self) -> list[str]:
        """Added to the tokenizer as special tokens, in a fixed order (checkpoints depend on it)."""
        return [*self.markers, *self.all_signal_tokens]

    def parse_signal(self, token: str) -> tuple[Modality, int] | None:
        match = re.fullmatch(r"\[(IMG|VID|AUD)(\d+)\]", token)
        if not match:
            return None
        modality = next(m for m, p in _SIGNAL_PREFIX.items() if p == match.group(1))
        index = int(match.group(2))
        return (modality, index) if index < self.counts.get(modality, 0) else None


class MetaResponse(BaseModel):
    """What the LLM writes between the request markers. One schema for validation and constrained decoding."""

    model_config = ConfigDict(extra="forbid")

    modality: Literal["image", "video", "audio"]
    prompt: str = Field(min_length=1, max_length=4000)
    source: str | None = Field(default=None, pattern=MEDIA_ID_PATTERN)
    generator: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
                                  description="a configured generator or a capability (generate, edit, speech)")
    options: RequestOptions = Field(default_factory=RequestOptions)


@lru_cache(maxsize=64)
def meta_json_schema(max_prompt_chars: int, media_ids: tuple[str, ...] = (), modalities: tuple[str, ...] = (),
                     generators: tuple[str, ...] = (), options: str | None = None) -> str:
    """JSON schema for constrained decoding: bounded, visible prompt, ``source`` limited to ids that exist, ``modality``
    limited to ``modalities`` when given (a reply that must make a video), ``generator`` to ``generators`` (the
    configured names and capabilities; none: the field is left out) and ``options`` to the JSON schema ``options``
    (the configured plugins' fields; default: the uniform options only)."""
    schema: dict[str, Any] = json.loads(_meta_schema())  # a fresh copy to edit
    props = schema["properties"]
    if modalities:
        props["modality"]["enum"] = list(modalities)
    props["prompt"]["maxLength"] = max_prompt_chars
    # a visible first character and no control characters (a blank prompt fails validation), and no "|", so a
    # prompt cannot spell a request marker that the parser would read as the end of the request
    props["prompt"]["pattern"] = rf'^[^\x00-\x20\x7f"\\|][^\x00-\x1f\x7f"\\|]{{0,{max_prompt_chars - 1}}}$'
    props["source"] = {"anyOf": [{"enum": list(media_ids)}, {"type": "null"}]} if media_ids else {"type": "null"}
    if generators:
        props["generator"] = {"anyOf": [{"enum": list(generators)}, {"type": "null"}]}
    else:  # a prompt that names no generators keeps the schema it was trained with
        del props["generator"]
    option_schema = json.loads(options) if options else {**schema["$defs"]["RequestOptions"]}
    schema["$defs"]["RequestOptions"] = {**option_schema, "additionalProperties": False}
    return json.dumps(schema)


@lru_cache(maxsize=1)
def _meta_schema() -> str:
    """pydantic's schema of MetaResponse, built once (it costs milliseconds, and the media ids change every turn)."""
    return json.dumps(MetaResponse.model_json_schema())


def validate_meta(raw: str, max_prompt_chars: int) -> MediaRequest:
    """Parse and validate a meta-response body. Raises ValueError with a short, user-readable reason."""
    try:
        # strict=False: grammar backends let raw control characters into JSON strings; they are harmless here.
        data = json.loads(raw, strict=False)
    except json.JSONDecodeError as err:
        raise ValueError(f"request: invalid JSON ({err.msg} at column {err.colno})") from None
    try:
        meta = MetaResponse.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        raise ValueError(f"{where}: {first['msg']}") from None
    prompt = " ".join(re.sub(r"[\x00-\x1f\x7f\ufffd]", " ", meta.prompt).split())  # and undecodable bytes
    if not prompt:
        raise ValueError("prompt: empty")
    if len(prompt) > max_prompt_chars:
        raise ValueError(f"prompt: longer than {max_prompt_chars} characters")
    return MediaRequest(
        modality=Modality(meta.modality),
        prompt=prompt,
        source=meta.source,
        generator=meta.generator,
        options=meta.options,
        origin="meta",
    )


class StreamParser:
    """Incremental parser: feed decoded text pieces (special tokens appear verbatim), get events back.

    Text outside requests is released as soon as it cannot be the start of a marker, so it can be shown live.
    """

    def __init__(self, vocab: SignalVocabulary, mode: Literal["meta", "signal"], max_prompt_chars: int = 400):
        self.vocab = vocab
        self.mode = mode
        self.max_prompt_chars = max_prompt_chars
        self._pending = ""  # text that may still be the start of a special token
        self._body = ""  # JSON of the request being read
        self._in_request = False
        self._signal: tuple[Modality, int] | None = None  # (modality, tokens seen) of the run being read
        self._requests = 0
        self.failed_requests = 0  # started meta-responses that were malformed or never finished
        self._specials = [REQUEST_OPEN, REQUEST_CLOSE, *vocab.all_signal_tokens]
        self._special_re = re.compile("|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True)))
        self._longest_special = max(len(s) for s in self._specials)

    def feed(self, text: str) -> list[Event]:
        self._pending += text
        events: list[Event] = []
        while True:
            match = self._special_re.search(self._pending)
            if match is None:
                break
            before, token = self._pending[: match.start()], match.group(0)
            self._pending = self._pending[match.end() :]
            events += self._text(before)
            events += self._special(token)
        cut = len(self._pending) - self._possible_prefix_len(self._pending)
        events += self._text(self._pending[:cut])
        self._pending = self._pending[cut:]
        return events

    def close(self) -> list[Event]:
        """End of stream: flush text, report what was left unfinished."""
        events: list[Event] = []
        if self._in_request:
            self.failed_requests += 1
            events.append(Notice(message="the reply ended inside a media request; it was ignored"))
            self._in_request, self._body = False, ""
        events += self._end_signal_run()
        events += self._text(self._pending)
        self._pending = ""
        return events

    def _possible_prefix_len(self, text: str) -> int:
        for size in range(min(len(text), self._longest_special - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._specials):
                return size
        return 0

    def _text(self, text: str) -> list[Event]:
        if not text:
            return []
        if self._in_request:
            self._body += text
            return []
        return [*self._end_signal_run(), TextDelta(text=text)]

    def _special(self, token: str) -> list[Event]:
        if token in (REQUEST_OPEN, REQUEST_CLOSE):
            return self._marker(token)
        signal = self.vocab.parse_signal(token)
        assert signal is not None
        if self.mode != "signal":
            return [Notice(message=f"ignored signal token {token} (output mode is 'meta')")]
        return self._signal_token(*signal)

    def _marker(self, token: str) -> list[Event]:
        if self.mode != "meta":
            return [Notice(message=f"ignored request marker {token} (output mode is 'signal')")]
        if token == REQUEST_OPEN:
            if self._in_request:
                return [Notice(message="a media request started inside another; the first was dropped")]
            self._in_request = True
            return self._end_signal_run()
        if not self._in_request:
            return [Notice(message="a request end marker appeared without a start; ignored")]
        body, self._body, self._in_request = self._body, "", False
        try:
            request = validate_meta(body, self.max_prompt_chars)
        except ValueError as err:
            self.failed_requests += 1
            return [Notice(message=f"malformed media request ignored ({err})")]
        return [self._emit(request)]

    def _signal_token(self, modality: Modality, index: int) -> list[Event]:
        events: list[Event] = []
        if self._signal is not None and (self._signal[0] != modality or index != self._signal[1]):
            events += self._end_signal_run()
        if self._signal is None:
            if index != 0:
                return [*events, Notice(message=f"signal token {self.vocab.signal_tokens(modality)[index]} "
                                                "appeared outside a signal run; ignored")]
            self._signal = (modality, 0)
        self._signal = (modality, self._signal[1] + 1)
        if self._signal[1] == self.vocab.counts[modality]:
            self._signal = None
            events.append(self._emit(MediaRequest(modality=modality, origin="signal")))
        return events

    def _end_signal_run(self) -> list[Event]:
        if self._signal is None:
            return []
        modality, seen = self._signal
        self._signal = None
        return [Notice(message=f"incomplete {modality.value} signal ({seen} of {self.vocab.counts[modality]} "
                               "tokens); ignored")]

    def _emit(self, request: MediaRequest) -> MediaRequested:
        self._requests += 1
        return MediaRequested(request=request, index=self._requests - 1)
