"""``anyverse batch run --engine ray`` on a local Ray instance (2 CPUs) gives the results the local engine gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from anyverse.cli.app import app
from typer.testing import CliRunner

ray = pytest.importorskip("ray")


def run(jobs: Path, out: Path, *extra: str) -> dict[str, dict]:
    result = CliRunner().invoke(app, ["batch", "run", str(jobs), "--out", str(out), "--batch-size", "3",
                                      "--mode", "signal", *extra])
    assert result.exit_code == 0, result.output
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


@pytest.mark.slow  # Ray's start-up and its actor's model load take about 30 s
def test_the_ray_engine_gives_the_same_results_as_the_local_one(batch_media: dict[str, Path], tmp_path: Path) -> None:
    jobs = batch_media["image"].parent / "ray.jsonl"
    jobs.write_text("".join(json.dumps(j) + "\n" for j in [
        {"id": "text", "prompt": "hello"}, {"id": "image-in", "inputs": [batch_media["image"].name]},
        {"id": "image-out", "prompt": "draw", "outputs": ["image"]}, {"id": "audio-in", "inputs": [
            batch_media["audio"].name]}, {"id": "corrupt", "inputs": [batch_media["corrupt"].name]}]))
    local = run(jobs, tmp_path / "local")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        distributed = run(jobs, tmp_path / "ray", "--engine", "ray", "--limit", "4")
        resumed = run(jobs, tmp_path / "ray", "--engine", "ray")  # the finished four are not dispatched again
    finally:
        ray.shutdown()
    assert len(distributed) == 4 and set(resumed) == set(local)

    def comparable(record: dict) -> tuple:
        return (record["status"], record["reason"], record["text"],
                [(m["id"], m["request"]["options"], m["sha256"]) for m in record["media"]])

    assert {k: comparable(v) for k, v in resumed.items()} == {k: comparable(v) for k, v in local.items()}
