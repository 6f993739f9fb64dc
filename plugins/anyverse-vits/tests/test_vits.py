"""The VITS plugin through anyverse's public API on the tiny profile (meta mode): generate alone, and a full turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf

from anyverse.session import Anyverse

TINY_VITS = ["generators.vits.tiny={seed: 0}"]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Anyverse:
    return Anyverse.from_profile("tiny", TINY_VITS, output_dir=tmp_path_factory.mktemp("out"))


def test_reads_a_prompt_aloud_into_a_wav(session: Anyverse) -> None:
    made = session.generate("hello there", generator="vits", options={"seed": 1})
    audio, rate = sf.read(made.media.path)
    assert made.media.format == "wav" and rate == 16000 and len(audio) > 0 and audio.std() > 0
    assert made.request.generator == "vits" and made.request.modality.value == "audio"


def test_seed_and_speaking_rate_reach_the_model(session: Anyverse) -> None:
    def speak(**options: float) -> Path:
        return session.generate("read this caption aloud", generator="vits", options=options).media.path

    first, again, other_seed = speak(seed=1), speak(seed=1), speak(seed=2)
    slow, fast = speak(seed=1, speaking_rate=0.5), speak(seed=1, speaking_rate=4.0)
    assert first.read_bytes() == again.read_bytes() and first != other_seed
    assert len(sf.read(slow)[0]) > len(sf.read(fast)[0])


def test_a_bad_option_names_the_plugin_and_field(session: Anyverse) -> None:
    with pytest.raises(ValueError, match=r"'vits'.*speaking_rate"):
        session.generate("hi", generator="vits", options={"speaking_rate": 0})


def test_a_turn_in_meta_mode_routes_speech_to_vits(session: Anyverse) -> None:
    for seed in range(4):  # the tiny LLM's random request may not fit its token budget; another seed does
        result = session.turn("read this caption aloud: a red circle", generator="vits", seed=seed)
        speech = [m for m in result.media if m.request.generator == "vits"]
        if speech:
            break
    assert speech, result.notices
    assert speech[0].media.modality.value == "audio" and sf.read(speech[0].media.path)[1] == 16000
    assert speech[0].request.origin == "meta" and speech[0].request.prompt
