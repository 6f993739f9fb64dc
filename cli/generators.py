"""``anyverse generators``: list, inspect and start generator plugins (thin; the work is in anyverse.catalog)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from anyverse.cli.errors import fail_cleanly
from anyverse.cli.options import Json, Overrides, Profile

generators_app = typer.Typer(help="List, inspect and start generator plugins.", no_args_is_help=True)


@generators_app.command("list")
@fail_cleanly
def list_generators(
    profile: Profile = "tiny",
    overrides: Overrides = None,
    as_json: Json = False,
    check: Annotated[bool, typer.Option(help="import every plugin to find the broken ones (slower)")] = False,
) -> None:
    """Installed generator plugins, from package metadata (nothing is imported unless --check), and which entries
    of the profile use them."""
    from anyverse.catalog import list_plugins
    from anyverse.config import load_config

    rows = list_plugins(load_config(profile or "tiny", overrides), check=check)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        configured = ", ".join(f"{e['name']} ({e['weights']})" for e in row["configured"]) or "-"
        origin = "built-in" if row["built_in"] else f"{row['package']} {row['version']}"
        typer.echo(f"{row['name']:<20} {row['modality'] or '?':<6} {','.join(row['capabilities']):<16} "
                   f"{origin:<34} configured: {configured}")
        if row["broken"]:
            typer.echo(f"{'':<20} broken: {row['broken']}")


@generators_app.command("info")
@fail_cleanly
def info(
    name: Annotated[str, typer.Argument(help="plugin name, as `generators list` shows it")],
    profile: Profile = "tiny",
    overrides: Overrides = None,
) -> None:
    """One plugin as JSON: options (JSON Schema) and defaults, capabilities, and for a configured entry its
    conditioning shapes and memory estimate (tiny weights are built to read them)."""
    from anyverse.catalog import plugin_info
    from anyverse.config import load_config

    typer.echo(json.dumps(plugin_info(name, load_config(profile or "tiny", overrides)), indent=2))


@generators_app.command("new")
@fail_cleanly
def new(
    name: Annotated[str, typer.Argument(help="plugin name, e.g. my-painter (the package is anyverse-NAME)")],
    modality: Annotated[str, typer.Option(help="image, video or audio")] = "image",
    directory: Annotated[Path, typer.Option("--dir", help="where to write the package")] = Path("."),
) -> None:
    """Write a ready plugin package: pyproject with the entry point, one module, a README and a passing test."""
    from anyverse.scaffold import write_plugin
    from anyverse.types import Modality

    if modality not in {m.value for m in Modality}:
        raise ValueError(f"--modality {modality}: choose image, video or audio")
    typer.echo(str(write_plugin(name, Modality(modality), directory)))
