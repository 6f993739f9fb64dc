"""Streamed generation from ``inputs_embeds`` with the constraints that keep requests well formed.

``RequestConstraints`` is a stateless logits processor (it reads the generated ids each step): soft-token
placeholders are never generated, a started signal run is completed in order (NExT-GPT asserted instead, #66),
the other mode's syntax is masked, and ``require`` reserves the end of the token budget for a request.
``xgrammar`` (when installed) constrains the JSON inside meta-response markers to the schema, written compactly
(no free whitespace), and a ``RequestCloser`` finishes an open request validly before the budget runs out.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from anyverse.completion import Incomplete, shortest_completion
from anyverse.llm import LoadedLLM
from anyverse.signals import MEDIA_END, MEDIA_START, MEDIA_TOKEN, REQUEST_CLOSE, REQUEST_OPEN, meta_json_schema
from anyverse.types import Modality

log = logging.getLogger(__name__)


@dataclass
class RequestConstraints(LogitsProcessor):
    """Token-level rules for one reply. ``require``: modalities the reply must make, one request each."""

    llm: LoadedLLM
    mode: str
    max_new_tokens: int
    require: frozenset[Modality] = frozenset()
    meta_reserve: int = 0
    closer: RequestCloser | None = None
    _ids: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [REQUEST_OPEN, REQUEST_CLOSE, MEDIA_START, MEDIA_TOKEN, MEDIA_END, *self.llm.vocab.all_signal_tokens]
        self._ids = {n: self.llm.token_id(n) for n in names}
        self._runs = {m: [self._ids[t] for t in self.llm.vocab.signal_tokens(m)] for m in self.llm.vocab.counts}
        ours = set(self._ids.values())
        tokenizer_specials = self.llm.tokenizer.all_special_ids
        # placeholders, and template/bos/pad tokens: never part of a reply (the stop tokens are)
        self._never = [self._ids[n] for n in (MEDIA_START, MEDIA_TOKEN, MEDIA_END)] + [
            i for i in tokenizer_specials if i not in ours and i not in self.llm.stop_ids]
        self._later_signals = [i for run in self._runs.values() for i in run[1:]]
        if self.mode == "meta":
            self._never += [i for run in self._runs.values() for i in run]
        else:
            self._never += [self._ids[REQUEST_OPEN], self._ids[REQUEST_CLOSE]]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Runs after a grammar processor: it only narrows what the grammar allows, never widens it."""
        for row, ids in enumerate(input_ids.tolist()):
            allowed = scores[row].clone()
            forced = self._forced(ids)
            if forced is not None and torch.isfinite(allowed[forced]):
                scores[row] = float("-inf")
                scores[row, forced] = allowed[forced]
                continue
            scores[row, self._never] = float("-inf")
            if self.mode == "signal":
                scores[row, self._later_signals] = float("-inf")
            if self._missing(ids):
                scores[row, self.llm.stop_ids] = float("-inf")
            self._keep_closable(scores[row], ids)
            if not torch.isfinite(scores[row]).any():  # the rules conflict with a grammar: the grammar wins
                scores[row] = allowed
        return scores

    def _forced(self, ids: list[int]) -> int | None:
        remaining = self.max_new_tokens - len(ids)
        if self.mode == "signal":
            for run in self._runs.values():  # finish a started run
                for k in range(len(run) - 1, 0, -1):
                    if len(ids) >= k and ids[-k:] == run[:k]:
                        return run[k]
            missing = self._missing(ids)
            if missing and remaining <= sum(len(self._runs[m]) for m in missing):
                return self._runs[missing[0]][0]
            return None
        body = self._open_request(ids)
        if body is not None:
            plan = self.closer.plan(body) if self.closer else None
            if plan is not None and remaining <= len(plan):  # the budget left is what closing takes: close
                return plan[0]
            return self._ids[REQUEST_CLOSE] if plan is None and remaining <= 1 else None
        if remaining <= self.meta_reserve * len(self._missing(ids)):
            return self._ids[REQUEST_OPEN]
        return None

    def _keep_closable(self, scores: torch.Tensor, ids: list[int]) -> None:
        """Near the end of the budget, allow only tokens after which a request can still close in time (of the
        ``_CANDIDATES`` likeliest), so no token opens more than the budget can finish."""
        if self.closer is None:
            return
        remaining = self.max_new_tokens - len(ids)
        body = self._open_request(ids)
        if body is None:
            if remaining <= self.closer.window:  # not even the shortest request fits after the marker
                scores[self._ids[REQUEST_OPEN]] = float("-inf")
            return
        if (plan := self.closer.plan(body)) is None:
            return
        if remaining > len(plan) + self.closer.window or not torch.isfinite(scores[plan[0]]):
            return
        keep = [plan[0]]
        for token in torch.topk(scores, _CANDIDATES).indices.tolist():
            after = self.closer.plan([*body, token]) if token != plan[-1] else []
            if torch.isfinite(scores[token]) and after is not None and len(after) <= remaining - 1:
                keep.append(token)
        kept = scores[keep].clone()
        scores.fill_(float("-inf"))
        scores[keep] = kept

    def _open_request(self, ids: list[int]) -> list[int] | None:
        """The body of a request still open at the end of ``ids`` (meta mode), else None."""
        opens = [i for i, t in enumerate(ids) if t == self._ids[REQUEST_OPEN]]
        if not opens or self._ids[REQUEST_CLOSE] in ids[opens[-1] :]:
            return None
        return ids[opens[-1] + 1 :]

    def _missing(self, ids: list[int]) -> list[Modality]:
        """Required modalities the reply has not asked for yet (meta: the grammar limits requests to the required
        modalities, so each request made counts for one of them)."""
        required = sorted(self.require)
        if self.mode == "signal":
            return [m for m in required if self._runs[m][0] not in ids]
        return required[ids.count(self._ids[REQUEST_OPEN]):]


