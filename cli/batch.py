"""``anyverse batch``: run, map, status, validate and schema (thin; the work is in anyverse.batch)."""

from __future__ import annotations

import glob
import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from anyverse.cli.errors import fail_cleanly
from anyverse.cli.options import Device, Dtype, Mode, Overrides, Profile, Seed
from anyverse.cli.options import config_overrides as _overrides

batch_app = typer.Typer(help="Transform collections: a JSONL job file in, one result line per job out, resumable.",
                        no_args_is_help=True)

OutDir = Annotated[Path, typer.Option("--out", "-o", help="run folder: results.jsonl, media/, run.json")]
Root = Annotated[Path | None, typer.Option(help="relative inputs resolve here and nothing outside it is read "
                                                "(default: the job file's folder)")]
BatchSize = Annotated[int, typer.Option(min=1, max=256, help="jobs per batch (encoder, LLM and generators)")]
Engine = Annotated[str, typer.Option(help="local, or ray (pip install 'anyverse[ray]')")]
Address = Annotated[str | None, typer.Option(help="Ray cluster to join (default: start a local one)")]
Workers = Annotated[int, typer.Option(min=1, help="Ray actors, each loading the pipeline once")]
RetryFailed = Annotated[bool, typer.Option("--retry-failed", help="run failed jobs again")]
SkipInvalid = Annotated[bool, typer.Option("--skip-invalid", help="run the valid lines, record invalid ones as failed")]
Force = Annotated[bool, typer.Option("--force", help="go on despite a changed config; redo changed jobs")]
Limit = Annotated[int | None, typer.Option(min=1, help="run at most this many jobs now")]


def _run(jobs: Path, out: Path, root: Path | None, profile: str | None, overrides: list[str], batch_size: int,
         engine: str, address: str | None, workers: int, retry_failed: bool, skip_invalid: bool, force: bool,
         limit: int | None, seed: int | None) -> None:
    """Plan, run with a progress bar, print the summary (and the resume hint when interrupted)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from anyverse.batch.engine import RunOptions, execute, plan

    if engine not in ("local", "ray"):
        raise ValueError(f"--engine {engine}: choose local or ray")
    if engine == "ray":
        _require_ray()
    options = RunOptions(jobs=jobs, out=out, root=root, profile=profile or "tiny", overrides=tuple(overrides),
                         batch_size=batch_size, seed=seed or 0, engine=engine,  # type: ignore[arg-type]
                         address=address, workers=workers, retry_failed=retry_failed, skip_invalid=skip_invalid,
                         force=force, limit=limit)
    chosen = plan(options)
    for note in chosen.notes:
        typer.echo(f"anyverse: note: {note}", err=True)
    hint = (f"Resume with: anyverse batch run {shlex.quote(str(jobs))} --out {shlex.quote(str(out))} --root "
            f"{shlex.quote(str(chosen.settings.root))} and the same options")
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=True, console=_stderr()) as bar:
        task = bar.add_task("jobs", total=chosen.total)

        def advance(records: list[dict[str, Any]]) -> None:
            bar.update(task, advance=len(records))

        def stage(name: str) -> None:
            bar.update(task, description=f"jobs ({bar.tasks[0].speed or 0.0:.2f}/s, {name})")

        try:
            outcome = execute(options, chosen, advance, stage)
        except KeyboardInterrupt:
            typer.echo(f"anyverse: abandoned the batch in flight; finished results are kept. {hint}", err=True)
            raise typer.Exit(130) from None
    summary = {"ran": outcome.done + outcome.failed, "ok": outcome.done, "failed": outcome.failed,
               "invalid": len(chosen.invalid), "already_finished": chosen.finished,
               "results": str(out / "results.jsonl")}
    typer.echo(json.dumps(summary))
    if outcome.stopped:
        typer.echo(f"anyverse: stopped after the batch in flight. {hint}", err=True)
        raise typer.Exit(130)


def _stderr():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'anyverse[ray]'") from None


@batch_app.command("run")
@fail_cleanly
def run(
    jobs: Annotated[Path, typer.Argument(help="JSONL job file (anyverse or OpenAI batch lines)")],
    out: OutDir,
    root: Root = None,
    profile: Profile = "tiny",
    overrides: Overrides = None,
    batch_size: BatchSize = 8,
    engine: Engine = "local",
    address: Address = None,
    workers: Workers = 1,
    retry_failed: RetryFailed = False,
    skip_invalid: SkipInvalid = False,
    force: Force = False,
    limit: Limit = None,
    seed: Seed = None,
    device: Device = None,
    dtype: Dtype = None,
    mode: Mode = None,
) -> None:
    """Run a job file; rerunning the same command resumes it."""
    _run(jobs, out, root, profile, _overrides(overrides, device, dtype, mode), batch_size, engine, address, workers,
         retry_failed, skip_invalid, force, limit, seed)


@batch_app.command("map")
@fail_cleanly
def map_(
    prompt: Annotated[str, typer.Argument(help="what to do with each input")],
    inputs: Annotated[str, typer.Option(help="glob of input files, e.g. 'photos/*.jpg'")],
    out: OutDir,
    outputs: Annotated[str, typer.Option(help="comma-separated: text, image, audio, video")] = "text",
    root: Root = None,
    profile: Profile = "tiny",
    overrides: Overrides = None,
    batch_size: BatchSize = 8,
    engine: Engine = "local",
    address: Address = None,
    workers: Workers = 1,
    retry_failed: RetryFailed = False,
    force: Force = False,
    limit: Limit = None,
    seed: Seed = None,
    device: Device = None,
    dtype: Dtype = None,
    mode: Mode = None,
) -> None:
    """One job per matching file, written to OUT/jobs.jsonl (so the run is reproducible), then run it."""
    from anyverse.batch.jobs import map_jobs

    jobs, common = map_jobs(prompt, sorted(Path(p) for p in glob.glob(inputs, recursive=True)),
                            [o.strip() for o in outputs.split(",")], out, force)
    _run(jobs, out, root or common, profile, _overrides(overrides, device, dtype, mode), batch_size, engine,
         address, workers, retry_failed, False, force, limit, seed)


@batch_app.command("status")
@fail_cleanly
def status(
    out: Annotated[Path, typer.Argument(help="a batch run folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Done, failed (by reason) and pending jobs of a run folder."""
    from anyverse.batch.store import status as run_status

    report = run_status(out)
    if as_json:
        typer.echo(json.dumps(report))
        return
    pending = "unknown (job file gone)" if report["pending"] is None else report["pending"]
    typer.echo(f"{report['done']} done, {report['failed']} failed, {pending} pending ({report['job_file']})")
    for reason, count in report["failed_by_reason"].items():
        typer.echo(f"  failed: {count} {reason}")


@batch_app.command("validate")
@fail_cleanly
def validate(
    jobs: Annotated[Path, typer.Argument(help="JSONL job file")],
    root: Root = None,
) -> None:
    """Check every line (JSON, fields, duplicate ids, inputs under the root) without loading a model."""
    from anyverse.batch.jobs import scan

    checked = scan(jobs, (root or jobs.parent).resolve())
    if checked.problems:
        typer.echo(checked.report(), err=True)
        raise typer.Exit(2)
    typer.echo(f"{jobs}: {len(checked.refs)} valid {checked.format} jobs")


@batch_app.command("schema")
def schema() -> None:
    """Print the anyverse job line schema as JSON Schema."""
    from anyverse.batch.jobs import job_schema

    typer.echo(json.dumps(job_schema(), indent=2))
