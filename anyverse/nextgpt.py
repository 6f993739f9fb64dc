"""NExT-GPT's released checkpoint (``ChocoWu/nextgpt_7b_tiva_v0``, legacy ``code/``): conversion and prompt format.

The checkpoint is ``torch.save`` of an OrderedDict of every trainable parameter of ``NextGPTModel``: LoRA on the
Vicuna-7B v0 attention, the whole resized ``embed_tokens``/``lm_head`` (32000 + 38 added rows), ``llama_proj``
(ImageBind -> one soft token, shared by every input modality) and three ``TextFcLayer`` output projectors.
:func:`convert` maps it to a peft adapter, ``projectors.safetensors`` and ``added_tokens.json``; the ``nextgpt``
profile renders prompts the way NExT-GPT trained them (:func:`render`): no system prompt,
``### Human: <Img>`` + the media vector + ``</Img> {text}\\n### Assistant:``, stopping at ``###``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from anyverse.model import INPUT_MODALITIES, Context  # image, audio, video, ...: demo_app.py's order too
from anyverse.signals import SignalVocabulary
from anyverse.types import Media, Message, Modality

if TYPE_CHECKING:
    from anyverse.config import LLMConfig

MARKERS = ("<Img>", "</Img>")  # NExT-GPT wraps every input modality's vector in these (code/model: prompt_wrap)
OLD_MARKERS = ("<Vid>", "</Vid>", "<Aud>", "</Aud>")  # added by code before 2023-09-26: 32042 rows
STOP = "###"
_RELEASED_COUNTS = {Modality.IMAGE: 4, Modality.VIDEO: 24, Modality.AUDIO: 8}  # num_gen_{img,video,audio}_tokens
LORA_ALPHA = 32  # code/config/base.yaml; the checkpoint stores r (the LoRA matrices' rank), not alpha
_MEDIA = "\x00"  # where a media vector goes in rendered text; removed from user text first

_PEFT = "llama_model.base_model.model."
_LORA = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.lora_([AB])(?:\.default)?\.weight")
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"
_OUTPUTS = {"gen_text_hidden_fcs.0.": Modality.IMAGE, "gen_text_hidden_fcs_video.0.": Modality.VIDEO,
            "gen_text_hidden_fcs_audio.0.": Modality.AUDIO}
_TEXTFC_REQUIRED = ("fc.weight", "fc.bias", "model.weight", "model.bias", "query_embs")
_WHERE = "ChocoWu/nextgpt_7b_tiva_v0's pytorch_model.pt"
VICUNA_V0 = ("Vicuna-7B v0 is LLaMA-7B (v1, in Hugging Face format) plus lmsys/vicuna-7b-delta-v0: merge them with "
             "FastChat v0.1.10's `python -m fastchat.model.apply_delta --base LLAMA_7B --target DIR --delta "
             "lmsys/vicuna-7b-delta-v0` and put DIR here (README: Running NExT-GPT's released weights).")
CONVERT = ("Download pytorch_model.pt and added_tokens.json from ChocoWu/nextgpt_7b_tiva_v0 and run `anyverse convert "
           "nextgpt pytorch_model.pt $ANYVERSE_HOME/weights/nextgpt --added-tokens added_tokens.json`.")


class CheckpointError(ValueError):
    """A file that is not NExT-GPT's released delta checkpoint; the message says what it is and what to do."""


# ---------------------------------------------------------------- conversion


@dataclass
class Converted:
    """What :func:`convert` wrote, for the CLI to print."""

    directory: Path
    lines: list[str]


def convert(src: Path, dst: Path, added_tokens: Path | None = None) -> Converted:
    """Map ``pytorch_model.pt`` to ``dst/{adapter/, projectors.safetensors, added_tokens.json, manifest.json}``.
    Every check runs before anything is written."""
    state = load_checkpoint(src)
    check_origin(state, src)
    lora, rows = split_llm(state, src)
    tokens, tokens_source = added_token_layout(rows[_EMBED].shape[0], added_tokens, src)
    projectors = map_projectors(state)
    manifest = describe(src, state, lora, rows, tokens_source)
    dst.mkdir(parents=True, exist_ok=True)
    write_adapter(dst / "adapter", lora, rows)
    save_file(projectors, str(dst / "projectors.safetensors"))
    (dst / "added_tokens.json").write_text(json.dumps(dict(tokens), indent=1))
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return Converted(dst, summary(manifest, len(tokens), tokens[0][1]))


