"""Frozen ImageBind encoder: media and text -> pooled embeddings plus the trunk's patch tokens.

The model code comes from ``imagebind-unofficial`` (CC BY-NC-SA 4.0), imported without its ``__init__`` (which
needs torchvision/torchaudio) and with a two-symbol ``timm`` stand-in. Weights are read from ``config.json`` +
``model.safetensors`` only; official ``.pth`` checkpoints go through :func:`convert_checkpoint` once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn

from anyverse.config import Caps, EncoderConfig, TinySpec
from anyverse.encoders import preprocess as pp
from anyverse.encoders.cache import EmbeddingCache
from anyverse.types import Media, Modality
from anyverse.weights import MissingWeightsError, component_dir, expand

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/omnivore/imagebind/imagebind_huge.pth"
PREPROCESS_VERSION = "2"  # bump when preprocessing changes, so cached embeddings are not reused
ENCODER_MODALITIES = (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO, Modality.DEPTH, Modality.THERMAL, Modality.TEXT)
_Pair = tuple[torch.Tensor, torch.Tensor]  # (pooled, tokens) of one item
_MEDIA_MODALITIES = tuple(m for m in ENCODER_MODALITIES if m is not Modality.TEXT)
# ImageBind's own modality keys; video is the vision trunk with a clip axis.
TOWER = {Modality.IMAGE: "vision", Modality.VIDEO: "vision", Modality.AUDIO: "audio", Modality.DEPTH: "depth",
        Modality.THERMAL: "thermal", Modality.TEXT: "text"}


def _as_is(x: torch.Tensor) -> torch.Tensor:
    """The input as preprocessed: the one view of every modality (images and videos also have a grey one)."""
    return x


COLOUR_VIEWS = {"as_is": _as_is, "flat": pp.flat_colour}  # EncoderConfig.image_colour_view


def _timm_shim() -> types.ModuleType:
    """The two symbols ImageBind takes from ``timm.layers``; real timm imports torchvision."""

    class DropPath(nn.Module):
        """Stochastic depth per sample; identity in eval or when ``drop_prob`` is 0."""

        def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
            super().__init__()
            self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.drop_prob == 0.0 or not self.training:
                return x
            keep = 1.0 - self.drop_prob
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            return x * (mask / keep if self.scale_by_keep and keep > 0 else mask)

    timm, layers = types.ModuleType("timm"), types.ModuleType("timm.layers")
    layers.DropPath = DropPath  # type: ignore[attr-defined]
    layers.trunc_normal_ = nn.init.trunc_normal_  # type: ignore[attr-defined]
    timm.layers = layers  # type: ignore[attr-defined]
    return timm


@cache
def _imagebind() -> types.ModuleType:
    """``imagebind.models.imagebind_model``, loaded lazily without running ``imagebind/__init__.py``."""
    spec = importlib.util.find_spec("imagebind")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("imagebind-unofficial is not installed: pip install --no-deps imagebind-unofficial==0.1.1")
    if "imagebind" not in sys.modules:
        sys.modules["imagebind"] = importlib.util.module_from_spec(spec)
    shimmed = "timm" not in sys.modules
    if shimmed:
        timm = _timm_shim()
        sys.modules["timm"], sys.modules["timm.layers"] = timm, timm.layers  # type: ignore[attr-defined]
    try:
        from imagebind.models import imagebind_model
    finally:
        # ImageBind has bound DropPath/trunc_normal_ by now; a fake timm left behind breaks other libraries'
        # package probing (diffusers calls find_spec("timm")).
        if shimmed:
            del sys.modules["timm"], sys.modules["timm.layers"]
    return imagebind_model


@cache
def simple_tokenizer() -> Any:
    """ImageBind's CLIP BPE tokenizer with its bundled vocabulary (loaded once; it parses 49k merges)."""
    _imagebind()
    from imagebind.models.multimodal_preprocessors import SimpleTokenizer

    spec = importlib.util.find_spec("imagebind")
    assert spec is not None and spec.submodule_search_locations
    bpe = Path(spec.submodule_search_locations[0]) / "bpe" / "bpe_simple_vocab_16e6.txt.gz"
    return SimpleTokenizer(bpe_path=str(bpe), context_length=pp.TEXT_CONTEXT)


