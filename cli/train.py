"""``anyverse train STAGE --config FILE``: thin; recipes live in anyverse.train. Works under ``accelerate launch``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from anyverse.cli.errors import fail_cleanly

train_app = typer.Typer(help="Train projectors and LoRA adapters (and the toy world's tiny base models).",
                        no_args_is_help=True)

Config = Annotated[Path, typer.Option("--config", "-c", help="training config YAML")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="override, e.g. steps=100 or optim.lr=1e-4")]
Fresh = Annotated[bool, typer.Option("--fresh", help="ignore checkpoints already in output_dir (no resume)")]


def _stage(stage: str):  # type: ignore[no-untyped-def]
    @fail_cleanly
    def command(config: Config, overrides: Overrides = None, fresh: Fresh = False) -> None:
        from anyverse.train.run import run_stage

        typer.echo(str(run_stage(stage, config, overrides, resume=not fresh)))

    command.__doc__ = {
        "lm-pretrain": "Pretrain a tiny causal LM on a dataset's text (the toy world's base LLM).",
        "encoder-pretrain": "Contrastively pretrain tiny ImageBind towers on media-caption pairs (InfoNCE).",
        "encoder-alignment": "Stage 1: input projectors learn to caption media (LLM and encoder frozen).",
        "decoder-alignment": "Stage 2: output projectors learn the generators' text conditioning of captions.",
        "instruction-tuning": "Stage 3: LoRA + projectors on dialogs with media in and out, both output modes.",
    }[stage]
    return command


for _name in ("lm-pretrain", "encoder-pretrain", "encoder-alignment", "decoder-alignment", "instruction-tuning"):
    train_app.command(_name)(_stage(_name))


@train_app.command("toyworld")
@fail_cleanly
def toyworld(
    n: Annotated[int, typer.Option("--n", help="toy-world items per modality")] = 200,
    seed: Annotated[int, typer.Option(help="seeds the toy world's data and every stage's training")] = 0,
) -> None:
    """Build the toyworld profile in one command: data, tiny LM + encoder pretraining, the three stages, eval."""
    import json

    from anyverse.train.toyworld_build import build_toyworld

    typer.echo(json.dumps(build_toyworld(n, seed, report=lambda line: typer.echo(line, err=True)), indent=2))
