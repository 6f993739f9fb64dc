"""Stage 2, decoder alignment: output projectors map the signal tokens' hidden states to each generator's own
text conditioning of the caption (NExT-GPT's decoder-side stage; L2 and/or cosine loss).

The LLM is frozen, so the signal states of every caption are computed once up front; an epoch is then only the
projectors' forward and backward. Targets come from the generator's text encoder (never hard-coded 77x768).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anyverse.model import AnyverseModel
from anyverse.train.common import (
    FeatureTable,
    conditioning_targets,
    embed_batch,
    l2_distance,
    load_model,
    render_example,
    reply_text,
    save_projectors,
    spread,
)
from anyverse.train.config import TrainConfig
from anyverse.train.manifest import PairRecord, RequestRecord, read_manifest
from anyverse.types import OUTPUT_MODALITIES, Message, Modality

INSTRUCTIONS = {Modality.IMAGE: "draw {}", Modality.VIDEO: "make a video of {}", Modality.AUDIO: "play {}"}


@dataclass
class SignalItem:
    modality: Modality
    caption: str
    states: torch.Tensor  # [S, D]: last hidden layer at the signal run + the signal tokens' input embeddings


def signal_items(model: AnyverseModel, pairs: list[tuple[Modality, str]], batch_size: int = 16) -> list[SignalItem]:
    """Teacher-forced signal states for "instruction -> caption + signal tokens" of each (modality, caption)."""
    items: list[SignalItem] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        examples = [render_example(model, [Message(role="user", text=INSTRUCTIONS[m].format(c))],
                                   reply_text(c, [RequestRecord(modality=m, prompt=c)], "signal", model),
                                   "signal", [RequestRecord(modality=m, prompt=c)]) for m, c in chunk]
        embeds, mask, _ = embed_batch(model, examples, FeatureTable())
        with torch.no_grad():
            hidden = model.llm.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        last = hidden.hidden_states[-1] + embeds
        for b, ((modality, caption), example) in enumerate(zip(chunk, examples, strict=True)):
            _, position, _ = example.signals[0]
            count = model.llm.vocab.counts[modality]
            items.append(SignalItem(modality, caption, last[b, position : position + count].detach().clone()))
    return items


def distinct_pairs(manifests: list[Path], modalities: set[Modality]) -> list[tuple[Modality, str]]:
    """Distinct (modality, caption) of the pairs in ``manifests`` (captions only: no media is read)."""
    found = {(r.modality, r.caption): None for path in manifests for r in read_manifest(path, PairRecord)
             if r.modality in modalities}
    return list(found)


def projection_loss(model: AnyverseModel, items: list[SignalItem], targets: dict[tuple[Modality, str], Any],
                    l2: float, cosine: float) -> torch.Tensor:
    """Weighted L2 + (1 - cos) between projected signal states and the generator conditioning, per modality."""
    total = torch.zeros(())
    for modality in {item.modality for item in items}:
        mine = [item for item in items if item.modality == modality]
        predicted = model.output_projectors[modality.value](torch.stack([item.states for item in mine]))
        for name, value in predicted.items():
            target = torch.stack([targets[(modality, item.caption)][name] for item in mine]).to(value.device)
            total = total + len(mine) / len(items) * (
                l2 * l2_distance(value, target)
                + cosine * (1 - F.cosine_similarity(value, target, dim=-1)).mean())
    return total


class DecoderAlignment(nn.Module):
    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__()
        self.config = config
        self.model, self.pool = load_model(config, device, output_projectors=True)
        self.model_config, self.base = self.model.config, self.model.base_fingerprint()
        wanted = set(config.modalities or OUTPUT_MODALITIES) & {Modality(m) for m in self.model.output_projectors}
        pairs = distinct_pairs([config.data.train], wanted)
        if not pairs:
            raise ValueError(f"{config.data.train}: no captions of a modality with a generator ({sorted(wanted)})")
        self.modalities = sorted({m for m, _ in pairs}, key=str)
        for modality in self.modalities:
            self.model.output_projectors[modality.value].requires_grad_(True)
        self.targets = self.encode_targets(pairs)
        self.items = signal_items(self.model, pairs)

    def encode_targets(self, pairs: list[tuple[Modality, str]]) -> dict[tuple[Modality, str], dict[str, Any]]:
        targets: dict[tuple[Modality, str], dict[str, Any]] = {}
        for modality in {m for m, _ in pairs}:
            captions = [c for m, c in pairs if m == modality]
            encoded = conditioning_targets(self.pool, modality, captions)
            for i, caption in enumerate(captions):
                targets[(modality, caption)] = {name: value[i] for name, value in encoded.items()}
        return targets

    def collate(self, items: list[SignalItem]) -> list[SignalItem]:
        return items

    def forward(self, batch: list[SignalItem]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = projection_loss(self.model, batch, self.targets, self.config.loss.l2, self.config.loss.cosine)
        return loss, {}

    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.config.optim.projector_lr or self.config.optim.lr
        return [{"params": [p for p in self.model.output_projectors.parameters() if p.requires_grad], "lr": lr}]

    def evaluate(self) -> dict[str, float]:
        assert self.config.data.eval is not None
        return decoder_retrieval(self.model, self.pool, [self.config.data.train, self.config.data.eval],
                                 self.config.data.eval, set(self.modalities), self.config.data.max_eval_items)

    def artifacts(self, directory: Path) -> dict[tuple[str | None, str], str | None]:
        return save_projectors(self.model, directory)


def decoder_retrieval(model: AnyverseModel, pool: Any, bank_manifests: list[Path], eval_manifest: Path,
                      modalities: set[Modality], limit: int | None = None) -> dict[str, float]:
    """Recall@1 of projected conditioning against every distinct caption's target, and the mean cosine."""
    bank = distinct_pairs(bank_manifests, modalities)
    queries = distinct_pairs([eval_manifest], modalities)
    queries = spread(queries, limit)
    scores: dict[str, float] = {}
    hits_all, cos_all = [], []
    for modality in sorted({m for m, _ in queries}, key=str):
        captions = [c for m, c in bank if m == modality]
        targets = conditioning_targets(pool, modality, captions)
        flat_bank = torch.cat([v.flatten(1) for v in targets.values()], dim=1)
        mine = [c for m, c in queries if m == modality]
        items = signal_items(model, [(modality, c) for c in mine])
        with torch.no_grad():
            predicted = model.output_projectors[modality.value](torch.stack([i.states for i in items]))
        flat = torch.cat([predicted[name].flatten(1).cpu() for name in targets], dim=1)
        nearest = torch.cdist(flat, flat_bank).argmin(dim=1).tolist()
        hits = [captions[j] == caption for j, caption in zip(nearest, mine, strict=True)]
        own = flat_bank[[captions.index(c) for c in mine]]
        cos = F.cosine_similarity(flat, own, dim=-1).tolist()
        scores[f"decoder_retrieval/{modality.value}"] = sum(hits) / len(hits)
        hits_all += hits
        cos_all += cos
    scores["decoder_retrieval"] = sum(hits_all) / len(hits_all)
    scores["decoder_cosine"] = sum(cos_all) / len(cos_all)
    return scores
