"""Generator plugins: the protocol every image/video/audio generator implements, discovery, and a lazy LRU pool.

Built-in generators are found exactly like third-party ones: through the ``anyverse.generators`` entry-point group
(see pyproject.toml). ``register_generator`` adds classes programmatically (tests, notebooks). ``DiffusersRuntime``
holds what the diffusers-backed built-ins share; they use it by composition through the ``DiffusersGenerator`` base,
and third-party plugins may too. ``Denoiser`` is the optional part of a generator that decoder alignment's denoising
loss needs.
"""

from __future__ import annotations

import functools
import gc
import importlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from anyverse.config import GeneratorConfig, TinySpec
from anyverse.types import GenerationOptions, Media, MediaRequest, Modality
from anyverse.weights import collect_missing, component_dir

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "anyverse.generators"


@dataclass(frozen=True, eq=False)  # arrays compare element-wise, so equality is identity
class GeneratedMedia:
    """Decoded output of a generator. Image float32 [H,W,3] in [0,1]; video [F,H,W,3] in [0,1]; audio [N] in [-1,1]."""

    modality: Modality
    data: np.ndarray
    sample_rate: int | None = None
    fps: int | None = None


@runtime_checkable
class Generator(Protocol):
    """What a generator plugin implements. Construction is cheap and validates options; weights load lazily.

    Optional: ``denoising_loss`` (see ``Denoiser``), for training output projectors through the generator itself.
    It is a protocol of its own so that ``isinstance(x, Generator)`` still holds for plugins without it.
    """

    name: ClassVar[str]
    modality: ClassVar[Modality]
    Options: ClassVar[type[GenerationOptions]]
    accepts_source: ClassVar[frozenset[Modality]]

    def __init__(self, config: GeneratorConfig, device: torch.device, dtype: torch.dtype) -> None: ...

    @property
    def loaded(self) -> bool: ...

    def check_weights(self) -> None:
        """Raise MissingWeightsError when real weights are absent, without loading them."""
        ...

    def conditioning_spec(self) -> dict[str, tuple[int, ...]]:
        """Tensors accepted instead of a text prompt, name -> (sequence length, width), from saved configs."""
        ...

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def memory_bytes(self) -> int:
        """Parameter and buffer bytes when loaded; an estimate from the weight files otherwise."""
        ...

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The generator's own text conditioning, [B, *spec] per name: targets for aligning an output projector."""
        ...

    def generate(self, request: MediaRequest, source: GeneratedMedia | None = None) -> GeneratedMedia: ...


@runtime_checkable
class Denoiser(Protocol):
    """The optional generator method behind decoder alignment's ``loss.denoise`` (NExT-GPT / GILL style)."""

    def denoising_loss(self, conditioning: dict[str, torch.Tensor], media: list[Media]) -> torch.Tensor:
        """The diffusion training loss of the frozen generator on ``media`` (one per batch row), conditioned on
        ``conditioning`` (``encode_prompts``' names and shapes); a scalar whose gradient reaches only
        ``conditioning``."""
        ...


# ---------------------------------------------------------------- registry

_registered: dict[str, type[Generator]] = {}


GeneratorT = TypeVar("GeneratorT", bound=type[Generator])


def register_generator(cls: GeneratorT) -> GeneratorT:
    """Register a generator class under ``cls.name``; usable as a decorator. Overrides an entry point of that name."""
    _registered[cls.name] = cls
    return cls


@functools.cache
def _entry_point_generators() -> dict[str, type[Generator]]:
    """Load every entry point once. A plugin that fails to import is skipped with a warning, never fatal."""
    found: dict[str, type[Generator]] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = point.load()
        except Exception as err:  # a broken third-party plugin must not take the others down
            log.warning("skipping generator plugin %r (%s): %s: %s", point.name, point.value, type(err).__name__, err)
            continue
        if getattr(cls, "name", None) != point.name or not isinstance(getattr(cls, "modality", None), Modality):
            why = f"its class needs name = {point.name!r} and a Modality"
            log.warning("skipping generator plugin %r (%s): %s", point.name, point.value, why)
            continue
        found[point.name] = cls
    return found


def available_generators() -> dict[str, type[Generator]]:
    """Generator classes by name: entry points plus ``register_generator`` ones."""
    return {**_entry_point_generators(), **_registered}


def get_generator_class(name: str) -> type[Generator]:
    known = available_generators()
    if name not in known:
        raise ValueError(f"unknown generator plugin {name!r}; known: {', '.join(sorted(known)) or 'none'}")
    return known[name]


# ---------------------------------------------------------------- helpers for plugin authors

OptionsT = TypeVar("OptionsT", bound=GenerationOptions)


