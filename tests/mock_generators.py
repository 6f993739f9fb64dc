"""Generator plugins defined in the tests (registered on import), as a third party would write them on
``BaseGenerator``: they cost nothing, and none implements the optional ``denoising_loss``."""

from __future__ import annotations

import threading
from typing import ClassVar

import numpy as np
from pydantic import Field

from anyverse.plugins import BaseGenerator, GeneratedMedia, Options, Progress, register_generator
from anyverse.types import MediaRequest, Modality


class MockOptions(Options):
    level: float = Field(default=0.5, ge=0.0, le=1.0)


@register_generator
class MockImage(BaseGenerator):
    """A generator that costs nothing but says it holds 400 MiB when loaded."""

    name: ClassVar[str] = "mock-image"
    modality: ClassVar[Modality] = Modality.IMAGE
    Options: ClassVar[type[MockOptions]] = MockOptions
    loads: ClassVar[int] = 0
    _loaded = False

    @property
    def loaded(self) -> bool:
        return self._loaded

    def conditioning_spec(self) -> dict[str, tuple[int, int]]:
        return {"prompt_embeds": (3, 4)}

    def load(self) -> None:
        type(self).loads += 1
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    def memory_bytes(self) -> int:
        return 400 * 1024**2

    def encode_prompts(self, prompts: list[str]):  # type: ignore[no-untyped-def]
        import torch

        return {"prompt_embeds": torch.zeros(len(prompts), 3, 4)}

    def generate_one(self, request: MediaRequest, options: MockOptions, source: GeneratedMedia | None,
                     progress: Progress | None, cancel: threading.Event | None) -> GeneratedMedia:
        if progress is not None:
            progress(1, 1)
        return GeneratedMedia(self.modality, np.full((2, 2, 3), options.level, np.float32))


@register_generator
class MockVideo(MockImage):
    name: ClassVar[str] = "mock-video"
    modality: ClassVar[Modality] = Modality.VIDEO


@register_generator
class MockAudio(MockImage):
    name: ClassVar[str] = "mock-audio"
    modality: ClassVar[Modality] = Modality.AUDIO
