"""``anyverse eval``: score captions and trained checkpoints (thin; the work is in anyverse.train)."""

from __future__ import annotations

import typer

eval_app = typer.Typer(help="Evaluate captions and trained models.", no_args_is_help=True)
