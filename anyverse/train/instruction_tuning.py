"""Stage 3, instruction tuning: LoRA (+ new tokens' rows) and the projectors on dialogs with media in and out.

Each dialog is rendered in every configured output mode: meta-responses (ModaVerse) and a description plus signal
tokens (NExT-GPT), each under its own system prompt, so one adapter serves both. Loss: cross-entropy on the
assistant's reply, plus (signal mode) the decoder-side L2/cosine of the projected signal states.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyverse.checkpoint import ADAPTER
from anyverse.llm import attach_lora
from anyverse.model import AnyverseModel
from anyverse.train.common import (
    Example,
    FeatureTable,
    conditioning_targets,
    embed_batch,
    load_model,
    next_token_loss,
    render_example,
    reply_text,
    save_projectors,
    spread,
)
from anyverse.train.config import TrainConfig
from anyverse.train.decoder_alignment import SignalItem, projection_loss
from anyverse.train.manifest import DialogRecord, SkipReport, TurnRecord, read_manifest, resolve
from anyverse.types import Message, Modality

log = logging.getLogger(__name__)


@dataclass
class Dialog:
    """One assistant turn of a dialog record, with every turn before it (media resolved) as the context."""

    record: DialogRecord
    history: list[Message]
    reply: TurnRecord


def load_dialogs(model: AnyverseModel, manifest: Path, limit: int | None = None,
                 where: Callable[[DialogRecord], bool] | None = None) -> tuple[list[Dialog], FeatureTable]:
    """Every assistant turn of the valid dialogs whose media encoded (``limit`` dialogs spread over those ``where``
    keeps), with the frozen-encoder features.

    A multi-turn record gives one item per assistant turn, each rendered as inference renders it: earlier replies
    appear as their text plus the media they produced, not as the requests that made them.
    """
    report = SkipReport(manifest)
    records = spread([r for r in read_manifest(manifest, DialogRecord, report) if where is None or where(r)], limit)
    log.info(report.summary())
    files = [(resolve(manifest, ref.media), ref.modality) for r in records for t in r.messages for ref in t.media]
    features = FeatureTable.build(model.encoder, files, model.config.caps)
    dialogs = []
    for record in records:
        if not all(features.has(resolve(manifest, ref.media)) for t in record.messages for ref in t.media):
            continue
        messages = [Message(role=t.role, text=t.text,
                            media=[features.media[resolve(manifest, ref.media)].with_id(ref.id) for ref in t.media])
                    for t in record.messages]
        dialogs += [Dialog(record, messages[:k], turn) for k, turn in enumerate(record.messages)
                    if k and turn.role == "assistant"]
    if not dialogs:
        raise ValueError(f"{manifest}: no usable dialogs ({report.summary()})")
    return dialogs, features


class InstructionTuning(nn.Module):
    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__()
        self.config = config
        decoder_side = "signal" in config.output_modes and config.loss.l2 + config.loss.cosine > 0
        self.model, self.pool = load_model(config, device, output_projectors=decoder_side)
        self.model_config, self.base = self.model.config, self.model.base_fingerprint()
        self.dialogs, self.features = load_dialogs(self.model, config.data.train)
        if config.train_lora:
            self._lora()
        in_modalities = {m.modality for m in self.features.media.values()}
        if config.modalities is not None:
            in_modalities &= set(config.modalities)
        out_modalities = {Modality(r.modality) for d in self.dialogs for r in d.reply.requests}
        for modality in in_modalities:
            self.model.input_projectors[modality.value].requires_grad_(True)
        for modality in out_modalities & {Modality(m) for m in self.model.output_projectors}:
            self.model.output_projectors[modality.value].requires_grad_(True)
        examples = [(self._example(d, mode), d.record.is_conversation) for d in self.dialogs
                    for mode in config.output_modes]
        self.items = [e for e, talk in examples for _ in range(config.conversation_repeats if talk else 1)]
        wanted = {(m, p) for e in self.items for m, _, p in e.signals if m.value in self.model.output_projectors}
        self.targets: dict[tuple[Modality, str], dict[str, Any]] = {}
        for modality in {m for m, _ in wanted}:
            prompts = sorted(p for m, p in wanted if m == modality)
            encoded = conditioning_targets(self.pool, modality, prompts)
            self.targets.update({(modality, p): {k: v[i] for k, v in encoded.items()} for i, p in enumerate(prompts)})

    def _lora(self) -> None:
        """Fresh LoRA on the base LLM, or keep training the adapter a checkpoint brought."""
        from peft import PeftModel

        if isinstance(self.model.llm.model, PeftModel):
            for name, param in self.model.llm.model.named_parameters():
                param.requires_grad_("lora_" in name or "trainable_tokens" in name)
        else:
            self.model.llm = attach_lora(self.model.llm, self.model.config.llm.lora)

    def _example(self, dialog: Dialog, mode: str) -> Example:
        target = reply_text(dialog.reply.text, dialog.reply.requests, mode, self.model)
        return render_example(self.model, dialog.history, target, mode, dialog.reply.requests)

    def train(self, mode: bool = True) -> InstructionTuning:
        super().train(mode)
        self.model.encoder.model.eval()
        return self

    def collate(self, items: list[Example]) -> list[Example]:
        return items

    def forward(self, batch: list[Example]) -> tuple[torch.Tensor, dict[str, float]]:
        embeds, mask, labels = embed_batch(self.model, batch, self.features)
        out = self.model.llm.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        lm = next_token_loss(out.logits, labels)
        signal = [(b, m, pos, prompt) for b, e in enumerate(batch) for m, pos, prompt in e.signals]
        if not signal or not self.model.output_projectors:
            return self.config.loss.lm * lm, {"lm_loss": lm.item()}
        last = out.hidden_states[-1] + embeds
        items = [SignalItem(m, prompt, last[b, pos : pos + self.model.llm.vocab.counts[m]])
                 for b, m, pos, prompt in signal if m.value in self.model.output_projectors]
        projection = projection_loss(self.model, items, self.targets, self.config.loss.l2, self.config.loss.cosine)
        loss = self.config.loss.lm * lm + projection
        return loss, {"lm_loss": lm.item(), "projection_loss": projection.item()}

    def param_groups(self) -> list[dict[str, Any]]:
        projectors = [p for p in [*self.model.input_projectors.parameters(), *self.model.output_projectors.parameters()]
                      if p.requires_grad]
        llm = [p for p in self.model.llm.model.parameters() if p.requires_grad]
        groups = [{"params": projectors, "lr": self.config.optim.projector_lr or self.config.optim.lr}]
        return groups + ([{"params": llm, "lr": self.config.optim.lr}] if llm else [])

    @cached_property
    def eval_dialogs(self) -> list[Dialog]:
        """Held-out dialogs, read and encoded once per run, not at every periodic eval."""
        assert self.config.data.eval is not None
        return load_dialogs(self.model, self.config.data.eval, self.config.data.max_eval_items)[0]

    def evaluate(self) -> dict[str, float]:
        from anyverse.train.evaluation import routing_accuracy

        return routing_accuracy(self.model, self.eval_dialogs, self.config.output_modes)

    def artifacts(self, directory: Path) -> dict[tuple[str | None, str], str | None]:
        written = save_projectors(self.model, directory)
        if self.config.train_lora:
            # new-token rows live in the trainable-token deltas; the resized base rows are re-made (seeded) at load
            self.model.llm.model.save_pretrained(directory / ADAPTER, save_embedding_layers=False)
            written[("llm", "adapter")] = ADAPTER
        return written
