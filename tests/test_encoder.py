"""ImageBind encoder on the tiny profile: every modality, batching, weights on disk, embedding cache, fbank, convert."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from anyverse import media
from anyverse.config import Caps, EncoderConfig, load_config, tiny_dir
from anyverse.encoders import imagebind as ib
from anyverse.encoders import preprocess as pp
from anyverse.encoders.cache import EmbeddingCache
from anyverse.types import Media, Modality
from anyverse.weights import MissingWeightsError

CPU = torch.device("cpu")
CAPS = Caps()
# tokens per item for the tiny arch at 224 px: CLS + patches
NUM_TOKENS = {Modality.IMAGE: 257, Modality.VIDEO: 257, Modality.AUDIO: 229, Modality.DEPTH: 197, Modality.THERMAL: 197}


@pytest.fixture(scope="module")
def cfg() -> EncoderConfig:
    return load_config("tiny").encoder


@pytest.fixture(scope="module")
def encoder(cfg: EncoderConfig) -> ib.ImageBindEncoder:
    return ib.ImageBindEncoder.from_config(cfg, CPU, torch.float32)


def _make(modality: Modality, seed: int, out_dir: Path) -> Media:
    """A small synthetic media item; different seeds give different content."""
    rng = np.random.default_rng(seed)
    if modality is Modality.AUDIO:
        t = np.arange(8000) / 16000
        return media.save_audio((0.3 * np.sin(2 * np.pi * (200 + 300 * seed) * t)).astype(np.float32), 16000, out_dir)
    if modality is Modality.VIDEO:
        return media.save_video(rng.random((4, 32, 48, 3)).astype(np.float32), 8, out_dir)
    item = media.save_image(rng.random((24, 40, 3)).astype(np.float32), out_dir)
    if modality is Modality.IMAGE:
        return item
    return media.load_media(item.path, CAPS, modality=modality)


class _Items(dict):
    """Three synthetic items per modality, made on first use."""

    def __init__(self, out: Path):
        super().__init__()
        self.out = out

    def __missing__(self, modality: Modality) -> list[Media]:
        self[modality] = [_make(modality, seed, self.out / f"{modality.value}{seed}") for seed in range(3)]
        return self[modality]


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> _Items:
    return _Items(tmp_path_factory.mktemp("media"))


@pytest.mark.parametrize("modality", [Modality.IMAGE, Modality.AUDIO, Modality.VIDEO, Modality.DEPTH, Modality.THERMAL])
def test_every_media_modality_encodes(encoder: ib.ImageBindEncoder, items: _Items, modality: Modality) -> None:
    pair = items[modality][:2]
    out = encoder.encode(pair, CAPS)
    assert out.pooled.shape == (2, encoder.embed_dim)
    assert out.tokens.shape == (2, NUM_TOKENS[modality], encoder.token_dim(modality))
    frames, rows, cols = encoder.patch_grid(modality)  # what a grid projector folds the patch tokens back into
    assert 1 + frames * rows * cols == NUM_TOKENS[modality]
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.tokens).all()
    assert not torch.allclose(out.pooled[0], out.pooled[1])
    again = encoder.encode(pair, CAPS)
    assert torch.equal(again.pooled, out.pooled) and torch.equal(again.tokens, out.tokens)


def test_clips_that_are_all_the_same_run_once_and_give_what_all_of_them_give(encoder: ib.ImageBindEncoder) -> None:
    """A sound or video no longer than a clip is its clips over again: one forward gives their mean."""
    sound = torch.randn(2, 1, 1, pp.NUM_MEL_BINS, pp.AUDIO_FRAMES)
    seen: list[int] = []
    trunk = encoder.model.modality_trunks["audio"]
    handle = trunk.register_forward_hook(lambda _m, _args, out: seen.append(out.shape[0]))
    try:
        once = encoder.forward_tokens("audio", sound.expand(-1, 3, -1, -1, -1))
        mixed = torch.cat([sound, torch.randn(2, 1, 1, pp.NUM_MEL_BINS, pp.AUDIO_FRAMES), sound], dim=1)
        encoder.forward_tokens("audio", mixed)
    finally:
        handle.remove()
    assert seen == [2, 6]  # the same clips ran once per item; different ones all ran
    alone = encoder.forward_tokens("audio", sound)
    torch.testing.assert_close(once, alone)


def test_a_one_frame_patch_reads_an_image_once_on_the_first_frames_positions() -> None:
    arch = ib.ImageBindArch.tiny(kernel_size=(1, 28, 28))
    encoder = ib.ImageBindEncoder(arch.build().eval(), arch, "one-frame")
    assert encoder.patch_grid(Modality.IMAGE) == (1, 8, 8) and encoder.patch_grid(Modality.VIDEO) == (2, 8, 8)
    image = torch.randn(2, 3, pp.IMAGE_SIZE, pp.IMAGE_SIZE)
    vision = encoder.model.modality_preprocessors["vision"]
    tokens = vision(vision=image)["trunk"]["tokens"]
    still = vision(vision=image[:, :, None].expand(-1, -1, 2, -1, -1))["trunk"]["tokens"]  # a clip of it, unmoving
    assert tokens.shape[1] == 1 + 8 * 8 and still.shape[1] == 1 + 2 * 8 * 8
    torch.testing.assert_close(tokens, still[:, : tokens.shape[1]])  # its CLS and first frame
    assert encoder.forward_tokens("vision", image)[1].shape[1] == tokens.shape[1]
    two_deep = ib.ImageBindArch.tiny().build()  # ImageBind's 2-frame patch sees an image as a clip of it, as trained
    assert two_deep.modality_preprocessors["vision"].rgbt_stem.proj[0].ntimes == 2


def _shape(kind: str, colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """A toy-world-like picture: one shape on a dark ground, preprocessed."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (18, 18, 24))
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    if kind == "triangle":
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    return pp.image_tensor(image)


