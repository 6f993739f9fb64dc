"""Safe, capped decoding of user media and program-named writing of generated media.

Every user file enters through :func:`load_media` (or :func:`media_from_bytes`): the format is sniffed from the
bytes, hard caps (size, pixels, duration, frames) are checked before anything large is decoded, and every library
exception becomes a one-line :class:`MediaError` naming the file. Decoders return plain numpy / PIL data in fixed
ranges; long audio and video are read by seeking to the sampled clips, never decoded whole.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from math import gcd
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile as sf
from PIL import Image, ImageOps

from anyverse.config import Caps
from anyverse.types import Media, Modality

logger = logging.getLogger(__name__)

__all__ = [
    "EXTENSIONS",
    "FORMAT_EXTENSIONS",
    "MediaError",
    "decode_audio",
    "decode_audio_clips",
    "decode_gray",
    "decode_image",
    "decode_video_clips",
    "load_media",
    "media_from_bytes",
    "save_audio",
    "save_image",
    "save_video",
    "sniff",
]

_I, _A, _V = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO

# File extension -> what a file so named should hold. The first extension listed for a format is the one writers
# and media_from_bytes use.
EXTENSIONS: dict[str, tuple[Modality, str]] = {
    ".png": (_I, "png"), ".jpg": (_I, "jpeg"), ".jpeg": (_I, "jpeg"), ".jpe": (_I, "jpeg"), ".jfif": (_I, "jpeg"),
    ".webp": (_I, "webp"), ".gif": (_I, "gif"), ".bmp": (_I, "bmp"), ".tif": (_I, "tiff"), ".tiff": (_I, "tiff"),
    ".avif": (_I, "avif"),
    ".wav": (_A, "wav"), ".wave": (_A, "wav"), ".flac": (_A, "flac"), ".ogg": (_A, "ogg"), ".oga": (_A, "ogg"),
    ".opus": (_A, "ogg"), ".mp3": (_A, "mp3"),
    ".mp4": (_V, "mp4"), ".m4v": (_V, "mp4"), ".mov": (_V, "mov"), ".qt": (_V, "mov"), ".webm": (_V, "webm"),
    ".mkv": (_V, "mkv"), ".avi": (_V, "avi"),
}  # fmt: skip
FORMAT_EXTENSIONS: dict[str, str] = {fmt: ext for ext, (_, fmt) in reversed(EXTENSIONS.items())}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF",
                "avif": "AVIF"}
_HIGH_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_AV_FORMATS = {"mp4": "mov", "mov": "mov", "webm": "matroska", "mkv": "matroska", "avi": "avi"}
_HEAD_BYTES = 64
_SEEK_GAP_S = 2.0  # decode forward rather than seek when the next wanted frame is this close
_WHITE = (255, 255, 255, 255)


class MediaError(ValueError):
    """Input that cannot be read safely. The message is one line: ``"<file>: <reason>"``. ``group`` names the
    failure without this file's particulars (its path, sizes, the decoder's words), so skip counts over a dataset
    add up the same failure across files; it is the reason itself where that has no particulars."""

    def __init__(self, label: str, reason: str, group: str | None = None):
        self.label, self.reason = label, re.sub(r"\s+", " ", reason).strip()
        self.group = group or self.reason
        super().__init__(re.sub(r"\s+", " ", f"{label}: {self.reason}").strip())


def _error(label: str, reason: str, group: str | None = None) -> MediaError:
    return MediaError(label, reason, group)


@contextmanager
def _guard(label: str, fmt: str, kind: str) -> Iterator[None]:
    """Turn whatever a decoder library raises into a MediaError; the original goes to the debug log."""
    try:
        yield
    except MediaError:
        raise
    except Exception as err:
        logger.debug("decoding %s failed", label, exc_info=True)
        detail = str(err)[:200] or type(err).__name__
        if isinstance(err, Image.DecompressionBombError | MemoryError):
            too_large = f"{fmt.upper()} {kind} too large to decode safely"
            raise _error(label, f"{too_large} ({detail})", too_large) from None
        corrupt = f"truncated or corrupt {fmt.upper()} {kind}"
        raise _error(label, f"{corrupt} ({detail})", corrupt) from None


def _cap_error(label: str, what: str, value: float, cap: float, field: str) -> MediaError:
    """``"5.2 hours of audio exceeds the 4.0 hour cap (caps.max_audio_seconds)"``, in the cap's natural unit."""
    unit, scale = ("hour", 3600) if cap >= 3600 else ("minute", 60) if cap >= 60 else ("second", 1)
    return _error(label, f"{value / scale:.1f} {unit}s of {what} exceeds the {cap / scale:.1f} {unit} cap "
                         f"(caps.{field})", f"over caps.{field}")


