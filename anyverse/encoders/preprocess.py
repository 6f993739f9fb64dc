"""ImageBind's input preprocessing (``imagebind/data.py``) in plain torch/numpy/PIL.

``data.py`` imports torchvision, torchaudio and pytorchvideo, which do not load next to CPU torch, so each transform
is reimplemented here, step for step, against the installed source. Decoding (clip sampling, resampling to 16 kHz)
belongs to :mod:`anyverse.media`; these functions take decoded arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Vision (images and video frames): CLIP statistics, 224 px.
IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R 601 weights of R, G, B
# Audio: three 2 s clips at 16 kHz, 128-bin kaldi log-mel, 204 frames, dataset statistics from data.py.
SAMPLE_RATE = 16000
AUDIO_CLIPS = 3
AUDIO_CLIP_SECONDS = 2.0
NUM_MEL_BINS = 128
AUDIO_FRAMES = 204
AUDIO_MEAN = -4.268
AUDIO_STD = 9.138
# Video: five 2 s clips of two frames each, every clip cut into three spatial crops (15 clips for the model).
VIDEO_CLIPS = 5
VIDEO_CLIP_SECONDS = 2.0
FRAMES_PER_CLIP = 2
SPATIAL_CROPS = 3
# Text: CLIP BPE, 77 tokens including start and end.
TEXT_CONTEXT = 77
# Kaldi fbank settings ImageBind passes (or inherits as kaldi defaults).
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
LOG_FLOOR = torch.finfo(torch.float32).eps


def _resize_crop(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """torchvision ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL image (PIL does the resampling there)."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    return image.crop((left, top, left + size, top + size))


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel normalisation of a channels-first tensor ``[C, ...]``."""
    shape = (len(mean),) + (1,) * (x.ndim - 1)
    x = x.contiguous()  # a permuted view costs several times as much per element
    return (x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> ``[3, 224, 224]`` float32, as ImageBind's ``load_and_transform_vision_data``."""
    pixels = np.asarray(_resize_crop(image.convert("RGB")), dtype=np.float32) / 255.0
    return _normalize(torch.from_numpy(pixels).permute(2, 0, 1), CLIP_MEAN, CLIP_STD)


def _per_channel(vision: torch.Tensor, *values: tuple[float, float, float]) -> tuple[torch.Tensor, ...]:
    """Channel constants that broadcast over a preprocessed image ``[3, H, W]`` or video ``[clips, 3, ...]``."""
    view = (3, 1, 1) if vision.ndim == 3 else (1, 3, 1, 1, 1)
    return tuple(torch.tensor(v).view(view) for v in values)


def greyscale(vision: torch.Tensor) -> torch.Tensor:
    """A preprocessed image ``[3, H, W]`` or video ``[clips, 3, frames, H, W]`` in grey: each pixel's luminance in all
    three channels, normalised as colour is (a training augmentation that takes colour away from shape)."""
    mean, std, weights = _per_channel(vision, CLIP_MEAN, CLIP_STD, LUMINANCE)
    luminance = ((vision.float() * std + mean) * weights).sum(dim=-4 if vision.ndim == 5 else 0, keepdim=True)
    return (luminance - mean) / std


def contrast_grey(vision: torch.Tensor) -> torch.Tensor:
    """:func:`greyscale`, its luminance stretched to span [0, 1] over the whole item (autocontrast): every colour of a
    shape on a plain background becomes the same bright shape, so this view shows shape without colour."""
    mean, std = _per_channel(vision, CLIP_MEAN, CLIP_STD)
    luminance = greyscale(vision) * std + mean
    low, high = luminance.amin(), luminance.amax()
    return ((luminance - low) / (high - low).clamp_min(1e-6) - mean) / std


def flat_colour(vision: torch.Tensor) -> torch.Tensor:
    """Each frame of a preprocessed image ``[3, H, W]`` or video ``[clips, 3, frames, H, W]`` filled with the colour of
    what stands out from it (the pixels farthest from its median colour): colour without shape or place."""
    mean, std = _per_channel(vision, CLIP_MEAN, CLIP_STD)
    rgb = vision.float() * std + mean
    frames = (rgb.reshape(-1, *vision.shape[-4:]) if vision.ndim == 5 else rgb[None, :, None]).transpose(1, 2)
    pixels = frames.flatten(3)  # [clips, frames, 3, H * W]
    median = pixels.median(dim=-1, keepdim=True).values
    distance = (pixels - median).norm(dim=2, keepdim=True)
    salient = ((distance > 0.5 * distance.amax(dim=-1, keepdim=True)) & (distance > 0.05)).float()
    count = salient.sum(dim=-1, keepdim=True)
    colour = torch.where(count > 0, (pixels * salient).sum(dim=-1, keepdim=True) / count.clamp_min(1),
                         median)  # a blank frame keeps its own colour
    filled = colour.expand_as(pixels).reshape(frames.shape).transpose(1, 2)
    return (filled.reshape(vision.shape) - mean) / std


def gray_tensor(gray: np.ndarray) -> torch.Tensor:
    """Depth or thermal map ``[H, W]`` in [0, 1] -> ``[1, 224, 224]``.

    ImageBind publishes no depth/thermal loader; its stems take one channel at 224 px. Geometry follows the image
    path (bicubic short side, centre crop); values stay in [0, 1], unnormalised, which is what the community loaders
    that reproduce the paper's thermal numbers do.
    """
    image = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))
    resized = np.asarray(_resize_crop(image), dtype=np.float32)
    return torch.from_numpy(resized.clip(0.0, 1.0)).unsqueeze(0)


def _mel(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)


