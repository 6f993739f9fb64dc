"""Generator plugins: the contract a plugin author reads, the registry, and the small helpers plugins use.

A plugin is a class registered under the ``anyverse.generators`` entry-point group (built-ins are registered the
same way, see pyproject.toml). It declares ``name``, ``modality``, ``capabilities``, an ``Options`` pydantic model
and ``accepts_source``, and implements the ``Generator`` protocol; ``BaseGenerator`` implements the bookkeeping so
a plugin writes ``load`` and ``generate_one``. Diffusers pipelines subclass ``anyverse.generators.base.
DiffusersGenerator`` instead. ``ANYVERSE_PLUGINS=name,...`` restricts which third-party plugins load. A plugin that
fails to import or declares itself wrongly is skipped, reported once, and listed by ``anyverse generators list``.

This module imports neither torch, diffusers nor numpy, so finding plugins stays fast.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from pydantic import ConfigDict, ValidationError

from anyverse.types import OUTPUT_MODALITIES, GenerationOptions, Media, MediaRequest, Modality

if TYPE_CHECKING:
    import numpy as np
    import torch

    from anyverse.config import GeneratorConfig, TinySpec

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "anyverse.generators"
BUILT_IN_DISTRIBUTION = "anyverse"  # its plugins always load; ANYVERSE_PLUGINS picks among the others

# What a generator can do with a request; the one table the meta-response schema, routing and defaults read.
CAPABILITIES: dict[str, str] = {
    "generate": "make new media from a text prompt",
    "edit": "change a source media item (its id in 'source') as the prompt says",
    "speech": "read the prompt aloud as speech",
}

Progress = Callable[[int, int], None]  # progress(step, total) of the item being made


class GenerationCancelled(RuntimeError):
    """Raised by ``generate`` when its ``cancel`` event is set; nothing of the batch is returned."""


@dataclass(frozen=True, eq=False)  # arrays compare element-wise, so equality is identity
class GeneratedMedia:
    """Decoded output of a generator. Image float32 [H,W,3] in [0,1]; video [F,H,W,3] in [0,1]; audio [N] in [-1,1]."""

    modality: Modality
    data: np.ndarray
    sample_rate: int | None = None
    fps: int | None = None


class Options(GenerationOptions):
    """Base of a plugin's ``Options``: the uniform options plus its own fields; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


@runtime_checkable
class Generator(Protocol):
    """What a generator plugin implements. Construction is cheap and validates config options; weights load lazily.

    ``generate`` makes one item per request (``sources[i]`` is the decoded media request ``i`` edits, or None),
    calls ``progress(step, total)`` as it goes and raises ``GenerationCancelled`` soon after ``cancel`` is set.
    ``conditioning_spec`` returns {} for a meta-only plugin (no output projector can feed it); otherwise
    ``encode_prompts`` gives its own text conditioning of those names and shapes. Optional: ``denoising_loss``
    (see ``Denoiser``).
    """

    name: ClassVar[str]
    modality: ClassVar[Modality]
    capabilities: ClassVar[frozenset[str]]
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

    def generate(self, requests: list[MediaRequest], sources: list[GeneratedMedia | None],
                 progress: Progress | None = None, cancel: threading.Event | None = None) -> list[GeneratedMedia]: ...


@runtime_checkable
class Denoiser(Protocol):
    """The optional generator method behind decoder alignment's ``loss.denoise`` (NExT-GPT / GILL style)."""

    def denoising_loss(self, conditioning: dict[str, torch.Tensor], media: list[Media]) -> torch.Tensor:
        """The diffusion training loss of the frozen generator on ``media`` (one per batch row), conditioned on
        ``conditioning`` (``encode_prompts``' names and shapes); a scalar whose gradient reaches only
        ``conditioning``."""
        ...


# ---------------------------------------------------------------- helpers for plugin authors

OptionsT = TypeVar("OptionsT", bound=GenerationOptions)


def validate_options(options: type[OptionsT], values: Mapping[str, Any], plugin: str) -> OptionsT:
    """Validate option values, naming the plugin and each offending field."""
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
        shape = tuple(tensor.shape) if hasattr(tensor, "shape") else type(tensor).__name__
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


