"""The configured generators, loaded lazily under a memory budget, and how a request picks one of them.

A request names a generator (or a capability), or leaves it to the defaults: ``generator_defaults`` in the config,
else an old-form entry keyed by the modality, else the first configured generator of that modality that can. A
generator whose plugin is missing or broken, whose config options are invalid or whose weights fail to load is
reported once and refused by name; every other one keeps working.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from anyverse.config import AnyverseConfig, GeneratorConfig
from anyverse.plugins import CAPABILITIES, Generator, get_generator_class
from anyverse.types import OUTPUT_MODALITIES, MediaRequest, Modality
from anyverse.weights import collect_missing

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """One configured generator: its class and instance, or why it cannot be used."""

    name: str
    plugin: str
    cls: type[Generator] | None
    generator: Generator | None
    broken: str | None = None


class GeneratorPool:
    """Configured generators by name, loaded on first use; before loading one (its weight files give the size), the
    least recently used others unload until the total would fit ``memory_budget_gb``; the one requested always
    loads and stays."""

    def __init__(self, configs: Mapping[str, GeneratorConfig], device: torch.device, dtype: torch.dtype,
                 memory_budget_gb: float, defaults: Mapping[Modality, Mapping[str, str]] | None = None):
        self._slots = {str(name): _slot(str(name), config, device, dtype) for name, config in configs.items()}
        self._defaults = {Modality(m): dict(chosen) for m, chosen in (defaults or {}).items()}
        self.budget_bytes = int(memory_budget_gb * 1024**3)
        self._use_order: list[str] = []  # least recently used first

    @classmethod
    def from_config(cls, config: AnyverseConfig, device: torch.device, dtype: torch.dtype) -> GeneratorPool:
        return cls(config.generators, device, dtype, config.runtime.generator_memory_gb, config.generator_defaults)

    # ---- what is configured

    def names(self) -> list[str]:
        """Configured generator names, in config order."""
        return list(self._slots)

    def modality(self, name: str) -> Modality | None:
        cls = self._slots[name].cls
        return None if cls is None else cls.modality

    def __contains__(self, key: object) -> bool:
        try:
            self.resolve(str(key))
        except ValueError:
            return False
        return True

    def describe(self) -> list[dict[str, Any]]:
        """One row per configured generator (name, plugin, modality, capabilities, default for, loaded, broken)."""
        defaults = self.default_names()
        rows = []
        for name, slot in self._slots.items():
            cls = slot.cls
            rows.append({
                "name": name, "plugin": slot.plugin, "modality": None if cls is None else cls.modality.value,
                "capabilities": [] if cls is None else sorted(cls.capabilities),
                "default_for": sorted(f"{m.value}.{c}" for (m, c), n in defaults.items() if n == name),
                "loaded": slot.generator is not None and slot.generator.loaded, "broken": slot.broken,
            })
        return rows

    def choices(self) -> tuple[str, ...]:
        """What a meta-response's ``generator`` may say: the usable configured names and their capabilities."""
        usable = [s for s in self._slots.values() if s.generator is not None and s.cls is not None]
        capabilities = sorted({c for s in usable for c in s.cls.capabilities})  # type: ignore[union-attr]
        return (*[s.name for s in usable], *capabilities)

    def options_schema(self) -> str:
        """JSON schema of a meta-response's ``options``: every usable configured plugin's fields (the first plugin
        to declare a field describes it)."""
        properties: dict[str, Any] = {}
        for slot in self._slots.values():
            if slot.generator is not None:
                for field, spec in slot.generator.Options.model_json_schema()["properties"].items():
                    if "$ref" not in json.dumps(spec):
                        properties.setdefault(field, spec)
        return json.dumps({"type": "object", "properties": properties})

    # ---- choosing

    def default(self, modality: Modality, capability: str = "generate") -> str | None:
        """The usable generator for (modality, capability): the configured default, else an old-form entry keyed by
        the modality that can, else the first configured one that can; None when nothing configured can."""
        chosen = self._defaults.get(modality, {}).get(capability)
        if chosen is not None and self._slots[chosen].generator is not None:
            return chosen
        candidates = [n for n, s in self._slots.items() if s.generator is not None and s.cls is not None
                      and s.cls.modality == modality and capability in s.cls.capabilities]
        return modality.value if modality.value in candidates else next(iter(candidates), None)

    def default_names(self) -> dict[tuple[Modality, str], str]:
        """Every (modality, capability) some configured generator offers, and its default."""
        pairs = {(s.cls.modality, c) for s in self._slots.values() if s.cls is not None for c in s.cls.capabilities}
        return {(m, c): name for m, c in sorted(pairs) if (name := self.default(m, c)) is not None}

    def resolve(self, generator: str, modality: Modality | None = None) -> str:
        """A configured name for ``generator``: a configured name, a plugin configured once, or a capability (the
        default for it in ``modality``)."""
        if generator in self._slots:
            return generator
        by_plugin = [n for n, s in self._slots.items() if s.plugin == generator]
        if len(by_plugin) == 1:
            return by_plugin[0]
        if generator in CAPABILITIES and modality is not None:
            name = self.default(modality, generator)
            if name is None:
                raise ValueError(f"no configured {modality.value} generator can {generator}")
            return name
        known = ", ".join([*self._slots, *CAPABILITIES])
        raise ValueError(f"unknown generator {generator!r}; configured: {known}")

    def route(self, request: MediaRequest, source_modality: Modality | None = None) -> str:
        """The generator that makes ``request``: the one it names, else the default for editing its source (when the
        source is media such a generator accepts), else for generating its modality."""
        if request.generator is not None:
            name = self.resolve(request.generator, request.modality)
            if self.modality(name) not in (None, request.modality):
                raise ValueError(f"generator {name!r} makes {self.modality(name)}, not {request.modality.value}")
            return name
        editor = self.default(request.modality, "edit") if source_modality is not None else None
        if editor is not None and source_modality in getattr(self._slots[editor].cls, "accepts_source", ()):
            return editor
        default = self.default(request.modality)
        if default is None:
            raise ValueError(f"no generator configured for {request.modality.value}")
        return default

    # ---- using

    def peek(self, key: str) -> Generator:
        """The generator for a name or an output modality (its default), not loaded; raises if it is broken."""
        slot = self._slots[self._name(key)]
        if slot.generator is None:
            raise ValueError(f"generator {slot.name!r} is broken: {slot.broken}")
        return slot.generator

    def get(self, key: str) -> Generator:
        """The generator for a name or an output modality, loaded; may unload others to stay within the budget. A
        load failure marks it broken (reported once) and raises."""
        name = self._name(key)
        generator = self.peek(name)
        if name in self._use_order:
            self._use_order.remove(name)
        self._use_order.append(name)
        if not generator.loaded:
            try:
                self._fit_budget(keep=name, incoming=generator.memory_bytes())  # make room first: lower peak
                generator.load()
            except Exception as err:  # third-party loading code: whatever it raises, the others keep working
                generator.unload()
                self._break(name, f"load failed: {type(err).__name__}: {err}")
                raise ValueError(f"generator {name!r} is broken: {self._slots[name].broken}") from None
            self._fit_budget(keep=name)
        return generator

    def _name(self, key: str) -> str:
        if key in self._slots:
            return key
        if key in {m.value for m in OUTPUT_MODALITIES}:
            name = self.default(Modality(key))
            if name is None:
                raise ValueError(f"no generator configured for {key}")
            return name
        return self.resolve(key)

    def _break(self, name: str, why: str) -> None:
        slot = self._slots[name]
        slot.broken, slot.generator = why, None
        gc.collect()
        log.warning("generator %r is broken and will not be used: %s", name, why)

    def _fit_budget(self, keep: str, incoming: int = 0) -> None:
        """Unload least recently used generators until the loaded ones (plus ``incoming`` bytes about to load) fit."""
        for name in list(self._use_order):
            total = sum(g.memory_bytes() for g in self._loaded()) + incoming
            if total <= self.budget_bytes:
                return
            generator = self._slots[name].generator
            if name != keep and generator is not None and generator.loaded:
                log.info("unloading %s to stay within %.2f GB", name, self.budget_bytes / 1024**3)
                generator.unload()

    def _loaded(self) -> list[Generator]:
        return [s.generator for s in self._slots.values() if s.generator is not None and s.generator.loaded]

    def loaded(self) -> list[str]:
        """Names of the loaded generators, least recently used first."""
        return [n for n in self._use_order if (g := self._slots[n].generator) is not None and g.loaded]

    def check_weights(self) -> None:
        """Raise one MissingWeightsError listing every usable generator whose real weights are absent."""
        collect_missing([s.generator.check_weights for s in self._slots.values() if s.generator is not None])

    def conditioning_specs(self) -> dict[Modality, dict[str, tuple[int, ...]]]:
        """Per output modality, what its default generator accepts instead of a prompt (signal mode feeds it)."""
        specs = {}
        for modality in OUTPUT_MODALITIES:
            name = self.default(modality)
            if name is not None and self._slots[name].generator is not None:
                spec = self.peek(name).conditioning_spec()
                if spec:
                    specs[modality] = spec
        return specs


