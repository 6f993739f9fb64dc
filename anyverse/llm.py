"""Load any causal LM + tokenizer with a chat template, add anyverse's special tokens, attach LoRA adapters.

The tiny profile builds a small Llama and a byte-level BPE tokenizer from config, saves them with
``save_pretrained`` and loads them back through exactly the code path a 7B checkpoint takes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from anyverse.config import LLMConfig, LoraConfigSpec, TinySpec
from anyverse.signals import SignalVocabulary
from anyverse.weights import collect_missing, component_dir, locate

log = logging.getLogger(__name__)

TINY_ARCH = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}
TINY_VOCAB_SIZE = 512
_CHAT_SPECIALS = ["<s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def _tokenizer_corpus() -> list[str]:
    """Text the tiny BPE learns merges from: the shipped system prompts, so prompts tokenise compactly."""
    root = resources.files("anyverse.prompts")
    return [f.read_text() for d in root.iterdir() if d.is_dir() for f in d.iterdir() if f.name.endswith(".md")]


def build_tiny_llm(directory: Path, spec: TinySpec, corpus: list[str] | None = None) -> None:
    """A byte-level BPE tokenizer with a ChatML template and a small random Llama, written as safetensors.

    ``corpus`` adds text the tokenizer learns merges from (a dataset's language, for pretraining on it).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=_CHAT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*_tokenizer_corpus(), *(corpus or [])], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = (resources.files("anyverse.prompts") / "chat_templates/chatml.jinja").read_text()
    tokenizer.save_pretrained(directory)

    torch.manual_seed(spec.seed)
    arch = {**TINY_ARCH, **spec.arch}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


@dataclass
class LoadedLLM:
    """The causal LM (possibly a peft model), its tokenizer, and the ids of anyverse's special tokens."""

    model: Any  # a transformers PreTrainedModel, or a peft PeftModel around one
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    vocab: SignalVocabulary
    base_id: str = ""  # identity of the base weights, recorded in checkpoints (see ``base_fingerprint``)
    grammar_cache: dict[str, Any] = field(default_factory=dict)
    extra_stop_ids: tuple[int, ...] = ()  # replies also end here (NExT-GPT's ``###``)
    structural: tuple[str, ...] = ()  # prompt-format strings that are not special tokens, neutralised in user text

    def token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def stop_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [*([eos] if isinstance(eos, int) else eos), *self.extra_stop_ids]

    def neutralize(self, text: str) -> str:
        """Make user-typed special tokens (signal tokens, markers, chat-template tokens) plain text.

        A zero-width space after the first character keeps the text readable but stops the tokenizer from
        matching it as a special token, so a user cannot trigger generation or fake a turn boundary.
        """
        return self._specials_pattern.sub(lambda m: m.group(0)[0] + "\u200b" + m.group(0)[1:], text)

    @cached_property
    def _specials_pattern(self) -> re.Pattern[str]:
        """Longest first, so ``<|media_start|>`` is not split at ``<|media|>``-like prefixes."""
        specials = sorted({*self.tokenizer.all_special_tokens, *self.structural}, key=len, reverse=True)
        return re.compile("|".join(re.escape(s) for s in specials if len(s) > 1))

    def input_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)


def llm_dir(config: LLMConfig) -> Path:
    how_to_get = (f"Run `huggingface-cli download {config.path}` on a machine with internet (then copy the HF cache), "
                  "or set llm.path to a local directory holding the model and its tokenizer.")
    if config.prompt_format == "nextgpt":
        from anyverse.nextgpt import VICUNA_V0

        how_to_get = VICUNA_V0
    return component_dir("llm", config, build=lambda d: build_tiny_llm(d, config.tiny or TinySpec()),
                         how_to_get=how_to_get)


def adapter_dir(config: LLMConfig) -> Path | None:
    if config.adapter is None:
        return None
    return locate(config.adapter, "llm.adapter", _converted_how(config) or
                  "Point llm.adapter at a peft adapter directory (adapter_config.json).")