def test_a_flat_colour_view_shows_what_stands_out_in_its_colour_whatever_its_shape_and_place() -> None:
    red_triangle = pp.flat_colour(_shape("triangle", (220, 40, 40), (4, 4, 28, 28)))
    red_square = pp.flat_colour(_shape("square", (220, 40, 40), (36, 36, 60, 60)))
    green_triangle = pp.flat_colour(_shape("triangle", (40, 200, 60), (4, 4, 28, 28)))
    assert (red_triangle == red_triangle[:, :1, :1]).all()  # one colour over the whole frame
    torch.testing.assert_close(red_triangle, red_square, rtol=0, atol=0.05)
    assert (red_triangle - green_triangle).abs().amax() > 1
    clip = torch.stack([_shape("square", (220, 40, 40), (4, 4, 28, 28)),
                        _shape("square", (40, 200, 60), (36, 4, 60, 28))], dim=1)  # [3, frames, H, W]
    flat = pp.flat_colour(clip[None].expand(3, -1, -1, -1, -1))  # each frame its own colour
    torch.testing.assert_close(flat[:, :, 0], red_square.expand(3, -1, -1, -1), rtol=0, atol=0.05)
    assert (flat[:, :, 1] - flat[:, :, 0]).abs().amax() > 1


def test_an_encoder_with_a_flat_image_colour_view_encodes_it_beside_the_grey_one(cfg: EncoderConfig,
                                                                                 items: _Items) -> None:
    flat = ib.ImageBindEncoder.from_config(cfg.model_copy(update={"grey_view": True, "image_colour_view": "flat"}),
                                           CPU, torch.float32)
    out = flat.encode(items[Modality.IMAGE][:1], CAPS)
    inputs = flat.preprocess(items[Modality.IMAGE][0], CAPS)
    colour, grey = (flat.forward_tokens("vision", view(inputs)[None]) for view in (pp.flat_colour, pp.contrast_grey))
    torch.testing.assert_close(out.pooled[0], torch.cat([colour[0][0], grey[0][0]]), rtol=0, atol=1e-5)
    assert flat.views(Modality.IMAGE) == flat.views(Modality.VIDEO) == 2 and flat.views(Modality.AUDIO) == 1
    video = flat.preprocess(items[Modality.VIDEO][0], CAPS)
    as_is = flat.forward_tokens("vision", video[None])[0][0]
    torch.testing.assert_close(flat.encode(items[Modality.VIDEO][:1], CAPS).pooled[0, : len(as_is)], as_is, rtol=0,
                               atol=1e-5)  # a video's colour view is the video as it is
    with pytest.raises(ValueError, match="set grey_view: true"):
        cfg.model_validate({**cfg.model_dump(), "image_colour_view": "flat"})


