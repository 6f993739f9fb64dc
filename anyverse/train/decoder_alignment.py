"""Stage 2, decoder alignment: output projectors map the signal tokens' hidden states to each generator's own
text conditioning of the caption (NExT-GPT's decoder-side stage; L2 and/or cosine loss), optionally also through
the frozen generator itself: its denoising loss on the caption's media (``loss.denoise``, as NExT-GPT and GILL).

The LLM is frozen, so the signal states of every caption are computed once up front; an epoch is then only the
projectors' forward and backward (plus the generators' VAE and UNet for the denoising loss). Targets come from the
generator's text encoder (never hard-coded 77x768).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from anyverse.media import MediaError, load_media
from anyverse.model import AnyverseModel
from anyverse.plugins import Denoiser
from anyverse.projectors import OutputProjector
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
from anyverse.train.manifest import PairRecord, RequestRecord, read_manifest, resolve
from anyverse.types import OUTPUT_MODALITIES, Media, Message, Modality

log = logging.getLogger(__name__)

# Several phrasings of the request and the reply, so the projectors learn what the caption puts in the signal states
# rather than one template's traces; the projectors are used after any phrasing (instruction tuning, chat).
INSTRUCTIONS = {
    Modality.IMAGE: ("draw {}", "make an image of {}", "paint {}", "show me {}"),
    Modality.VIDEO: ("make a video of {}", "animate {}", "film {}", "show me a clip of {}"),
    Modality.AUDIO: ("play {}", "make a sound of {}", "let me hear {}", "generate audio of {}"),
}
REPLIES = ("{}", "here is {}")


@dataclass
class SignalItem:
    modality: Modality
    caption: str
    states: torch.Tensor  # [S, D]: last hidden layer at the signal run + the signal tokens' input embeddings


def signal_items(model: AnyverseModel, pairs: list[tuple[Modality, str]], batch_size: int = 16) -> list[SignalItem]:
    """Teacher-forced signal states of "instruction -> reply with the caption + signal tokens", one item per
    (modality, caption) and phrasing of the instruction and the reply."""
    renderings = [(m, c, instruction.format(c), reply.format(c))
                  for m, c in pairs for instruction in INSTRUCTIONS[m] for reply in REPLIES]
    items: list[SignalItem] = []
    for start in range(0, len(renderings), batch_size):
        chunk = renderings[start : start + batch_size]
        requests = [[RequestRecord(modality=m, prompt=c)] for m, c, _, _ in chunk]
        examples = [render_example(model, [Message(role="user", text=instruction)],
                                   reply_text(reply, request, "signal", model), "signal", request)
                    for (_, _, instruction, reply), request in zip(chunk, requests, strict=True)]
        embeds, mask, _ = embed_batch(model, examples, FeatureTable())
        with torch.no_grad():
            hidden = model.llm.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
        last = hidden.hidden_states[-1] + embeds
        for b, ((modality, caption, _, _), example) in enumerate(zip(chunk, examples, strict=True)):
            _, position, _ = example.signals[0]
            count = model.llm.vocab.counts[modality]
            items.append(SignalItem(modality, caption, last[b, position : position + count].detach().clone()))
    return items


def distinct_pairs(manifests: list[Path], modalities: set[Modality]) -> list[tuple[Modality, str]]:
    """Distinct (modality, caption) of the pairs in ``manifests`` (captions only: no media is read)."""
    found = {(r.modality, r.caption): None for path in manifests for r in read_manifest(path, PairRecord)
             if r.modality in modalities}
    return list(found)


def caption_media(manifest: Path, modalities: set[Modality]) -> dict[tuple[Modality, str], list[Path]]:
    """The files of each (modality, caption) in ``manifest`` (paths only: no media is read)."""
    found: dict[tuple[Modality, str], list[Path]] = {}
    for record in read_manifest(manifest, PairRecord):
        if record.modality in modalities:
            found.setdefault((record.modality, record.caption), []).append(resolve(manifest, record.media))
    return found


Projected = list[tuple[Modality, list[SignalItem], dict[str, torch.Tensor]]]


def project(model: AnyverseModel, items: list[SignalItem]) -> Projected:
    """Each modality's items (in a fixed modality order, so random draws per modality repeat) with their projected
    conditioning, name -> [n, length, width]."""
    groups: Projected = []
    for modality in sorted({item.modality for item in items}):
        mine = [item for item in items if item.modality == modality]
        groups.append((modality, mine, model.output_projectors[modality.value](torch.stack([i.states for i in mine]))))
    return groups


def projection_loss(model: AnyverseModel, items: list[SignalItem], targets: dict[tuple[Modality, str], Any],
                    l2: float, cosine: float) -> torch.Tensor:
    """Weighted L2 + (1 - cos) between projected signal states and the generator conditioning, per modality."""
    return _projection_loss(project(model, items), targets, l2, cosine)


def _projection_loss(groups: Projected, targets: dict[tuple[Modality, str], Any], l2: float,
                     cosine: float) -> torch.Tensor:
    total = torch.zeros(())
    count = sum(len(mine) for _, mine, _ in groups)
    for modality, mine, predicted in groups:
        for name, value in predicted.items():
            target = torch.stack([targets[(modality, item.caption)][name] for item in mine]).to(value.device)
            total = total + len(mine) / count * (
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
        self.media_paths: dict[tuple[Modality, str], list[Path]] = {}
        self.media: dict[tuple[Modality, str], list[Media]] = {}  # readable files, loaded on first use
        self.skipped: Counter[str] = Counter()
        if config.loss.denoise > 0:
            for modality in self.modalities:
                self.denoiser(modality)  # a plugin without denoising_loss fails here, before any step
            self.media_paths = caption_media(config.data.train, set(self.modalities))
        self.targets = self.encode_targets(pairs)
        self.items = signal_items(self.model, pairs)
        for modality in self.modalities:  # this data's states (frozen LLM) and targets fix the projectors' scaling
            mine = [item for item in self.items if item.modality == modality]
            projector = cast(OutputProjector, self.model.output_projectors[modality.value])
            projector.standardize(torch.stack([item.states for item in mine]),
                                  {name: torch.stack([self.targets[(modality, item.caption)][name] for item in mine])
                                   for name in projector.spec})

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
        weights = self.config.loss
        groups = project(self.model, batch)
        loss = _projection_loss(groups, self.targets, weights.l2, weights.cosine)
        if weights.denoise == 0:
            return loss, {}
        denoise = self.denoising_loss(groups)
        return loss + weights.denoise * denoise, {"denoise_loss": denoise.item()}

    def denoiser(self, modality: Modality) -> Denoiser:
        generator = self.pool.get(modality)
        if not isinstance(generator, Denoiser):
            raise ValueError(f"generator plugin {generator.name} has no denoising_loss; set loss.denoise=0")
        return generator

    def denoising_loss(self, groups: Projected) -> torch.Tensor:
        """Each generator's diffusion loss on a file of each item's caption, conditioned on the item's projection,
        weighted by items per modality. Items whose caption has no readable file do not count (zero if none has)."""
        parts: list[tuple[int, torch.Tensor]] = []
        for modality, mine, projected in groups:
            rows = [(i, media) for i, item in enumerate(mine) if (media := self.pick_media(modality, item.caption))]
            if rows:
                index = torch.tensor([i for i, _ in rows])
                conditioning = {name: value[index.to(value.device)] for name, value in projected.items()}
                loss = self.denoiser(modality).denoising_loss(conditioning, [media for _, media in rows])
                parts.append((len(rows), loss))
        count = sum(n for n, _ in parts)
        return sum((n / count * loss for n, loss in parts), torch.zeros(()))

    def pick_media(self, modality: Modality, caption: str) -> Media | None:
        """A readable file of the caption, drawn at random when it has several. The caption's files are loaded
        (checked and hashed) on first use; unreadable ones are skipped, counted and logged."""
        key = (modality, caption)
        if key not in self.media:
            self.media[key] = []
            for path in self.media_paths.get(key, []):
                try:
                    self.media[key].append(load_media(path, self.model_config.caps))
                except MediaError as err:
                    self.skipped[err.group[:80]] += 1
                    log.warning("denoising loss: skipping %s (%d files so far: %s)", err, self.skipped.total(),
                                dict(self.skipped))
        found = self.media[key]
        if len(found) > 1:
            return found[int(torch.randint(len(found), ()))]
        return found[0] if found else None

    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.config.optim.projector_lr or self.config.optim.lr
        return [{"params": [p for p in self.model.output_projectors.parameters() if p.requires_grad], "lr": lr}]

    @cached_property
    def retrieval_probe(self) -> RetrievalProbe:
        assert self.config.data.eval is not None
        return RetrievalProbe.build(self.model, self.pool, self.config.data.train, self.config.data.eval,
                                    set(self.modalities), self.config.data.max_eval_items)

    def evaluate(self) -> dict[str, float]:
        return self.retrieval_probe.score(self.model)

    def artifacts(self, directory: Path) -> dict[tuple[str | None, str], str | None]:
        return save_projectors(self.model, directory)


@dataclass
class RetrievalProbe:
    """What decoder retrieval compares, computed once: the targets of every distinct caption (train and eval) and
    the held-out captions' signal states. The generators' text encoders and (in decoder alignment) the LLM are
    frozen, so a periodic eval re-runs only the output projectors."""

    banks: dict[Modality, tuple[list[str], torch.Tensor]]  # captions and their flattened targets
    queries: dict[Modality, list[SignalItem]]
    seen: set[tuple[Modality, str]]

    @classmethod
    def build(cls, model: AnyverseModel, pool: Any, train_manifest: Path, eval_manifest: Path,
              modalities: set[Modality], limit: int | None = None) -> RetrievalProbe:
        trained = distinct_pairs([train_manifest], modalities)
        held_out = distinct_pairs([eval_manifest], modalities)
        bank = list(dict.fromkeys(trained + held_out))
        queries = spread(held_out, limit)
        probe = cls({}, {}, set(trained))
        for modality in sorted({m for m, _ in queries}, key=str):
            captions = [c for m, c in bank if m == modality]
            targets = conditioning_targets(pool, modality, captions)
            probe.banks[modality] = captions, torch.cat([targets[name].flatten(1) for name in sorted(targets)], dim=1)
            probe.queries[modality] = signal_items(model, [(modality, c) for m, c in queries if m == modality])
        return probe

    def score(self, model: AnyverseModel) -> dict[str, float]:
        """Recall@1 of the projected conditioning against every bank target, overall, per modality and per
        seen/unseen caption, and the mean cosine to its own caption's target."""
        scores: dict[str, float] = {}
        hits_all, cos_all, by_split = [], [], defaultdict(list)
        for modality, items in self.queries.items():
            captions, bank = self.banks[modality]
            with torch.no_grad():
                predicted = model.output_projectors[modality.value](torch.stack([i.states for i in items]))
            flat = torch.cat([predicted[name].flatten(1).cpu() for name in sorted(predicted)], dim=1)
            nearest = torch.cdist(flat, bank).argmin(dim=1).tolist()
            mine = [item.caption for item in items]
            hits = [captions[j] == caption for j, caption in zip(nearest, mine, strict=True)]
            own = bank[[captions.index(c) for c in mine]]
            scores[f"decoder_retrieval/{modality.value}"] = sum(hits) / len(hits)
            hits_all += hits
            cos_all += F.cosine_similarity(flat, own, dim=-1).tolist()
            for caption, hit in zip(mine, hits, strict=True):
                by_split["seen" if (modality, caption) in self.seen else "unseen"].append(hit)
        scores["decoder_retrieval"] = sum(hits_all) / len(hits_all)
        scores |= {f"decoder_retrieval/{split}": sum(hits) / len(hits) for split, hits in sorted(by_split.items())}
        scores["decoder_cosine"] = sum(cos_all) / len(cos_all)
        return scores


def decoder_retrieval(model: AnyverseModel, pool: Any, train_manifest: Path, eval_manifest: Path,
                      modalities: set[Modality], limit: int | None = None) -> dict[str, float]:
    """Recall@1 of projected conditioning against every distinct caption's target (train and eval), and the mean
    cosine, over every phrasing of each held-out caption's request; also split into captions seen in training and
    unseen ones (a compositional split), which tells a lookup from a projector that composes."""
    return RetrievalProbe.build(model, pool, train_manifest, eval_manifest, modalities, limit).score(model)
