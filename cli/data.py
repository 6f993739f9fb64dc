"""``anyverse data``: make and convert datasets (thin; the work is in anyverse.train)."""

from __future__ import annotations

import typer

data_app = typer.Typer(help="Make synthetic datasets and convert existing ones to anyverse manifests.",
                       no_args_is_help=True)