@functools.cache
def mel_banks(num_bins: int, n_fft: int, sample_rate: int, low_freq: float = LOW_FREQ) -> torch.Tensor:
    """Kaldi triangular mel filters ``[num_bins, n_fft // 2 + 1]`` (high_freq = Nyquist, no VTLN warp).

    Kaldi builds ``n_fft // 2`` columns; the Nyquist column is zero, as torchaudio pads it.
    """
    nyquist = sample_rate / 2.0
    mel_low, mel_high = _mel(torch.tensor(low_freq, dtype=torch.float64)), _mel(torch.tensor(nyquist).double())
    delta = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left, center, right = mel_low + index * delta, mel_low + (index + 1) * delta, mel_low + (index + 2) * delta
    mel = _mel(sample_rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float64)).unsqueeze(0)
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return F.pad(banks, (0, 1)).float()


def kaldi_fbank(
    waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS
) -> torch.Tensor:
    """Log mel filterbank ``[..., frames, num_mel_bins]`` of ``waveform [..., samples]``, equal to
    ``torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False, window_type="hanning", dither=0.0,
    frame_length=25, frame_shift=10)`` with kaldi's other defaults: snip_edges, power-of-two FFT, per-frame DC
    removal, pre-emphasis 0.97, power spectrum, low_freq 20 Hz, high_freq Nyquist, log floored at float eps.
    """
    window = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    n_fft = 1 << (window - 1).bit_length()
    waveform = waveform.float()
    if waveform.shape[-1] < window:
        return waveform.new_zeros((*waveform.shape[:-1], 0, num_mel_bins))
    frames = waveform.unfold(-1, window, shift)
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - PREEMPHASIS * previous) * torch.hann_window(window, periodic=False)
    power = torch.fft.rfft(F.pad(frames, (0, n_fft - window))).abs().pow(2.0)
    energies = power @ mel_banks(num_mel_bins, n_fft, sample_rate).T
    return energies.clamp(min=LOG_FLOOR).log()


def _each_clip(clips: np.ndarray, prepare: Callable[[np.ndarray], torch.Tensor]) -> torch.Tensor:
    """``prepare(clips)``, made once and repeated where every clip is the same (media no longer than a clip)."""
    if len(clips) > 1 and bool((clips == clips[:1]).all()):
        once = prepare(clips[:1])
        return once.repeat(len(clips), *[1] * (once.ndim - 1))
    return prepare(clips)


def audio_tensor(clips: np.ndarray, num_mel_bins: int = NUM_MEL_BINS, frames: int = AUDIO_FRAMES) -> torch.Tensor:
    """Mono 16 kHz clips ``[clips, samples]`` -> normalised log-mel ``[clips, 1, num_mel_bins, frames]``."""
    return _each_clip(clips, lambda each: _audio_tensor(each, num_mel_bins, frames))


def _audio_tensor(clips: np.ndarray, num_mel_bins: int, frames: int) -> torch.Tensor:
    waveform = torch.from_numpy(np.asarray(clips, dtype=np.float32))
    waveform = waveform - waveform.mean(dim=-1, keepdim=True)
    fbank = kaldi_fbank(waveform, SAMPLE_RATE, num_mel_bins).transpose(-1, -2)
    fbank = F.pad(fbank, (0, max(frames - fbank.shape[-1], 0)))[..., :frames]  # zero-pad after the log, as data.py
    return ((fbank - AUDIO_MEAN) / AUDIO_STD).unsqueeze(1)


def _short_side_scale(video: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """pytorchvideo ``ShortSideScale``: bilinear, no antialias, long side floored."""
    height, width = video.shape[-2:]
    if width < height:
        new_h, new_w = math.floor(height / width * size), size
    else:
        new_h, new_w = size, math.floor(width / height * size)
    return F.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False)


def _uniform_crop(video: torch.Tensor, index: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """data.py ``uniform_crop``: crop 0/1/2 is left/centre/right (top/centre/bottom for portrait frames)."""
    height, width = video.shape[-2:]
    top, left = math.ceil((height - size) / 2), math.ceil((width - size) / 2)
    if height > width:
        top = (0, top, height - size)[index]
    else:
        left = (0, left, width - size)[index]
    return video[..., top : top + size, left : left + size]


def video_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 ``[clips, frames, H, W, 3]`` -> ``[clips * 3, 3, frames, 224, 224]``: each clip's three spatial crops
    become extra clips, which the model averages, as ImageBind's ``SpatialCrop(224, num_crops=3)``."""
    return _each_clip(clips, _video_tensor)


def _video_tensor(clips: np.ndarray) -> torch.Tensor:
    video = torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 4, 1, 2, 3).float() / 255.0  # [S, C, T, H, W]
    num_clips, channels, num_frames = video.shape[:3]
    scaled = _short_side_scale(video.flatten(0, 2).unsqueeze(1)).squeeze(1)
    scaled = scaled.reshape(num_clips, channels, num_frames, *scaled.shape[-2:])
    scaled = _normalize(scaled.transpose(0, 1), CLIP_MEAN, CLIP_STD).transpose(0, 1)
    crops = [_uniform_crop(scaled, index) for index in range(SPATIAL_CROPS)]
    return torch.stack(crops, dim=1).flatten(0, 1).contiguous()


def text_tokens(texts: list[str]) -> torch.Tensor:
    """CLIP BPE ids ``[B, 77]`` (start, text cut to 75 tokens, end, zero padding) via ImageBind's SimpleTokenizer."""
    from anyverse.encoders.imagebind import simple_tokenizer

    tokenizer = simple_tokenizer()
    return torch.stack([tokenizer(text, context_length=TEXT_CONTEXT).reshape(-1) for text in texts])