# ---------------------------------------------------------------------------------------------------- sniffing


def _is_mpeg_audio_frame(h: bytes) -> bool:
    """MPEG audio frame header: 11 sync bits, then a valid version, layer, bitrate and sample rate."""
    if len(h) < 4 or h[0] != 0xFF or h[1] & 0xE0 != 0xE0:
        return False
    version, layer, bitrate, rate = (h[1] >> 3) & 3, (h[1] >> 1) & 3, h[2] >> 4, (h[2] >> 2) & 3
    return version != 1 and layer != 0 and bitrate != 15 and rate != 3


def sniff(head: bytes) -> tuple[Modality, str] | None:
    """Format of a file from its first bytes (64 are enough); None when it is not a supported format.

    Extensions lie, magic bytes rarely do; decoders are then opened for exactly this format.
    """
    riff = head[8:12] if head[:4] in (b"RIFF", b"RF64") else b""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _I, "png"
    if head.startswith(b"\xff\xd8\xff"):
        return _I, "jpeg"
    if riff == b"WEBP":
        return _I, "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _I, "gif"
    if head.startswith(b"BM") and len(head) >= 26:
        return _I, "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _I, "tiff"
    if riff == b"WAVE":
        return _A, "wav"
    if riff == b"AVI ":
        return _V, "avi"
    if head.startswith(b"fLaC"):
        return _A, "flac"
    if head.startswith(b"OggS"):
        return _A, "ogg"
    if head.startswith(b"ID3") or _is_mpeg_audio_frame(head):
        return _A, "mp3"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return _I, "avif"
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"M4A ", b"M4B ", b"M4P "):
            return None  # HEIC stills and AAC-only audio: nothing here decodes them
        return _V, "mov" if brand == b"qt  " else "mp4"
    if head[4:8] in (b"moov", b"mdat", b"wide"):
        return _V, "mov"  # old QuickTime files without an ftyp box
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return _V, "webm" if b"webm" in head[:_HEAD_BYTES] else "mkv"
    return None


# ------------------------------------------------------------------------------------------- opening, capped


def _fit_size(width: int, height: int, side: int, shorter: bool = False) -> tuple[int, int]:
    """Size that brings the longest (or shortest) side down to ``side``; never upscales."""
    scale = side / (min(width, height) if shorter else max(width, height))
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def _load_image(path: Path, fmt: str, label: str, caps: Caps) -> Image.Image:
    """Open with Pillow restricted to the sniffed format, refuse bombs from the header, decode, apply EXIF.

    JPEGs are drafted (DCT-scaled) to the smallest size still >= the target, which saves most of the memory.
    """
    with _guard(label, fmt, "image"), Image.open(path, formats=[_PIL_FORMATS[fmt]]) as im:
        width, height = im.size
        if width * height > caps.max_image_pixels:
            raise _error(label, f"{width}x{height} image has {width * height:,} pixels, over the "
                                f"{caps.max_image_pixels:,} cap (caps.max_image_pixels; decompression bomb?)",
                         "over caps.max_image_pixels")
        im.draft(im.mode, _fit_size(width, height, caps.image_side))
        im.load()
        ImageOps.exif_transpose(im, in_place=True)
        return im


