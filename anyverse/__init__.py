"""anyverse: an any-to-any multimodal assistant. ``from anyverse import Anyverse`` is the entry point.

Exports resolve lazily so ``import anyverse`` (and ``anyverse --help``) stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Anyverse": "anyverse.session",
    "load_config": "anyverse.config",
    "AnyverseConfig": "anyverse.config",
    "Modality": "anyverse.types",
    "Media": "anyverse.types",
    "TurnResult": "anyverse.types",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'anyverse' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(_EXPORTS[name]), name)
