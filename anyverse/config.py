"""One config schema for the whole system, its named profiles, and where weights live.

Every model field is ``extra="forbid"`` so a typo fails at load time, not halfway through a run.
Profiles are YAML files in ``anyverse/profiles``; ``load_config`` applies dotted overrides on top.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from anyverse.types import OUTPUT_MODALITIES, Modality

GENERATOR_NAME = r"[a-z0-9][a-z0-9_-]{0,63}"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Caps(Strict):
    """Hard limits on what input is decoded at all. Larger-but-sane media is resized or sampled, not refused."""

    max_file_bytes: int = Field(default=2 * 1024**3, gt=0)
    max_image_pixels: int = Field(default=100_000_000, gt=0, description="beyond this an image is a bomb")
    image_side: int = Field(default=1024, gt=0, description="larger images are downscaled to this side")
    max_audio_seconds: float = Field(default=4 * 3600, gt=0)
    max_video_seconds: float = Field(default=4 * 3600, gt=0)
    max_video_frames: int = Field(default=1_000_000, gt=0, description="frames declared by the container")
    max_video_pixels: int = Field(default=8192 * 8192, gt=0, description="per frame")
    max_text_chars: int = Field(default=32_000, gt=0)
    max_attachments: int = Field(default=16, gt=0)
    allowed_roots: list[Path] | None = Field(
        default=None,
        description="directories media may resolve into; None allows a named file's own directory only",
    )


class TinySpec(Strict):
    """Marks a component as built from a small config with random weights (the tiny profile).

    ``arch`` holds architecture overrides for the component's builder; the built weights are saved to the
    cache and loaded back through the same ``from_pretrained`` path real weights use.
    """

    seed: int = 0
    arch: dict[str, Any] = Field(default_factory=dict)


class Component(Strict):
    """A model part loaded from ``path`` (local dir or hub id in the HF cache), or built tiny."""

    path: str | None = None
    tiny: TinySpec | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Component:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of 'path' (real weights) or 'tiny' (random tiny weights)")
        return self


class EncoderConfig(Component):
    kind: Literal["imagebind"] = "imagebind"
    batch_size: int = Field(default=8, gt=0)
    grey_view: bool = Field(default=False, description="images and videos are encoded twice, in colour and in "
                            "contrast-stretched grey (shape without colour); pooled and tokens hold both views")
    image_colour_view: Literal["as_is", "flat"] = Field(default="as_is", description="grey_view: an image's colour "
                                                        "view is the image as it is, or filled with the colour of "
                                                        "what stands out in it (colour without shape)")

    @model_validator(mode="after")
    def _flat_colour_beside_grey(self) -> EncoderConfig:
        if self.image_colour_view != "as_is" and not self.grey_view:
            raise ValueError(f"image_colour_view: {self.image_colour_view} leaves shape to the grey view "
                             "(set grey_view: true)")
        return self


class InputProjectorConfig(Strict):
    kind: Literal["linear", "mlp", "resampler", "grid"] = "mlp"
    num_tokens: int = Field(default=1, gt=0, le=256)
    hidden_dim: int | None = Field(default=None, ge=0, description="mlp/resampler/grid width; default LLM width; "
                                   "grid: 0 reads the cells linearly")
    grid: int = Field(default=4, gt=0, le=16, description="grid: patch tokens are average-pooled to grid x grid cells")
    words: bool = Field(default=False, description="each soft token is a mixture of the LLM's input embeddings, "
                        "weighted by a softmax over the vocabulary: media are written in the LLM's own words")
    hard_words: bool = Field(default=False, description="words: each soft token is its highest-scoring word's "
                             "embedding, what the LLM reads in text; gradients pass through the mixture")
    layers: int = Field(default=1, gt=0, description="resampler cross-attention layers")
    heads: int = Field(default=4, gt=0)

    @model_validator(mode="after")
    def _linear_only_for_grid(self) -> InputProjectorConfig:
        if self.hidden_dim == 0 and self.kind != "grid":
            raise ValueError(f"hidden_dim: 0 (a linear readout) is for grid projectors; for {self.kind}, "
                             "use kind: linear or a width")
        if self.hard_words and not self.words:
            raise ValueError("hard_words: true is for projectors that write words (set words: true)")
        return self


class OutputProjectorConfig(Strict):
    kind: Literal["query", "textfc"] = Field(
        default="query", description="query: anyverse's standardised query decoder; textfc: NExT-GPT's TextFcLayer")
    linear_rank: int = Field(default=0, ge=0, description="rank of a linear path beside the transformer; 0: none")
    d_model: int = Field(default=512, gt=0)
    encoder_layers: int = Field(default=2, ge=0)
    decoder_layers: int = Field(default=2, gt=0)
    heads: int = Field(default=4, gt=0)
    feedforward: int = Field(default=2048, gt=0)


class LoraConfigSpec(Strict):
    r: int = Field(default=32, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class LLMConfig(Component):
    adapter: str | None = Field(default=None, description="peft LoRA adapter dir to load on top")
    lora: LoraConfigSpec = Field(default_factory=LoraConfigSpec)
    max_new_tokens: int = Field(default=256, gt=0)
    max_context_tokens: int = Field(default=4096, gt=0)
    temperature: float = Field(default=0.7, ge=0.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    system_prompt: str = Field(default="v1", description="version folder under prompts/")
    prompt_format: Literal["chat", "nextgpt"] = Field(
        default="chat", description="chat: the tokenizer's chat template with anyverse's markers; nextgpt: NExT-GPT's "
        "Vicuna v0 prompt and added tokens (see anyverse/nextgpt.py)")
    added_tokens: str | None = Field(default=None, description="nextgpt: the converted checkpoint's added_tokens.json")

    @model_validator(mode="after")
    def _nextgpt_tokens(self) -> LLMConfig:
        if (self.prompt_format == "nextgpt") != (self.added_tokens is not None):
            raise ValueError("llm.added_tokens is set exactly when llm.prompt_format is nextgpt")
        return self


class OutputConfig(Strict):
    """How the LLM asks for media: JSON meta-responses (ModaVerse) or signal tokens (NExT-GPT)."""

    mode: Literal["meta", "signal"] = "meta"
    signal_tokens: dict[Modality, int] = Field(
        default_factory=lambda: {Modality.IMAGE: 4, Modality.VIDEO: 24, Modality.AUDIO: 8}
    )
    constrained: Literal["auto", "xgrammar", "none"] = "auto"
    retries: int = Field(default=2, ge=0, le=10, description="re-asks when a meta-response is malformed")
    max_prompt_chars: int = Field(default=400, gt=0)
    max_requests: int = Field(default=4, gt=0, description="media requests honoured per reply")
    name_generators: bool = Field(
        default=False, description="meta mode: the system prompt lists the configured generators and a request may "
                                   "name one; off keeps the prompt and schema a model was trained with")

    @model_validator(mode="after")
    def _outputs_only(self) -> OutputConfig:
        bad = [m.value for m in self.signal_tokens if m not in OUTPUT_MODALITIES]
        if bad:
            raise ValueError(f"signal_tokens: {bad} cannot be generated; use image, video or audio")
        if any(n <= 0 for n in self.signal_tokens.values()):
            raise ValueError("signal_tokens: counts must be positive")
        return self


class GeneratorConfig(Component):
    plugin: str | None = Field(default=None, description="registered plugin name; default: the entry's name")
    options: dict[str, Any] = Field(default_factory=dict, description="defaults, validated by the plugin")
    max_options: dict[str, float] = Field(default_factory=dict, description="upper bounds on what a request (the "
                                          "model's or a user's) may set, e.g. {seconds: 10}; a larger value is lowered")
    offload: bool = Field(default=False, description="diffusers model CPU offload (accelerators only)")


class RuntimeConfig(Strict):
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    generator_memory_gb: float = Field(default=24.0, gt=0, description="loaded generators beyond this unload LRU")
    threads: int | None = Field(default=None, gt=0, description="torch CPU threads; None keeps torch's default")


class AnyverseConfig(Strict):
    profile: str = "custom"
    encoder: EncoderConfig
    input_projectors: dict[Modality, InputProjectorConfig] = Field(default_factory=dict)
    default_input_projector: InputProjectorConfig = Field(default_factory=InputProjectorConfig)
    output_projector: OutputProjectorConfig = Field(default_factory=OutputProjectorConfig)
    projector_weights: str | None = Field(default=None, description="safetensors file with trained projectors")
    llm: LLMConfig
    output: OutputConfig = Field(default_factory=OutputConfig)
    generators: dict[str, GeneratorConfig] = Field(
        description="name -> generator; a request or --generator picks one by this name (or its plugin's). The "
                    "old form, keyed by modality, still loads: such an entry is that modality's default.")
    generator_defaults: dict[Modality, dict[str, str]] = Field(
        default_factory=dict, description="modality -> capability -> generator name, e.g. image: {edit: pix2pix}; "
                                          "unset ones fall back to the first configured generator that can")
    caps: Caps = Field(default_factory=Caps)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _generators_are_named(self) -> AnyverseConfig:
        for name, entry in self.generators.items():
            if not re.fullmatch(GENERATOR_NAME, name):
                raise ValueError(f"generators.{name}: a name is lower-case letters, digits, '-' or '_'")
            if entry.plugin is None:
                entry.plugin = name
        bad = [m.value for m in self.generator_defaults if m not in OUTPUT_MODALITIES]
        if bad:
            raise ValueError(f"generator_defaults: no generator can produce {bad}")
        for modality, chosen in self.generator_defaults.items():
            for capability, name in chosen.items():
                if name not in self.generators:
                    raise ValueError(f"generator_defaults.{modality.value}.{capability}: {name!r} is not configured "
                                     f"under generators (configured: {', '.join(self.generators)})")
        if self.llm.prompt_format == "nextgpt" and self.output.mode != "signal":
            raise ValueError("llm.prompt_format nextgpt asks for media with signal tokens; set output.mode: signal")
        return self

    def input_projector(self, modality: Modality) -> InputProjectorConfig:
        return self.input_projectors.get(modality, self.default_input_projector)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> str:
        """Short hash of the resolved config: records name it instead of repeating the whole config."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def anyverse_home() -> Path:
    """Root for caches and tiny weights: ``$ANYVERSE_HOME`` or ``~/.cache/anyverse``."""
    return Path(os.environ.get("ANYVERSE_HOME", Path.home() / ".cache" / "anyverse")).expanduser()


