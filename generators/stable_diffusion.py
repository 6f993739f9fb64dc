"""Stable Diffusion as the image generator: a text prompt or CLIP-sized prompt embeddings in, one image out.

An existing image is varied through img2img with the same weights (no second copy). Zeroscope shares this file's
CLIP conditioning and VAE input, since its architecture is SD's text encoder and VAE around a 3-D UNet.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from anyverse.config import GeneratorConfig, TinySpec
from anyverse.plugins import GeneratedMedia, Progress, tiny_arch
from anyverse.types import Media, MediaRequest, Modality

from .base import DECODE_CAPS, DiffusersGenerator, DiffusionOptions


class StableDiffusionOptions(DiffusionOptions):
    strength: float = Field(default=0.6, gt=0.0, le=1.0, description="img2img: how far to move from the source")


class StableDiffusionGenerator(DiffusersGenerator):
    """Stable Diffusion: images from a prompt, or a source image varied through img2img."""

    name: ClassVar[str] = "stable-diffusion"
    modality: ClassVar[Modality] = Modality.IMAGE
    capabilities: ClassVar[frozenset[str]] = frozenset({"generate", "edit"})
    Options: ClassVar[type[StableDiffusionOptions]] = StableDiffusionOptions
    accepts_source: ClassVar[frozenset[Modality]] = frozenset({Modality.IMAGE})
    pipeline_class: ClassVar[str] = "StableDiffusionPipeline"
    usual_weights: ClassVar[str] = "stable-diffusion-v1-5/stable-diffusion-v1-5"

    def __init__(self, config: GeneratorConfig, device: torch.device, dtype: torch.dtype):
        super().__init__(config, device, dtype)
        self._img2img: Any = None

    @classmethod
    def build_tiny(cls, directory: Path, spec: TinySpec) -> None:
        build_tiny(directory, spec)

    def conditioning_spec(self) -> dict[str, tuple[int, ...]]:
        return clip_conditioning_spec(self)

    def unload(self) -> None:
        self._img2img = None
        super().unload()

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return encode_clip_prompts(self, prompts)

    def denoising_loss(self, conditioning: dict[str, torch.Tensor], media: list[Media]) -> torch.Tensor:
        """Images resized to the configured generation size, encoded by the VAE, denoised as the pipeline does."""
        from anyverse.media import decode_image

        size = generation_size(self)
        pixels = torch.cat([vae_pixels(np.asarray(decode_image(m, DECODE_CAPS))[None], size) for m in media])
        return self.diffusion_loss(self.vae_latents(pixels), encoder_hidden_states=conditioning["prompt_embeds"])

    def generate_one(self, request: MediaRequest, options: StableDiffusionOptions, source: GeneratedMedia | None,
                     progress: Progress | None, cancel: threading.Event | None) -> GeneratedMedia:
        if source is None:
            kwargs = self.call_kwargs(request, options, progress, cancel, height=options.height, width=options.width)
            images = self.pipeline()(**kwargs).images
        else:
            image = resized(source.data, options.height, options.width)
            pipe = self._img2img_pipeline()
            kwargs = self.call_kwargs(request, options, progress, cancel, pipe, image=image, strength=options.strength)
            images = pipe(**kwargs).images
        return GeneratedMedia(Modality.IMAGE, np.asarray(images[0], dtype=np.float32))

    def _img2img_pipeline(self) -> Any:
        """img2img over the loaded pipeline's own modules, built once per load."""
        if self._img2img is None:
            from diffusers import StableDiffusionImg2ImgPipeline

            pipe = self.pipeline()
            self._img2img = StableDiffusionImg2ImgPipeline(
                **pipe.components, requires_safety_checker=pipe.config.requires_safety_checker
            )
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img


def resized(images: np.ndarray, height: int | None, width: int | None) -> torch.Tensor:
    """Images [H,W,3] or [N,H,W,3] in [0,1] (uint8: 0-255) as a [N,3,h,w] tensor in [0,1] at the requested size
    (their own size where unset)."""
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    array = np.ascontiguousarray(images, dtype=np.float32).reshape(-1, *images.shape[-3:]) / scale
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    size = (height or tensor.shape[2], width or tensor.shape[3])
    if size != tuple(tensor.shape[2:]):
        tensor = torch.nn.functional.interpolate(tensor, size=size, mode="bicubic", antialias=True, align_corners=False)
    return tensor.clamp(0.0, 1.0)


# ---------------------------------------------------------------- shared with zeroscope and instruct-pix2pix


def generation_size(generator: DiffusersGenerator) -> tuple[int, int]:
    """(height, width) the pipeline generates at: the configured options, else its UNet's sample size in pixels."""
    pipe = generator.pipeline()
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return generator.defaults.height or default, generator.defaults.width or default


def vae_pixels(images: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Images [N,H,W,3] (float in [0,1] or uint8) as VAE input: [N,3,h,w] in [-1,1] at ``size``."""
    return resized(images, *size) * 2.0 - 1.0


def clip_conditioning_spec(generator: DiffusersGenerator) -> dict[str, tuple[int, ...]]:
    """CLIP text-encoder hidden states, padded to the tokenizer's length, as the pipeline's encode_prompt makes them."""
    length = generator.config_int(
        ("tokenizer/tokenizer_config.json", "model_max_length"), ("text_encoder/config.json", "max_position_embeddings")
    )
    width = generator.config_int(("text_encoder/config.json", "hidden_size"))
    return {"prompt_embeds": (length, width)}


def encode_clip_prompts(generator: DiffusersGenerator, prompts: list[str]) -> dict[str, torch.Tensor]:
    pipe = generator.pipeline()
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompts, generator.execution_device, 1, False)
    return {"prompt_embeds": embeds}


# ---------------------------------------------------------------- tiny


TINY_ARCH: dict[str, Any] = {
    "size": 32,  # pixels
    "channels": [32, 64],  # UNet and VAE widths; the VAE downsamples by 2 ** (levels - 1)
    "groups": 32,
    "text_hidden": 32,
    "text_layers": 2,
    "text_heads": 4,
    "max_length": 16,  # tokens; the real CLIP has 77
}


def build_tiny(directory: Path, spec: TinySpec) -> None:
    """A real StableDiffusionPipeline with tiny random weights, saved as safetensors."""
    from diffusers import StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline(**tiny_components(StableDiffusionGenerator.name, spec))
    pipe.save_pretrained(directory, safe_serialization=True)


def tiny_components(plugin: str, spec: TinySpec, unet_in_channels: int = 4) -> dict[str, Any]:
    """Tiny random SD parts (``TINY_ARCH`` with ``tiny.arch`` over it), as pipeline keyword arguments; SD-based
    pipelines with another UNet input (InstructPix2Pix: 8 channels) share them."""
    from diffusers import UNet2DConditionModel

    from .tiny import clip_text_encoder, clip_tokenizer, tiny_scheduler, tiny_unet_kwargs, tiny_vae

    arch = tiny_arch(plugin, TINY_ARCH, spec)
    levels = len(arch["channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        tokenizer = clip_tokenizer(arch["max_length"])
        text_encoder = clip_text_encoder(tokenizer, arch["text_hidden"], arch["text_layers"], arch["text_heads"])
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            **{**tiny_unet_kwargs(arch), "in_channels": unet_in_channels},
        )
        vae = tiny_vae(arch["channels"], arch["groups"], arch["size"])
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet,
            "scheduler": tiny_scheduler(), "safety_checker": None, "feature_extractor": None,
            "requires_safety_checker": False}
