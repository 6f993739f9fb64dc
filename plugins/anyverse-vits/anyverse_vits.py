"""VITS text-to-speech as an anyverse generator: the prompt is read aloud into a waveform (no diffusion)."""

from __future__ import annotations

import json
import string
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from anyverse.config import GeneratorConfig, TinySpec
from anyverse.plugins import BaseGenerator, GeneratedMedia, Options, Progress, tiny_arch
from anyverse.types import MediaRequest, Modality
from anyverse.weights import component_dir

USUAL_WEIGHTS = "facebook/mms-tts-eng"


class VitsOptions(Options):
    speaking_rate: float = Field(default=1.0, gt=0.1, le=5.0, description="above 1 speaks faster")
    noise_scale: float = Field(default=0.667, ge=0.0, le=2.0, description="variation of the voice")


class VitsGenerator(BaseGenerator):
    """VITS text-to-speech: reads the prompt aloud (MMS-TTS)."""

    name: ClassVar[str] = "vits"
    modality: ClassVar[Modality] = Modality.AUDIO
    capabilities: ClassVar[frozenset[str]] = frozenset({"speech"})
    Options: ClassVar[type[VitsOptions]] = VitsOptions

    def __init__(self, config: GeneratorConfig, device: torch.device, dtype: torch.dtype):
        super().__init__(config, device, dtype)
        self.model: Any = None
        self.tokenizer: Any = None

    def directory(self) -> Path:
        how = f"Run `hf download {USUAL_WEIGHTS}` or set generators.<name>.path to a local copy."
        return component_dir(self.name, self.config, lambda d: build_tiny(d, self.config.tiny), how)

    def check_weights(self) -> None:
        if self.config.tiny is None:
            self.directory()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        from transformers import VitsModel, VitsTokenizer

        if self.model is None:
            directory = self.directory()
            self.tokenizer = VitsTokenizer.from_pretrained(directory)
            self.model = VitsModel.from_pretrained(directory, dtype=self.dtype).to(self.device).eval()

    def unload(self) -> None:
        self.model = self.tokenizer = None

    def memory_bytes(self) -> int:
        if self.model is None:
            return sum(f.stat().st_size for f in self.directory().glob("*.safetensors"))
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def generate_one(self, request: MediaRequest, options: VitsOptions, source: GeneratedMedia | None,
                     progress: Progress | None, cancel: threading.Event | None) -> GeneratedMedia:
        if not request.prompt:
            raise ValueError(f"{self.name} reads text aloud: the request needs a prompt")
        self.load()
        inputs = self.tokenizer(request.prompt, return_tensors="pt").to(self.device)
        if inputs.input_ids.shape[1] == 0:
            raise ValueError(f"{self.name}: nothing in the prompt can be spoken")
        self.model.speaking_rate, self.model.noise_scale = options.speaking_rate, options.noise_scale
        with torch.random.fork_rng(devices=[]), torch.inference_mode():  # the flows sample noise globally
            torch.manual_seed(options.seed if options.seed is not None else torch.seed())
            waveform = self.model(**inputs).waveform[0]
        if progress is not None:
            progress(1, 1)
        audio = np.clip(waveform.float().cpu().numpy(), -1.0, 1.0)
        return GeneratedMedia(Modality.AUDIO, audio, sample_rate=self.model.config.sampling_rate)


TINY_ARCH: dict[str, Any] = {"hidden": 16, "layers": 1, "sampling_rate": 16000}


def build_tiny(directory: Path, spec: TinySpec | None) -> None:
    """A real VitsModel and VitsTokenizer (characters, no phonemizer) with tiny random weights."""
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    assert spec is not None
    arch = tiny_arch(VitsGenerator.name, TINY_ARCH, spec)
    chars = ["<pad>", "<unk>", " ", *string.ascii_lowercase, *string.digits, *".,!?'-"]
    vocab = directory / "vocab.json"
    directory.mkdir(parents=True, exist_ok=True)
    vocab.write_text(json.dumps({c: i for i, c in enumerate(chars)}))
    hidden, layers = arch["hidden"], arch["layers"]
    config = VitsConfig(
        vocab_size=len(chars), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, ffn_dim=4 * hidden,
        flow_size=hidden, spectrogram_bins=17, upsample_initial_channel=hidden, upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        duration_predictor_filter_channels=hidden, prior_encoder_num_wavenet_layers=1,
        posterior_encoder_num_wavenet_layers=1, duration_predictor_num_flows=1, prior_encoder_num_flows=layers,
        depth_separable_num_layers=1, pad_token_id=0, sampling_rate=arch["sampling_rate"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = VitsModel(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    VitsTokenizer(str(vocab), phonemize=False).save_pretrained(directory)
