"""The toy world's generators draw what a request names: caption in, the toy world's image, sound or clip out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anyverse.config import load_config
from anyverse.media import decode_image
from anyverse.plugins import GeneratedMedia, get_generator_class
from anyverse.session import Anyverse
from anyverse.train import toyworld
from anyverse.types import GenerationOptions, MediaProduced, MediaRequest, Modality

TOY = [f"generators.{m}.plugin=toyworld-{m}" for m in ("image", "video", "audio")]


def generator(modality: Modality):
    config = load_config("tiny", TOY).generators[modality]
    return get_generator_class(config.plugin)(config, torch.device("cpu"), torch.float32)


def make(draw, request: MediaRequest, source: GeneratedMedia | None = None) -> GeneratedMedia:  # type: ignore[no-untyped-def]
    """One item through the batched generator protocol."""
    return draw.generate([request], [source])[0]


def request(modality: Modality, prompt: str | None, seed: int = 0, **fields) -> MediaRequest:
    return MediaRequest(modality=modality, prompt=prompt, options=GenerationOptions(seed=seed), **fields)


@pytest.mark.parametrize("prompt", ["a green triangle at the bottom left", "draw a blue square at the top right",
                                    "a yellow circle at the top left"])
def test_an_image_shows_the_caption_it_was_asked_for(prompt: str) -> None:
    image = make(generator(Modality.IMAGE), request(Modality.IMAGE, prompt))
    assert image.data.shape == (toyworld.SIDE, toyworld.SIDE, 3)
    assert toyworld.read_image(image.data) == toyworld.read_caption(Modality.IMAGE, prompt)


def peak_hz(wave: np.ndarray) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(wave))) * toyworld.SAMPLE_RATE / len(wave))


def test_a_sound_has_the_length_pitch_and_kind_it_was_asked_for() -> None:
    audio = generator(Modality.AUDIO)
    chirp = make(audio, request(Modality.AUDIO, "a long high chirp")).data
    tone = make(audio, request(Modality.AUDIO, "a short low tone")).data
    assert 1.3 < len(chirp) / toyworld.SAMPLE_RATE < 1.7 and 0.4 < len(tone) / toyworld.SAMPLE_RATE < 0.6
    quarter = len(chirp) // 4
    assert peak_hz(chirp[-quarter:]) > 1.3 * peak_hz(chirp[:quarter]) and peak_hz(chirp[:quarter]) > 1200  # rises
    assert abs(peak_hz(tone) - 300) < 40


def test_a_clip_moves_the_shape_the_way_it_was_asked() -> None:
    frames = make(generator(Modality.VIDEO), request(Modality.VIDEO, "a red square moving right")).data
    assert frames.shape[0] == toyworld.FRAMES
    first, last = toyworld.read_image(frames[0]), toyworld.read_image(frames[-1])
    assert first["colour"] == last["colour"] == "red" and first["shape"] == "square"
    assert first["position"].endswith("left") and last["position"].endswith("right")


def test_an_edit_keeps_what_the_prompt_does_not_change() -> None:
    draw = generator(Modality.IMAGE)
    original = make(draw, request(Modality.IMAGE, "a red circle at the bottom right"))
    edited = make(draw, request(Modality.IMAGE, "make it blue", seed=5), original)
    assert toyworld.read_image(edited.data) == {"shape": "circle", "colour": "blue", "position": "bottom right"}


def test_signal_conditioning_draws_the_nearest_caption() -> None:
    draw = generator(Modality.IMAGE)
    wanted = "a green triangle at the top right"
    conditioning = draw.encode_prompts([wanted])
    noisy = {k: v + 0.2 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
             for k, v in conditioning.items()}
    image = make(draw, request(Modality.IMAGE, None, conditioning=noisy))
    assert toyworld.read_image(image.data) == toyworld.read_caption(Modality.IMAGE, wanted)


def test_a_prompt_naming_nothing_still_gets_a_toy_item_from_its_seed() -> None:
    draw = generator(Modality.IMAGE)
    first, again = (make(draw, request(Modality.IMAGE, "something else", seed=3)) for _ in range(2))
    assert np.array_equal(first.data, again.data) and toyworld.read_image(first.data)
    with pytest.raises(ValueError, match="cannot edit audio"):
        make(draw, request(Modality.IMAGE, "x"), GeneratedMedia(Modality.AUDIO, np.zeros(4)))


def test_the_toyworld_profile_uses_the_toy_generators() -> None:
    config = load_config("toyworld")
    assert {m: g.plugin for m, g in config.generators.items()} == {
        Modality.IMAGE: "toyworld-image", Modality.VIDEO: "toyworld-video", Modality.AUDIO: "toyworld-audio"}


def test_a_turn_saves_the_toy_image_its_request_names(tmp_path: Path) -> None:
    session = Anyverse.from_profile("tiny", TOY, output_dir=tmp_path)
    result = session.turn("draw a blue square", require=Modality.IMAGE, seed=0)
    produced = [m for m in result.media if isinstance(m, MediaProduced)]
    assert len(produced) == 1
    named = toyworld.read_caption(Modality.IMAGE, produced[0].request.prompt or "")
    pixels = np.asarray(decode_image(produced[0].media, session.config.caps), dtype=np.float32) / 255.0
    assert named.items() <= toyworld.read_image(pixels).items()
