"""Decode a batch of replies together: left-padded contexts, one forward pass per step for the rows still going.

Each row keeps its own logits processors (grammar, request constraints), stream parser and random stream, so a
row's reply does not depend on which rows share its batch; a finished row leaves the batch (and its KV cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from anyverse.llm import LoadedLLM
from anyverse.signals import StreamParser
from anyverse.types import Event, Modality, Notice, TextDelta


@dataclass
class Row:
    """One reply being decoded: its prompt embeddings [1, L, D], rules, parser and random stream."""

    embeds: torch.Tensor
    processors: list
    parser: StreamParser
    seed: int
    require: frozenset[Modality] = frozenset()
    ids: list[int] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    done: bool = False
    _sent: str = ""

    def __post_init__(self) -> None:
        self.rng = torch.Generator().manual_seed(self.seed)

    def step(self, llm: LoadedLLM, logits: torch.Tensor, max_new_tokens: int, temperature: float,
             top_p: float) -> int:
        """Constrain and sample the next token from this row's logits [1, V], feed the parser; returns the token."""
        scores = logits.float().clone()
        history = torch.tensor([self.ids], dtype=torch.long, device=logits.device).reshape(1, len(self.ids))
        for processor in self.processors:
            scores = processor(history, scores)
        token = sample(scores[0], temperature, top_p, self.rng)
        if token in llm.stop_ids:
            self.finish()
            return token
        self.ids.append(token)
        text = llm.tokenizer.decode(self.ids, skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # hold back half a UTF-8 character
            self.events += self.parser.feed(text[len(self._sent):])
            self._sent = text
        if len(self.ids) >= max_new_tokens:
            self.finish()
        return token

    def finish(self) -> None:
        self.done = True
        self.events += self.parser.close()
        made = {e.request.modality for e in self.events if e.kind == "request"}  # type: ignore[union-attr]
        self.events += [Notice(message=f"the reply made no {m.value} although it was required")
                        for m in sorted(self.require - made)]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta)).strip()


def sample(scores: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator) -> int:
    """Greedy at temperature 0; else nucleus sampling by inverse CDF with one uniform draw from the row's stream,
    so tiny numeric differences between batch shapes rarely change the token."""
    if temperature <= 0:
        return int(scores.argmax())
    probs = torch.softmax(scores.double() / temperature, -1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(0) - ordered >= top_p  # keep the smallest prefix reaching top_p
        probs = probs.clone()
        probs[order[outside]] = 0
        probs /= probs.sum()
    cdf = probs.cumsum(0)
    u = torch.rand(1, generator=rng, dtype=torch.float64) * cdf[-1]
    return int(min(int(torch.searchsorted(cdf, u).item()), int(probs.nonzero()[-1])))


@torch.inference_mode()
def decode_batch(llm: LoadedLLM, rows: list[Row], max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Run every row to its end (a stop token or its token budget); results are left in the rows."""
    if not rows:
        return
    embeds, mask = _left_pad([r.embeds for r in rows])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = llm.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    active = list(range(len(rows)))  # which row each batch position holds
    while active:
        tokens = [rows[i].step(llm, logits[p : p + 1], max_new_tokens, temperature, top_p)
                  for p, i in enumerate(active)]
        keep = [p for p, i in enumerate(active) if not rows[i].done]
        if not keep:
            return
        if len(keep) < len(active):  # finished rows stop costing: drop them from the batch and the cache
            cache.batch_select_indices(torch.tensor(keep, device=mask.device))
            mask = mask[keep]
            active = [active[p] for p in keep]
            tokens = [tokens[p] for p in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], 1)
        step = llm.input_embeddings(torch.tensor(tokens, device=mask.device)[:, None])
        out = llm.model(inputs_embeds=step, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                        past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]


def _left_pad(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, D] with shorter contexts padded on the left (zeros, masked out) and the [B, L] attention mask."""
    width = max(e.shape[1] for e in embeds)
    first = embeds[0]
    batch = first.new_zeros(len(embeds), width, first.shape[2])
    mask = torch.zeros(len(embeds), width, dtype=torch.long, device=first.device)
    for i, e in enumerate(embeds):
        batch[i, width - e.shape[1] :] = e[0]
        mask[i, width - e.shape[1] :] = 1
    return batch, mask
