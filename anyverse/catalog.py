"""What ``anyverse generators list`` and ``info`` show: installed plugins read from entry-point and package metadata,
and each plugin class's declared attributes read from its source (``ast``), so listing imports no plugin, torch or
diffusers. ``check=True`` imports them to find the broken ones; ``info`` builds the plugin for its details.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from typing import Any

from anyverse.config import AnyverseConfig, GeneratorConfig
from anyverse.plugins import BUILT_IN_DISTRIBUTION, broken_generators, enabled_entry_points

DECLARED = ("name", "modality", "capabilities")


def list_plugins(config: AnyverseConfig | None = None, check: bool = False) -> list[dict[str, Any]]:
    """One row per enabled plugin: name, modality, capabilities, summary, package, version, the profile's entries
    that use it (with whether their weights are here), and ``broken``: a source that cannot be read, and with
    ``check`` also import and declaration problems."""
    broken = broken_generators() if check else {}
    rows = []
    for point in enabled_entry_points():
        module, _, attribute = point.value.partition(":")
        declared, problem = _declared(module, attribute)
        dist = point.dist
        rows.append({
            "name": point.name, "modality": declared.get("modality"), "capabilities": declared.get("capabilities", []),
            "summary": declared.get("summary", ""), "entry_point": point.value,
            "package": dist.name if dist else None, "version": dist.version if dist else None,
            "built_in": bool(dist and dist.name == BUILT_IN_DISTRIBUTION),
            "configured": _configured(config, point.name),
            "broken": broken.get(point.name) or problem,
        })
    return rows


def _configured(config: AnyverseConfig | None, plugin: str) -> list[dict[str, Any]]:
    """The profile's entries using ``plugin``: name and whether its weights are on this machine."""
    if config is None:
        return []
    return [{"name": name, "weights": _weights(entry)} for name, entry in config.generators.items()
            if (entry.plugin or name) == plugin]


def _weights(entry: GeneratorConfig) -> str:
    """'tiny' (built on first use), 'present' or 'missing', judged from paths alone (a hub id: the HF cache)."""
    if entry.tiny is not None:
        return "tiny"
    from anyverse.weights import expand

    path = entry.path or ""
    if expand(path).exists():
        return "present"
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    cached = hub.expanduser() / f"models--{path.replace('/', '--')}" / "snapshots"
    return "present" if path.count("/") == 1 and cached.is_dir() and any(cached.iterdir()) else "missing"


def _declared(module: str, attribute: str) -> tuple[dict[str, Any], str | None]:
    """The class attributes in ``DECLARED`` and its docstring's first line, read from source without importing it
    (inherited ones from base classes in the same module); or why that failed."""
    try:
        spec = importlib.util.find_spec(module)
        source = Path(spec.origin).read_text() if spec and spec.origin else None
    except (ImportError, OSError, ValueError) as err:
        return {}, f"cannot find module {module!r}: {err}"
    if source is None:
        return {}, f"cannot find module {module!r}"
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    if attribute not in classes:
        return {}, f"{module} defines no class {attribute!r} at top level"
    found: dict[str, Any] = {}
    queue = [classes[attribute]]
    while queue:
        node = queue.pop(0)
        for statement in node.body:
            target, value = _assignment(statement)
            if target in DECLARED and target not in found and value is not None:
                found[target] = _literal(value)
        queue += [classes[b.id] for b in node.bases if isinstance(b, ast.Name) and b.id in classes]
    doc = ast.get_docstring(classes[attribute]) or ""
    found["summary"] = doc.strip().split("\n")[0]
    if isinstance(found.get("capabilities"), list):
        found["capabilities"] = sorted(found["capabilities"])
    return found, None


def _assignment(statement: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
        return statement.target.id, statement.value
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
        return statement.targets[0].id, statement.value
    return None, None


def _literal(node: ast.expr) -> Any:
    """``"x"`` -> "x"; ``Modality.IMAGE`` -> "image"; ``frozenset({"a", "b"})`` (or a set/list/tuple) -> [...]."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Attribute):
        return node.attr.lower()
    if isinstance(node, ast.Call) and node.args:
        return _literal(node.args[0])
    if isinstance(node, ast.Set | ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    return None


def plugin_info(name: str, config: AnyverseConfig | None = None) -> dict[str, Any]:
    """Everything about one plugin, importing it: declared attributes, options as JSON Schema with their defaults
    (the profile's entry's over the plugin's), what sources it edits, and, for an entry the profile configures, the
    conditioning it accepts (read from saved configs; tiny weights are built) and a memory estimate."""
    import torch

    from anyverse.plugins import get_generator_class
    from anyverse.pool import GeneratorPool

    cls = get_generator_class(name)
    row: dict[str, Any] = next((r for r in list_plugins(config) if r["name"] == name), {"name": name})
    info: dict[str, Any] = {
        **row, "modality": cls.modality.value, "capabilities": sorted(cls.capabilities),
        "accepts_source": sorted(m.value for m in cls.accepts_source),
        "options": cls.Options.model_json_schema(), "defaults": cls.Options().model_dump(mode="json"),
    }
    entries = {e["name"]: config.generators[e["name"]] for e in row.get("configured", [])} if config else {}
    if entries and config is not None:
        entry_name, entry = next(iter(entries.items()))
        pool = GeneratorPool({entry_name: entry}, torch.device("cpu"), torch.float32, 1.0)
        generator = pool.peek(entry_name)
        spec = generator.conditioning_spec()
        info |= {
            "defaults": {**info["defaults"], **entry.options},
            "conditioning": {k: list(v) for k, v in spec.items()} or "none (meta-only: prompts, no signal tokens)",
            "memory_bytes": generator.memory_bytes(),
        }
    return info