class ImageBindArch(BaseModel):
    """Keyword arguments of ``ImageBindModel``; defaults are its own. Saved as ``config.json`` beside the weights."""

    model_config = ConfigDict(extra="forbid")

    video_frames: int = pp.FRAMES_PER_CLIP
    kernel_size: tuple[int, int, int] = (2, 14, 14)
    audio_kernel_size: int = 16
    audio_stride: int = 10
    out_embed_dim: int = 768
    vision_embed_dim: int = 1024
    vision_num_blocks: int = 24
    vision_num_heads: int = 16
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_num_mel_bins: int = pp.NUM_MEL_BINS
    audio_target_len: int = pp.AUDIO_FRAMES
    audio_drop_path: float = 0.1
    text_embed_dim: int = 768
    text_num_blocks: int = 12
    text_num_heads: int = 12
    depth_embed_dim: int = 384
    depth_kernel_size: int = 16
    depth_num_blocks: int = 12
    depth_num_heads: int = 8
    depth_drop_path: float = 0.0
    thermal_embed_dim: int = 768
    thermal_kernel_size: int = 16
    thermal_num_blocks: int = 12
    thermal_num_heads: int = 12
    thermal_drop_path: float = 0.0
    imu_embed_dim: int = 512
    imu_kernel_size: int = 8
    imu_num_blocks: int = 6
    imu_num_heads: int = 8
    imu_drop_path: float = 0.7

    @classmethod
    def huge(cls) -> ImageBindArch:
        """The released checkpoint, as ``imagebind_huge()`` builds it."""
        return cls(vision_embed_dim=1280, vision_num_blocks=32, vision_num_heads=16, text_embed_dim=1024,
                   text_num_blocks=24, text_num_heads=16, out_embed_dim=1024, audio_drop_path=0.1, imu_drop_path=0.7)

    @classmethod
    def tiny(cls, **overrides: Any) -> ImageBindArch:
        """32-wide, one block, two heads per modality: about 1.8M parameters, builds and runs in milliseconds."""
        dims = {f"{m}_embed_dim": 32 for m in ("vision", "audio", "text", "depth", "thermal", "imu")}
        blocks = {f"{m}_num_blocks": 1 for m in ("vision", "audio", "text", "depth", "thermal", "imu")}
        heads = {f"{m}_num_heads": 2 for m in ("vision", "audio", "text", "depth", "thermal", "imu")}
        return cls.model_validate({"out_embed_dim": 32, **dims, **blocks, **heads, **overrides})

    def build(self) -> nn.Module:
        """ImageBindModel, with an image repeated into as many frames as the vision patch is deep (ImageBind's
        stem always makes two): a 1-frame patch then reads an image once, on the first frame's positions."""
        model = _imagebind().ImageBindModel(**self.model_dump())
        model.modality_preprocessors.vision.rgbt_stem.proj[0].ntimes = self.kernel_size[0]
        return model


def write_encoder(directory: Path, arch: ImageBindArch, state: Mapping[str, torch.Tensor]) -> None:
    """Write ``config.json`` + ``model.safetensors`` (tensors made contiguous and unshared, as safetensors needs)."""
    directory.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        storage = tensor.untyped_storage().data_ptr()
        if not tensor.is_contiguous() or storage in seen:
            tensor = tensor.contiguous().clone()
        seen.add(storage)
        tensors[name] = tensor
    tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "architecture": "imagebind"})
    os.replace(tmp, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps({"architecture": "imagebind", "arch": arch.model_dump()}, indent=2))