def validate_options(options: type[OptionsT], values: Mapping[str, Any], plugin: str) -> OptionsT:
    """Validate option values, naming the plugin and the offending fields (a bad config fails at startup)."""
    try:
        return options.model_validate(dict(values))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in err.errors())
        raise ValueError(f"generator {plugin!r} options: {problems}") from None


def check_source(generator: Generator, source: GeneratedMedia | None) -> None:
    """Refuse a source media item the generator cannot edit or vary."""
    if source is not None and source.modality not in generator.accepts_source:
        accepted = ", ".join(sorted(m.value for m in generator.accepts_source)) or "nothing"
        raise ValueError(f"{generator.name} cannot edit {source.modality.value} media (it accepts: {accepted})")


def check_conditioning(
    conditioning: Mapping[str, Any], spec: Mapping[str, tuple[int, ...]], plugin: str
) -> dict[str, torch.Tensor]:
    """Conditioning must hold exactly the spec's names, each a tensor of shape (1, length, width)."""
    expected = {name: (1, *shape) for name, shape in spec.items()}
    if set(conditioning) != set(expected):
        wanted = ", ".join(f"{name} {shape}" for name, shape in expected.items())
        raise ValueError(f"{plugin}: conditioning needs exactly {wanted}; got names {sorted(conditioning)}")
    for name, tensor in conditioning.items():
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        if shape != expected[name]:
            raise ValueError(
                f"{plugin}: conditioning {name!r} must have shape {expected[name]} (batch of 1, then the "
                f"generator's conditioning_spec), got {shape}"
            )
    return dict(conditioning)


def tiny_arch(plugin: str, defaults: Mapping[str, Any], spec: TinySpec) -> dict[str, Any]:
    """A tiny builder's sizes: its defaults overridden by ``tiny.arch``, refusing unknown keys."""
    unknown = sorted(set(spec.arch) - set(defaults))
    if unknown:
        raise ValueError(f"{plugin}: unknown tiny.arch keys {unknown}; known: {sorted(defaults)}")
    return {**defaults, **spec.arch}


class DiffusionOptions(GenerationOptions):
    """Uniform options plus what every diffusers text-conditioned pipeline understands."""

    negative_prompt: str | None = None


DiffusionOptionsT = TypeVar("DiffusionOptionsT", bound=DiffusionOptions)