def describe(src: Path, state: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor],
             rows: Mapping[str, torch.Tensor], tokens_source: str) -> dict[str, Any]:
    """The manifest: the source file's hash and what each part of it became."""
    with src.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {
        "source": src.name, "sha256": digest, "vocab_rows": rows[_EMBED].shape[0],
        "llm_hidden_size": rows[_EMBED].shape[1], "added_tokens": tokens_source,
        "lora": {"r": next(iter(lora.values())).shape[0], "alpha": LORA_ALPHA,
                 "layers": len({k.split(".layers.")[1].split(".")[0] for k in lora}), "tensors": len(lora)},
        "input_projector": list(state["llama_proj.weight"].shape[::-1]),
        "output_projectors": {m.value: [state[f"{prefix}query_embs"].shape[1], state[f"{prefix}model.weight"].shape[0]]
                              for prefix, m in _OUTPUTS.items()},
    }


def summary(manifest: Mapping[str, Any], count: int, first_id: int) -> list[str]:
    """What the CLI prints: one line per mapped part."""
    lora = manifest["lora"]
    rows = (manifest["vocab_rows"], manifest["llm_hidden_size"])
    return [f"LoRA r={lora['r']} alpha={lora['alpha']} on {lora['layers']} layers ({lora['tensors']} tensors) -> "
            "adapter/",
            f"embed_tokens + lm_head {rows} -> adapter/ (trained whole)",
            f"llama_proj {tuple(manifest['input_projector'])} -> input projectors (linear, 1 token): "
            + ", ".join(m.value for m in INPUT_MODALITIES),
            *(f"TextFcLayer -> output.{name}: {q} x {width}" for name, (q, width) in
              manifest["output_projectors"].items()),
            f"added tokens ({manifest['added_tokens']}): {count} from id {first_id}"]


def load_checkpoint(src: Path) -> dict[str, torch.Tensor]:
    """Plain tensors only (``weights_only=True``): a pickle holding anything else is refused, never run."""
    if src.is_dir():
        raise CheckpointError(f"{src}: a directory (a Hugging Face model folder?); pass NExT-GPT's delta "
                              f"checkpoint file itself, {_WHERE}")
    if not src.is_file():
        raise CheckpointError(f"{src}: no such checkpoint file")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if found:
            raise CheckpointError(f"{src}: holds a {found.group(1)}, not only tensors, so it was not unpickled (code "
                                  f"could run); use {_WHERE}") from None
        raise CheckpointError(f"{src}: not a PyTorch checkpoint ({type(err).__name__}); use {_WHERE}") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise CheckpointError(f"{src}: expected a mapping of names to tensors, got {type(state).__name__}; "
                              f"use {_WHERE}")
    return dict(state)


def check_origin(state: Mapping[str, torch.Tensor], src: Path) -> None:
    """Refuse the other things people pass for it: the newer codebase's keys, plain Hugging Face weights."""
    if any(k.startswith("model.mm_") or ".mm_input_projector" in k or ".mm_output_" in k for k in state):
        raise CheckpointError(f"{src}: keys of NExT-GPT's newer codebase (mm_input_projector / mm_output_*); no "
                              f"weights were released for it. This converter reads the legacy code's {_WHERE}")
    if not any(k.startswith(("llama_model.", "llama_proj.", "gen_text_hidden_fcs")) for k in state):
        example = next(iter(state), "(none)")
        raise CheckpointError(f"{src}: no NExT-GPT keys (llama_model.*, llama_proj.*, gen_text_hidden_fcs*; first "
                              f"key {example!r}): plain LLM or other weights? Use {_WHERE}")


