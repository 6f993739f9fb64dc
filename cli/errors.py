"""One-line errors for every command: known user-facing failures never show a traceback."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import typer


def fail_cleanly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Known user-facing errors print one line (plus the list of missing weights) and exit 2, no traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from anyverse.weights import MissingWeightsError  # MediaError and ConfigError are ValueErrors; importing
        # anyverse.media here (PyAV, numpy) would tax fast commands like `generators list`

        try:
            return command(*args, **kwargs)
        except (MissingWeightsError, ValueError, FileNotFoundError) as err:
            typer.echo(f"anyverse: error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper
