"""Contrastive (InfoNCE) pretraining of tiny ImageBind towers on media-caption pairs.

A random frozen ImageBind maps every toy image to nearly the same vector, so nothing downstream could learn;
the real encoder was pretrained contrastively, and so is the tiny one here: each media embedding must pick its
caption's text embedding among the batch's distinct captions (and each caption its media). Inputs are decoded and
preprocessed once and kept in memory as fp16. The result is ``encoder/`` (config.json + model.safetensors), what
``encoder.path`` loads.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anyverse.config import load_config
from anyverse.encoders import preprocess as pp
from anyverse.encoders.imagebind import TOWER, ImageBindArch, ImageBindEncoder, write_encoder
from anyverse.media import MediaError, load_media
from anyverse.train.config import TrainConfig
from anyverse.train.manifest import PairRecord, SkipReport, read_manifest, resolve
from anyverse.types import Modality

log = logging.getLogger(__name__)

ENCODER_DIR = "encoder"
TOKEN_EMBEDDING = "modality_preprocessors.text.token_embedding"  # the text tower's word table


@dataclass
class Prepared:
    record: PairRecord
    inputs: torch.Tensor  # preprocessed model input, fp16


def prepare(encoder: ImageBindEncoder, manifest: Path, caps: Any, limit: int | None = None) -> list[Prepared]:
    """Decode and preprocess every valid pair once; unreadable media are skipped and counted."""
    report = SkipReport(manifest)
    records = list(read_manifest(manifest, PairRecord, report))[:limit]
    items = []
    for record in records:
        try:
            media = load_media(resolve(manifest, record.media), caps)
            items.append(Prepared(record, encoder.preprocess(media, caps).half()))
        except MediaError as err:
            report.skip("unreadable media", 0, str(err))
    log.info(report.summary())
    if not items:
        raise ValueError(f"{manifest}: no usable media-caption pairs ({report.summary()})")
    return items


class EncoderPretrain(nn.Module):
    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__()
        self.config = config
        model_cfg = load_config(config.model, config.model_overrides)
        if model_cfg.encoder.tiny is None:
            raise ValueError(f"encoder-pretrain trains a tiny ImageBind from scratch; {config.model} sets "
                             "encoder.path instead of encoder.tiny")
        self.arch = ImageBindArch.tiny(**{**model_cfg.encoder.tiny.arch, **config.encoder_arch})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_cfg.encoder.tiny.seed)
            self.network = self.arch.build().to(device)
        self.network.get_submodule(TOKEN_EMBEDDING).requires_grad_(config.train_token_embeddings)
        self.encoder = ImageBindEncoder(self.network, self.arch, "pretraining")
        self.model_config = model_cfg
        self.base: dict[str, Any] = {}
        self.items = prepare(self.encoder, config.data.train, model_cfg.caps)
        self.eval_items = (prepare(self.encoder, config.data.eval, model_cfg.caps, config.data.max_eval_items)
                           if config.data.eval else [])

    def collate(self, items: list[Prepared]) -> list[Prepared]:
        return items

    def embed_media(self, items: list[Prepared]) -> torch.Tensor:
        """Normalised embeddings in ``items`` order (one forward per modality)."""
        out = torch.empty(len(items), self.arch.out_embed_dim, device=self.encoder.device)
        groups: dict[Modality, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[item.record.modality].append(i)
        for modality, indices in groups.items():  # image and video share the vision tower, not input shapes
            inputs = [items[i].inputs for i in indices]
            clips = self.config.train_clips
            if self.training and clips and inputs[0].ndim >= 4 and len(inputs[0]) > clips:  # cost is per clip
                chosen = torch.randperm(len(inputs[0]))[:clips]  # chosen before the batch is stacked and made float
                inputs = [x[chosen] for x in inputs]
            batch = torch.stack(inputs).to(self.encoder.device, torch.float32)
            out[indices] = self.encoder.forward_tokens(TOWER[modality], batch)[0]
        return F.normalize(out, dim=-1)

    def embed_text(self, captions: list[str]) -> torch.Tensor:
        return F.normalize(self.encoder.forward_text(pp.text_tokens(captions).to(self.encoder.device)), dim=-1)

    def greyed(self, batch: list[Prepared]) -> list[Prepared]:
        """Images with a ``colour`` attribute, at chance ``config.grey``: shown in grey and captioned without their
        colour word, so shape has to be told from luminance, the same for every colour (videos share the tower)."""
        out = []
        for item in batch:
            colour = item.record.attributes.get("colour")
            if item.record.modality is Modality.IMAGE and colour and torch.rand(()) < self.config.grey:
                caption = " ".join(word for word in item.record.caption.split() if word != colour)
                item = Prepared(item.record.model_copy(update={"caption": caption}), pp.greyscale(item.inputs).half())
            out.append(item)
        return out

    def forward(self, batch: list[Prepared]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.config.grey:
            batch = self.greyed(batch)
        captions = list(dict.fromkeys(item.record.caption for item in batch))
        target = torch.tensor([captions.index(item.record.caption) for item in batch], device=self.encoder.device)
        logits = self.embed_media(batch) @ self.embed_text(captions).T / self.config.temperature  # [B, U]
        to_text = F.cross_entropy(logits, target)
        positives = F.one_hot(target, len(captions)).T.float()  # [U, B]: a caption may have several media
        to_media = F.cross_entropy(logits.T, positives / positives.sum(dim=1, keepdim=True))
        accuracy = (logits.argmax(dim=1) == target).float().mean().item()
        return (to_text + to_media) / 2, {"batch_accuracy": accuracy}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.network.parameters() if p.requires_grad], "lr": self.config.optim.lr}]

    def evaluate(self) -> dict[str, float]:
        """Zero-shot retrieval@1 per modality: each held-out item's nearest caption among all captions seen."""
        scores: dict[str, float] = {}
        with torch.no_grad():
            for modality in sorted({i.record.modality for i in self.eval_items}, key=str):
                mine = [i for i in self.eval_items if i.record.modality == modality]
                bank = list(dict.fromkeys(i.record.caption for i in [*self.items, *self.eval_items]
                                          if i.record.modality == modality))
                nearest = (self.embed_media(mine) @ self.embed_text(bank).T).argmax(dim=1).tolist()
                hits = [bank[j] == item.record.caption for j, item in zip(nearest, mine, strict=True)]
                scores[f"retrieval/{modality.value}"] = sum(hits) / len(hits)
        return scores

    def artifacts(self, directory: Path) -> dict[tuple[str | None, str], str | None]:
        write_encoder(directory / ENCODER_DIR, self.arch, self.network.state_dict())
        return {("encoder", "path"): ENCODER_DIR, ("encoder", "tiny"): None}