def split_llm(state: Mapping[str, torch.Tensor], src: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The LLM's part: LoRA tensors by peft adapter key, and the full embedding/output matrices. Every key of the
    checkpoint must be one NExT-GPT saves; every LoRA module needs both matrices on every layer."""
    lora: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    found: dict[str, set[str]] = {}
    for key, tensor in state.items():
        if key.startswith(("llama_proj.", *_OUTPUTS)):
            if key.startswith("llama_proj.") and key not in ("llama_proj.weight", "llama_proj.bias"):
                unknown.append(key)
            continue
        inner = key.removeprefix(_PEFT) if key.startswith(_PEFT) else None
        match = _LORA.fullmatch(inner or "")
        if match:
            layer, proj, ab = match.groups()
            lora[f"base_model.model.model.layers.{layer}.self_attn.{proj}_proj.lora_{ab}.weight"] = tensor
            found.setdefault(layer, set()).add(f"{proj}_proj.lora_{ab}")
        elif inner in (_EMBED, _HEAD):
            rows[inner] = tensor
        else:
            unknown.append(key)
    modules = set().union(*found.values()) if found else set()
    missing = [f"{_PEFT}{k}" for k in (_EMBED, _HEAD) if k not in rows]
    missing += [f"llama_proj.{p}" for p in ("weight", "bias") if f"llama_proj.{p}" not in state]
    missing += [f"{prefix}{name}" for prefix in _OUTPUTS for name in _TEXTFC_REQUIRED if prefix + name not in state]
    if not lora:
        missing.append(f"{_PEFT}model.layers.*.self_attn.*_proj.lora_*.default.weight")
    missing += [f"layer {layer}: {m}" for layer, have in sorted(found.items()) for m in sorted(modules - have)]
    missing += [f"{m.replace('lora_A', 'lora_B')} (pair of {m})" for m in sorted(modules)
                if "lora_A" in m and m.replace("lora_A", "lora_B") not in modules]
    missing += [f"{m.replace('lora_B', 'lora_A')} (pair of {m})" for m in sorted(modules)
                if "lora_B" in m and m.replace("lora_B", "lora_A") not in modules]
    _refuse(src, missing, unknown)
    if rows[_EMBED].shape != rows[_HEAD].shape:
        raise CheckpointError(f"{src}: embed_tokens {tuple(rows[_EMBED].shape)} and lm_head "
                              f"{tuple(rows[_HEAD].shape)} differ; not a NExT-GPT checkpoint")
    return lora, rows


def map_projectors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``llama_proj`` becomes every input modality's linear projector (NExT-GPT shares one); each TextFcLayer keeps its
    parameter names under ``output.<modality>.``."""
    out = {f"input.{m.value}.layers.{p}": state[f"llama_proj.{p}"].clone()
           for m in INPUT_MODALITIES for p in ("weight", "bias")}
    for prefix, modality in _OUTPUTS.items():
        for key, tensor in state.items():
            if key.startswith(prefix):
                out[f"output.{modality.value}.{key.removeprefix(prefix)}"] = tensor.contiguous()
    return out


def added_token_layout(rows: int, path: Path | None, src: Path) -> tuple[list[tuple[str, int]], str]:
    """The added tokens and their ids: from the checkpoint's ``added_tokens.json`` when given, else as the code of
    the release (October 2023) added them, ending at the last embedding row: ``add_tokens({"<Img>"})`` (a set,
    which transformers 4.29 turned into the token ``{'<Img>'}``, so prompts hold ``<Img>`` as plain text), then
    ``[IMG0..3]``, ``[VID0..23]``, ``[AUD0..7]``."""
    default = [*MARKERS, *SignalVocabulary(_RELEASED_COUNTS).all_signal_tokens]
    if path is None:
        if rows == 32000 + len(default) + len(OLD_MARKERS):
            _older_vocabulary(src, rows)
        base = rows - len(default)
        released = [f"{{'{t}'}}" if t in MARKERS else t for t in default]
        return ([(t, base + i) for i, t in enumerate(released)],
                "assumed from the release's code, as {'<Img>'}; pass --added-tokens to read them")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable added_tokens.json ({err})") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in raw.items()):
        raise CheckpointError(f"{path}: expected a JSON object of token -> id")
    tokens = sorted(raw.items(), key=lambda item: item[1])
    names = [_plain(t) for t, _ in tokens]
    if any(m in names for m in OLD_MARKERS):
        _older_vocabulary(src, rows)
    ids = [i for _, i in tokens]
    if not tokens or ids != list(range(ids[0], ids[0] + len(ids))) or ids[-1] != rows - 1:
        raise CheckpointError(f"{path}: ids {ids[:1]}..{ids[-1:]} are not the last {len(ids)} of the checkpoint's "
                              f"{rows} embedding rows; is it the added_tokens.json saved with this checkpoint?")
    if names != default:
        raise CheckpointError(f"{path}: tokens {names[:3]}... are not NExT-GPT's {len(default)} (<Img>, </Img>, "
                              "[IMG0..3], [VID0..23], [AUD0..7]) in that order")
    return tokens, f"read from {path.name}"


def _plain(token: str) -> str:
    """``{'<Img>'}`` (what code before 2023-11-01 added) names the ``<Img>`` marker too."""
    match = re.fullmatch(r"\{'(.*)'\}", token)
    return match.group(1) if match else token


def _older_vocabulary(src: Path, rows: int) -> None:
    raise CheckpointError(f"{src}: {rows}-row vocabulary with <Vid></Vid><Aud></Aud>: a checkpoint of NExT-GPT's "
                          f"older code (before 2023-09-26), which nothing released matches; use {_WHERE} "
                          "(32038 rows)")


def write_adapter(directory: Path, lora: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> None:
    """A peft LoRA adapter whose ``modules_to_save`` carry the trained embedding and output matrices whole."""
    from peft import LoraConfig

    rank = next(iter(lora.values())).shape[0]
    targets = sorted({k.split(".self_attn.")[1].split(".")[0] for k in lora})
    config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
                        modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM", inference_mode=True)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {**lora, f"base_model.model.{_EMBED}": rows[_EMBED], f"base_model.model.{_HEAD}": rows[_HEAD]}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))


def _refuse(src: Path, missing: list[str], unknown: list[str]) -> None:
    if not (missing or unknown):
        return
    parts = [f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
             for label, keys in (("missing keys", missing), ("unknown keys", unknown)) if keys]
    raise CheckpointError(f"{src}: not NExT-GPT's 7b_tiva_v0 layout; {'; '.join(parts)}")


# ---------------------------------------------------------------- loading and prompting


@dataclass(frozen=True)
class Tokens:
    """What the ``nextgpt`` format changes in a loaded tokenizer: the vocabulary, stop ids, strings to neutralise."""

    vocab: SignalVocabulary
    stop_ids: tuple[int, ...]
    structural: tuple[str, ...]


def check_base(directory: Path) -> None:
    """Refuse a LLaMA-2 base: NExT-GPT's LoRA and rows load onto it without an error, and it answers nonsense."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{directory}: no readable config.json ({err})") from None
    if config.get("max_position_embeddings") == 4096 and config.get("rms_norm_eps") == 1e-5:
        raise ValueError(f"{directory}: a LLaMA-2 / Vicuna v1.5 config (max_position_embeddings 4096, rms_norm_eps "
                         "1e-05), but NExT-GPT's checkpoint was trained on Vicuna-7B v0 (LLaMA-1 plus "
                         "lmsys/vicuna-7b-delta-v0); see README, 'Running NExT-GPT's released weights'")


def prepare_tokenizer(tokenizer: Any, config: LLMConfig, vocab: SignalVocabulary, directory: Path) -> Tokens:
    """Add the checkpoint's tokens at the checkpoint's ids, as NExT-GPT's tokenizer had them (whitespace around them
    stripped), and set the Vicuna v0 template. Signal counts must match the checkpoint's."""
    from tokenizers import AddedToken

    from anyverse.weights import expand

    check_base(directory)
    assert config.added_tokens is not None
    path = expand(config.added_tokens)
    try:
        layout = sorted(json.loads(path.read_text()).items(), key=lambda item: item[1])
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"llm.added_tokens {path}: not readable ({err}); run `anyverse convert nextgpt`") from None
    tokens, ids = [t for t, _ in layout], [i for _, i in layout]
    signals = set(vocab.all_signal_tokens)
    ours = SignalVocabulary(vocab.counts, markers=[t for t in tokens if t not in signals])
    if ours.special_tokens != tokens:
        raise ValueError(f"llm.added_tokens {path}: the checkpoint's tokens are not this config's signal tokens "
                         f"({len(vocab.all_signal_tokens)} configured); output.signal_tokens must be "
                         "{image: 4, video: 24, audio: 8}")
    if ids[0] != len(tokenizer):
        raise ValueError(f"llm.added_tokens {path}: ids start at {ids[0]} but the base tokenizer in {directory} has "
                         f"{len(tokenizer)} tokens: not the Vicuna v0 tokenizer this checkpoint extends")
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, lstrip=True, rstrip=True, normalized=False, special=True) for t in tokens]},
        replace_extra_special_tokens=False)
    tokenizer.chat_template = (resources.files("anyverse.prompts") / "chat_templates/vicuna_v0.jinja").read_text()
    stops = tuple(i for piece, i in tokenizer.get_vocab().items() if piece.lstrip("▁Ġ") == STOP and i < ids[0])
    if not stops:
        raise ValueError(f"{directory}: the tokenizer has no '{STOP}' token to end replies at, as NExT-GPT does")
    return Tokens(ours, stops, (STOP, *MARKERS))