class BaseGenerator:
    """Bookkeeping most plugins share: config options validated into ``defaults``, each request's options merged
    over them, the batch loop with source checks and cancellation. A subclass sets the class attributes and writes
    ``load``, ``unload`` and ``generate_one``; it is meta-only unless it overrides ``conditioning_spec``."""

    name: ClassVar[str]
    modality: ClassVar[Modality]
    capabilities: ClassVar[frozenset[str]] = frozenset({"generate"})
    Options: ClassVar[type[GenerationOptions]] = Options
    accepts_source: ClassVar[frozenset[Modality]] = frozenset()

    def __init__(self, config: GeneratorConfig, device: torch.device, dtype: torch.dtype):
        self.config, self.device, self.dtype = config, device, dtype
        self.defaults: Any = validate_options(self.Options, config.options, self.name)  # an instance of Options

    @property
    def loaded(self) -> bool:
        raise NotImplementedError

    def load(self) -> None:
        raise NotImplementedError

    def unload(self) -> None:
        raise NotImplementedError

    def check_weights(self) -> None:
        """Tiny weights are built on demand; real ones are checked by subclasses that have them."""

    def memory_bytes(self) -> int:
        return 0

    def conditioning_spec(self) -> dict[str, tuple[int, ...]]:
        return {}

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise ValueError(f"{self.name} is meta-only: it takes text prompts, not conditioning tensors")

    def options(self, request: MediaRequest) -> Any:
        """Config defaults overridden by the request's options that are set (lowered to ``max_options``), validated
        by this plugin's Options."""
        values = {**self.defaults.model_dump(exclude_none=True), **self.capped(request.options).model_dump(
            exclude_none=True)}
        return validate_options(self.Options, values, self.name)

    def capped(self, options: GenerationOptions) -> GenerationOptions:
        """A request's ``options`` with every value above the config's ``max_options`` lowered to it."""
        values = options.model_dump(exclude_none=True)
        for name, cap in self.config.max_options.items():
            if isinstance(values.get(name), int | float) and values[name] > cap:
                values[name] = type(values[name])(cap)
        return type(options).model_validate(values)

    def generate(self, requests: list[MediaRequest], sources: list[GeneratedMedia | None],
                 progress: Progress | None = None, cancel: threading.Event | None = None) -> list[GeneratedMedia]:
        if len(sources) != len(requests):
            raise ValueError(f"{self.name}: {len(requests)} requests but {len(sources)} sources")
        for source in sources:
            check_source(self, source)  # type: ignore[arg-type]
        made = []
        for request, source in zip(requests, sources, strict=True):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled(f"{self.name}: cancelled")
            made.append(self.generate_one(request, self.options(request), source, progress, cancel))
        return made

    def generate_one(self, request: MediaRequest, options: Any, source: GeneratedMedia | None,
                     progress: Progress | None, cancel: threading.Event | None) -> GeneratedMedia:
        """One item with validated ``options``; report ``progress`` and honour ``cancel`` within it if it can."""
        raise NotImplementedError


# ---------------------------------------------------------------- registry

_registered: dict[str, type[Generator]] = {}

GeneratorT = TypeVar("GeneratorT", bound=type[Generator])


def register_generator(cls: GeneratorT) -> GeneratorT:
    """Register a generator class under ``cls.name``; usable as a decorator. Overrides an entry point of that name."""
    problem = declaration_problem(cls, cls.name)
    if problem:
        raise ValueError(f"generator {cls.name!r}: {problem}")
    _registered[cls.name] = cls
    return cls


def enabled_entry_points() -> list[EntryPoint]:
    """The group's entry points: the built-ins, plus the third-party ones ``ANYVERSE_PLUGINS`` names (all if unset)."""
    wanted = os.environ.get("ANYVERSE_PLUGINS")
    names = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    found = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        built_in = point.dist is not None and point.dist.name == BUILT_IN_DISTRIBUTION
        if built_in or names is None or point.name in names:
            found.append(point)
    return found


def declaration_problem(cls: Any, name: str) -> str | None:
    """Why a loaded class cannot be a generator named ``name``, or None: its declared attributes, checked up front."""
    if getattr(cls, "name", None) != name:
        return f"its class needs name = {name!r}"
    if getattr(cls, "modality", None) not in OUTPUT_MODALITIES:
        return "its modality must be Modality.IMAGE, VIDEO or AUDIO"
    capabilities = getattr(cls, "capabilities", None)
    if not isinstance(capabilities, frozenset) or not capabilities or not capabilities <= set(CAPABILITIES):
        return f"capabilities must be a non-empty frozenset of {sorted(CAPABILITIES)}, got {capabilities!r}"
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, GenerationOptions)):
        return "Options must subclass anyverse.plugins.Options (a pydantic model)"
    try:
        options.model_validate(options().model_dump())  # defaults must pass their own constraints
        options.model_json_schema()
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return f"invalid Options model: its defaults fail validation ({problems})"
    except Exception as err:  # a field type pydantic cannot describe, a default that cannot be built
        return f"invalid Options model: {type(err).__name__}: {str(err).splitlines()[0]}"
    return None


@functools.cache
def _discover() -> tuple[dict[str, type[Generator]], dict[str, str]]:
    """Import every enabled entry point once: (classes by name, why each broken one was skipped). A broken plugin
    is reported once and never takes the others down."""
    found: dict[str, type[Generator]] = {}
    broken: dict[str, str] = {}
    for point in enabled_entry_points():
        try:
            cls = point.load()
            problem = declaration_problem(cls, point.name)
        except Exception as err:  # any import-time failure of third-party code
            problem = f"import failed: {type(err).__name__}: {err}"
        if problem:
            broken[point.name] = problem
            log.warning("skipping generator plugin %r (%s): %s", point.name, point.value, problem)
        else:
            found[point.name] = cls
    return found, broken


def available_generators() -> dict[str, type[Generator]]:
    """Generator classes by name: enabled entry points plus ``register_generator`` ones."""
    return {**_discover()[0], **_registered}


def broken_generators() -> dict[str, str]:
    """Enabled entry points that could not be used, and why."""
    return {name: why for name, why in _discover()[1].items() if name not in _registered}


def get_generator_class(name: str) -> type[Generator]:
    known = available_generators()
    if name in known:
        return known[name]
    broken = broken_generators()
    if name in broken:
        raise ValueError(f"generator plugin {name!r} is broken: {broken[name]}")
    raise ValueError(f"unknown generator plugin {name!r}; known: {', '.join(sorted(known)) or 'none'}")
