"""LoRA adapters go through peft's own save/load format; a wrong adapter path is a clear missing-weights error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from anyverse.config import load_config
from anyverse.devices import resolve_device, resolve_dtype
from anyverse.llm import attach_lora, load_llm
from anyverse.session import Anyverse
from anyverse.signals import SignalVocabulary
from anyverse.weights import MissingWeightsError


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_trained_adapter_round_trips_through_the_config(tmp_path: Path) -> None:
    config = load_config("tiny")
    llm = load_llm(config.llm, SignalVocabulary(config.output.signal_tokens), torch.device("cpu"), torch.float32)
    ids = llm.tokenizer("hello [IMG0]", add_special_tokens=False).input_ids
    base = logits(llm.model, ids)
    tuned = attach_lora(llm, config.llm.lora)
    for name, param in tuned.model.named_parameters():
        if "lora_B" in name or "trainable_tokens" in name:
            torch.nn.init.normal_(param, std=0.5)  # stands in for training
    expected = logits(tuned.model, ids)
    assert not torch.allclose(base, expected)
    tuned.model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    session = Anyverse.from_profile("tiny", [f"llm.adapter={tmp_path / 'adapter'}"], output_dir=tmp_path / "out")
    assert not isinstance(session.model.llm.model, PeftModel)  # folded into the weights for inference
    torch.testing.assert_close(logits(session.model.llm.model, ids), expected, rtol=1e-4, atol=1e-4)


def test_missing_adapter_is_named(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match=r"llm\.adapter"):
        _ = Anyverse.from_profile("tiny", [f"llm.adapter={tmp_path / 'nope'}"], output_dir=tmp_path).model


def test_dtype_defaults_per_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_an_absent_accelerator_is_an_error() -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