def render(llm: Any, history: list[Message]) -> Context:
    """NExT-GPT's prompt: each user message's media as ``<Img>`` + one vector + ``</Img>`` per modality (the files of
    one modality summed, so their slots share a position), then its text; assistant messages as their text."""
    tokenizer = llm.tokenizer
    chat: list[dict[str, str]] = []
    groups: list[list[Media]] = []
    for message in history:
        text = llm.neutralize(message.text.replace(_MEDIA, ""))
        if message.role == "user":
            mine = [[m for m in message.media if m.modality == modality] for modality in INPUT_MODALITIES]
            mine = [g for g in mine if g]
            groups += mine
            text = " ".join([*(f"{MARKERS[0]}{_MEDIA}{MARKERS[1]}" for _ in mine), text])
        chat.append({"role": message.role, "content": text})
    rendered = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    placeholder = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.bos_token_id
    ids: list[int] = [tokenizer.bos_token_id]
    slots: list[tuple[Media, int, int]] = []
    for index, piece in enumerate(rendered.split(_MEDIA)):  # pieces tokenised apart, as NExT-GPT's prompt_wrap does
        if index:
            slots += [(media, len(ids), 1) for media in groups[index - 1]]
            ids.append(placeholder)
        ids += tokenizer(piece, add_special_tokens=False).input_ids
    return Context(ids=ids, slots=slots, text=tokenizer.bos_token + rendered.replace(_MEDIA, "<media>"))


