"""What the alignment and instruction-tuning recipes share: loading the model a config names, the frozen-encoder
feature table, rendering examples into ids/labels, and embedding a padded batch with soft tokens spliced in.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from anyverse.checkpoint import PROJECTORS, checkpoint_config
from anyverse.config import load_config
from anyverse.devices import resolve_dtype
from anyverse.encoders.imagebind import ImageBindEncoder
from anyverse.media import MediaError, load_media
from anyverse.model import AnyverseModel
from anyverse.pool import GeneratorPool
from anyverse.signals import REQUEST_CLOSE, REQUEST_OPEN
from anyverse.train.config import TrainConfig
from anyverse.train.manifest import RequestRecord
from anyverse.types import Media, Message, Modality
from anyverse.weights import expand

log = logging.getLogger(__name__)

IGNORE = -100
T = TypeVar("T")


def load_model(config: TrainConfig, device: torch.device,
               output_projectors: bool = False) -> tuple[AnyverseModel, GeneratorPool]:
    """The model a training config names (profile, YAML, or a checkpoint to continue from, its base verified) in
    fp32, and a generator pool for conditioning specs and target encodings."""
    check = None
    if expand(config.model).is_dir():
        model_cfg, check = checkpoint_config(expand(config.model), config.model_overrides)
    else:
        model_cfg = load_config(config.model, config.model_overrides)
    dtype = resolve_dtype("fp32", device)
    pool = GeneratorPool.from_config(model_cfg, device, dtype)
    specs = pool.conditioning_specs() if output_projectors else {}
    model = AnyverseModel.from_config(model_cfg, device, dtype, specs, check, output_projectors=output_projectors)
    return model, pool


@dataclass
class FeatureTable:
    """Frozen-encoder outputs for every media file of a dataset, computed once (batched; resumable through the
    on-disk embedding cache) and then served from memory every epoch: the encoder never runs again."""

    media: dict[Path, Media] = field(default_factory=dict)
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)

    @classmethod
    def build(cls, encoder: ImageBindEncoder, files: list[tuple[Path, Modality]], caps: Any) -> FeatureTable:
        table = cls()
        for path, modality in dict.fromkeys(files):
            try:
                table.media[path] = load_media(path, caps, modality if modality in (
                    Modality.DEPTH, Modality.THERMAL) else None)
            except MediaError as err:
                table.skip(path, err)
        by_modality: dict[Modality, list[Media]] = {}
        for item in table.media.values():
            by_modality.setdefault(item.modality, []).append(item)
        for items in by_modality.values():
            for start in range(0, len(items), encoder.batch_size):
                table._encode(encoder, items[start : start + encoder.batch_size], caps)
        if table.skipped:
            log.warning("features: skipped %d files (%s)", sum(table.skipped.values()), dict(table.skipped))
        return table

    def skip(self, path: Path, err: MediaError) -> None:
        self.skipped[err.group[:80]] += 1
        self.media.pop(path, None)
        log.debug("skipping %s", err)

    def _encode(self, encoder: ImageBindEncoder, batch: list[Media], caps: Any) -> None:
        """A batch at once; if a file in it fails to decode, item by item so only that file is skipped."""
        try:
            out = encoder.encode(batch, caps)
        except MediaError as err:
            if len(batch) == 1:
                self.skip(batch[0].path, err)
            else:
                for item in batch:
                    self._encode(encoder, [item], caps)
            return
        for i, item in enumerate(batch):
            self.pooled[item.sha256], self.tokens[item.sha256] = out.pooled[i].cpu(), out.tokens[i].cpu()

    def add_grey(self, media: list[Media]) -> dict[Path, Media]:
        """Grey twins of image and video ``media`` (keyed ``<sha256>-grey``): their two-view features (the encoder's
        ``grey_view``) with the colour view zeroed, so a projector sees the grey view alone."""
        twins = {m.path: m.model_copy(update={"sha256": f"{m.sha256}-grey"}) for m in media}
        for item in media:
            pooled, tokens = self.pooled[item.sha256].clone(), self.tokens[item.sha256].clone()
            pooled[: len(pooled) // 2] = 0
            tokens[: len(tokens) // 2] = 0
            self.pooled[twins[item.path].sha256], self.tokens[twins[item.path].sha256] = pooled, tokens
        return twins

    def stack(self, media: list[Media]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled [N, D] and token [N, T, D'] features of ``media``, in order."""
        return (torch.stack([self.pooled[m.sha256] for m in media]),
                torch.stack([self.tokens[m.sha256] for m in media]))

    def has(self, path: Path) -> bool:
        return path in self.media and self.media[path].sha256 in self.pooled


@dataclass
class Example:
    """One training sequence: ids, labels (IGNORE outside the assistant's reply), media slots and signal runs."""

    ids: list[int]
    labels: list[int]
    slots: list[tuple[Media, int, int]]
    signals: list[tuple[Modality, int, str]] = field(default_factory=list)  # (modality, first position, prompt)


def reply_text(text: str, requests: list[RequestRecord], mode: str, model: AnyverseModel) -> str:
    """The assistant's target: meta-responses (ModaVerse) or a description plus signal tokens (NExT-GPT)."""
    parts = [text] if text else []
    for request in requests:
        if mode == "meta":
            body = json.dumps(request.model_dump(mode="json", exclude_none=True))  # spacing the system prompt shows
            parts.append(f"{REQUEST_OPEN}{body}{REQUEST_CLOSE}")
        else:
            words = "" if request.prompt in text else request.prompt
            parts.append(words + "".join(model.llm.vocab.signal_tokens(Modality(request.modality))))
    return "\n".join(parts)


