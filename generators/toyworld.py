"""The toy world's own renderers as generators: a toy caption in, the toy world's image, sound or clip out.

So the toyworld profile's replies are meaningful media the model can caption back. A prompt is read for the
attributes it names (the rest come from the source image when editing one, else from the seed); signal-mode
conditioning picks the toy caption whose conditioning (a multi-hot of its attribute words) is nearest.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, ClassVar

import numpy as np
import torch

from anyverse.config import GeneratorConfig
from anyverse.plugins import BaseGenerator, GeneratedMedia, Progress, check_conditioning
from anyverse.train import toyworld
from anyverse.types import MediaRequest, Modality

CONDITIONING = "attributes"


class ToyWorldGenerator(BaseGenerator):
    """Renders toy-world items; no weights, nothing to load."""

    name: ClassVar[str] = "toyworld-image"
    modality: ClassVar[Modality] = Modality.IMAGE
    capabilities: ClassVar[frozenset[str]] = frozenset({"generate", "edit"})
    accepts_source: ClassVar[frozenset[Modality]] = frozenset({Modality.IMAGE})

    def __init__(self, config: GeneratorConfig, device: torch.device, dtype: torch.dtype):
        super().__init__(config, device, dtype)
        self.vocabulary = toyworld.VOCABULARY[self.modality]
        self.words = [(key, value) for key, values in self.vocabulary.items() for value in values]
        self.captions = [dict(zip(self.vocabulary, combo, strict=True))
                         for combo in itertools.product(*self.vocabulary.values())]
        self._targets = self._encode(self.captions)

    @property
    def loaded(self) -> bool:
        return True

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def conditioning_spec(self) -> dict[str, tuple[int, ...]]:
        return {CONDITIONING: (1, len(self.words))}

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {CONDITIONING: self._encode([toyworld.read_caption(self.modality, p) for p in prompts])}

    def _encode(self, attributes: list[dict[str, str]]) -> torch.Tensor:
        """[B, 1, words]: 1 where the caption names that attribute value."""
        return torch.tensor([[[float(a.get(k) == v) for k, v in self.words]] for a in attributes])

    def generate_one(self, request: MediaRequest, options: Any, source: GeneratedMedia | None,
                     progress: Progress | None, cancel: threading.Event | None) -> GeneratedMedia:
        rng = np.random.default_rng(options.seed)
        attributes = {**(toyworld.read_image(source.data) if source is not None else {}), **self._named(request)}
        for key, values in self.vocabulary.items():  # what the request leaves open
            attributes.setdefault(key, str(rng.choice(values)))
        data = toyworld.render(self.modality, attributes, rng)
        if self.modality == Modality.AUDIO:
            return GeneratedMedia(self.modality, data, sample_rate=toyworld.SAMPLE_RATE)
        fps = toyworld.FPS if self.modality == Modality.VIDEO else None
        return GeneratedMedia(self.modality, data.astype(np.float32) / 255.0, fps=fps)

    def _named(self, request: MediaRequest) -> dict[str, str]:
        """The attributes the prompt names, or the nearest toy caption to signal-mode conditioning."""
        if request.conditioning is not None:
            projected = check_conditioning(request.conditioning, self.conditioning_spec(), self.name)[CONDITIONING]
            distances = ((self._targets - projected.detach().float().cpu()) ** 2).sum((1, 2))
            return self.captions[int(distances.argmin())]
        return toyworld.read_caption(self.modality, request.prompt or "")


class ToyWorldAudio(ToyWorldGenerator):
    name: ClassVar[str] = "toyworld-audio"
    modality: ClassVar[Modality] = Modality.AUDIO
    capabilities: ClassVar[frozenset[str]] = frozenset({"generate"})
    accepts_source: ClassVar[frozenset[Modality]] = frozenset()


class ToyWorldVideo(ToyWorldGenerator):
    name: ClassVar[str] = "toyworld-video"
    modality: ClassVar[Modality] = Modality.VIDEO
    capabilities: ClassVar[frozenset[str]] = frozenset({"generate"})
    accepts_source: ClassVar[frozenset[Modality]] = frozenset()
