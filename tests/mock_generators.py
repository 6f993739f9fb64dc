"""Generator plugins defined in the tests (registered on import), as a third party would write them: they cost
nothing, and none implements the optional ``denoising_loss``."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from pydantic import Field

from anyverse.config import GeneratorConfig
from anyverse.plugins import GeneratedMedia, register_generator, validate_options
from anyverse.types import GenerationOptions, MediaRequest, Modality


class MockOptions(GenerationOptions):
    level: float = Field(default=0.5, ge=0.0, le=1.0)


@register_generator
class MockImage:
    """A generator that costs nothing but says it holds 400 MiB when loaded."""

    name: ClassVar[str] = "mock-image"
    modality: ClassVar[Modality] = Modality.IMAGE
    Options: ClassVar[type[GenerationOptions]] = MockOptions
    accepts_source: ClassVar[frozenset[Modality]] = frozenset()
    loads: ClassVar[int] = 0

    def __init__(self, config: GeneratorConfig, device: torch.device, dtype: torch.dtype):
        self.defaults = validate_options(MockOptions, config.options, self.name)
        self._loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def check_weights(self) -> None:
        pass

    def conditioning_spec(self) -> dict[str, tuple[int, int]]:
        return {"prompt_embeds": (3, 4)}

    def load(self) -> None:
        type(self).loads += 1
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    def memory_bytes(self) -> int:
        return 400 * 1024**2

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": torch.zeros(len(prompts), 3, 4)}

    def generate(self, request: MediaRequest, source: GeneratedMedia | None = None) -> GeneratedMedia:
        level = request.options.model_dump(exclude_none=True).get("level", self.defaults.level)
        return GeneratedMedia(self.modality, np.full((2, 2, 3), level, np.float32))


@register_generator
class MockVideo(MockImage):
    name: ClassVar[str] = "mock-video"
    modality: ClassVar[Modality] = Modality.VIDEO


@register_generator
class MockAudio(MockImage):
    name: ClassVar[str] = "mock-audio"
    modality: ClassVar[Modality] = Modality.AUDIO
