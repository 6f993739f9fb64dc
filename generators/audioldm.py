"""AudioLDM (v1) as an audio generator: a text prompt, or one CLAP text vector, in; a waveform out.

NExT-GPT's audio output projector was trained against this model (``cvssp/audioldm-l-full``): its conditioning is a
single normalised CLAP text embedding ``prompt_embeds`` [B, projection_dim], which the UNet reads as a class
embedding, not a sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from anyverse.config import GeneratorConfig, TinySpec
from anyverse.plugins import (
    DiffusersGenerator,
    DiffusersRuntime,
    DiffusionOptions,
    GeneratedMedia,
    check_source,
    tiny_arch,
)
from anyverse.types import GenerationOptions, MediaRequest, Modality


class AudioLDMOptions(DiffusionOptions):
    pass


class AudioLDMGenerator(DiffusersGenerator[AudioLDMOptions]):
    name: ClassVar[str] = "audioldm"
    modality: ClassVar[Modality] = Modality.AUDIO
    Options: ClassVar[type[GenerationOptions]] = AudioLDMOptions

    def __init__(self, config: GeneratorConfig, device: torch.device, dtype: torch.dtype):
        self._runtime = DiffusersRuntime(
            type(self), config, device, dtype, options=AudioLDMOptions, pipeline_class="AudioLDMPipeline",
            build_tiny=build_tiny, usual_weights="cvssp/audioldm-l-full",
        )

    def conditioning_spec(self) -> dict[str, tuple[int, ...]]:
        """One CLAP text vector per prompt: [B, projection_dim] (512 in cvssp/audioldm-l-full)."""
        return {"prompt_embeds": (self._runtime.config_int(("text_encoder/config.json", "projection_dim")),)}

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline's own encoding: CLAP's projected text embedding, L2-normalised."""
        pipe = self._runtime.pipeline()
        with torch.no_grad():
            embeds = pipe._encode_prompt(prompts, self._runtime.execution_device, 1, False)
        return {"prompt_embeds": embeds}

    def generate(self, request: MediaRequest, source: GeneratedMedia | None = None) -> GeneratedMedia:
        check_source(self, source)
        options = self._runtime.options(request)
        kwargs = self._runtime.call_kwargs(self, request, options, audio_length_in_s=options.seconds)
        pipe = self._runtime.pipeline()
        audio = np.asarray(pipe(**kwargs).audios[0], dtype=np.float32)
        return GeneratedMedia(Modality.AUDIO, np.clip(audio, -1.0, 1.0), sample_rate=pipe.vocoder.config.sampling_rate)


TINY_ARCH: dict[str, Any] = {
    "channels": [32, 64],  # UNet widths
    "vae_channels": [16, 32],
    "groups": 8,
    "clap_hidden": 32,
    "clap_projection": 16,  # the conditioning width (512 in cvssp/audioldm-l-full)
    "clap_max_length": 16,
    "mel_bins": 8,
    "sampling_rate": 16000,
}


def build_tiny(directory: Path, spec: TinySpec) -> None:
    """A real AudioLDMPipeline with tiny random weights, saved as safetensors."""
    from diffusers import AudioLDMPipeline, DDIMScheduler, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

    from ._tiny_text import roberta_tokenizer
    from .stable_diffusion import tiny_vae

    arch = tiny_arch(AudioLDMGenerator.name, TINY_ARCH, spec)
    levels = len(arch["channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        tokenizer = roberta_tokenizer(arch["clap_max_length"])
        text_encoder = ClapTextModelWithProjection(ClapTextConfig(
            vocab_size=len(tokenizer), hidden_size=arch["clap_hidden"], num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=2 * arch["clap_hidden"], max_position_embeddings=arch["clap_max_length"] + 2,
            projection_dim=arch["clap_projection"],
        ))
        unet = UNet2DConditionModel(  # AudioLDM's: the CLAP vector is a class embedding, concatenated to time's
            in_channels=8,
            out_channels=8,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            block_out_channels=tuple(arch["channels"]),
            layers_per_block=1,
            norm_num_groups=arch["groups"],
            cross_attention_dim=tuple(arch["channels"]),
            class_embed_type="simple_projection",
            projection_class_embeddings_input_dim=arch["clap_projection"],
            class_embeddings_concat=True,
            attention_head_dim=8,
        )
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
            model_in_dim=arch["mel_bins"], sampling_rate=arch["sampling_rate"], upsample_initial_channel=16,
            upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]], normalize_before=False,
        ))
        pipe: Any = AudioLDMPipeline(
            vae=tiny_vae(arch["vae_channels"], arch["groups"], image_channels=1, latent_channels=8),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler(
                beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1,
            ),
            vocoder=vocoder,
        )
    pipe.save_pretrained(directory, safe_serialization=True)
