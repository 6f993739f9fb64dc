"""Compose encoder + input projectors + LLM + output projectors; render conversations into embeddings.

Each media item is written in the prompt as ``<id> <|media_start|><|media|>*k<|media_end|>``; the ``k`` placeholder
embeddings are replaced by the projector's soft tokens, so the model can read the item and refer to it by id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from anyverse.config import AnyverseConfig, anyverse_home
from anyverse.encoders.imagebind import ImageBindEncoder
from anyverse.llm import LoadedLLM, load_adapter, load_llm
from anyverse.pool import generator_menu
from anyverse.projectors import build_input_projector, build_output_projector
from anyverse.signals import MEDIA_END, MEDIA_START, MEDIA_TOKEN, REQUEST_CLOSE, REQUEST_OPEN, SignalVocabulary
from anyverse.types import Media, Message, Modality
from anyverse.weights import expand

log = logging.getLogger(__name__)

INPUT_MODALITIES = (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO, Modality.DEPTH, Modality.THERMAL)


@dataclass
class Context:
    """A rendered conversation: token ids and, per media item, where its soft tokens go."""

    ids: list[int]
    slots: list[tuple[Media, int, int]]  # (media, first position, number of soft tokens)
    text: str


def system_prompt(config: AnyverseConfig, vocab: SignalVocabulary, mode: str | None = None) -> str:
    """The versioned system prompt from ``prompts/<version>/system_<mode>.md`` with this config's values."""
    name = f"{config.llm.system_prompt}/system_{mode or config.output.mode}.md"
    source = resources.files("anyverse.prompts") / name
    if not source.is_file():
        raise ValueError(f"prompts/{name}: no such system prompt (llm.system_prompt={config.llm.system_prompt!r})")
    values = {"request_open": REQUEST_OPEN, "request_close": REQUEST_CLOSE,
              "max_prompt_chars": config.output.max_prompt_chars}
    for modality in vocab.counts:
        values[f"{modality.value}_tokens"] = "".join(vocab.signal_tokens(modality))
    text = Template(source.read_text()).safe_substitute(values).strip()
    if config.output.name_generators and (mode or config.output.mode) == "meta":
        text += GENERATORS_PARAGRAPH + generator_menu(config)
    return text


GENERATORS_PARAGRAPH = """
"generator" is optional: one of these generators, or what it should do (generate, edit, speech) for the usual one.
A generator's own options go in "options" too.
"""


def fingerprint(encoder: ImageBindEncoder, llm: LoadedLLM) -> dict[str, Any]:
    """What a checkpoint's trained parts depend on: the exact base encoder and LLM, vocabulary and signal tokens."""
    return {"encoder": encoder.id, "llm": llm.base_id, "llm_hidden_size": llm.hidden_size,
            "vocab_size": len(llm.tokenizer), "signal_tokens": {m.value: n for m, n in llm.vocab.counts.items()}}