def test_media_whose_clips_are_all_the_same_are_prepared_once_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 256, (1, 2, 224, 300, 3), dtype=np.uint8), pp.VIDEO_CLIPS, axis=0)
    sound = np.repeat(rng.standard_normal((1, 16000)).astype(np.float32), pp.AUDIO_CLIPS, axis=0)
    expected = pp._video_tensor(frames), pp._audio_tensor(sound, pp.NUM_MEL_BINS, pp.AUDIO_FRAMES)
    calls: list[int] = []
    for name in ("_video_tensor", "_audio_tensor"):
        original = getattr(pp, name)
        monkeypatch.setattr(pp, name, lambda clips, *a, f=original: calls.append(len(clips)) or f(clips, *a))
    assert torch.equal(pp.video_tensor(frames), expected[0]) and torch.equal(pp.audio_tensor(sound), expected[1])
    assert calls == [1, 1]
    frames[1] = 0  # clips that differ are each prepared
    assert torch.equal(pp.video_tensor(frames), pp._video_tensor(frames)) and calls[-1] == pp.VIDEO_CLIPS


def test_text_encodes(encoder: ib.ImageBindEncoder) -> None:
    out = encoder.encode_text(["a dog barking", "rain on a roof"])
    assert out.pooled.shape == (2, encoder.embed_dim)
    assert out.tokens.shape == (2, pp.TEXT_CONTEXT, encoder.token_dim(Modality.TEXT))
    assert torch.isfinite(out.tokens).all() and not torch.allclose(out.pooled[0], out.pooled[1])
    assert torch.equal(encoder.encode_text(["a dog barking", "rain on a roof"]).tokens, out.tokens)
    torch.testing.assert_close(encoder.encode_text(["rain on a roof"]).pooled[0], out.pooled[1])

def test_text_embeddings_run_only_up_to_the_longest_caption_and_equal_the_full_contexts(
        encoder: ib.ImageBindEncoder) -> None:
    texts = ["a dog", "rain on a tin roof at night"]
    full = encoder.encode_text(texts).pooled
    ids = pp.text_tokens(texts)
    lengths: list[int] = []
    trunk = encoder.model.modality_trunks["text"]
    handle = trunk.register_forward_hook(lambda _m, _args, out: lengths.append(out.shape[1]))
    try:
        trimmed = encoder.forward_text(ids)
    finally:
        handle.remove()
    assert lengths == [int(ids.argmax(dim=1).max()) + 1] and lengths[0] < pp.TEXT_CONTEXT
    torch.testing.assert_close(trimmed, full)


def test_rejects_text_mixed_and_empty(encoder: ib.ImageBindEncoder, items: _Items) -> None:
    text = items[Modality.IMAGE][0].model_copy(update={"modality": Modality.TEXT})
    for bad in ([], [text], [items[Modality.IMAGE][0], items[Modality.AUDIO][0]]):
        with pytest.raises(ValueError, match="one modality"):
            encoder.encode(bad, CAPS)


def test_batches_equal_one_by_one(cfg: EncoderConfig, encoder: ib.ImageBindEncoder, items: _Items) -> None:
    batched = ib.ImageBindEncoder.from_config(cfg.model_copy(update={"batch_size": 2}), CPU, torch.float32)
    three = items[Modality.IMAGE]
    together = batched.encode(three, CAPS)
    alone = [encoder.encode([item], CAPS) for item in three]
    torch.testing.assert_close(together.pooled, torch.cat([a.pooled for a in alone]), rtol=0, atol=1e-5)
    torch.testing.assert_close(together.tokens, torch.cat([a.tokens for a in alone]), rtol=0, atol=1e-5)