def tiny_dir(component: str, spec: TinySpec, extra: dict[str, Any] | None = None) -> Path:
    """Cache directory of a tiny component, keyed by everything that shapes its weights."""
    key = json.dumps({"spec": spec.model_dump(), "extra": extra or {}}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return anyverse_home() / "tiny" / f"{component}-{digest}"


def profile_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("anyverse.profiles").iterdir()
                  if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    return data


def _apply_override(data: dict[str, Any], override: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to nested dicts."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key.path=value")
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[last] = yaml.safe_load(raw)


class ConfigError(ValueError):
    """A config that cannot be used; the message says which file or key and why."""


def validation_error(where: str, err: ValueError) -> ConfigError:
    """One line naming each bad key, instead of pydantic's multi-line report."""
    if isinstance(err, ValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                             for e in err.errors())
        return ConfigError(f"{where}: {problems}")
    return ConfigError(f"{where}: {err}")


def load_config(profile_or_file: str | Path = "tiny", overrides: list[str] | None = None) -> AnyverseConfig:
    """Load a named profile or a YAML/JSON file, apply ``key.path=value`` overrides, validate."""
    path = Path(profile_or_file)
    if path.suffix in {".yaml", ".yml", ".json"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        data = _read_yaml(path.read_text(), str(path))
        where = str(path)
    else:
        name = str(profile_or_file)
        resource = resources.files("anyverse.profiles") / f"{name}.yaml"
        if not resource.is_file():
            raise ConfigError(f"unknown profile {name!r}; known: {', '.join(profile_names())}")
        data = _read_yaml(resource.read_text(), f"profile {name}")
        data.setdefault("profile", name)
        where = f"profile {name}"
    for override in overrides or []:
        _apply_override(data, override)
    try:
        return AnyverseConfig.model_validate(data)
    except ValueError as err:
        raise validation_error(where, err) from None
