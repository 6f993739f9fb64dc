"""Tiny real parts for tiny-profile builders (built-ins and plugin packages): tokenizers with in-memory
vocabularies, a CLIP text encoder, a VAE, a UNet's sizes and a scheduler.

No vocabulary files, sentencepiece or network: byte-level BPE tokenizers get the 256 byte characters and no merges,
the T5 (Unigram) tokenizer gets printable ASCII. They save and reload like the real ones.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, RobertaTokenizer, T5Tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler


def _byte_alphabet() -> list[str]:
    return sorted(ByteLevel.alphabet())


def clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """CLIP BPE over single bytes (plus their end-of-word forms), padding to ``max_length`` like SD expects."""
    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length)


def clip_text_encoder(tokenizer: CLIPTokenizer, hidden: int, layers: int, heads: int) -> CLIPTextModel:
    """A CLIP text transformer whose positions cover exactly the tokenizer's padded length."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def roberta_tokenizer(max_length: int) -> RobertaTokenizer:
    """RoBERTa BPE over single bytes, with the special-token ids CLAP's text model expects (<s>=0, <pad>=1, </s>=2)."""
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", *_byte_alphabet()]
    return RobertaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int) -> T5Tokenizer:
    """T5 Unigram over printable ASCII characters (with and without the word-start marker)."""
    chars = [c for c in string.printable if not c.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -2.5) for c in chars] + [(c, -3.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def tiny_vae(channels: list[int], groups: int, sample_size: int = 32, image_channels: int = 3,
             latent_channels: int = 4) -> AutoencoderKL:
    """A small AutoencoderKL: RGB for SD/Zeroscope; AudioLDM-2 uses it on 1-channel mel spectrograms."""
    from diffusers import AutoencoderKL

    levels = len(channels)
    return AutoencoderKL(
        in_channels=image_channels,
        out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=groups,
        sample_size=sample_size,
    )


def tiny_unet_kwargs(arch: dict[str, Any]) -> dict[str, Any]:
    """The tiny UNet sizes SD-like 2-D and 3-D UNets share (keys of stable_diffusion.TINY_ARCH); each adds its own
    block types."""
    return {
        "sample_size": arch["size"] // 2 ** (len(arch["channels"]) - 1),
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": tuple(arch["channels"]),
        "layers_per_block": 1,
        "norm_num_groups": arch["groups"],
        "cross_attention_dim": arch["text_hidden"],
        "attention_head_dim": 8,
    }


def tiny_scheduler() -> DDIMScheduler:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