def spread(items: list[T], limit: int | None) -> list[T]:
    """At most ``limit`` items taken evenly across ``items`` (manifests are often grouped by modality, so a plain
    prefix, or a whole-number stride cut short, would leave the last groups out)."""
    if not limit or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


def render_example(model: AnyverseModel, history: list[Message], target: str, mode: str,
                   requests: list[RequestRecord] | None = None) -> Example:
    """Prompt exactly as inference renders it (generation prompt included), then the reply and end of turn."""
    context = model.render(history, mode)
    tokenizer = model.llm.tokenizer
    reply = tokenizer(target, add_special_tokens=False).input_ids + model.llm.stop_ids[:1]
    ids = context.ids + reply
    labels = [IGNORE] * len(context.ids) + reply
    signals = []
    if mode == "signal":
        runs = model.signal_runs(reply)
        for (modality, start), request in zip(runs, requests or [], strict=False):
            signals.append((modality, len(context.ids) + start, request.prompt))
    return Example(ids=ids, labels=labels, slots=context.slots, signals=signals)


class MadeOnUse(Sequence[T]):
    """A stage's items, each made (tokenised) by its function the first time a batch draws it and kept: a short
    run draws a fraction of a large corpus, and the rest is never made."""

    def __init__(self, makers: list[Callable[[], T]]):
        self.makers, self.made = makers, dict[int, T]()

    def __len__(self) -> int:
        return len(self.makers)

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        index = range(len(self))[index]
        if index not in self.made:
            self.made[index] = self.makers[index]()
        return self.made[index]


def pad_right(rows: list[tuple[list[int], list[int]]], pad: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels) rows right-padded into [B, L] ids, attention mask and labels (IGNORE on padding)."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [pad] * (length - len(i)) for i, _ in rows], device=device)
    mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i, _ in rows], device=device)
    labels = torch.tensor([lab + [IGNORE] * (length - len(lab)) for _, lab in rows], device=device)
    return ids, mask, labels


def embed_batch(model: AnyverseModel, examples: list[Example], features: FeatureTable,
                skip: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [B, L, D] embeddings with projected soft tokens in the media slots, attention mask, labels,
    of each example's ids after the first ``skip`` (a shared prefix whose keys/values are cached)."""
    device = model.llm.model.get_input_embeddings().weight.device
    ids, mask, labels = pad_right([(e.ids[skip:], e.labels[skip:]) for e in examples],
                                  model.llm.tokenizer.pad_token_id, device)
    embeds = model.llm.input_embeddings(ids)
    slots = [(b, media, start - skip, k) for b, e in enumerate(examples) for media, start, k in e.slots]
    if slots:
        embeds = embeds.clone()
        for modality in {media.modality for _, media, _, _ in slots}:
            mine = [s for s in slots if s[1].modality == modality]
            pooled, tokens = features.stack([m for _, m, _, _ in mine])
            projected = model.input_projectors[modality.value](pooled.to(device), tokens.to(device))
            for (b, _, start, k), soft in zip(mine, projected, strict=True):
                embeds[b, start : start + k] = soft
    return embeds, mask, labels


class FrozenPrefix:
    """Keys and values of the ids every example starts with (system prompt, chat header), computed once by the
    frozen LLM, so that each step runs the LLM over the rest only: with a 200-token system prompt before a
    30-token caption turn, that is most of an encoder-alignment step. Valid only while the LLM does not train."""

    def __init__(self, model: AnyverseModel, examples: list[Example]):
        first = examples[0].ids
        length = len(first) - 1
        for example in examples:
            ends = [len(example.ids) - 1, *(start for _, start, _ in example.slots),
                    next(i for i, label in enumerate([*example.labels, 0]) if label != IGNORE)]
            length = min(length, *ends)
            while example.ids[:length] != first[:length]:
                length -= 1
        self.length = length
        ids = torch.tensor([first[:length]], device=model.llm.model.get_input_embeddings().weight.device)
        with torch.no_grad():
            cache = model.llm.model(input_ids=ids, use_cache=True).past_key_values
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    def __call__(self, model: AnyverseModel, embeds: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> Any:
        """The LLM's output over ``embeds`` (ids after the prefix, from ``embed_batch(..., skip=length)``) as if the
        prefix came first."""
        from transformers import DynamicCache

        batch = embeds.shape[0]
        cache = DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.layers])
        mask = torch.cat([mask.new_ones(batch, self.length), mask], dim=1)
        return model.llm.model(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache, **kwargs)


def conditioning_targets(pool: GeneratorPool, modality: Modality, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The generator's own text-encoder output for each prompt (decoder-side regression targets), on CPU."""
    generator = pool.get(modality)
    with torch.no_grad():
        out = generator.encode_prompts(prompts)
    spec = generator.conditioning_spec()
    return {name: out[name].float().cpu() for name in spec}


def l2_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NExT-GPT's "L2": Euclidean distance per token over the feature dim, averaged (not MSE)."""
    return (pred - target).norm(dim=-1).mean()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross-entropy: position t predicts label t+1; IGNORE labels do not count."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def save_projectors(model: AnyverseModel, directory: Path) -> dict[tuple[str | None, str], str | None]:
    """Write every projector to the checkpoint and point ``projector_weights`` at it."""
    save_file({k: v.contiguous() for k, v in model.projector_state().items()}, str(directory / PROJECTORS))
    return {(None, "projector_weights"): PROJECTORS}
