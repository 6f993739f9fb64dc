"""InstructPix2Pix as an anyverse image editor: a source image and an instruction in, the edited image out."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from anyverse.generators.base import DiffusersGenerator, DiffusionOptions
from anyverse.generators.stable_diffusion import resized, tiny_components
from pydantic import Field

from anyverse.config import TinySpec
from anyverse.plugins import GeneratedMedia, Progress
from anyverse.types import MediaRequest, Modality


class InstructPix2PixOptions(DiffusionOptions):
    image_guidance: float = Field(default=1.5, ge=1.0, le=20.0, description="how closely the edit keeps the source")


class InstructPix2PixGenerator(DiffusersGenerator):
    """InstructPix2Pix: edits a source image as the prompt says ("make it look like night")."""

    name: ClassVar[str] = "instruct-pix2pix"
    modality: ClassVar[Modality] = Modality.IMAGE
    capabilities: ClassVar[frozenset[str]] = frozenset({"edit"})
    Options: ClassVar[type[InstructPix2PixOptions]] = InstructPix2PixOptions
    accepts_source: ClassVar[frozenset[Modality]] = frozenset({Modality.IMAGE})
    pipeline_class: ClassVar[str] = "StableDiffusionInstructPix2PixPipeline"
    usual_weights: ClassVar[str] = "timbrooks/instruct-pix2pix"

    def generate_one(self, request: MediaRequest, options: InstructPix2PixOptions, source: GeneratedMedia | None,
                     progress: Progress | None, cancel: threading.Event | None) -> GeneratedMedia:
        if source is None:
            raise ValueError(f"{self.name} edits an image: the request needs a source (an image id)")
        image = resized(source.data, options.height, options.width)
        kwargs = self.call_kwargs(request, options, progress, cancel, image=image,
                                  image_guidance_scale=options.image_guidance)
        return GeneratedMedia(Modality.IMAGE, np.asarray(self.pipeline()(**kwargs).images[0], dtype=np.float32))

    @classmethod
    def build_tiny(cls, directory: Path, spec: TinySpec) -> None:
        """Stable Diffusion's tiny parts with an 8-channel UNet input (noise latents + source latents)."""
        from diffusers import StableDiffusionInstructPix2PixPipeline

        pipe: Any = StableDiffusionInstructPix2PixPipeline(**tiny_components(cls.name, spec, unet_in_channels=8))
        pipe.save_pretrained(directory, safe_serialization=True)