def _gray_float(im: Image.Image) -> np.ndarray:
    """[H, W] float32 in [0, 1] keeping 16-bit precision; colour goes through luminance."""
    if im.mode not in _HIGH_BIT_MODES:
        return np.asarray(_to_rgb(im).convert("L"), dtype=np.float32) / 255.0
    arr = np.asarray(im, dtype=np.float32)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.min() >= 0 and arr.max() <= 65535):
        return arr / 65535.0
    if im.mode == "F" and arr.min() >= 0 and arr.max() <= 1:
        return arr
    low, high = float(arr.min()), float(arr.max())  # arbitrary int32/float data: stretch to [0, 1]
    return (arr - low) / (high - low) if high > low else np.zeros_like(arr)


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB 8-bit: alpha composited over white, 16-bit scaled down, CMYK and the rest converted."""
    if im.mode in _HIGH_BIT_MODES:
        return Image.fromarray(np.round(_gray_float(im) * 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("P", "PA", "LA", "La", "RGBa", "RGBA") and (im.mode != "P" or "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


@contextmanager
def _open_audio(path: Path, fmt: str, label: str, caps: Caps) -> Iterator[sf.SoundFile]:
    """SoundFile whose duration is within caps; errors inside the block are wrapped too."""
    with _guard(label, fmt, "audio"), sf.SoundFile(path) as f:
        if f.frames <= 0 or f.samplerate <= 0:
            raise _error(label, "contains no audio samples")
        if f.frames / f.samplerate > caps.max_audio_seconds:
            raise _cap_error(label, "audio", f.frames / f.samplerate, caps.max_audio_seconds, "max_audio_seconds")
        yield f


def _declared_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration is not None else None


def _demuxed_duration(container: Any, stream: Any, caps: Caps) -> float:
    """End of the last packet, read without decoding (e.g. browser-recorded WebM declares no duration)."""
    end = 0.0
    for packet in container.demux(stream):
        if packet.pts is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
            if end > caps.max_video_seconds:
                break
    return end


@contextmanager
def _open_video(path: Path, fmt: str, label: str, caps: Caps) -> Iterator[tuple[Any, Any, float]]:
    """(container, first video stream, duration) after the duration, frame and pixel caps pass."""
    def open_() -> Any:  # demuxer forced to the sniffed format, local files only
        return av.open(str(path), format=_AV_FORMATS[fmt], options={"protocol_whitelist": "file"},
                       metadata_errors="ignore")

    with _guard(label, fmt, "video"):
        container = open_()
        try:
            if not container.streams.video:
                raise _error(label, f"{fmt.upper()} file has no video stream")
            stream = container.streams.video[0]
            duration = _declared_duration(container, stream)
            if duration is None:
                duration = _demuxed_duration(container, stream, caps)
                container.close()  # start over at the beginning
                container = open_()
                stream = container.streams.video[0]
            if duration > caps.max_video_seconds:
                raise _cap_error(label, "video", duration, caps.max_video_seconds, "max_video_seconds")
            frames = stream.frames or round(duration * float(stream.average_rate or 0))
            if frames > caps.max_video_frames:
                raise _error(label, f"{frames:,} video frames exceed the {caps.max_video_frames:,} cap "
                                    "(caps.max_video_frames)", "over caps.max_video_frames")
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > caps.max_video_pixels:
                raise _error(label, f"{width}x{height} video frames exceed the {caps.max_video_pixels:,} pixel cap "
                                    "(caps.max_video_pixels)", "over caps.max_video_pixels")
            yield container, stream, duration
        finally:
            container.close()


# -------------------------------------------------------------------------------------------------- loading


def _probe(path: Path, modality: Modality, fmt: str, label: str, caps: Caps) -> None:
    """Decode just enough to catch corrupt or truncated files and cap violations before anyone relies on them."""
    if modality is _I:
        _load_image(path, fmt, label, caps)
    elif modality is _A:
        with _open_audio(path, fmt, label, caps) as f:
            f.read(frames=min(f.frames, 4096), dtype="float32")
    else:
        with _open_video(path, fmt, label, caps) as (container, stream, _):
            if next(container.decode(stream), None) is None:
                raise _error(label, f"no frame of the {fmt.upper()} video decodes")


def _load(named: Path, caps: Caps, modality: Modality | None, label: str, original_name: str) -> Media:
    if not os.path.lexists(named):
        raise _error(label, "no such file")
    if not named.exists():
        raise _error(label, "broken symlink")
    if named.is_dir():
        raise _error(label, "is a directory, not a file")
    if not named.is_file():
        raise _error(label, "not a regular file")
    resolved = named.resolve()
    if caps.allowed_roots is not None:
        if not any(resolved.is_relative_to(Path(root).resolve()) for root in caps.allowed_roots):
            raise _error(label, f"resolves to {resolved}, outside the allowed roots (caps.allowed_roots)",
                         "outside caps.allowed_roots")
    else:
        base = named.absolute().parent.resolve()
        if not resolved.is_relative_to(base):
            raise _error(label, f"symlink points outside {base}", "symlink points outside its directory")
    size = resolved.stat().st_size
    if size == 0:
        raise _error(label, "empty file")
    if size > caps.max_file_bytes:
        raise _error(label, f"{size:,} bytes exceeds the {caps.max_file_bytes:,} byte cap (caps.max_file_bytes)",
                     "over caps.max_file_bytes")
    with open(resolved, "rb") as f:
        sniffed = sniff(f.read(_HEAD_BYTES))
    if sniffed is None:
        raise _error(label, "not a supported image, audio or video file")
    kind, fmt = sniffed
    suffix = Path(original_name).suffix.lower()
    if suffix in EXTENSIONS and EXTENSIONS[suffix][0] is not kind:
        raise _error(label, f"named {suffix} but contains {fmt} {kind.value}")
    if modality is not None and modality is not kind and not (kind is _I and modality in (Modality.DEPTH,
                                                                                          Modality.THERMAL)):
        raise _error(label, f"expected {modality.value} but contains {fmt} {kind.value}")
    _probe(resolved, kind, fmt, label, caps)
    with open(resolved, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return Media(modality=modality or kind, path=resolved, sha256=digest, format=fmt, original_name=original_name)


def load_media(source: str | Path, caps: Caps, modality: Modality | None = None) -> Media:
    """The one entry for user files: checks path, symlinks, size, sniffed format and caps, then hashes.

    ``modality`` says an image file is DEPTH or THERMAL (it must still hold image bytes).
    """
    named = Path(source)
    return _load(named, caps, modality, label=str(source), original_name=named.name)


def media_from_bytes(
    data: bytes, name: str, caps: Caps, directory: Path, modality: Modality | None = None
) -> Media:
    """Store API-supplied bytes under a content-hash name in ``directory`` and load them like a file.

    ``name`` is only a label (its last component becomes ``original_name``); it never becomes a path.
    """
    original_name = re.sub(r"[\x00-\x1f]", "", name.replace("\\", "/").rsplit("/", 1)[-1]) or "upload"
    if not data:
        raise _error(original_name, "empty file")
    if len(data) > caps.max_file_bytes:
        raise _error(original_name, f"{len(data):,} bytes exceeds the {caps.max_file_bytes:,} byte cap "
                                    "(caps.max_file_bytes)", "over caps.max_file_bytes")
    sniffed = sniff(data[:_HEAD_BYTES])
    if sniffed is None:
        raise _error(original_name, "not a supported image, audio or video file")

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    path, _ = _write_atomic(Path(directory), FORMAT_EXTENSIONS[sniffed[1]], write)
    try:
        return _load(path, caps, modality, label=original_name, original_name=original_name)
    except MediaError:
        path.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------- decoders


def decode_image(media: Media, caps: Caps) -> Image.Image:
    """RGB image, EXIF-oriented, alpha over white, longest side <= ``caps.image_side``."""
    with _guard(media.original_name, media.format, "image"):
        im = _to_rgb(_load_image(media.path, media.format, media.original_name, caps))
        size = _fit_size(*im.size, caps.image_side)
        return im if size == im.size else im.resize(size, Image.Resampling.LANCZOS)


def decode_gray(media: Media, caps: Caps) -> np.ndarray:
    """Float32 [H, W] in [0, 1] for depth/thermal maps: 16-bit kept at full precision, colour as luminance."""
    with _guard(media.original_name, media.format, "image"):
        arr = _gray_float(_load_image(media.path, media.format, media.original_name, caps))
        size = _fit_size(arr.shape[1], arr.shape[0], caps.image_side)
        if size != (arr.shape[1], arr.shape[0]):
            arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
        return np.clip(arr, 0.0, 1.0).astype(np.float32, copy=False)


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    if target <= 0:
        raise ValueError(f"sample_rate must be positive, got {target}")
    if rate == target:
        return x.astype(np.float32, copy=False)
    g = gcd(rate, target)
    from scipy.signal import resample_poly  # lazy: scipy.signal costs ~0.7 s and ~100 MB to import

    return resample_poly(x, target // g, rate // g).astype(np.float32)


def decode_audio(media: Media, caps: Caps, sample_rate: int = 16000) -> np.ndarray:
    """Whole file as float32 mono [N] at ``sample_rate`` (mixed down block by block to bound memory)."""
    with _open_audio(media.path, media.format, media.original_name, caps) as f:
        blocks = [_finite(b.mean(axis=1)) for b in f.blocks(blocksize=1 << 20, dtype="float32", always_2d=True)]
        rate = f.samplerate
    return _resample(np.concatenate(blocks) if blocks else np.zeros(0, np.float32), rate, sample_rate)


def _finite(samples: np.ndarray) -> np.ndarray:
    """Float WAVs can hold NaN/Inf samples; they would poison the encoder, so they become silence."""
    if np.isfinite(samples).all():
        return samples
    return np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)


def _check_clips(num_clips: int, per_clip: int, clip_seconds: float) -> None:
    if num_clips < 1 or per_clip < 1 or not clip_seconds > 0:
        raise ValueError(f"need num_clips >= 1, frames >= 1 and clip_seconds > 0, got {num_clips}, {per_clip}, "
                         f"{clip_seconds}")


def _clip_starts(duration: float, clip_seconds: float, num_clips: int) -> np.ndarray:
    """ImageBind-style clip starts: evenly spread, first at 0, last ending at the end (all 0 when too short)."""
    return np.linspace(0.0, max(duration - clip_seconds, 0.0), num_clips)


def decode_audio_clips(
    media: Media, caps: Caps, num_clips: int, clip_seconds: float, sample_rate: int = 16000
) -> np.ndarray:
    """Float32 [num_clips, round(clip_seconds * sample_rate)] mono clips, reading only those segments.

    Audio shorter than a clip is zero-padded; clips overlap when they do not fit side by side.
    """
    length = round(clip_seconds * sample_rate)
    _check_clips(num_clips, length, clip_seconds)
    out = np.zeros((num_clips, length), np.float32)
    with _open_audio(media.path, media.format, media.original_name, caps) as f:
        rate, frames = f.samplerate, f.frames
        src_len = round(clip_seconds * rate)
        for i, start in enumerate(_clip_starts(frames / rate, clip_seconds, num_clips)):
            f.seek(min(round(start * rate), frames - 1))
            clip = _finite(f.read(frames=src_len, dtype="float32", always_2d=True).mean(axis=1))
            clip = _resample(np.pad(clip, (0, src_len - len(clip))), rate, sample_rate)[:length]
            out[i, : len(clip)] = clip
    return out


def _frames_at(container: Any, stream: Any, times: list[float], size: tuple[int, int], label: str) -> list[np.ndarray]:
    """RGB arrays of the frames showing at each (ascending) time in seconds from the stream start.

    Seeks to the keyframe before a time when it is far ahead and decodes forward; past the end the last frame is
    repeated, so short videos still fill every slot.
    """
    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    step = 1.0 / float(stream.average_rate or stream.guessed_rate or 25)
    decoded = container.decode(stream)
    shown = pending = fallback = None  # frame on screen at the last time; the first one decoded past it
    position, converted = 0.0, None  # converted: (frame, its array), since repeated frames are adjacent
    out: list[np.ndarray] = []
    for t in times:
        if t - position > _SEEK_GAP_S:
            logger.debug("%s: seeking to %.2f s", label, t)
            container.seek(int((t0 + t) / stream.time_base), stream=stream)
            decoded, pending, fallback, shown = container.decode(stream), None, shown, None
        while (frame := pending if pending is not None else next(decoded, None)) is not None:
            pending = None
            position = frame.time - t0 if frame.time is not None else position + step
            if position > t + 1e-6 and shown is not None:
                pending = frame
                break
            shown = frame
        shown = shown if shown is not None else fallback
        if shown is None:
            raise _error(label, "no video frame decodes")
        if converted is None or converted[0] is not shown:
            converted = (shown, shown.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="AREA"))
        out.append(converted[1])
    return out


def decode_video_clips(
    media: Media,
    caps: Caps,
    num_clips: int,
    frames_per_clip: int,
    clip_seconds: float,
    max_side: int | None = None,
) -> np.ndarray:
    """Uint8 [num_clips, frames_per_clip, H, W, 3]: clips spread over the video, frames evenly inside each.

    Frames are scaled so the shorter side is <= ``max_side`` (default ``caps.image_side``). A video shorter than
    a clip is sampled over its whole length, repeating frames as needed.
    """
    _check_clips(num_clips, frames_per_clip, clip_seconds)
    with _open_video(media.path, media.format, media.original_name, caps) as (container, stream, duration):
        clip = min(clip_seconds, duration) if duration > 0 else clip_seconds
        offsets = (np.arange(frames_per_clip) + 0.5) * clip / frames_per_clip
        times = (_clip_starts(duration, clip, num_clips)[:, None] + offsets[None, :]).ravel()
        order = np.argsort(times, kind="stable")
        size = _fit_size(stream.codec_context.width, stream.codec_context.height, max_side or caps.image_side, True)
        frames = _frames_at(container, stream, [float(times[i]) for i in order], size, media.original_name)
    out = np.empty((len(times), size[1], size[0], 3), np.uint8)
    out[order] = np.stack(frames)
    return out.reshape(num_clips, frames_per_clip, size[1], size[0], 3)


# -------------------------------------------------------------------------------------------------- writers


def _write_atomic(out_dir: Path, ext: str, write: Callable[[str], None]) -> tuple[Path, str]:
    """Let ``write`` fill a temp file in out_dir, then rename it to ``<sha256[:16]><ext>``.

    Readers never see half a file, and identical content always lands on the same name. Returns (path, sha256).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=ext)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        path = out_dir / f"{digest[:16]}{ext}"
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.resolve(), digest


