"""``anyverse eval``: score captions and trained checkpoints (thin; the work is in anyverse.train)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from anyverse.cli.errors import fail_cleanly

if TYPE_CHECKING:
    from collections.abc import Iterator

    from PIL import Image

eval_app = typer.Typer(help="Evaluate captions and trained models.", no_args_is_help=True)


def _clip_score(model_dir: Path, media_file: Path | None, predictions: dict[str, str], device: str) -> dict[str, Any]:
    """CLIPScore over the predicted ids whose media file is an image (``clipscore_n`` says how many)."""
    from anyverse.config import Caps
    from anyverse.devices import resolve_device
    from anyverse.media import decode_image, load_media
    from anyverse.train.metrics import clip_score, read_media
    from anyverse.types import Modality

    if media_file is None:
        raise ValueError("--clip-model needs --media (JSONL lines {\"id\", \"path\"} of the predicted images)")
    paths = read_media(media_file)
    caps = Caps()
    scored = 0

    def pairs() -> Iterator[tuple[Image.Image, str]]:  # lazy: the model loads (or fails) before any image decodes
        nonlocal scored
        for key, caption in predictions.items():
            if key in paths and (media := load_media(paths[key], caps)).modality is Modality.IMAGE:
                scored += 1
                yield decode_image(media, caps), caption

    score = clip_score(model_dir, pairs(), device=resolve_device(device))
    return {"clipscore": score, "clipscore_n": scored}

@eval_app.command("captions")
@fail_cleanly
def captions(
    predictions: Annotated[Path, typer.Option(help="JSONL: {\"id\", \"caption\"} per line")],
    references: Annotated[Path, typer.Option(help="JSONL: {\"id\", \"captions\": [...]} or {\"id\", \"caption\"}")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of text")] = False,
    clip_model: Annotated[Path | None, typer.Option(
        help="local CLIPModel + CLIPProcessor directory: adds CLIPScore for image predictions (needs --media)")] = None,
    media: Annotated[Path | None, typer.Option(help="JSONL: {\"id\", \"path\"} of each prediction's media")] = None,
    fid_reference: Annotated[Path | None, typer.Option(help="reference image directory for FID")] = None,
    fad_reference: Annotated[Path | None, typer.Option(help="reference audio directory for FAD")] = None,
    device: Annotated[str, typer.Option(help="for model-based metrics: auto, cpu, cuda or mps")] = "auto",
) -> None:
    """BLEU-4 and CIDEr-D as the COCO caption evaluation computes them; optionally CLIPScore."""
    from anyverse.train.metrics import NOT_COMPUTED, read_predictions, read_references, score_captions

    for name, directory in (("--fid-reference", fid_reference), ("--fad-reference", fad_reference)):
        if directory is not None and not directory.is_dir():
            raise FileNotFoundError(f"{name} {directory}: no such directory")
    predicted = read_predictions(predictions)
    scores = score_captions(predicted, read_references(references))
    report: dict[str, Any] = {"bleu4": scores.bleu4, "cider": scores.cider, "n": scores.n,
                              "missing": len(scores.missing), "missing_ids": scores.missing}
    if clip_model is not None:
        report |= _clip_score(clip_model, media, predicted, device)
    requested = {"fid": fid_reference, "fad": fad_reference}
    not_computed = {name: NOT_COMPUTED[name] for name, directory in requested.items() if directory is not None}
    if not_computed:
        report["not_computed"] = not_computed
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"n: {scores.n}")
    if scores.missing:
        shown = ", ".join(scores.missing[:5]) + (", ..." if len(scores.missing) > 5 else "")
        typer.echo(f"missing: {len(scores.missing)} predicted id(s) without reference captions, not scored ({shown})")
    typer.echo(f"bleu4: {scores.bleu4:.4f}")
    typer.echo(f"cider: {scores.cider:.4f}")
    if "clipscore" in report:
        typer.echo(f"clipscore: {report['clipscore']:.4f} (over {report['clipscore_n']} image(s))")
    for name, reason in not_computed.items():
        typer.echo(f"{name}: not computed ({reason})")


@eval_app.command("toyworld")
@fail_cleanly
def toyworld(
    data: Annotated[Path, typer.Option(help="toy-world directory (anyverse data toyworld)")],
    profile: Annotated[str, typer.Option(help="profile to evaluate")] = "toyworld",
    checkpoint: Annotated[Path | None, typer.Option(help="evaluate this checkpoint instead of --profile")] = None,
    limit: Annotated[int, typer.Option(help="held-out items per score (a quarter of the dialogs are "
                                               "conversations)")] = 120,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """caption_accuracy, decoder_retrieval (+ decoder_cosine), routing_accuracy in both modes, per attribute."""
    import json

    from anyverse.train.toyworld_build import evaluate_toyworld

    scores = evaluate_toyworld(checkpoint, data, profile, limit)
    typer.echo(json.dumps(scores) if as_json else "\n".join(f"{k}: {v:.3f}" for k, v in scores.items()))
