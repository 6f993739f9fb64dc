"""Pretrain a tiny causal LM on a dataset's language, so later stages start from an LM that speaks it (as real
training starts from a pretrained chat LLM rather than random weights).

The corpus is the dataset's plain text plus chat-formatted caption turns in which each media item's content is
written as its caption between the media markers: the LM learns the chat format and to read what a media block
says, which is the skill encoder alignment then gives the soft tokens. The tokenizer learns merges from the same
text. The result is a full model directory (``llm/``) that a profile's ``llm.path`` can point at.

Reading a caption word by word is copying, and captions drawn from a small grammar teach it slowly: the LM learns
their prior and copies only the first content word. ``copy_drills`` adds turns whose media block holds random
words of the captions' vocabulary, which nothing but copying predicts (an induction head). On the toy world,
with them and lr 1e-3, the LM writes held-out captions given as text exactly; without them it wrote 7% (and at
lr 3e-3 no copying formed even on drills alone).
"""

from __future__ import annotations

import logging
import random
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anyverse.config import LLMConfig, TinySpec, load_config
from anyverse.llm import build_tiny_llm, load_llm
from anyverse.model import system_prompt
from anyverse.signals import MEDIA_END, MEDIA_START, SignalVocabulary
from anyverse.train.common import IGNORE, MadeOnUse, next_token_loss, pad_right
from anyverse.train.config import TrainConfig
from anyverse.train.encoder_alignment import CAPTION_INSTRUCTIONS
from anyverse.train.manifest import CaptionRecord, SkipReport, read_manifest

log = logging.getLogger(__name__)

LLM_DIR = "llm"


def chat_sample(record: CaptionRecord, index: int, system: str | None) -> list[dict[str, str]]:
    """A caption turn with the media written as text: ``img_1 <|media_start|>caption<|media_end|>``."""
    media_id = f"{record.modality.label}_1"
    instruction = CAPTION_INSTRUCTIONS[index % len(CAPTION_INSTRUCTIONS)].format(id=media_id)
    user = f"{media_id} {MEDIA_START}{record.caption}{MEDIA_END}\n{instruction}"
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": user}, {"role": "assistant", "content": record.caption}]


def copy_drills(pairs: list[CaptionRecord], per_pair: int, seed: int) -> list[CaptionRecord]:
    """Pairs whose captions are 3 to 9 random words of all captions' vocabulary, ``per_pair`` for each pair."""
    rng = random.Random(seed)
    words = sorted({word for pair in pairs for word in pair.caption.split()})
    return [pair.model_copy(update={"caption": " ".join(rng.choices(words, k=rng.randint(3, 9)))})
            for pair in pairs for _ in range(per_pair)]


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
        pairs = list(read_manifest(config.data.train, CaptionRecord, report))
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
        texts = [f"{tokenizer.bos_token}{line}{tokenizer.eos_token}" for line in lines if line.strip()]
        # every pair under every caption instruction and both system prompts: reading the media block is the skill
        # the later stages need, and one chat per pair among the plain lines left it unlearnt (17% of items)
        chats = [partial(self._chat, p, i, system) for p in pairs for system in prompts
                 for i in range(len(CAPTION_INSTRUCTIONS))]
        # drills without a system prompt: a tenth of the length, and the copying carries over to chats with one
        drills = copy_drills(pairs, config.copy_drills, config.seed)
        self.items = MadeOnUse([*(partial(self._text, t) for t in texts), *chats,
                                *(partial(self._chat, drill, i, None) for i, drill in enumerate(drills))])
        self.eval_items: list[tuple[list[int], list[int]]] = []
        if config.data.eval:
            held_out = list(read_manifest(config.data.eval, CaptionRecord))[: config.data.max_eval_items]
            self.eval_items = [self._chat(p, i, prompts[0]) for i, p in enumerate(held_out)]

    def _text(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.llm.tokenizer(text, add_special_tokens=False).input_ids
        return ids, ids

    def _chat(self, record: CaptionRecord, index: int, system: str | None) -> tuple[list[int], list[int]]:
        """A caption turn whose loss is on the reply only: the system prompt and the user turn would otherwise make
        up 90% of the loss, and 250 steps taught the prompt by heart but not to read the media block (with the
        caption's own embeddings in it, the reply's loss did not move)."""
        chat = chat_sample(record, index, system)
        render = self.llm.tokenizer.apply_chat_template
        ids = self.llm.tokenizer(render(chat, tokenize=False), add_special_tokens=False).input_ids
        context = self.llm.tokenizer(render(chat[:-1], tokenize=False, add_generation_prompt=True),
                                     add_special_tokens=False).input_ids
        if ids[: len(context)] != context:
            raise ValueError("lm-pretrain: the chat template does not render the prompt as a prefix of the chat")
        return ids, [IGNORE] * len(context) + ids[len(context) :]

    def collate(self, items: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return pad_right(items, self.llm.tokenizer.pad_token_id, self.llm.model.device)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, mask, labels = batch
        logits = self.llm.model(input_ids=ids, attention_mask=mask).logits
        return next_token_loss(logits, labels), {}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.llm.model.parameters()), "lr": self.config.optim.lr}]

    def evaluate(self) -> dict[str, float]:
        with torch.no_grad():
            losses = [self(self.collate([item]))[0].item() for item in self.eval_items]
        return {"reply_loss": sum(losses) / max(1, len(losses))}  # ~0 once the LM reads the media block

    def artifacts(self, directory: Path) -> dict[tuple[str | None, str], str | None]:
        self.llm.model.save_pretrained(directory / LLM_DIR)
        self.llm.tokenizer.save_pretrained(directory / LLM_DIR)
        return {("llm", "path"): LLM_DIR, ("llm", "tiny"): None}
