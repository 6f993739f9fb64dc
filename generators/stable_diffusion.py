"""Stable Diffusion as the image generator: a text prompt or CLIP-sized prompt embeddings in, one image out.

An existing image is varied through img2img with the same weights (no second copy). Zeroscope shares this file's
CLIP conditioning, VAE input and tiny VAE, since its architecture is SD's text encoder and VAE around a 3-D UNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from anyverse.config import Caps, GeneratorConfig, TinySpec
from anyverse.plugins import (
    DiffusersGenerator,
    DiffusersRuntime,
    DiffusionOptions,
    GeneratedMedia,
    check_source,
    tiny_arch,
)
from anyverse.types import GenerationOptions, Media, MediaRequest, Modality

if TYPE_CHECKING:  # diffusers and transformers load on first use, so discovering plugins stays fast
    from diffusers import AutoencoderKL, DDIMScheduler


class StableDiffusionOptions(DiffusionOptions):
    strength: float = Field(default=0.6, gt=0.0, le=1.0, description="img2img: how far to move from the source")


class StableDiffusionGenerator(DiffusersGenerator[StableDiffusionOptions]):
    name: ClassVar[str] = "stable-diffusion"
    modality: ClassVar[Modality] = Modality.IMAGE
    Options: ClassVar[type[GenerationOptions]] = StableDiffusionOptions
    accepts_source: ClassVar[frozenset[Modality]] = frozenset({Modality.IMAGE})

    def __init__(self, config: GeneratorConfig, device: torch.device, dtype: torch.dtype):
        self._runtime = DiffusersRuntime(
            type(self), config, device, dtype, options=StableDiffusionOptions, pipeline_class="StableDiffusionPipeline",
            build_tiny=build_tiny, usual_weights="stable-diffusion-v1-5/stable-diffusion-v1-5",
        )
        self._img2img: Any = None

    def conditioning_spec(self) -> dict[str, tuple[int, ...]]:
        return clip_conditioning_spec(self._runtime)

    def unload(self) -> None:
        self._img2img = None
        super().unload()

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return encode_clip_prompts(self._runtime, prompts)

    def denoising_loss(self, conditioning: dict[str, torch.Tensor], media: list[Media]) -> torch.Tensor:
        """Images resized to the configured generation size, encoded by the VAE, denoised as the pipeline does."""
        from anyverse.media import decode_image

        size = generation_size(self._runtime)
        pixels = torch.cat([vae_pixels(np.asarray(decode_image(m, DECODE_CAPS))[None], size) for m in media])
        latents = self._runtime.vae_latents(pixels)
        return self._runtime.denoising_loss(latents, encoder_hidden_states=conditioning["prompt_embeds"])

    def generate(self, request: MediaRequest, source: GeneratedMedia | None = None) -> GeneratedMedia:
        check_source(self, source)
        options = self._runtime.options(request)
        if source is None:
            kwargs = self._runtime.call_kwargs(self, request, options, height=options.height, width=options.width)
            images = self._runtime.pipeline()(**kwargs).images
        else:
            image = _resized(source.data, options.height, options.width)
            kwargs = self._runtime.call_kwargs(self, request, options, image=image, strength=options.strength)
            images = self._img2img_pipeline()(**kwargs).images
        return GeneratedMedia(Modality.IMAGE, np.asarray(images[0], dtype=np.float32))

    def _img2img_pipeline(self) -> Any:
        """img2img over the loaded pipeline's own modules, built once per load."""
        if self._img2img is None:
            from diffusers import StableDiffusionImg2ImgPipeline

            pipe = self._runtime.pipeline()
            self._img2img = StableDiffusionImg2ImgPipeline(
                **pipe.components, requires_safety_checker=pipe.config.requires_safety_checker
            )
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img


def _resized(images: np.ndarray, height: int | None, width: int | None) -> torch.Tensor:
    """Images [H,W,3] or [N,H,W,3] in [0,1] (uint8: 0-255) as a [N,3,h,w] tensor in [0,1] at the requested size
    (their own size where unset)."""
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    array = np.ascontiguousarray(images, dtype=np.float32).reshape(-1, *images.shape[-3:]) / scale
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    size = (height or tensor.shape[2], width or tensor.shape[3])
    if size != tuple(tensor.shape[2:]):
        tensor = torch.nn.functional.interpolate(tensor, size=size, mode="bicubic", antialias=True, align_corners=False)
    return tensor.clamp(0.0, 1.0)


# ---------------------------------------------------------------- shared with zeroscope

# Training media were checked against the run's caps when loaded; decoding them again only needs the defaults.
DECODE_CAPS = Caps()


def generation_size(runtime: DiffusersRuntime[Any]) -> tuple[int, int]:
    """(height, width) the pipeline generates at: the configured options, else its UNet's sample size in pixels."""
    pipe = runtime.pipeline()
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return runtime.defaults.height or default, runtime.defaults.width or default


def vae_pixels(images: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Images [N,H,W,3] (float in [0,1] or uint8) as VAE input: [N,3,h,w] in [-1,1] at ``size``."""
    return _resized(images, *size) * 2.0 - 1.0



def clip_conditioning_spec(runtime: DiffusersRuntime[Any]) -> dict[str, tuple[int, ...]]:
    """CLIP text-encoder hidden states, padded to the tokenizer's length, as the pipeline's encode_prompt makes them."""
    length = runtime.config_int(
        ("tokenizer/tokenizer_config.json", "model_max_length"), ("text_encoder/config.json", "max_position_embeddings")
    )
    width = runtime.config_int(("text_encoder/config.json", "hidden_size"))
    return {"prompt_embeds": (length, width)}


def encode_clip_prompts(runtime: DiffusersRuntime[Any], prompts: list[str]) -> dict[str, torch.Tensor]:
    pipe = runtime.pipeline()
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompts, runtime.execution_device, 1, False)
    return {"prompt_embeds": embeds}


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
    """The tiny UNet sizes SD's 2-D and Zeroscope's 3-D UNets share; each adds its own block types."""
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
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from ._tiny_text import clip_text_encoder, clip_tokenizer

    arch = tiny_arch(StableDiffusionGenerator.name, TINY_ARCH, spec)
    levels = len(arch["channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        tokenizer = clip_tokenizer(arch["max_length"])
        text_encoder = clip_text_encoder(tokenizer, arch["text_hidden"], arch["text_layers"], arch["text_heads"])
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            **tiny_unet_kwargs(arch),
        )
        pipe: Any = StableDiffusionPipeline(
            vae=tiny_vae(arch["channels"], arch["groups"], arch["size"]), text_encoder=text_encoder,
            tokenizer=tokenizer, unet=unet, scheduler=tiny_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(directory, safe_serialization=True)
