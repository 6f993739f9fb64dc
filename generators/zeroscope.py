"""Zeroscope (ModelScope text-to-video architecture) as the video generator: a prompt or CLIP-sized prompt
embeddings in, frames out. Its CLIP conditioning and VAE input come from the Stable Diffusion plugin, whose
architecture it extends with a 3-D UNet."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from anyverse.config import TinySpec
from anyverse.plugins import GeneratedMedia, Progress, tiny_arch
from anyverse.types import GenerationOptions, Media, MediaRequest, Modality

from . import stable_diffusion as sd
from .base import DECODE_CAPS, DiffusersGenerator, DiffusionOptions


class ZeroscopeOptions(DiffusionOptions):
    fps: int = Field(default=8, ge=1, le=120, description="playback rate; with `seconds`, also sets the frame count")


class ZeroscopeGenerator(DiffusersGenerator):
    """Zeroscope (ModelScope text-to-video): short videos from a prompt."""

    name: ClassVar[str] = "zeroscope"
    modality: ClassVar[Modality] = Modality.VIDEO
    capabilities: ClassVar[frozenset[str]] = frozenset({"generate"})
    Options: ClassVar[type[ZeroscopeOptions]] = ZeroscopeOptions
    pipeline_class: ClassVar[str] = "TextToVideoSDPipeline"
    usual_weights: ClassVar[str] = "cerspense/zeroscope_v2_576w"

    @classmethod
    def build_tiny(cls, directory: Path, spec: TinySpec) -> None:
        build_tiny(directory, spec)

    def conditioning_spec(self) -> dict[str, tuple[int, ...]]:
        return sd.clip_conditioning_spec(self)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return sd.encode_clip_prompts(self, prompts)

    def denoising_loss(self, conditioning: dict[str, torch.Tensor], media: list[Media]) -> torch.Tensor:
        """The configured frame count at the configured fps from each video's start, resized to the generation size
        and VAE-encoded frame by frame (as the pipeline decodes), then denoised as latents [B, C, F, h, w]."""
        from anyverse.media import decode_video_clips

        fps = self.defaults.fps
        frames = _frame_count([self.defaults], fps)
        if frames is None:
            frames = inspect.signature(self.pipeline().__call__).parameters["num_frames"].default
        size = sd.generation_size(self)
        clips = [decode_video_clips(m, DECODE_CAPS, 1, frames, frames / fps, max(size))[0] for m in media]
        latents = torch.stack([self.vae_latents(sd.vae_pixels(clip, size)) for clip in clips]).transpose(1, 2)
        return self.diffusion_loss(latents, encoder_hidden_states=conditioning["prompt_embeds"])

    def generate_one(self, request: MediaRequest, options: ZeroscopeOptions, source: GeneratedMedia | None,
                     progress: Progress | None, cancel: threading.Event | None) -> GeneratedMedia:
        frames = _frame_count([self.capped(request.options), self.defaults], options.fps)
        kwargs = self.call_kwargs(request, options, progress, cancel, height=options.height, width=options.width,
                                  num_frames=frames)
        video = self.pipeline()(**kwargs).frames[0]  # batch-indexed since diffusers 0.26
        return GeneratedMedia(Modality.VIDEO, np.asarray(video, dtype=np.float32), fps=options.fps)


def _frame_count(sources: list[GenerationOptions], fps: int) -> int | None:
    """The first of ``sources`` that sets a length (the request before the config); within each, ``frames``
    before ``seconds`` at ``fps``. None: the pipeline's default."""
    for source in sources:
        if source.frames is not None:
            return source.frames
        if source.seconds is not None:
            return max(1, round(source.seconds * fps))
    return None


def build_tiny(directory: Path, spec: TinySpec) -> None:
    """A real TextToVideoSDPipeline with tiny random weights, saved as safetensors."""
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    from .tiny import clip_text_encoder, clip_tokenizer, tiny_scheduler, tiny_unet_kwargs, tiny_vae

    arch = tiny_arch(ZeroscopeGenerator.name, sd.TINY_ARCH, spec)
    levels = len(arch["channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        tokenizer = clip_tokenizer(arch["max_length"])
        text_encoder = clip_text_encoder(tokenizer, arch["text_hidden"], arch["text_layers"], arch["text_heads"])
        unet = UNet3DConditionModel(
            down_block_types=("CrossAttnDownBlock3D",) * (levels - 1) + ("DownBlock3D",),
            up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (levels - 1),
            **tiny_unet_kwargs(arch),
        )
        pipe: Any = TextToVideoSDPipeline(
            vae=tiny_vae(arch["channels"], arch["groups"], arch["size"]), text_encoder=text_encoder,
            tokenizer=tokenizer, unet=unet, scheduler=tiny_scheduler(),
        )
    pipe.save_pretrained(directory, safe_serialization=True)
