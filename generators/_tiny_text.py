"""Real tokenizer classes with tiny in-memory vocabularies, for the tiny profile's text encoders.

No vocabulary files, sentencepiece or network: byte-level BPE tokenizers get the 256 byte characters and no merges,
the T5 (Unigram) tokenizer gets printable ASCII. They save and reload like the real ones.
"""

from __future__ import annotations

import string

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, RobertaTokenizer, T5Tokenizer


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
