"""Held-out scores shared by the recipes' periodic eval and ``anyverse eval toyworld``.

- caption accuracy: greedy caption of held-out media equals its caption exactly (plus per-attribute accuracy: the
  attribute's value appears in the caption);
- decoder retrieval: teacher-forced signal states of a caption, projected, are nearest (L2) to that caption's own
  generator conditioning among the conditionings of every distinct caption in the data (recall@1);
- routing accuracy: on held-out instructions, the reply asks for exactly the expected modalities with valid
  requests (and for none when none is expected), editing the expected ``source`` (meta mode); also per assistant
  turn of a multi-turn dialog, and how often the model captions media it made earlier in the dialog exactly.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from anyverse.model import AnyverseModel
from anyverse.train.common import FeatureTable, spread
from anyverse.train.manifest import PairRecord, SkipReport, read_manifest, resolve
from anyverse.types import Media, Message, Modality

if TYPE_CHECKING:
    from anyverse.train.instruction_tuning import Dialog

log = logging.getLogger(__name__)


def load_pairs(model: AnyverseModel, manifest: Path, modalities: list[Modality] | None = None,
               limit: int | None = None) -> tuple[list[tuple[Path, PairRecord]], FeatureTable]:
    """Valid pairs (resolved paths) whose media encoded, with their frozen-encoder features."""
    report = SkipReport(manifest)
    records = [(resolve(manifest, r.media), r) for r in read_manifest(manifest, PairRecord, report)
               if modalities is None or r.modality in modalities]
    records = spread(records, limit)
    log.info(report.summary())
    features = FeatureTable.build(model.encoder, [(p, r.modality) for p, r in records], model.config.caps)
    kept = [(p, r) for p, r in records if features.has(p)]
    if not kept:
        raise ValueError(f"{manifest}: no usable media-caption pairs ({report.summary()})")
    return kept, features


def greedy_reply(model: AnyverseModel, history: list[Message], mode: str | None = None,
                 max_new_tokens: int = 48) -> str:
    """Deterministic reply text (special tokens kept), for exact-match scoring."""
    llm = model.llm
    embeds = model.embed(model.render(history, mode))
    with torch.inference_mode():
        out = llm.model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=llm.stop_ids,
                                 pad_token_id=llm.tokenizer.pad_token_id)
    ids = [i for i in out[0].tolist() if i not in llm.stop_ids]
    return str(llm.tokenizer.decode(ids, skip_special_tokens=False)).strip()


def _has_value(text: str, value: str) -> bool:
    return re.search(rf"\b{re.escape(value)}\b", text) is not None


def caption_accuracy(model: AnyverseModel, pairs: list[tuple[Path, PairRecord]],
                     features: FeatureTable) -> dict[str, float]:
    """Exact-match caption accuracy, overall, per modality, per split and per attribute."""
    from anyverse.train.encoder_alignment import caption_history

    hits: dict[str, list[bool]] = defaultdict(list)
    for index, (path, record) in enumerate(pairs):
        media: Media = features.media[path]
        predicted = greedy_reply(model, caption_history(media, index))
        exact = predicted == record.caption
        hits["caption_accuracy"].append(exact)
        hits[f"caption_accuracy/{record.modality.value}"].append(exact)
        if "split" in record.attributes:
            hits[f"caption_accuracy/{record.attributes['split']}"].append(exact)
        for name, value in record.attributes.items():
            if name != "split":
                hits[f"attribute/{record.modality.value}/{name}"].append(_has_value(predicted, value))
    return {key: sum(values) / len(values) for key, values in sorted(hits.items())}


def routing_accuracy(model: AnyverseModel, dialogs: list[Dialog], modes: Sequence[str]) -> dict[str, float]:
    """Per output mode, intent and turn position: the greedy reply asks for exactly the expected modalities (in
    order) with valid requests, and in meta mode the expected sources; also exact request prompts (meta), exact
    replies to describe-only turns, and among those, captions of media the assistant made (spliced back)."""
    from anyverse.session import Anyverse

    hits: dict[str, list[bool]] = defaultdict(list)
    for mode in modes:
        config = model.config.model_copy(update={
            "output": model.config.output.model_copy(update={"mode": mode}),
            "llm": model.config.llm.model_copy(update={"temperature": 0.0})})
        session = Anyverse(config, output_dir=Path("."), model=model)
        for dialog in dialogs:
            expected = dialog.reply
            text, requests, _ = session.draft(dialog.history)
            routed = [r.modality for r in requests] == [Modality(r.modality) for r in expected.requests]
            if mode == "meta":  # a signal run names no source
                routed = routed and [r.source for r in requests] == [r.source for r in expected.requests]
            intent = dialog.record.attributes.get("intent", "all")
            turn = 1 + sum(m.role == "assistant" for m in dialog.history)
            for key in ("routing_accuracy", f"routing_accuracy/{mode}", f"routing_accuracy/{mode}/{intent}",
                        f"routing_accuracy/{mode}/turn_{turn}"):
                hits[key].append(routed)
            if mode == "meta" and expected.requests:
                hits["prompt_accuracy/meta"].append(
                    routed and [r.prompt for r in requests] == [r.prompt for r in expected.requests])
            if not expected.requests:
                hits[f"reply_accuracy/{mode}"].append(text == expected.text)
                if _asks_about_made_media(dialog.history):
                    hits[f"made_caption_accuracy/{mode}"].append(text == expected.text)
    return {key: sum(values) / len(values) for key, values in sorted(hits.items())}


def _asks_about_made_media(history: list[Message]) -> bool:
    """Whether the last user message names media an assistant turn made (what splice-back lets it see)."""
    made = {str(m.id) for message in history if message.role == "assistant" for m in message.media}
    return any(_has_value(history[-1].text, media_id) for media_id in made)