def _save(modality: Modality, fmt: str, out_dir: Path, write: Callable[[str], None]) -> Media:
    path, digest = _write_atomic(Path(out_dir), FORMAT_EXTENSIONS[fmt], write)
    logger.debug("wrote %s", path)
    return Media(modality=modality, path=path, sha256=digest, format=fmt, original_name=path.name)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Float in [0, 1] (clipped) or uint8 -> uint8."""
    x = np.asarray(x)
    if x.dtype == np.uint8:
        return x
    return np.round(np.clip(x.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def save_image(image: np.ndarray | Image.Image, out_dir: Path) -> Media:
    """PNG of a PIL image or a float [H, W, 3] in [0, 1] / uint8 array, named by its content hash."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(_to_uint8(image))
    if im.mode not in ("RGB", "RGBA", "L", "LA", "I;16"):
        im = im.convert("RGB")
    return _save(_I, "png", out_dir, lambda tmp: im.save(tmp, format="PNG"))


@functools.cache
def _x264_options() -> dict[str, object]:
    """Cap x264 at AVX2 on CPUs that report AVX-512 (so AVX2 is surely there); leave other CPUs alone."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    return {"x264-params": "asm=AVX2"} if re.search(r"\bavx512f\b", flags) else {}


def save_video(frames: np.ndarray, fps: int, out_dir: Path) -> Media:
    """H.264 (yuv420p) MP4 of float [F, H, W, 3] in [0, 1] or uint8 frames; odd sizes are edge-padded to even."""
    arr = _to_uint8(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
        raise ValueError(f"save_video: expected [F, H, W, 3] frames with F >= 1, got shape {arr.shape}")
    arr = np.pad(arr, ((0, 0), (0, arr.shape[1] % 2), (0, arr.shape[2] % 2), (0, 0)), mode="edge")

    def write(tmp: str) -> None:
        try:  # faststart puts the index first, so players can start before the whole file arrives
            with av.open(tmp, "w", format="mp4", options={"movflags": "+faststart"}) as container:
                stream = container.add_stream("libx264", rate=int(fps))
                stream.width, stream.height, stream.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
                # Same frames must give the same bytes (hash names). Under CPU load on an AVX-512 KVM host, x264's
                # AVX-512 code and auto threading occasionally encoded identical frames differently.
                stream.codec_context.thread_count = 1
                stream.options = _x264_options()
                for frame in arr:
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                container.mux(stream.encode())
        except Exception as err:
            raise _error(str(out_dir), f"cannot write an H.264 MP4 with PyAV ({err})") from None

    return _save(_V, "mp4", out_dir, write)


def save_audio(samples: np.ndarray, sample_rate: int, out_dir: Path) -> Media:
    """16-bit PCM WAV of float [N] or [C, N] samples in [-1, 1] (clipped)."""
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    if x.ndim not in (1, 2):
        raise ValueError(f"save_audio: expected [N] or [C, N] samples, got shape {x.shape}")
    return _save(_A, "wav", out_dir, lambda tmp: sf.write(tmp, x.T, int(sample_rate), format="WAV", subtype="PCM_16"))