_CANDIDATES = 8  # tokens checked near the end of the budget, likeliest first


@dataclass
class RequestCloser:
    """Plans the tokens that finish an open meta-response validly: the shortest completion of its JSON under the
    schema, tokenised greedily (longest vocabulary entry first), then the end marker."""

    schema: dict
    token_bytes: list[bytes]  # what each token id decodes to
    by_bytes: dict[bytes, int]  # ordinary tokens by their bytes, for tokenising a completion
    close_id: int

    def __post_init__(self) -> None:
        self._longest = max(map(len, self.by_bytes))
        self._plans: dict[tuple[int, ...], list[int] | None] = {}  # one reply's bodies: a step asks up to 10 times
        plan = self.plan([])
        self.window = len(plan) if plan else 0  # about the most one token can add to what closing takes

    def plan(self, body: list[int]) -> list[int] | None:
        """Token ids that close a request whose body so far is ``body``; None if it is not a valid start."""
        if (key := tuple(body)) not in self._plans:
            self._plans[key] = self._plan(body)
        return self._plans[key]

    def _plan(self, body: list[int]) -> list[int] | None:
        text = b"".join(self.token_bytes[i] for i in body).decode("latin-1")
        try:
            rest = shortest_completion(text, self.schema).encode("latin-1")
        except Incomplete:
            return None
        tokens, start = [], 0
        while start < len(rest):
            size = next((n for n in range(min(self._longest, len(rest) - start), 0, -1)
                         if rest[start : start + n] in self.by_bytes), 0)
            if not size:
                return None
            tokens.append(self.by_bytes[rest[start : start + size]])
            start += size
        return [*tokens, self.close_id]


def _meta_schema(max_prompt_chars: int, media_ids: tuple[str, ...], require: frozenset[Modality],
                 generators: tuple[str, ...] = (), options: str | None = None) -> dict:
    return json.loads(meta_json_schema(max_prompt_chars, media_ids, tuple(sorted(m.value for m in require)),
                                       generators, options))


def _tokenizer_info(llm: LoadedLLM) -> Any:
    import xgrammar as xgr

    if "tokenizer-info" not in llm.grammar_cache:  # vocab_size: the logits width, also under peft wrappers
        llm.grammar_cache["tokenizer-info"] = xgr.TokenizerInfo.from_huggingface(
            llm.tokenizer, vocab_size=int(llm.model.config.vocab_size))
    return llm.grammar_cache["tokenizer-info"]


def request_closer(llm: LoadedLLM, max_prompt_chars: int, media_ids: tuple[str, ...],
                   require: frozenset[Modality] = frozenset(), generators: tuple[str, ...] = (),
                   options: str | None = None) -> RequestCloser | None:
    """The closer for the schema ``grammar_processor`` decodes under; None without xgrammar (it reads the
    token bytes from xgrammar's tokenizer info)."""
    if importlib.util.find_spec("xgrammar") is None:
        return None
    if "token-bytes" not in llm.grammar_cache:
        info = _tokenizer_info(llm)
        special = set(info.special_token_ids) | set(llm.tokenizer.all_special_ids)
        token_bytes = [bytes(b) for b in info.decoded_vocab]
        by_bytes: dict[bytes, int] = {}
        for i, piece in enumerate(token_bytes):
            if piece and i not in special:
                by_bytes.setdefault(piece, i)
        llm.grammar_cache["token-bytes"] = (token_bytes, by_bytes)
    token_bytes, by_bytes = llm.grammar_cache["token-bytes"]
    return RequestCloser(_meta_schema(max_prompt_chars, media_ids, require, generators, options), token_bytes,
                         by_bytes, llm.token_id(REQUEST_CLOSE))