def build_tiny(directory: Path, spec: TinySpec) -> None:
    """Build the tiny random ImageBind for ``spec`` (seeded, global RNG untouched) and save it to ``directory``."""
    arch = ImageBindArch.tiny(**spec.arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = arch.build()
    write_encoder(directory, arch, model.state_dict())


def _skeleton(arch: ImageBindArch) -> nn.Module:
    """The model with parameters on the meta device: keys and shapes without 4.8 GB of random init for huge.

    ``with torch.device("meta")`` cannot be used: ImageBind calls ``.item()`` while building. Parameters are moved
    to meta as they are registered instead (what accelerate's ``init_empty_weights`` does, without its import cost).
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        return arch.build()
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _check_state_dict(state: Mapping[str, Any], model: nn.Module, source: Path) -> None:
    """Raise a ValueError naming the mismatches if ``state`` is not a full state_dict for ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if not (missing or unexpected or wrong):
        return
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    raise ValueError(f"{source}: not an ImageBind checkpoint for this architecture; " + "; ".join(problems))


def convert_checkpoint(src: Path, dst: Path, arch: ImageBindArch | None = None) -> Path:
    """Turn an official ``imagebind_huge.pth`` (or any ImageBind state_dict) into ``dst/{config.json,
    model.safetensors}``, which is all the encoder ever loads. Returns ``dst``."""
    arch = arch or ImageBindArch.huge()
    state = torch.load(src, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{src}: expected a state_dict (a mapping of tensors), got {type(state).__name__}")
    _check_state_dict(state, _skeleton(arch), src)
    write_encoder(dst, arch, state)
    log.info("converted %s -> %s (%d tensors)", src, dst, len(state))
    return dst


def _weights_digest(path: Path, state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the tensors (names, dtypes, shapes, bytes), memoised beside the file by size and mtime.

    Hashing contents rather than file bytes keeps the id (and the embedding cache) stable across re-serialisations
    of the same weights, e.g. a converted checkpoint; the memo means a multi-GB file is hashed once.
    """
    stat = path.stat()
    sidecar = path.with_name(path.name + ".sha256.json")
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        memo = json.loads(sidecar.read_text())
        if {k: memo.get(k) for k in key} == key and isinstance(memo.get("sha256"), str):
            return str(memo["sha256"])
    except (OSError, ValueError):
        pass
    hasher = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = hasher.hexdigest()
    try:
        sidecar.write_text(json.dumps({**key, "sha256": digest}))
    except OSError:  # read-only weights directory: hash again next time
        log.debug("cannot write %s", sidecar)
    return digest


def _read_arch(raw: bytes, where: Path) -> ImageBindArch:
    try:
        data = json.loads(raw)
        if data.get("architecture") != "imagebind":
            raise ValueError(f"architecture is {data.get('architecture')!r}, not 'imagebind'")
        return ImageBindArch.model_validate(data["arch"])
    except (ValueError, KeyError, AttributeError) as err:
        raise ValueError(f"{where}: not an anyverse ImageBind config ({err}); write one with "
                         "`anyverse convert imagebind`") from None


@dataclass
class EncoderOutput:
    """``pooled [B, D]``: ImageBind's output embedding (normalised, times the modality's logit scale as ImageBind
    returns it). ``tokens [B, N, Dt]``: trunk tokens after the head's layer norm, averaged over clips."""

    pooled: torch.Tensor
    tokens: torch.Tensor


def _head_norm(head: nn.Module) -> nn.Module:
    """The LayerNorm that opens every ImageBind head (text keeps it inside ``proj``)."""
    first = head.proj[0] if hasattr(head, "proj") else head[0]  # type: ignore[index]
    assert isinstance(first, nn.LayerNorm), f"unexpected ImageBind head {head}"
    return first


def encoder_dir(config: EncoderConfig) -> Path:
    """The directory holding ``config.json`` + ``model.safetensors``: built once if tiny, else it must exist."""
    target = expand(config.path) if config.path else "<dir>"
    how_to_get = (f"Download {CHECKPOINT_URL} (CC BY-NC-SA 4.0) and run "
                  f"`anyverse convert imagebind imagebind_huge.pth {target}`.")
    spec = config.tiny
    directory = component_dir("encoder", config, build=lambda d: build_tiny(d, spec or TinySpec()),
                              how_to_get=how_to_get)
    if not ((directory / CONFIG_FILE).is_file() and (directory / WEIGHTS_FILE).is_file()):
        raise MissingWeightsError([f"encoder: {directory} has no {CONFIG_FILE} + {WEIGHTS_FILE}. {how_to_get}"])
    return directory


def check_encoder_weights(config: EncoderConfig) -> None:
    """Raise MissingWeightsError for absent real weights without loading anything (tiny ones need no check)."""
    if config.tiny is None:
        encoder_dir(config)


class ImageBindEncoder:
    """A frozen ImageBind with preprocessing, batching and an optional embedding cache."""

    def __init__(self, model: nn.Module, arch: ImageBindArch, weights_id: str, batch_size: int = 8,
                 cache: EmbeddingCache | None = None, grey_view: bool = False, image_colour_view: str = "as_is"):
        self.model, self.arch, self.id, self.batch_size, self.cache = model, arch, weights_id, batch_size, cache
        self.grey_view = grey_view
        self._views = {Modality.IMAGE: (COLOUR_VIEWS[image_colour_view], pp.contrast_grey),
                       Modality.VIDEO: (_as_is, pp.contrast_grey)} if grey_view else {}
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.embed_dim = arch.out_embed_dim

    @classmethod
    def from_config(cls, config: EncoderConfig, device: torch.device, dtype: torch.dtype,
                    cache_dir: Path | None = None) -> ImageBindEncoder:
        """Load real weights from ``config.path`` or the tiny build; with ``cache_dir``, cache embeddings there."""
        directory = encoder_dir(config)
        config_file, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        raw = config_file.read_bytes()
        arch = _read_arch(raw, config_file)
        state = load_file(str(weights))
        model = _skeleton(arch)
        _check_state_dict(state, model, weights)
        model.load_state_dict(state, strict=True, assign=True)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        content = _weights_digest(weights, state)
        views = ("+grey-view" + ("" if config.image_colour_view == "as_is" else f"+{config.image_colour_view}-image")
                 if config.grey_view else "")  # the cache holds what encode returns
        digest = hashlib.sha256(raw + content.encode() + (PREPROCESS_VERSION + views).encode()).hexdigest()
        encoder_id = f"imagebind-{digest[:16]}"
        cache = EmbeddingCache(cache_dir, encoder_id) if cache_dir is not None else None
        log.info("ImageBind encoder %s from %s on %s/%s", encoder_id, directory, device, dtype)
        return cls(model, arch, encoder_id, config.batch_size, cache, config.grey_view, config.image_colour_view)

    def views(self, modality: Modality) -> int:
        """How many views :meth:`encode` concatenates for ``modality``: 2 for images and videos with ``grey_view``."""
        return len(self._views.get(modality, (_as_is,)))

    def token_dim(self, modality: Modality) -> int:
        """Width ``Dt`` of :attr:`EncoderOutput.tokens` for ``modality``."""
        return int(getattr(self.arch, f"{TOWER[modality]}_embed_dim"))

    def patch_grid(self, modality: Modality) -> tuple[int, int, int]:
        """``(frames, rows, cols)`` of the patch tokens after the CLS, read from the modality's patch stem: one frame
        of 16x16 for 224 px images with 2x14x14 patches (a video clip's two with a 1-frame kernel), 12 frequency x
        19 time rows for audio's 128x204 log-mel."""
        m: Any = self.model
        pre = m.modality_preprocessors[TOWER[modality]]
        stem = pre.rgbt_stem or pre.depth_stem
        conv = next(c for c in stem.modules() if isinstance(c, nn.Conv2d | nn.Conv3d))
        size = [self.arch.audio_num_mel_bins, self.arch.audio_target_len] if modality is Modality.AUDIO else [
            pp.IMAGE_SIZE, pp.IMAGE_SIZE]
        if isinstance(conv, nn.Conv3d):  # vision: a clip's frames are a third axis, an image's repeated by the stem
            size = [self.arch.video_frames if modality is Modality.VIDEO else stem.proj[0].ntimes, *size]
        grid = [(n - k) // s + 1 for n, k, s in zip(size, conv.kernel_size, conv.stride, strict=True)]
        frames, rows, cols = [1] * (3 - len(grid)) + grid
        return frames, rows, cols

    def forward_tokens(self, key: str, x: torch.Tensor) -> _Pair:
        """One modality through ImageBindModel's own parts, as its ``forward`` does, also returning tokens."""
        if x.ndim >= 5 and bool((x == x[:, :1]).all()):  # media no longer than a clip: all clips the same, one runs
            x = x[:, :1]
        clips = x.shape[:2] if x.ndim >= 5 else None  # audio and video carry a clip axis
        if clips is not None:
            x = x.flatten(0, 1)
        m: Any = self.model  # ModuleDicts of ImageBind parts, untyped upstream
        inputs = m.modality_preprocessors[key](**{key: x})
        trunk = m.modality_trunks[key](**inputs["trunk"])
        head = m.modality_heads[key]
        pooled = m.modality_postprocessors[key](head(trunk, **inputs["head"]))
        tokens = _head_norm(head)(trunk)
        if clips is not None:
            pooled = pooled.reshape(*clips, -1).mean(dim=1)
            tokens = tokens.reshape(*clips, *tokens.shape[1:]).mean(dim=1)
        return pooled, tokens

    def forward_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings of token ids ``[B, 77]``, the trunk run only up to the longest text's end token: the text
        tower is causal, so the padding after it changes no embedding, and it is most of a short caption's cost."""
        m: Any = self.model
        inputs = m.modality_preprocessors["text"](text=ids)
        length = int(inputs["head"]["seq_len"].max()) + 1
        trunk = m.modality_trunks["text"](**{**inputs["trunk"], "tokens": inputs["trunk"]["tokens"][:, :length],
                                            "attn_mask": inputs["trunk"]["attn_mask"][:length, :length]})
        return m.modality_postprocessors["text"](m.modality_heads["text"](trunk, **inputs["head"]))

    def _run(self, key: str, inputs: list[Any], prepare: Callable[[Any], torch.Tensor],
             views: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (_as_is,)) -> list[_Pair]:
        """Prepare and encode ``inputs`` in batches, each input prepared once and encoded in every view (a batch's
        forward per view); returns per-item (pooled, tokens), the views concatenated, as ordinary tensors."""
        results: list[_Pair] = []
        for start in range(0, len(inputs), self.batch_size):
            prepared = [prepare(item) for item in inputs[start : start + self.batch_size]]
            encoded = []
            for view in views:
                batch = torch.stack([view(x) for x in prepared])
                with torch.inference_mode():
                    encoded.append(self.forward_tokens(key, batch.to(
                        self.device, self.dtype if batch.is_floating_point() else batch.dtype)))
            # copied outside inference mode: inference tensors cannot be saved for backward by trainable projectors
            results.extend((torch.cat([pooled[i] for pooled, _ in encoded]),
                            torch.cat([tokens[i] for _, tokens in encoded])) for i in range(len(prepared)))
        return results

    def preprocess(self, item: Media, caps: Caps) -> torch.Tensor:
        from anyverse import media

        if item.modality is Modality.IMAGE:
            return pp.image_tensor(media.decode_image(item, caps))
        if item.modality in (Modality.DEPTH, Modality.THERMAL):
            return pp.gray_tensor(media.decode_gray(item, caps))
        if item.modality is Modality.AUDIO:
            clips = media.decode_audio_clips(item, caps, pp.AUDIO_CLIPS, pp.AUDIO_CLIP_SECONDS, pp.SAMPLE_RATE)
            return pp.audio_tensor(clips, self.arch.audio_num_mel_bins, self.arch.audio_target_len)
        # frames come scaled (area filter) to a 224 px short side: 1/40 of the pixels of 4K, and antialiased
        clips = media.decode_video_clips(item, caps, pp.VIDEO_CLIPS, self.arch.video_frames, pp.VIDEO_CLIP_SECONDS,
                                         max_side=pp.IMAGE_SIZE)
        return pp.video_tensor(clips)

    def encode(self, items: list[Media], caps: Caps) -> EncoderOutput:
        """Encode media of one modality (image, audio, video, depth or thermal); cached items are not decoded. With
        ``grey_view``, an image's or video's pooled and tokens are its colour view's (an image's as it is or, with
        ``image_colour_view: flat``, :func:`pp.flat_colour`), then its :func:`pp.contrast_grey` view's."""
        modalities = {item.modality for item in items}
        if len(modalities) != 1 or not modalities <= set(_MEDIA_MODALITIES):
            raise ValueError(f"encode() takes a non-empty list of one modality among "
                             f"{[m.value for m in _MEDIA_MODALITIES]}; got {sorted(m.value for m in modalities)}"
                             " (use encode_text for text)")
        found: dict[str, _Pair] = {}
        if self.cache is not None:
            for sha in dict.fromkeys(item.sha256 for item in items):
                hit = self.cache.get(sha)
                if hit is not None:
                    found[sha] = hit
        todo = list({item.sha256: item for item in items if item.sha256 not in found}.values())
        results = self._run(TOWER[todo[0].modality], todo, lambda item: self.preprocess(item, caps),
                            self._views.get(todo[0].modality, (_as_is,))) if todo else []
        for item, (pooled, tokens) in zip(todo, results, strict=True):
            found[item.sha256] = (pooled, tokens)
            if self.cache is not None:
                self.cache.put(item.sha256, pooled, tokens)
        return self._stack([found[item.sha256] for item in items])

    def encode_text(self, texts: list[str]) -> EncoderOutput:
        """Encode strings (CLIP BPE, cut to 75 tokens); tokens cover all 77 positions, padding included."""
        if not texts:
            raise ValueError("encode_text() needs at least one string")
        ids = pp.text_tokens(texts)
        return self._stack(self._run("text", list(ids), lambda row: row))

    def _stack(self, pairs: list[_Pair]) -> EncoderOutput:
        pooled = torch.stack([p for p, _ in pairs]).to(self.device, self.dtype)
        tokens = torch.stack([t for _, t in pairs]).to(self.device, self.dtype)
        return EncoderOutput(pooled=pooled, tokens=tokens)