class DiffusersRuntime(Generic[DiffusionOptionsT]):
    """What the diffusers-backed generators share, used by composition: locating or building their weights, reading
    saved configs, loading onto the device, and turning uniform options and conditioning into pipeline arguments."""

    def __init__(
        self,
        generator: type[Generator],
        config: GeneratorConfig,
        device: torch.device,
        dtype: torch.dtype,
        *,
        options: type[DiffusionOptionsT],
        pipeline_class: str,
        build_tiny: Callable[[Path, TinySpec], None],
        usual_weights: str,
    ):
        self.plugin = generator.name
        self.modality = generator.modality
        self.config = config
        self.device = device
        self.dtype = dtype
        self.options_class = options
        self.defaults = validate_options(options, config.options, self.plugin)
        self.pipe: Any = None
        self._noise_scheduler: Any = None
        self._pipeline_class = pipeline_class
        self._build_tiny = build_tiny
        self._usual_weights = usual_weights
        self._directory: Path | None = None

    # -- weights and saved configs

    def directory(self) -> Path:
        """The pipeline folder: tiny weights are built on first use, real ones must already be local."""
        if self._directory is None:
            self._directory = component_dir(self.plugin, self.config, self._build, self._how_to_get())
        return self._directory

    def _build(self, directory: Path) -> None:
        assert self.config.tiny is not None
        self._build_tiny(directory, self.config.tiny)

    def _how_to_get(self) -> str:
        path = self.config.path or ""
        hub_id = path.count("/") == 1 and not path.startswith(("/", ".", "~", "$"))
        return (
            f"Run `hf download {path if hub_id else self._usual_weights}` (on a machine with internet; copy its HF "
            f"cache here if that is another machine), or set generators.{self.modality.value}.path to a local copy."
        )

    def check_weights(self) -> None:
        if self.config.tiny is None:
            self.directory()

    def config_int(self, *sources: tuple[str, str]) -> int:
        """The first usable (finite, positive) integer among ``(file, key)`` pairs of the saved pipeline configs."""
        for relative, key in sources:
            path = self.directory() / relative
            value = json.loads(path.read_text()).get(key) if path.is_file() else None
            if isinstance(value, int) and 0 < value < 1_000_000:
                return value
        tried = ", ".join(f"{relative}:{key}" for relative, key in sources)
        raise ValueError(f"{self.plugin}: no usable value in {self.directory()} for any of {tried}")

    # -- loading

    @property
    def loaded(self) -> bool:
        return self.pipe is not None

    def load(self) -> None:
        if self.pipe is not None:
            return
        start = time.perf_counter()
        diffusers = importlib.import_module("diffusers")
        if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):  # diffusers has no env knob of its own; honour HF's
            diffusers.utils.logging.disable_progress_bar()
        pipe = getattr(diffusers, self._pipeline_class).from_pretrained(self.directory(), dtype=self.dtype)
        if self.config.offload and self.device.type == "cuda":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            if self.config.offload:
                log.info("%s: offload only applies to CUDA; loading onto %s", self.plugin, self.device)
            pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        log.info("loaded %s from %s in %.1f s", self.plugin, self.directory(), time.perf_counter() - start)

    def unload(self) -> None:
        if self.pipe is None:
            return
        self.pipe = self._noise_scheduler = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("unloaded %s", self.plugin)

    def pipeline(self) -> Any:
        self.load()
        return self.pipe

    @property
    def execution_device(self) -> torch.device:
        """Where inputs go: the device, or the accelerator the offload hooks run on."""
        return self.pipeline()._execution_device

    def memory_bytes(self) -> int:
        if self.pipe is None:  # variant copies (model.fp16.safetensors) are not what from_pretrained loads
            files = self.directory().rglob("*.safetensors")
            return sum(f.stat().st_size for f in files if len(f.name.split(".")) == 2)
        seen: dict[int, int] = {}
        for part in self.pipe.components.values():
            if isinstance(part, torch.nn.Module):
                for t in (*part.parameters(), *part.buffers()):
                    seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    # -- one call

    def options(self, request: MediaRequest) -> DiffusionOptionsT:
        """Config defaults overridden by the request's options that are set; validated again."""
        values = {**self.defaults.model_dump(exclude_none=True), **request.options.model_dump(exclude_none=True)}
        return validate_options(self.options_class, values, self.plugin)

    def call_kwargs(
        self, generator: Generator, request: MediaRequest, options: DiffusionOptionsT, **extra: Any
    ) -> dict[str, Any]:
        """Pipeline keyword arguments: the prompt, or the request's conditioning (which wins) with negatives from the
        generator's own encoders for classifier-free guidance; seed, steps, guidance, numpy output and ``extra``.
        Options left unset are not passed, so the pipeline's own defaults apply."""
        pipe = self.pipeline()
        guidance = options.guidance
        if guidance is None:
            guidance = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
        kwargs: dict[str, Any] = {
            "num_inference_steps": options.steps,
            "guidance_scale": guidance,
            "generator": _rng(options.seed, self.plugin),
            "output_type": "np",
            **extra,
        }
        if request.conditioning is not None:
            checked = check_conditioning(request.conditioning, generator.conditioning_spec(), self.plugin)
            device = self.execution_device
            kwargs |= {name: tensor.to(device=device, dtype=self.dtype) for name, tensor in checked.items()}
            if guidance > 1:
                negatives = generator.encode_prompts([options.negative_prompt or ""])
                kwargs |= {f"negative_{name}": tensor for name, tensor in negatives.items()}
        elif request.prompt:
            kwargs |= {"prompt": request.prompt, "negative_prompt": options.negative_prompt}
        else:
            raise ValueError(f"{self.plugin}: the request has neither a prompt nor conditioning tensors")
        return {name: value for name, value in kwargs.items() if value is not None}

    # -- training through the frozen generator

    def vae_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents of VAE input [N, C, H, W] (already in the VAE's range), as the pipeline's latents are
        before it decodes them. The posterior sample uses the global CPU RNG, which checkpoints save, so a resumed
        run draws the same; no graph is kept (the VAE is frozen)."""
        vae = self.pipeline().vae
        with torch.no_grad():
            posterior = vae.encode(pixels.to(self.execution_device, self.dtype)).latent_dist
            noise = torch.randn(posterior.mean.shape).to(posterior.mean)
            return (posterior.mean + posterior.std * noise) * vae.config.scaling_factor

    def denoising_loss(self, latents: torch.Tensor, **conditioning: torch.Tensor) -> torch.Tensor:
        """Standard diffusion training loss: noise ``latents`` at timesteps drawn uniformly over the schedule's
        training range, let the frozen UNet predict from them with ``conditioning`` as its keyword arguments, and
        return the MSE to the target its ``prediction_type`` names. Gradients reach only ``conditioning``."""
        rows = {name: value.shape[0] for name, value in conditioning.items()}
        if set(rows.values()) != {latents.shape[0]}:
            raise ValueError(f"{self.plugin}: conditioning needs one row per media item ({latents.shape[0]}); got "
                             f"{rows}")
        pipe = self.pipeline()
        pipe.unet.requires_grad_(False)  # it is frozen: the backward pass must not fill (and keep) its .grad
        scheduler = self.noise_scheduler()
        device = latents.device
        steps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).to(device)
        noise = torch.randn(latents.shape).to(latents)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = scheduler.get_velocity(latents, noise, steps)
        elif kind == "sample":
            target = latents
        else:
            raise ValueError(f"{self.plugin}: cannot train against prediction_type {kind!r}")
        inputs = {name: value.to(device, self.dtype if value.is_floating_point() else value.dtype)
                  for name, value in conditioning.items()}
        prediction = pipe.unet(scheduler.add_noise(latents, noise, steps), steps, **inputs, return_dict=False)[0]
        return F.mse_loss(prediction.float(), target.float())

    def noise_scheduler(self) -> Any:
        """A DDPM scheduler on the pipeline scheduler's config (betas, training steps, prediction type), as diffusers'
        training scripts use: it adds noise at any training timestep, which inference-only schedulers may not."""
        if self._noise_scheduler is None:
            from diffusers import DDPMScheduler

            self._noise_scheduler = DDPMScheduler.from_config(self.pipeline().scheduler.config)
        return self._noise_scheduler


class DiffusersGenerator(Generator, Generic[DiffusionOptionsT]):
    """Base for generators built on a ``DiffusersRuntime``: their ``__init__`` sets ``_runtime``, this delegates the
    lifecycle methods to it, and they add ``conditioning_spec``, ``encode_prompts`` and ``generate``."""

    accepts_source: ClassVar[frozenset[Modality]] = frozenset()
    _runtime: DiffusersRuntime[DiffusionOptionsT]

    @property
    def loaded(self) -> bool:
        return self._runtime.loaded

    def check_weights(self) -> None:
        self._runtime.check_weights()

    def load(self) -> None:
        self._runtime.load()

    def unload(self) -> None:
        self._runtime.unload()

    def memory_bytes(self) -> int:
        return self._runtime.memory_bytes()


def _rng(seed: int | None, plugin: str) -> torch.Generator:
    """A CPU generator, so a seed gives the same noise on every device; no seed draws (and logs) a fresh one."""
    rng = torch.Generator(device="cpu")
    if seed is None:
        log.debug("%s: random seed %d", plugin, rng.seed())
    else:
        rng.manual_seed(seed)
    return rng


# ---------------------------------------------------------------- pool


class GeneratorPool:
    """One generator per output modality, loaded on first use; loading one unloads the least recently used others
    until the loaded total fits ``memory_budget_gb`` (the one just requested always stays)."""

    def __init__(
        self, configs: Mapping[Modality, GeneratorConfig], device: torch.device, dtype: torch.dtype,
        memory_budget_gb: float,
    ):
        self._generators: dict[Modality, Generator] = {}
        for modality, config in configs.items():
            cls = get_generator_class(config.plugin)
            if cls.modality != modality:
                raise ValueError(
                    f"generators.{modality.value}: plugin {config.plugin!r} makes {cls.modality.value}, not "
                    f"{modality.value}"
                )
            self._generators[modality] = cls(config, device, dtype)
        self.budget_bytes = int(memory_budget_gb * 1024**3)
        self._use_order: list[Modality] = []  # least recently used first

    def __contains__(self, modality: object) -> bool:
        return modality in self._generators

    def get(self, modality: Modality) -> Generator:
        """The generator for ``modality``, loaded; may unload others to stay within the budget."""
        generator = self._generators.get(modality)
        if generator is None:
            raise ValueError(f"no generator configured for {Modality(modality).value}")
        if modality in self._use_order:
            self._use_order.remove(modality)
        self._use_order.append(modality)
        if not generator.loaded:
            generator.load()
            self._fit_budget(keep=modality)
        return generator

    def _fit_budget(self, keep: Modality) -> None:
        for modality in list(self._use_order):
            total = sum(g.memory_bytes() for g in self._generators.values() if g.loaded)
            if total <= self.budget_bytes:
                return
            generator = self._generators[modality]
            if modality != keep and generator.loaded:
                log.info("unloading %s to stay within %.2f GB", generator.name, self.budget_bytes / 1024**3)
                generator.unload()

    def loaded(self) -> list[str]:
        """Names of the loaded generators, least recently used first."""
        return [self._generators[m].name for m in self._use_order if self._generators[m].loaded]

    def check_weights(self) -> None:
        """Raise one MissingWeightsError listing every generator whose real weights are absent."""
        collect_missing([g.check_weights for g in self._generators.values()])

    def conditioning_specs(self) -> dict[Modality, dict[str, tuple[int, ...]]]:
        return {modality: g.conditioning_spec() for modality, g in self._generators.items()}