def grammar_processor(llm: LoadedLLM, max_prompt_chars: int, media_ids: tuple[str, ...],
                      require: frozenset[Modality] = frozenset(), generators: tuple[str, ...] = (),
                      options: str | None = None):
    """xgrammar processor: free text, and schema-valid compact JSON (no free whitespace) between request markers
    (``generators`` and ``options`` as ``meta_json_schema`` takes them). None if not installed."""
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    schema = _meta_schema(max_prompt_chars, media_ids, require, generators, options)
    key = f"{json.dumps(schema)}|{sorted(require)}"
    if key not in llm.grammar_cache:  # compiling costs ~10 ms a turn; the processor itself is single-use
        llm.grammar_cache[key] = xgr.GrammarCompiler(_tokenizer_info(llm)).compile_structural_tag(
            _request_tag(llm, schema, bool(require)))
    return xgr.contrib.hf.LogitsProcessor(llm.grammar_cache[key])


def _request_tag(llm: LoadedLLM, schema: dict, at_least_one: bool) -> Any:
    """Free text; after the request marker, the schema's compact JSON (xgrammar's JSONSchemaFormat allows free
    whitespace, or runs of it when bounded), then the end marker."""
    import xgrammar as xgr
    from xgrammar.structural_tag import GrammarFormat, StructuralTag, TagFormat, TokenFormat, TokenTriggeredTagsFormat

    for bound in ("minLength", "maxLength"):  # the prompt's pattern bounds its length; xgrammar warns beside it
        schema["properties"]["prompt"].pop(bound, None)
    open_id, close_id = llm.token_id(REQUEST_OPEN), llm.token_id(REQUEST_CLOSE)
    excluded: list[int | str] = [llm.token_id(t) for t in (REQUEST_CLOSE, MEDIA_START, MEDIA_TOKEN, MEDIA_END,
                                                           *llm.vocab.all_signal_tokens)]
    compact = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    return StructuralTag(
        format=TokenTriggeredTagsFormat(
            trigger_tokens=[open_id],
            tags=[TagFormat(begin=TokenFormat(token=open_id), content=GrammarFormat(grammar=compact),
                            end=TokenFormat(token=close_id))],
            exclude_tokens=excluded,
            at_least_one=at_least_one,
        )
    )


class _TextStreamer(BaseStreamer):
    """Decodes generated ids incrementally into a queue (vLLM-style prefix/read offsets, so a token costs a
    short decode, not the whole reply); holds back incomplete UTF-8 sequences."""

    def __init__(self, llm: LoadedLLM):
        self.llm = llm
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded already; text after them is new
        self.queue: queue.Queue[str | None] = queue.Queue()

    def put(self, value: torch.Tensor) -> None:
        new = [i for i in value.reshape(-1).tolist() if i not in self.llm.stop_ids]
        if not new:
            return
        self.ids += new
        decode = self.llm.tokenizer.decode
        seen = decode(self.ids[self.prefix : self.read], skip_special_tokens=False)
        text = decode(self.ids[self.prefix :], skip_special_tokens=False)
        if len(text) > len(seen) and not text.endswith("\ufffd"):
            self.queue.put(text[len(seen) :])
            self.prefix, self.read = self.read, len(self.ids)

    def end(self) -> None:
        self.queue.put(None)


class _StopWhenSet(StoppingCriteria):
    """Ends ``generate`` at the next token once the event is set (Ctrl-C in chat, a client gone in serve)."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


class GenerationStream:
    """Iterate to get text pieces as they are sampled; afterwards ``ids`` holds the generated token ids.

    Decoding stops when ``stop`` is set or the iterator is closed early; either way the model is free again when
    iteration ends (the decode thread is joined).
    """

    def __init__(self, llm: LoadedLLM, embeds: torch.Tensor, processors: list, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int | None, stop: threading.Event | None = None):
        self.llm = llm
        self.ids: list[int] = []
        self._streamer = _TextStreamer(llm)
        self._error: BaseException | None = None
        self._closed = threading.Event()
        events = (self._closed,) if stop is None else (self._closed, stop)
        kwargs = {
            "inputs_embeds": embeds,
            "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            "max_new_tokens": max_new_tokens,
            "do_sample": temperature > 0,
            "logits_processor": processors,
            "stopping_criteria": StoppingCriteriaList([_StopWhenSet(*events)]),
            "streamer": self._streamer,
            "eos_token_id": llm.stop_ids,
            "pad_token_id": llm.tokenizer.pad_token_id,
        }
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        self._kwargs, self._seed = kwargs, seed

    def _run(self) -> None:
        try:
            if self._seed is not None:
                torch.manual_seed(self._seed)
            with torch.inference_mode():
                out = self.llm.model.generate(**self._kwargs)
            self.ids = [i for i in out[0].tolist() if i not in self.llm.stop_ids
                        and i != self.llm.tokenizer.pad_token_id]
        except BaseException as err:  # surfaced in the consuming thread
            self._error = err
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            while (piece := self._streamer.queue.get()) is not None:
                yield piece
        finally:  # also on close() or an exception in the consumer: stop decoding and wait for the model
            self._closed.set()
            thread.join()
        if self._error is not None:
            raise self._error
