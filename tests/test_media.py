"""Safe media loading, decoding and writing, on synthetic files made in tmp_path."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from anyverse.config import Caps
from anyverse.media import (
    MediaError,
    decode_audio,
    decode_audio_clips,
    decode_gray,
    decode_image,
    decode_video_clips,
    load_media,
    media_from_bytes,
    save_audio,
    save_image,
    save_video,
    sniff,
)
from anyverse.types import Modality

CAPS = Caps()
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ------------------------------------------------------------------------------------------------- fixtures


def halves(left: tuple[int, ...], right: tuple[int, ...], w: int = 64, h: int = 48) -> np.ndarray:
    arr = np.zeros((h, w, len(left)), np.uint8)
    arr[:, : w // 2], arr[:, w // 2 :] = left, right
    return arr


def sine(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()])


def write_video(path: Path, codec: str, fps: int = 8, frames: int = 16, size: tuple[int, int] = (64, 48),
                level=lambda i: 10 + 14 * i, gop: int | None = None, fmt: str | None = None) -> Path:  # fmt: skip
    """Flat grey frames whose level rises with the frame index, so sampled times can be read back."""
    with av.open(str(path) if isinstance(path, Path) else path, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        if codec == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(frames):
            arr = np.full((size[1], size[0], 3), level(i), np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        container.mux(stream.encode())
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a huge RGB image, with almost no data behind it."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(8), (Modality.IMAGE, "png")),
        (b"\xff\xd8\xff\xe0" + bytes(8), (Modality.IMAGE, "jpeg")),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", (Modality.IMAGE, "webp")),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", (Modality.AUDIO, "wav")),
        (b"RIFF\x00\x00\x00\x00AVI LIST", (Modality.VIDEO, "avi")),
        (b"GIF89a" + bytes(8), (Modality.IMAGE, "gif")),
        (b"II*\x00" + bytes(8), (Modality.IMAGE, "tiff")),
        (b"fLaC" + bytes(8), (Modality.AUDIO, "flac")),
        (b"OggS" + bytes(8), (Modality.AUDIO, "ogg")),
        (b"ID3\x04" + bytes(8), (Modality.AUDIO, "mp3")),
        (b"\xff\xfb\x90\x64" + bytes(8), (Modality.AUDIO, "mp3")),
        (b"\x00\x00\x00\x20ftypisom" + bytes(8), (Modality.VIDEO, "mp4")),
        (b"\x00\x00\x00\x14ftypqt  " + bytes(8), (Modality.VIDEO, "mov")),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", (Modality.VIDEO, "webm")),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x88matroska", (Modality.VIDEO, "mkv")),
        (b"\x00\x00\x00\x18ftypheic" + bytes(8), None),
        (b"\xff\xf1\x50\x80" + bytes(8), None),  # AAC ADTS, not MPEG layer audio
        (b"hello world, not media", None),
        (b"", None),
    ],
)
def test_sniff_reads_magic_bytes(head: bytes, expected: tuple[Modality, str] | None) -> None:
    assert sniff(head) == expected


# --------------------------------------------------------------------------------------------------- images


def _rgba(path: Path) -> None:
    arr = halves((255, 0, 0, 0), (0, 0, 255, 255))  # left: red but fully transparent
    Image.fromarray(arr, "RGBA").save(path)


def _palette(path: Path) -> None:
    im = Image.fromarray(halves((0,), (1,))[..., 0], "L").convert("P")
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    im.save(path, transparency=0)


def _gray16(path: Path) -> None:
    Image.fromarray(np.full((48, 64), 257 * 200, np.uint16)).save(path)


def _cmyk(path: Path) -> None:
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(path, quality=95)


@pytest.mark.parametrize(
    ("name", "make", "left", "right"),
    [
        ("rgba.png", _rgba, WHITE, BLUE),
        ("palette.png", _palette, WHITE, GREEN),
        ("gray16.png", _gray16, (200,) * 3, (200,) * 3),
        ("cmyk.jpg", _cmyk, RED, RED),
        ("gray.png", lambda p: Image.fromarray(halves((30,), (220,))[..., 0], "L").save(p), (30,) * 3, (220,) * 3),
        ("lossless.webp", lambda p: Image.fromarray(halves(RED, BLUE)).save(p, lossless=True), RED, BLUE),
        ("plain.gif", lambda p: Image.fromarray(halves(RED, BLUE)).save(p), RED, BLUE),
        ("plain.bmp", lambda p: Image.fromarray(halves(RED, BLUE)).save(p), RED, BLUE),
        ("plain.tiff", lambda p: Image.fromarray(halves(RED, BLUE)).save(p), RED, BLUE),
    ],
)
def test_decode_image_modes_to_rgb(tmp_path: Path, name: str, make, left, right) -> None:
    make(tmp_path / name)
    media = load_media(tmp_path / name, CAPS)
    assert media.modality is Modality.IMAGE and media.original_name == name and media.id is None
    im = decode_image(media, CAPS)
    assert im.mode == "RGB" and im.size == (64, 48)
    arr = np.asarray(im).astype(int)
    np.testing.assert_allclose(arr[24, 8], left, atol=3)
    np.testing.assert_allclose(arr[24, 56], right, atol=3)


def test_large_jpeg_is_drafted_and_downscaled(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.fromarray(np.tile(halves(RED, BLUE, 640, 480), (1, 1, 1))).save(path)
    im = decode_image(load_media(path, Caps(image_side=64)), Caps(image_side=64))
    assert im.size == (64, 48)
    np.testing.assert_allclose(np.asarray(im)[24, 4], RED, atol=12)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.fromarray(halves(RED, BLUE, 64, 32)).save(path, exif=exif, quality=95)
    arr = np.asarray(decode_image(load_media(path, CAPS), CAPS)).astype(int)
    assert arr.shape == (64, 32, 3)
    np.testing.assert_allclose(arr[4, 16], RED, atol=12)  # the stored left side is now on top
    np.testing.assert_allclose(arr[60, 16], BLUE, atol=12)


def test_decode_gray_keeps_16_bit_precision(tmp_path: Path) -> None:
    values = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21 + 1).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "depth.png")
    media = load_media(tmp_path / "depth.png", CAPS, modality=Modality.DEPTH)
    assert media.modality is Modality.DEPTH and media.format == "png"
    gray = decode_gray(media, CAPS)
    assert gray.dtype == np.float32 and gray.shape == (48, 64)
    np.testing.assert_allclose(gray, values / 65535.0, atol=1e-7)
    assert len(np.unique(gray)) == 48 * 64  # 8-bit would collapse these
    small = decode_gray(media, Caps(image_side=32))
    assert small.shape == (24, 32) and small.min() >= 0.0 and small.max() <= 1.0


def test_decode_gray_from_8_bit_and_rgb(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 51, np.uint8)).save(tmp_path / "t.png")
    Image.new("RGB", (8, 8), WHITE).save(tmp_path / "w.png")
    assert decode_gray(load_media(tmp_path / "t.png", CAPS, Modality.THERMAL), CAPS)[0, 0] == pytest.approx(0.2)
    assert decode_gray(load_media(tmp_path / "w.png", CAPS), CAPS)[0, 0] == pytest.approx(1.0)


def test_same_modality_under_another_extension_is_fine(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), RED).save(tmp_path / "really_png.jpg", format="PNG")
    media = load_media(tmp_path / "really_png.jpg", CAPS)
    assert media.format == "png" and media.original_name == "really_png.jpg"
    assert decode_image(media, CAPS).getpixel((0, 0)) == RED


def test_depth_requires_image_bytes(tmp_path: Path) -> None:
    sf.write(tmp_path / "depth.wav", sine(0.1, 8000), 8000)
    with pytest.raises(MediaError, match=r"depth\.wav: expected depth but contains wav audio"):
        load_media(tmp_path / "depth.wav", CAPS, modality=Modality.DEPTH)


# ---------------------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize(
    ("name", "rate", "channels", "fmt", "subtype"),
    [
        ("stereo.wav", 44100, 2, "WAV", "PCM_16"),
        ("mono.flac", 22050, 1, "FLAC", "PCM_16"),
        ("vorbis.ogg", 22050, 1, "OGG", "VORBIS"),
        ("lame.mp3", 22050, 2, "MP3", "MPEG_LAYER_III"),
        ("u8.wav", 16000, 1, "WAV", "PCM_U8"),
        ("s24.wav", 48000, 1, "WAV", "PCM_24"),
    ],
)
def test_decode_audio_formats(tmp_path: Path, name: str, rate: int, channels: int, fmt: str, subtype: str) -> None:
    x = sine(1.0, rate)
    sf.write(tmp_path / name, np.stack([x] * channels, axis=1), rate, format=fmt, subtype=subtype)
    media = load_media(tmp_path / name, CAPS)
    assert media.modality is Modality.AUDIO and media.format == Path(name).suffix[1:].replace("flac", "flac")
    y = decode_audio(media, CAPS)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - 16000) <= 0.1 * 16000  # mp3 adds encoder delay and padding
    assert float(np.sqrt(np.mean(y[2000:14000] ** 2))) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)
    assert peak_hz(y[:16000], 16000) == pytest.approx(440, abs=5)


def test_audio_clips_spread_over_a_long_file_and_read_only_those(tmp_path: Path, monkeypatch) -> None:
    rate, seconds = 8000, 60.0
    t = np.arange(int(rate * seconds)) / rate
    sweep = 0.5 * np.sin(2 * np.pi * (100 * t + 15 * t**2))  # 100 Hz at 0 s up to 1900 Hz at 60 s
    sf.write(tmp_path / "sweep.wav", sweep.astype(np.float32), rate)
    media = load_media(tmp_path / "sweep.wav", CAPS)

    reads: list[int] = []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *args, **kwargs):
        reads.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    clips = decode_audio_clips(media, CAPS, num_clips=4, clip_seconds=1.0)
    assert clips.shape == (4, 16000) and clips.dtype == np.float32
    assert reads == [rate] * 4
    peaks = [peak_hz(c, 16000) for c in clips]
    # clip starts at 0, 19.67, 39.33 and 59 s: the instantaneous frequency at their middles
    for peak, mid in zip(peaks, [0.5, 20.17, 39.83, 59.5], strict=True):
        assert peak == pytest.approx(100 + 30 * mid, rel=0.1)


def test_short_audio_clips_are_zero_padded(tmp_path: Path) -> None:
    sf.write(tmp_path / "short.wav", sine(0.5, 16000), 16000)
    clips = decode_audio_clips(load_media(tmp_path / "short.wav", CAPS), CAPS, num_clips=3, clip_seconds=1.0)
    assert clips.shape == (3, 16000)
    np.testing.assert_array_equal(clips[0], clips[2])
    assert np.abs(clips[:, 8000:]).max() == 0 and np.abs(clips[:, :8000]).max() > 0.4


# ---------------------------------------------------------------------------------------------------- video


@pytest.mark.parametrize(
    ("name", "codec"), [("h264.mp4", "libx264"), ("vp9.webm", "libvpx-vp9"), ("mp4v.avi", "mpeg4")]
)
def test_video_clips_follow_time(tmp_path: Path, name: str, codec: str) -> None:
    media = load_media(write_video(tmp_path / name, codec), CAPS)
    assert media.modality is Modality.VIDEO and media.format == Path(name).suffix[1:]
    clips = decode_video_clips(media, CAPS, num_clips=3, frames_per_clip=2, clip_seconds=0.5)
    assert clips.shape == (3, 2, 48, 64, 3) and clips.dtype == np.uint8
    levels = clips.reshape(6, -1).mean(axis=1)
    assert np.all(np.diff(levels) > 5), levels


def test_webm_without_declared_duration_is_measured_and_capped(tmp_path: Path) -> None:
    class Sink:  # not seekable, like a browser's MediaRecorder: the muxer cannot go back to write a duration
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, b: bytes) -> int:
            self.data += bytes(b)
            return len(b)

    sink = Sink()
    write_video(sink, "libvpx-vp9", fmt="webm")  # type: ignore[arg-type]
    path = tmp_path / "live.webm"
    path.write_bytes(sink.data)
    with av.open(str(path)) as container:
        assert container.duration is None and container.streams.video[0].duration is None
    clips = decode_video_clips(load_media(path, CAPS), CAPS, num_clips=2, frames_per_clip=1, clip_seconds=0.5)
    levels = clips.mean(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(levels, [10 + 14 * 2, 10 + 14 * 14], atol=2)  # frames 2 and 14: at 0.25 s, 1.75 s
    with pytest.raises(MediaError, match="max_video_seconds"):
        load_media(path, Caps(max_video_seconds=1.5))


def test_video_seeking_lands_on_the_right_frames(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fps, frames = 8, 80  # 10 s, a keyframe every second: the later clips are reached by seeking
    path = write_video(tmp_path / "long.mp4", "libx264", fps, frames, (32, 32), lambda i: 10 + 3 * i, gop=8)
    with caplog.at_level(logging.DEBUG, logger="anyverse.media"):
        clips = decode_video_clips(load_media(path, CAPS), CAPS, num_clips=4, frames_per_clip=3, clip_seconds=1.0)
    assert sum("seeking" in r.message for r in caplog.records) == 3
    starts, offsets = np.linspace(0, 9, 4), (np.arange(3) + 0.5) / 3
    expected = 10 + 3 * np.floor((starts[:, None] + offsets) * fps)
    np.testing.assert_allclose(clips.mean(axis=(2, 3, 4)), expected, atol=1.4)


def test_short_video_repeats_frames_and_max_side(tmp_path: Path) -> None:
    media = load_media(write_video(tmp_path / "short.mp4", "libx264", frames=4), CAPS)  # 0.5 s
    clips = decode_video_clips(media, CAPS, num_clips=2, frames_per_clip=6, clip_seconds=4.0, max_side=24)
    assert clips.shape == (2, 6, 24, 32, 3)
    np.testing.assert_array_equal(clips[0], clips[1])
    levels = clips[0].mean(axis=(1, 2, 3))
    assert np.all(np.diff(levels) >= 0) and levels[-1] > levels[0]


# ------------------------------------------------------------------------------------------------ bad input


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _symlink(tmp_path: Path, target_dir: str, link_dir: str) -> Path:
    (tmp_path / target_dir).mkdir(exist_ok=True)
    (tmp_path / link_dir).mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / target_dir / "real.png")
    (tmp_path / link_dir / "link.png").symlink_to(tmp_path / target_dir / "real.png")
    return tmp_path / link_dir / "link.png"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _png(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def _wav(path: Path, seconds: float = 0.5) -> Path:
    sf.write(path, sine(seconds, 8000), 8000, format="WAV")
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "missing.png", {}, "no such file"),
    "directory": (lambda d: (d / "folder.png").mkdir() or d / "folder.png", {}, "is a directory"),
    "empty": (lambda d: _write(d / "empty.png", b""), {}, "empty file"),
    # 0x00 first: a bare MPEG audio frame sync (0xFFE...) at the start is sniffed as MP3, then fails as corrupt MP3
    "random": (lambda d: _write(d / "noise.bin", b"\0" + np.random.default_rng(1).bytes(500)), {}, "not a supported"),
    "truncated_png": (lambda d: _truncate(_png(d / "half.png")), {}, "truncated or corrupt PNG image"),
    "truncated_mp4": (lambda d: _truncate(write_video(d / "half.mp4", "libx264")), {}, "corrupt MP4 video"),
    "mislabelled": (lambda d: _wav(d / "sound.png"), {}, "named .png but contains wav audio"),
    "bomb": (lambda d: _write(d / "bomb.png", png_claiming(2000, 2000)), {"max_image_pixels": 10**6},
             "4,000,000 pixels, over the 1,000,000 cap"),
    "pil_bomb": (lambda d: _write(d / "huge.png", png_claiming(100_000, 100_000)), {}, "decompression bomb"),
    "long_audio": (lambda d: _wav(d / "long.wav", 3.0), {"max_audio_seconds": 1.0},
                   r"3\.0 seconds of audio exceeds the 1\.0 second cap \(caps\.max_audio_seconds\)"),
    "long_video": (lambda d: write_video(d / "long.mp4", "libx264"), {"max_video_seconds": 1.0}, "max_video_seconds"),
    "many_frames": (lambda d: write_video(d / "many.webm", "libvpx-vp9"), {"max_video_frames": 4}, "max_video_frames"),
    "big_frames": (lambda d: write_video(d / "wide.avi", "mpeg4"), {"max_video_pixels": 1000}, "max_video_pixels"),
    "big_file": (lambda d: _png(d / "big.png"), {"max_file_bytes": 100}, "max_file_bytes"),
    "symlink_out": (lambda d: _symlink(d, "elsewhere", "inbox"), {}, "symlink points outside"),
    "outside_roots": (lambda d: _png(d / "stray.png"), {"allowed_roots": ["/nonexistent-root"]}, "allowed roots"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_one_line_media_error(tmp_path: Path, case: str) -> None:
    make, caps_kwargs, reason = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(MediaError, match=reason) as info:
        load_media(path, Caps(**caps_kwargs))
    message = str(info.value)
    assert path.name in message and "\n" not in message
    assert message == f"{info.value.label}: {info.value.reason}"
    assert path.name not in info.value.group and " bytes" not in info.value.group  # counts add up across files
    assert info.value.__cause__ is None


def test_symlink_allowed_inside_its_dir_or_roots(tmp_path: Path) -> None:
    assert load_media(_symlink(tmp_path, "inbox", "inbox"), CAPS).original_name == "link.png"
    link = _symlink(tmp_path, "store", "links")
    media = load_media(link, Caps(allowed_roots=[tmp_path / "store"]))
    assert media.path == (tmp_path / "store" / "real.png").resolve()
    with pytest.raises(MediaError, match="allowed roots"):
        load_media(link, Caps(allowed_roots=[tmp_path / "links"]))


def test_decoders_wrap_errors_of_files_broken_after_loading(tmp_path: Path) -> None:
    media = load_media(_png(tmp_path / "ok.png"), CAPS)
    _truncate(media.path)
    with pytest.raises(MediaError, match=r"ok\.png: truncated or corrupt PNG"):
        decode_image(media, CAPS)
    audio = load_media(_wav(tmp_path / "ok.wav"), CAPS)
    audio.path.write_bytes(b"RIFF" + bytes(40))
    with pytest.raises(MediaError, match=r"ok\.wav"):
        decode_audio(audio, CAPS)


# -------------------------------------------------------------------------------------------------- writers


def _only_file(directory: Path) -> Path:
    files = list(directory.iterdir())
    assert len(files) == 1, files  # no temp files left behind
    return files[0]


def test_save_image_round_trip_and_hash_names(tmp_path: Path) -> None:
    img = np.random.default_rng(2).random((48, 64, 3)).astype(np.float32)
    media = save_image(img, tmp_path / "out")
    assert media.modality is Modality.IMAGE and media.format == "png"
    assert media.path.name == f"{media.sha256[:16]}.png" == media.original_name
    assert _only_file(tmp_path / "out") == media.path
    back = np.asarray(decode_image(load_media(media.path, CAPS), CAPS), dtype=np.float32) / 255
    np.testing.assert_allclose(back, img, atol=0.5 / 255 + 1e-6)
    again = save_image(Image.fromarray(np.round(img * 255).astype(np.uint8)), tmp_path / "out")
    assert again == media and _only_file(tmp_path / "out") == media.path
    assert save_image(np.clip(img + 0.1, 0, 1), tmp_path / "out").path != media.path


def test_save_video_round_trip(tmp_path: Path) -> None:
    frames = np.stack([np.full((25, 33, 3), 0.1 + 0.05 * i, np.float32) for i in range(16)])  # odd sizes
    media = save_video(frames, 8, tmp_path / "out")
    assert media.format == "mp4" and media.path.name == f"{media.sha256[:16]}.mp4"
    loaded = load_media(media.path, CAPS)
    assert loaded.sha256 == media.sha256
    with av.open(str(media.path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    clips = decode_video_clips(loaded, CAPS, num_clips=2, frames_per_clip=2, clip_seconds=1.0)
    assert clips.shape == (2, 2, 26, 34, 3)
    levels = clips.reshape(4, -1).mean(axis=1) / 255
    times = np.array([0.25, 0.75, 1.25, 1.75])  # clips start at 0 and 1 s, frames at the middles of their halves
    expected = 0.1 + 0.05 * np.floor(times * 8)
    np.testing.assert_allclose(levels, expected, atol=0.02)
    assert save_video(frames, 8, tmp_path / "out") == media
    assert _only_file(tmp_path / "out") == media.path


def test_save_audio_round_trip(tmp_path: Path) -> None:
    left, right = sine(0.5, 16000), sine(0.5, 16000, 880, 0.3)
    media = save_audio(np.stack([left * 3, right]), 16000, tmp_path / "out")  # left clips at +-1
    assert media.format == "wav" and media.modality is Modality.AUDIO
    info = sf.info(str(media.path))
    assert (info.channels, info.samplerate, info.subtype) == (2, 16000, "PCM_16")
    back = decode_audio(load_media(media.path, CAPS), CAPS)
    np.testing.assert_allclose(back, (np.clip(left * 3, -1, 1) + right) / 2, atol=1e-4)
    assert save_audio(np.stack([left * 3, right]), 16000, tmp_path / "out") == media
    assert _only_file(tmp_path / "out") == media.path


def test_media_from_bytes_ignores_the_name(tmp_path: Path) -> None:
    data = _png(tmp_path / "src.png").read_bytes()
    uploads = tmp_path / "deep" / "uploads"
    media = media_from_bytes(data, "../../etc/passwd", CAPS, uploads)
    assert media.path.parent == uploads.resolve() and media.path.name == f"{media.sha256[:16]}.png"
    assert media.original_name == "passwd" and media.format == "png"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(["src.png", media.path.name])
    assert media_from_bytes(data, "again.png", CAPS, uploads).path == media.path


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("evil.png", None, "named .png but contains wav audio"),
        ("half.png", b"half", "truncated or corrupt PNG"),
        ("noise.png", b"\x00" * 100, "not a supported"),
    ],
)
def test_media_from_bytes_refusals_leave_nothing(tmp_path: Path, name: str, data: bytes | None, reason: str) -> None:
    if data is None:
        data = _wav(tmp_path / "x.wav").read_bytes()
    elif data == b"half":
        data = _png(tmp_path / "x.png").read_bytes()[:300]
    uploads = tmp_path / "uploads"
    with pytest.raises(MediaError, match=reason) as info:
        media_from_bytes(data, name, CAPS, uploads)
    assert name in str(info.value)
    assert not uploads.exists() or not list(uploads.iterdir())


def test_non_finite_float_audio_decodes_as_silence_there(tmp_path: Path) -> None:
    samples = sine(1.0, 16000)
    samples[100:200], samples[300], samples[400] = np.nan, np.inf, -np.inf
    path = tmp_path / "nan.wav"
    sf.write(path, samples, 16000, subtype="FLOAT")
    media = load_media(path, CAPS)
    whole, clips = decode_audio(media, CAPS), decode_audio_clips(media, CAPS, 2, 0.5)
    assert np.isfinite(whole).all() and np.isfinite(clips).all()
    assert np.allclose(whole[150], 0.0) and np.abs(whole[1000:2000]).max() > 0.4
