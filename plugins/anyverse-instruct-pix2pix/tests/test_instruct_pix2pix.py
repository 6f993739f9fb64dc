"""The InstructPix2Pix plugin through anyverse's public API on the tiny profile (meta mode): editing a source image
alone, and a full turn that edits the attached image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anyverse.media import save_image
from anyverse.session import Anyverse

TINY_PIX2PIX = ["generators.instruct-pix2pix.tiny={seed: 0}", "generators.instruct-pix2pix.options={steps: 2}"]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Anyverse:
    return Anyverse.from_profile("tiny", TINY_PIX2PIX, output_dir=tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return save_image(np.random.default_rng(0).random((40, 48, 3)), tmp_path_factory.mktemp("in")).path


def test_edits_a_source_image(session: Anyverse, photo) -> None:  # type: ignore[no-untyped-def]
    made = session.generate("make it look like night", generator="instruct-pix2pix", source=photo,
                            options={"seed": 0, "width": 32, "height": 32})
    edited = np.asarray(Image.open(made.media.path))
    assert edited.shape == (32, 32, 3) and made.request.generator == "instruct-pix2pix"
    assert made.request.source and made.request.source.startswith("img_")


def test_the_source_and_image_guidance_change_the_edit(session: Anyverse, photo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    other = save_image(np.zeros((32, 32, 3)), tmp_path).path

    def edit(source, **options: float) -> bytes:  # type: ignore[no-untyped-def]
        return session.generate("night", generator="instruct-pix2pix", source=source,
                                options={"seed": 0, **options}).media.path.read_bytes()

    assert edit(photo) == edit(photo)
    assert edit(photo) != edit(other)
    assert edit(photo, image_guidance=1.0) != edit(photo, image_guidance=5.0)


def test_it_refuses_to_make_an_image_from_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fresh = Anyverse.from_profile("tiny", TINY_PIX2PIX, output_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a source"):
        fresh.generate("night", generator="instruct-pix2pix")


def test_a_turn_in_meta_mode_edits_the_attached_image(session: Anyverse, photo) -> None:  # type: ignore[no-untyped-def]
    for seed in range(4):  # the tiny LLM's random request may not fit its token budget; another seed does
        result = session.turn("make img_1 look like night", [photo], generator="instruct-pix2pix", seed=seed)
        edits = [m for m in result.media if m.request.generator == "instruct-pix2pix"]
        if edits:
            break
    assert edits, result.notices
    assert edits[0].request.source == session.history[-2].media[0].id and edits[0].request.origin == "meta"
    assert Image.open(edits[0].media.path).size == Image.open(photo).size  # the source's size unless options say