def _slot(name: str, config: GeneratorConfig, device: torch.device, dtype: torch.dtype) -> Slot:
    """Find and construct one configured generator; a broken plugin or invalid options make a broken slot."""
    plugin = config.plugin or name
    if name in CAPABILITIES:
        raise ValueError(f"generators.{name}: {name!r} names a capability; choose another name")
    try:
        cls = get_generator_class(plugin)
    except ValueError as err:  # not installed, or broken: the others keep working
        log.warning("generators.%s: %s", name, err)
        return Slot(name, plugin, None, None, str(err))
    if name in {m.value for m in OUTPUT_MODALITIES} and cls.modality != name:
        raise ValueError(f"generators.{name}: plugin {plugin!r} makes {cls.modality.value}, not {name}")
    try:
        generator = cls(config, device, dtype)
    except ValueError as err:
        log.warning("generators.%s: %s", name, err)
        return Slot(name, plugin, cls, None, str(err))
    return Slot(name, plugin, cls, generator)


def generator_menu(config: AnyverseConfig) -> str:
    """The system prompt's list of the configured generators, one line each: name, modality and capabilities.
    Read from the config and the plugin classes, so it changes only when the profile does."""
    lines = []
    for name, entry in config.generators.items():
        try:
            cls = get_generator_class(entry.plugin or name)
        except ValueError:
            continue  # unusable: reported by the pool, not offered to the model
        lines.append(f"- {name}: {cls.modality.value} ({', '.join(sorted(cls.capabilities))})")
    return "\n".join(lines)
