"""Pretrain a tiny causal LM on a dataset's language, so later stages start from an LM that speaks it (as real
training starts from a pretrained chat LLM rather than random weights).

The corpus is the dataset's plain text plus chat-formatted caption turns in which each media item's content is
written as its caption between the media markers: the LM learns the chat format and to read what a media block
says, which is the skill encoder alignment then gives the soft tokens. The tokenizer learns merges from the same
text. The result is a full model directory (``llm/``) that a profile's ``llm.path`` can point at.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyverse.config import LLMConfig, TinySpec, load_config
from anyverse.llm import build_tiny_llm, load_llm
from anyverse.model import system_prompt
from anyverse.signals import MEDIA_END, MEDIA_START, SignalVocabulary
from anyverse.train.common import next_token_loss
from anyverse.train.config import TrainConfig
from anyverse.train.encoder_alignment import CAPTION_INSTRUCTIONS
from anyverse.train.manifest import PairRecord, SkipReport, read_manifest

log = logging.getLogger(__name__)

LLM_DIR = "llm"


def chat_sample(record: PairRecord, index: int, system: str) -> list[dict[str, str]]:
    """A caption turn with the media written as text: ``img_1 <|media_start|>caption<|media_end|>``."""
    media_id = f"{record.modality.label}_1"
    instruction = CAPTION_INSTRUCTIONS[index % len(CAPTION_INSTRUCTIONS)].format(id=media_id)
    user = f"{media_id} {MEDIA_START}{record.caption}{MEDIA_END}\n{instruction}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user},
            {"role": "assistant", "content": record.caption}]


class LMPretrain(nn.Module):
    def __init__(self, config: TrainConfig, device: torch.device):
        super().__init__()
        self.config = config
        model_cfg = load_config(config.model, config.model_overrides)
        if model_cfg.llm.tiny is None:
            raise ValueError(f"lm-pretrain builds a tiny LM from scratch; {config.model} sets llm.path instead of "
                             "llm.tiny")
        spec = TinySpec(seed=model_cfg.llm.tiny.seed, arch={**model_cfg.llm.tiny.arch, **config.lm_arch})
        report = SkipReport(config.data.train)
        pairs = list(read_manifest(config.data.train, PairRecord, report))
        log.info(report.summary())
        lines = config.data.text.read_text().splitlines() if config.data.text else []
        base = config.output_dir / "base-llm"  # rebuilt identically on resume: seeded, deterministic
        build_tiny_llm(base, spec, corpus=[*lines, *(p.caption for p in pairs)])
        vocab = SignalVocabulary(model_cfg.output.signal_tokens)
        self.llm = load_llm(LLMConfig(path=str(base)), vocab, device, torch.float32)
        self.network = self.llm.model.requires_grad_(True)  # registered: checkpoints and DDP see its weights
        self.model_config = model_cfg.model_copy(update={"llm": model_cfg.llm.model_copy(update={"adapter": None})})
        self.base: dict[str, Any] = {}
        tokenizer = self.llm.tokenizer
        prompts = [system_prompt(model_cfg, vocab, mode) for mode in ("meta", "signal")]
        chats = [tokenizer.apply_chat_template(chat_sample(p, i, prompts[i % 2]), tokenize=False)
                 for i, p in enumerate(pairs)]
        texts = [f"{tokenizer.bos_token}{line}{tokenizer.eos_token}" for line in lines if line.strip()] + chats
        self.items = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        self.eval_items: list[list[int]] = []
        if config.data.eval:
            held_out = list(read_manifest(config.data.eval, PairRecord))[: config.data.max_eval_items]
            self.eval_items = [tokenizer(tokenizer.apply_chat_template(chat_sample(p, i, prompts[0]), tokenize=False),
                                         add_special_tokens=False).input_ids for i, p in enumerate(held_out)]

    def collate(self, items: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(i) for i in items)
        device = self.llm.model.device
        ids = torch.tensor([i + [self.llm.tokenizer.pad_token_id] * (length - len(i)) for i in items], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in items], device=device)
        return ids, mask

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask = batch
        logits = self.llm.model(input_ids=ids, attention_mask=mask).logits
        labels = ids.masked_fill(mask == 0, -100)
        return next_token_loss(logits, labels), {}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.llm.model.parameters()), "lr": self.config.optim.lr}]

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            losses = [self(self.collate([item]))[0].item() for item in self.eval_items]
        return {"loss": sum(losses) / max(1, len(losses))}

    def artifacts(self, directory: Path) -> dict[tuple[str | None, str], str | None]:
        self.llm.model.save_pretrained(directory / LLM_DIR)
        self.llm.tokenizer.save_pretrained(directory / LLM_DIR)
        return {("llm", "path"): LLM_DIR, ("llm", "tiny"): None}