def check_llm_weights(config: LLMConfig) -> None:
    """Raise one MissingWeightsError naming every absent piece: base model, adapter, NExT-GPT's added tokens."""
    checks: list[Callable[[], object]] = [lambda: adapter_dir(config)]
    if config.tiny is None:
        checks.insert(0, lambda: llm_dir(config))
    if config.added_tokens is not None:
        checks.append(lambda: locate(config.added_tokens or "", "llm.added_tokens", _converted_how(config)))
    collect_missing(checks)


def _converted_how(config: LLMConfig) -> str:
    if config.prompt_format != "nextgpt":
        return ""
    from anyverse.nextgpt import CONVERT

    return CONVERT


def base_fingerprint(model: Any) -> str:
    """A cheap identity of base weights: the architecture config plus the first embedding rows (bf16-rounded, so
    loading in fp32 or bf16 gives the same id). Different base models differ here with near certainty."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "dtype", "torch_dtype", "transformers_version", "vocab_size")}
    rows = model.get_input_embeddings().weight[:256].detach().to("cpu", torch.bfloat16).view(torch.int16)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(rows.numpy().tobytes())
    return f"llm-{digest.hexdigest()[:16]}"


def load_llm(config: LLMConfig, vocab: SignalVocabulary, device: torch.device, dtype: torch.dtype) -> LoadedLLM:
    """Load tokenizer + base model and add the special tokens (new rows start at the mean embedding).

    ``config.adapter`` is not applied here: callers check a checkpoint's base first, then :func:`load_adapter`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = llm_dir(config)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    extras: dict[str, Any] = {}
    if config.prompt_format == "nextgpt":  # the checkpoint fixes the added tokens, their ids and the template
        from anyverse.nextgpt import prepare_tokenizer

        tokens = prepare_tokenizer(tokenizer, config, vocab, directory)
        vocab, extras = tokens.vocab, {"extra_stop_ids": tokens.stop_ids, "structural": tokens.structural}
    else:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": vocab.special_tokens}, replace_extra_special_tokens=False
        )
    if not tokenizer.chat_template:
        raise ValueError(f"{directory}: the tokenizer has no chat template; use a chat model or add one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    base_id = base_fingerprint(model)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        with torch.random.fork_rng(devices=[]):  # new rows are sampled around the mean: same rows every load
            torch.manual_seed(0)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.to(device).eval().requires_grad_(False)
    return LoadedLLM(model=model, tokenizer=tokenizer, vocab=vocab, base_id=base_id, **extras)


def load_adapter(llm: LoadedLLM, config: LLMConfig, merge: bool = False) -> LoadedLLM:
    """Apply ``config.adapter`` (a peft LoRA directory), if set, frozen. ``merge`` folds it into the LM's weights
    for inference: no adapter layers run in each forward (toy world: replies decode 40% faster)."""
    adapter = adapter_dir(config)
    if adapter is None:
        return llm
    from peft import PeftModel

    model = PeftModel.from_pretrained(llm.model, adapter).eval().requires_grad_(False)
    return replace(llm, model=model.merge_and_unload() if merge else model, grammar_cache={})


def attach_lora(llm: LoadedLLM, spec: LoraConfigSpec) -> LoadedLLM:
    """Wrap the LM with fresh trainable LoRA weights; the added special tokens' rows (input embedding and output
    head) train too, since mean-initialised rows cannot tell ``[IMG0]`` from ``[VID0]``."""
    from peft import LoraConfig, get_peft_model

    new_ids = [llm.token_id(t) for t in llm.vocab.special_tokens]
    rows = {"embed_tokens": new_ids}
    if not llm.model.config.tie_word_embeddings:
        rows["lm_head"] = new_ids
    lora = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        trainable_token_indices=rows,
        task_type="CAUSAL_LM",
    )
    return replace(llm, model=get_peft_model(llm.model, lora), grammar_cache={})
