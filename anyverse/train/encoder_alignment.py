"""Stage 1, encoder alignment: input projectors learn to caption media for a frozen LLM (encoder frozen too).

Loss: caption cross-entropy on media-caption pairs, as NExT-GPT's encoder-side stage. Features come from the
frozen-encoder table, so each file is decoded and encoded once for the whole run, and the shared system prompt's
keys/values are computed once, so each step runs the frozen LLM over the caption turn only. With ``grey``, coloured
images and videos are sometimes shown by the encoder's grey view alone, their colour word untrained: the grey view's
readout learns shape and position from them, the same for every colour.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anyverse.projectors import WordMixture
from anyverse.signals import MEDIA_END
from anyverse.train.common import (
    IGNORE,
    Example,
    FeatureTable,
    FrozenPrefix,
    embed_batch,
    load_model,
    next_token_loss,
    render_example,
    save_projectors,
)
from anyverse.train.config import TrainConfig
from anyverse.train.evaluation import caption_accuracy, load_pairs
from anyverse.train.manifest import PairRecord
from anyverse.types import Media, Message, Modality

CAPTION_INSTRUCTIONS = ("what is in {id}?", "describe {id}", "write a caption for {id}")


def caption_history(media: Media, index: int) -> list[Message]:
    """A user turn asking for a caption of ``media`` (instruction varied by ``index``)."""
    media = media.with_id(f"{media.modality.label}_1")
    instruction = CAPTION_INSTRUCTIONS[index % len(CAPTION_INSTRUCTIONS)].format(id=media.id)
    return [Message(role="user", text=instruction, media=[media])]


def reply_start(example: Example) -> int:
    """Where the example's reply begins: its first trained label."""
    return next(i for i, label in enumerate(example.labels) if label != IGNORE)


def caption_ids(example: Example) -> list[int]:
    """The caption's token ids: the example's reply labels, without the end of turn (words not trained: IGNORE)."""
    return example.labels[reply_start(example) : -1]


def untrain_word(example: Example, caption: str, word: str, tokenizer: Any) -> Example:
    """``example`` with the tokens of ``word`` (whole, first occurrence) in its caption reply set to IGNORE."""
    found = re.search(rf"\b{re.escape(word)}\b", caption)
    if found is None:
        return example
    start = reply_start(example)
    before, through = (len(tokenizer(caption[:end], add_special_tokens=False).input_ids) for end in found.span())
    labels = [IGNORE if start + before <= i < start + through else label for i, label in enumerate(example.labels)]
    return Example(ids=example.ids, labels=labels, slots=example.slots, signals=example.signals)


class EncoderAlignment(nn.Module):
    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__()
        self.config = config
        self.model, _ = load_model(config, device)
        self.model_config, self.base = self.model.config, self.model.base_fingerprint()
        self.pairs, self.features = load_pairs(self.model, config.data.train, config.modalities)
        self.modalities = sorted({m.modality for m in self.features.media.values()}, key=str)
        for modality in self.modalities:
            self.model.input_projectors[modality.value].requires_grad_(True)
        examples = [self._example(self.features.media[path], record, i) for i, (path, record) in enumerate(self.pairs)]
        greys = self._grey_twins() if config.grey else {}
        self.items = [(example, greys.get(i)) for i, example in enumerate(examples)]
        self.prefix = FrozenPrefix(self.model, examples) if config.loss.lm else None  # only the caption loss reads it
        if config.loss.words:
            self._check_word_projectors()

    def train(self, mode: bool = True) -> EncoderAlignment:
        super().train(mode)
        self.model.llm.model.eval()  # frozen: no dropout
        return self

    def _example(self, media: Media, record: PairRecord, index: int) -> Example:
        return render_example(self.model, caption_history(media, index), record.caption, self.model.config.output.mode)

    def _grey_twins(self) -> dict[int, Example]:
        """Pair index -> its example with the image or video in grey and the caption's colour word untrained."""
        if not self.model.encoder.grey_view:
            raise ValueError("grey: the grey twins are the encoder's grey view alone (set encoder.grey_view: true)")
        coloured = [(i, path, record) for i, (path, record) in enumerate(self.pairs)
                    if record.modality in (Modality.IMAGE, Modality.VIDEO) and "colour" in record.attributes]
        twins = self.features.add_grey([self.features.media[path] for _, path, _ in coloured])
        return {i: untrain_word(self._example(twins[path], record, i), record.caption, record.attributes["colour"],
                                self.model.llm.tokenizer) for i, path, record in coloured}

    def collate(self, items: list[tuple[Example, Example | None]]) -> list[Example]:
        """Each item, or at chance ``grey`` its grey twin where it has one."""
        return [grey if grey is not None and torch.rand(()) < self.config.grey else example for example, grey in items]

    def forward(self, batch: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        """The caption's cross-entropy through the frozen LLM and the word loss, each only where it has weight."""
        weights, values = self.config.loss, {}
        loss = torch.zeros((), device=self.model.llm.model.get_input_embeddings().weight.device)
        if weights.lm:
            assert self.prefix is not None
            embeds, mask, labels = embed_batch(self.model, batch, self.features, skip=self.prefix.length)
            lm = next_token_loss(self.prefix(self.model, embeds, mask).logits, labels)
            loss, values["lm"] = loss + weights.lm * lm, lm.item()
        if weights.words:
            words = self.word_loss(batch)
            loss, values["words"] = loss + weights.words * words, words.item()
        return loss, values

    def _check_word_projectors(self) -> None:
        bad = [m.value for m in self.modalities if not isinstance(self.model.input_projectors[m.value], WordMixture)]
        if bad:
            raise ValueError(f"loss.words: the {', '.join(bad)} input projectors do not write words (set words: true)")

    def word_loss(self, batch: list[Example]) -> torch.Tensor:
        """Cross-entropy of every soft token's word scores against the caption's word in its place; slots past the
        caption's end against the media block's end (what follows a caption when lm-pretrain writes it as text)."""
        device = self.model.llm.model.get_input_embeddings().weight.device
        end = self.model.llm.tokenizer.convert_tokens_to_ids(MEDIA_END)
        logits, targets = [], []
        for modality in {media.modality for example in batch for media, _, _ in example.slots}:
            slots = [(media, (caption_ids(e) + [end] * k)[:k]) for e in batch for media, _, k in e.slots
                     if media.modality == modality]
            pooled, tokens = self.features.stack([media for media, _ in slots])
            projector = self.model.input_projectors[modality.value]
            assert isinstance(projector, WordMixture)  # checked in _check_word_projectors
            logits.append(projector.logits(pooled.to(device), tokens.to(device)).flatten(0, 1))
            targets += [word for _, words in slots for word in words]
        return F.cross_entropy(torch.cat(logits), torch.tensor(targets, device=device), ignore_index=IGNORE)

    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.config.optim.projector_lr or self.config.optim.lr
        return [{"params": [p for p in self.model.input_projectors.parameters() if p.requires_grad], "lr": lr}]

    @cached_property
    def eval_pairs(self) -> tuple[list[tuple[Path, PairRecord]], FeatureTable]:
        """Held-out pairs and their features, read and encoded once per run, not at every periodic eval."""
        assert self.config.data.eval is not None
        return load_pairs(self.model, self.config.data.eval, self.modalities, limit=self.config.data.max_eval_items)

    def evaluate(self) -> dict[str, float]:
        return caption_accuracy(self.model, *self.eval_pairs)

    def artifacts(self, directory: Path) -> dict[tuple[str | None, str], str | None]:
        return save_projectors(self.model, directory)