def test_tokens_train_a_projector(encoder: ib.ImageBindEncoder, items: _Items) -> None:
    """Outputs are ordinary tensors, not inference-mode ones, so a trainable layer can backprop through them."""
    out = encoder.encode(items[Modality.IMAGE][:1], CAPS)
    layer = torch.nn.Linear(encoder.token_dim(Modality.IMAGE), 4)
    layer(out.tokens).sum().backward()
    assert layer.weight.grad is not None
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training


def test_tiny_weights_saved_then_loaded_not_rebuilt(cfg: EncoderConfig, encoder: ib.ImageBindEncoder,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert cfg.tiny is not None
    directory = tiny_dir("encoder", cfg.tiny)
    assert (directory / ib.CONFIG_FILE).is_file() and (directory / ib.WEIGHTS_FILE).is_file()

    def no_rebuild(*args: object) -> None:
        raise AssertionError("tiny ImageBind rebuilt or re-hashed although it is saved")

    monkeypatch.setattr(ib, "build_tiny", no_rebuild)
    assert (directory / f"{ib.WEIGHTS_FILE}.sha256.json").is_file()  # weights digest memo: not hashed again
    monkeypatch.setattr(ib.hashlib, "file_digest", no_rebuild)
    again = ib.ImageBindEncoder.from_config(cfg, CPU, torch.float32)
    assert again.id == encoder.id
    assert torch.equal(again.encode_text(["x"]).pooled, encoder.encode_text(["x"]).pooled)


def test_cache_skips_decode_and_model(cfg: EncoderConfig, items: _Items, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    cached = ib.ImageBindEncoder.from_config(cfg, CPU, torch.float32, cache_dir=tmp_path)
    calls = []
    for trunk in cached.model.get_submodule("modality_trunks").children():
        trunk.register_forward_hook(lambda *_: calls.append(1))
    pair = items[Modality.AUDIO][:2]
    first = cached.encode(pair, CAPS)
    assert len(calls) == 1 and cached.cache is not None and cached.cache.misses == 2

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("cached media decoded again")

    monkeypatch.setattr(media, "decode_audio_clips", no_decode)
    second = cached.encode(list(reversed(pair)), CAPS)
    assert len(calls) == 1 and cached.cache.hits == 2
    assert torch.equal(second.pooled, first.pooled.flip(0)) and torch.equal(second.tokens, first.tokens.flip(0))
    assert EmbeddingCache(tmp_path, "another-encoder").get(pair[0].sha256) is None

    monkeypatch.undo()
    cached.cache.path(pair[0].sha256).write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        third = cached.encode(pair[:1], CAPS)
    assert "unreadable" in caplog.text and len(calls) == 2
    torch.testing.assert_close(third.pooled[0], first.pooled[0])  # batch of one: same up to float rounding
    assert cached.cache.get(pair[0].sha256) is not None  # overwritten with a good entry


def _mel(f: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)


def _reference_fbank(x: np.ndarray, sr: int = 16000, bins: int = 128) -> np.ndarray:
    """Kaldi fbank written out frame by frame in float64, the way the kaldi docs describe it."""
    win, hop, nfft = 400, 160, 512
    edges = _mel(20.0) + (_mel(sr / 2) - _mel(20.0)) / (bins + 1) * np.arange(bins + 2)
    fft_mel = _mel(np.arange(nfft // 2 + 1) * sr / nfft)
    banks = np.zeros((bins, nfft // 2 + 1))
    for b in range(bins):
        left, center, right = edges[b : b + 3]
        for k in range(nfft // 2):  # kaldi has no Nyquist column
            m = fft_mel[k]
            if left < m < right:
                banks[b, k] = (m - left) / (center - left) if m <= center else (right - m) / (right - center)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / (win - 1))
    rows = []
    for i in range(1 + (len(x) - win) // hop):
        frame = x[i * hop : i * hop + win].astype(np.float64)
        frame = frame - frame.mean()
        frame = np.concatenate([[frame[0] * (1 - 0.97)], frame[1:] - 0.97 * frame[:-1]])
        power = np.abs(np.fft.rfft(frame * window, nfft)) ** 2
        rows.append(np.log(np.maximum(banks @ power, np.finfo(np.float32).eps)))
    return np.array(rows)


def test_fbank_tone_peaks_in_its_mel_bin() -> None:
    t = np.arange(8000) / 16000
    fbank = pp.kaldi_fbank(torch.from_numpy(np.sin(2 * np.pi * 1000 * t).astype(np.float32)))
    assert fbank.shape == (1 + (8000 - 400) // 160, pp.NUM_MEL_BINS)
    centers = _mel(20.0) + (_mel(8000.0) - _mel(20.0)) / 129 * np.arange(1, 129)
    assert int(fbank.mean(0).argmax()) == int(np.abs(centers - _mel(1000.0)).argmin())


def test_fbank_matches_reference() -> None:
    x = np.random.default_rng(0).standard_normal(2400).astype(np.float32) * 0.1
    ours = pp.kaldi_fbank(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, _reference_fbank(x), atol=2e-3)


def test_audio_tensor_pads_and_normalises() -> None:
    clips = np.zeros((2, 16000), dtype=np.float32)
    out = pp.audio_tensor(clips)
    assert out.shape == (2, 1, pp.NUM_MEL_BINS, pp.AUDIO_FRAMES)
    silent = (np.log(np.finfo(np.float32).eps) - pp.AUDIO_MEAN) / pp.AUDIO_STD
    torch.testing.assert_close(out[0, 0, 0, 0].item(), float(silent))
    torch.testing.assert_close(out[0, 0, 0, -1].item(), -pp.AUDIO_MEAN / pp.AUDIO_STD)  # padded frames


def test_image_and_video_geometry() -> None:
    from PIL import Image

    flat = pp.image_tensor(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert flat.shape == (3, 224, 224)
    expected = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(pp.CLIP_MEAN)) / torch.tensor(pp.CLIP_STD)
    torch.testing.assert_close(flat.mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)
    ramp = np.broadcast_to(np.linspace(0, 255, 448).astype(np.uint8)[None, None, None, :, None], (1, 2, 224, 448, 3))
    video = pp.video_tensor(ramp)
    assert video.shape == (pp.SPATIAL_CROPS, 3, 2, 224, 224)
    assert video[0].mean() < video[1].mean() < video[2].mean()  # left, centre, right crops
    assert pp.gray_tensor(np.ones((50, 80), dtype=np.float32)).shape == (1, 224, 224)


def _tiny_state(encoder: ib.ImageBindEncoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in encoder.model.state_dict().items()}


def test_convert_checkpoint_round_trip(encoder: ib.ImageBindEncoder, items: _Items, tmp_path: Path) -> None:
    src = tmp_path / "imagebind_tiny.pth"
    torch.save({"model": _tiny_state(encoder)}, src)
    dst = ib.convert_checkpoint(src, tmp_path / "converted", ib.ImageBindArch.tiny())
    loaded = ib.ImageBindEncoder.from_config(EncoderConfig(path=str(dst)), CPU, torch.float32)
    assert loaded.id == encoder.id
    image = items[Modality.IMAGE][:1]
    assert torch.equal(loaded.encode(image, CAPS).pooled, encoder.encode(image, CAPS).pooled)
    assert torch.equal(loaded.encode_text(["hi"]).tokens, encoder.encode_text(["hi"]).tokens)


def test_convert_rejects_wrong_checkpoints(encoder: ib.ImageBindEncoder, tmp_path: Path) -> None:
    state = _tiny_state(encoder)
    state["not.a.weight"] = state.pop("modality_heads.vision.2.weight")
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"missing \(1\): modality_heads\.vision\.2\.weight.*unexpected \(1\)"):
        ib.convert_checkpoint(bad, tmp_path / "out", ib.ImageBindArch.tiny())
    torch.save(_tiny_state(encoder), bad)
    with pytest.raises(ValueError, match="wrong shape"):  # tiny weights are not ImageBind-Huge
        ib.convert_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out" / ib.WEIGHTS_FILE).exists()


def test_missing_real_weights_explain_the_fix(tmp_path: Path) -> None:
    config = EncoderConfig(path=str(tmp_path / "imagebind-huge"))
    with pytest.raises(MissingWeightsError, match="anyverse convert imagebind"):
        ib.ImageBindEncoder.from_config(config, CPU, torch.float32)