class AnyverseModel(nn.Module):
    """The trainable/inferable core. Generators are not part of it: they live in a lazy pool."""

    def __init__(self, config: AnyverseConfig, encoder: ImageBindEncoder, llm: LoadedLLM,
                 input_projectors: nn.ModuleDict, output_projectors: nn.ModuleDict):
        super().__init__()
        self.config, self.encoder, self.llm = config, encoder, llm
        self.input_projectors, self.output_projectors = input_projectors, output_projectors
        self.system_prompts = {mode: system_prompt(config, llm.vocab, mode) for mode in ("meta", "signal")}
        self.system_prompt = self.system_prompts[config.output.mode]

    @property
    def llm(self) -> LoadedLLM:
        return self._llm

    @llm.setter
    def llm(self, llm: LoadedLLM) -> None:
        """Registers the LM as a submodule, so its (LoRA) weights are this module's parameters: optimisers,
        checkpoints and DDP see them, also after a LoRA wrapper replaces it."""
        self._llm = llm
        self.language_model = llm.model

    @classmethod
    def from_config(cls, config: AnyverseConfig, device: torch.device, dtype: torch.dtype,
                    conditioning_specs: dict[Modality, dict[str, tuple[int, ...]]],
                    check_base: Callable[[dict[str, Any]], None] | None = None,
                    output_projectors: bool | None = None, merge_adapter: bool = False) -> AnyverseModel:
        """Load encoder and LLM, build projectors (from ``projector_weights`` when set).

        ``check_base`` sees :meth:`base_fingerprint` before any adapter or projector is applied, so a checkpoint
        meant for another base fails with a named mismatch instead of a shape error. Output projectors are built
        in signal mode (or when ``output_projectors`` says so, for training both modes). ``merge_adapter`` folds
        the LoRA into the LLM (inference sessions); training keeps it apart, to go on training it.
        """
        vocab = SignalVocabulary(config.output.signal_tokens)
        encoder = ImageBindEncoder.from_config(config.encoder, device, dtype, cache_dir=anyverse_home() / "embeddings")
        llm = load_llm(config.llm, vocab, device, dtype)
        if check_base is not None:
            check_base(fingerprint(encoder, llm))
        llm = load_adapter(llm, config.llm, merge=merge_adapter)
        torch.manual_seed(0)  # untrained projectors are reproducible
        inputs = nn.ModuleDict({
            m.value: build_input_projector(config.input_projector(m), encoder.embed_dim, encoder.token_dim(m),
                                           llm.hidden_size, encoder.patch_grid(m), llm.model.get_input_embeddings(),
                                           encoder.views(m))
            for m in INPUT_MODALITIES
        })
        outputs = nn.ModuleDict({
            m.value: build_output_projector(llm.hidden_size, config.output.signal_tokens[m], spec,
                                            config.output_projector)
            for m, spec in conditioning_specs.items()
            if (config.output.mode == "signal" if output_projectors is None else output_projectors)
        })
        model = cls(config, encoder, llm, inputs, outputs)
        if config.projector_weights:
            # training may add output projectors to a stage that had none; inference never runs them untrained
            model.load_projectors(expand(config.projector_weights), new_outputs=output_projectors is not None)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def projector_state(self) -> dict[str, torch.Tensor]:
        return {f"input.{k}": v for k, v in self.input_projectors.state_dict().items()} | {
            f"output.{k}": v for k, v in self.output_projectors.state_dict().items()}

    def base_fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.encoder, self.llm)

    def load_projectors(self, path: Path, new_outputs: bool = False) -> None:
        """Load trained projectors; a shape or key mismatch names the offending tensors.

        Output projectors in the file are skipped when this model has none (meta mode does not use them); with
        ``new_outputs`` a file without any keeps this model's freshly initialised ones (to be trained).
        """
        state = load_file(path)
        mine = self.projector_state()
        if not self.output_projectors:
            state = {k: v for k, v in state.items() if not k.startswith("output.")}
        elif new_outputs and not any(k.startswith("output.") for k in state):
            state |= {k: v for k, v in mine.items() if k.startswith("output.")}
        missing = sorted(set(mine) - set(state))
        unexpected = sorted(set(state) - set(mine))
        wrong = sorted(k for k in set(mine) & set(state) if mine[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            detail = "; ".join(f"{label}: {', '.join(keys[:3])}" for label, keys in
                               (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
            raise ValueError(f"{path}: projector weights do not match this config ({detail})")
        self.input_projectors.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("input.")})
        self.output_projectors.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("output.")})

    def num_soft_tokens(self, modality: Modality) -> int:
        return self.config.input_projector(modality).num_tokens

    def render(self, history: list[Message], mode: str | None = None) -> Context:
        """Chat-template the conversation (system prompt first) and locate every media item's soft-token slots.

        ``mode`` picks the output mode's system prompt (default: the config's); training renders both.
        """
        if self.config.llm.prompt_format == "nextgpt":  # NExT-GPT's own prompt: no system prompt, no ids
            from anyverse.nextgpt import render

            return render(self.llm, history)
        neutral = self.llm.neutralize
        chat = [{"role": "system", "content": self.system_prompts[mode or self.config.output.mode]}]
        ordered: list[Media] = []
        for message in history:
            blocks = [f"{m.id} {MEDIA_START}{MEDIA_TOKEN * self.num_soft_tokens(m.modality)}{MEDIA_END}"
                      for m in message.media]
            ordered += message.media
            parts = [*blocks, neutral(message.text)] if message.role == "user" else [neutral(message.text), *blocks]
            chat.append({"role": message.role, "content": "\n".join(p for p in parts if p)})
        tokenizer = self.llm.tokenizer
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        media_id = self.llm.token_id(MEDIA_TOKEN)
        positions = [i for i, t in enumerate(ids) if t == media_id]
        slots, cursor = [], 0
        for item in ordered:
            k = self.num_soft_tokens(item.modality)
            slots.append((item, positions[cursor], k))
            cursor += k
        if cursor != len(positions):
            raise RuntimeError(f"chat template kept {len(positions)} media placeholders, expected {cursor}")
        return Context(ids=ids, slots=slots, text=text)

    def soft_tokens(self, media: list[Media]) -> dict[str, torch.Tensor]:
        """Encode (cached by sha256) and project each item: media id -> [k, llm_dim]."""
        out: dict[str, torch.Tensor] = {}
        for modality in {m.modality for m in media}:
            items = [m for m in media if m.modality == modality]
            encoded = self.encoder.encode(items, self.config.caps)
            projector = self.input_projectors[modality.value]
            dtype = next(projector.parameters()).dtype
            projected = projector(encoded.pooled.to(dtype), encoded.tokens.to(dtype))
            out.update({str(item.id): projected[i] for i, item in enumerate(items)})
        return out

    def embed(self, context: Context) -> torch.Tensor:
        """[1, L, llm_dim] input embeddings with soft tokens spliced into the placeholder slots; slots sharing a
        position add up (NExT-GPT sums the files of one modality)."""
        device = self.llm.model.get_input_embeddings().weight.device
        embeds = self.llm.input_embeddings(torch.tensor([context.ids], device=device))
        if context.slots:
            soft = self.soft_tokens([m for m, _, _ in context.slots])
            embeds = embeds.clone()
            for _, start, k in context.slots:
                embeds[0, start : start + k] = 0
            for media, start, k in context.slots:
                embeds[0, start : start + k] += soft[str(media.id)].to(embeds.dtype)
        return embeds

    def signal_runs(self, generated: list[int]) -> list[tuple[Modality, int]]:
        """(modality, start index) of every complete, ordered signal-token run in generated ids."""
        runs = []
        for modality in self.llm.vocab.counts:
            run = [self.llm.token_id(t) for t in self.llm.vocab.signal_tokens(modality)]
            runs += [(modality, i) for i in range(len(generated) - len(run) + 1) if generated[i : i + len(run)] == run]
        return sorted(runs, key=lambda r: r[1])

    def signal_conditioning(self, prompt_embeds: torch.Tensor,
                            generated: list[int]) -> list[tuple[Modality, dict[str, torch.Tensor] | None]]:
        """Output-projector conditioning for each signal run, in order of appearance.

        One forward pass over prompt + reply gives the last layer's hidden states at the run's positions; as in
        NExT-GPT, the signal tokens' input embeddings are added before projection. Re-running the sequence avoids
        the off-by-one between ``generate``'s per-step hidden states and the sampled ids. ``None`` conditioning
        marks a modality without a configured generator.
        """
        runs = self.signal_runs(generated)
        if not runs:
            return []
        ids = torch.tensor([generated], device=prompt_embeds.device)
        reply_embeds = self.llm.input_embeddings(ids)
        with torch.inference_mode():
            out = self.llm.model(inputs_embeds=torch.cat([prompt_embeds, reply_embeds], 1),
                                 output_hidden_states=True)
        hidden = out.hidden_states[-1][0, prompt_embeds.shape[1] :] + reply_embeds[0]
        result: list[tuple[Modality, dict[str, torch.Tensor] | None]] = []
        for modality, start in runs:
            if modality.value not in self.output_projectors:  # no generator configured: reported when routed
                result.append((modality, None))
                continue
            states = hidden[start : start + self.llm.vocab.counts[modality]].unsqueeze(0)
            result.append((modality, self.output_projectors[modality.value](states)))
        return result
