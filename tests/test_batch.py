"""``anyverse batch`` end to end on the tiny profile: both line formats, validation, resume after SIGKILL,
--retry-failed, map, status, and the same replies whatever the batch size."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from anyverse.cli.app import app
from PIL import Image
from typer.testing import CliRunner

runner = CliRunner()
SIGNAL = ["--mode", "signal"]  # signal mode: a required output is always requested (no model-written options)


def batch(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["batch", *map(str, args)])
    return result.exit_code, result.output


def results(out: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_id = {line.get("custom_id", line.get("id")): line for line in lines}
    assert len(by_id) == len(lines), "one result line per job"
    return by_id


def write_jobs(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def mixed_anyverse(media: dict[str, Path]) -> list:
    image, audio, video, corrupt = (media[k].name for k in ("image", "audio", "video", "corrupt"))
    return [
        {"id": "text", "prompt": "hello"},
        {"id": "image-in", "prompt": "describe img_1", "inputs": [image]},
        {"id": "audio-in", "prompt": "describe aud_1", "inputs": [audio]},
        {"id": "video-in", "prompt": "describe vid_1", "inputs": [video]},
        {"id": "image-out", "prompt": "draw a cat", "outputs": ["text", "image"]},
        "{not json",
        {"id": "audio-out", "prompt": "play a tone", "outputs": ["audio"]},
        {"id": "video-out", "prompt": "film a wave", "outputs": ["video"]},
        {"id": "both-out", "prompt": "draw and play img_1", "inputs": [image], "outputs": ["image", "audio"]},
        {"id": "corrupt", "prompt": "describe", "inputs": [corrupt]},
        {"id": "missing", "prompt": "describe", "inputs": ["nope.png"]},
    ]


def mixed_openai(media: dict[str, Path]) -> list:
    def line(custom_id: str, content: list | str, modalities: list[str] | None = None) -> dict:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                "body": body | ({"modalities": modalities} if modalities else {})}

    wav = base64.b64encode(media["audio"].read_bytes()).decode()
    png = "data:image/png;base64," + base64.b64encode(media["image"].read_bytes()).decode()
    return [
        line("text", "hello"),
        line("image-in", [{"type": "text", "text": "describe img_1"},
                          {"type": "image_url", "image_url": {"url": png}}]),
        line("audio-in", [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]),
        line("video-in", [{"type": "video_url", "video_url": {"url": media["video"].name}}]),
        line("image-out", "draw a cat", ["text", "image"]),
        "{not json",
        line("audio-out", "play a tone", ["audio"]),
        line("video-out", "film a wave", ["video"]),
        line("both-out", [{"type": "image_url", "image_url": {"url": media["image"].name}}], ["image", "audio"]),
        line("corrupt", [{"type": "image_url", "image_url": {"url": media["corrupt"].name}}]),
        line("missing", [{"type": "image_url", "image_url": {"url": "nope.png"}}]),
    ]


@pytest.mark.parametrize("fmt", ["anyverse", "openai"])
def test_a_mixed_job_file_runs_end_to_end_and_records_every_failure_on_its_line(
        fmt: str, batch_media: dict[str, Path], tmp_path: Path) -> None:
    lines = mixed_anyverse(batch_media) if fmt == "anyverse" else mixed_openai(batch_media)
    jobs = write_jobs(batch_media["image"].parent / f"mixed-{fmt}.jsonl", lines)
    out = tmp_path / "out"
    code, output = batch("run", jobs, "--out", out, "--skip-invalid", "--batch-size", "4", "--seed", "3", *SIGNAL)
    assert code == 0, output
    got = results(out)
    wanted = {"image-out": ["image"], "audio-out": ["audio"], "video-out": ["video"], "both-out": ["image", "audio"]}
    for job_id in ("text", "image-in", "audio-in", "video-in", *wanted):
        line = got[job_id]
        if fmt == "anyverse":
            assert line["status"] == "ok", line
            made = sorted(m["modality"] for m in line["media"])
            paths = [m["path"] for m in line["media"]]
        else:
            assert line["error"] is None and line["response"]["status_code"] == 200, line
            message = line["response"]["body"]["choices"][0]["message"]
            assert isinstance(message["content"], str)
            entries = [*message.get("images", []), *message.get("audios", []), *message.get("videos", [])]
            made = sorted(["image"] * len(message.get("images", [])) + ["audio"] * len(message.get("audios", []))
                          + ["video"] * len(message.get("videos", [])))
            paths = [e.get("url") or e.get(e.get("type", ""), {}).get("url") for e in entries]
        assert set(wanted.get(job_id, [])) <= set(made), line  # the random tiny model may ask for more
        assert all((out / p).is_file() and Path(p).parent == Path("media") for p in paths)
    status = {k: (v.get("anyverse", v)["status"], v.get("anyverse", v)["reason"]) for k, v in got.items()}
    assert status["line-6"] == ("failed", "invalid job")
    assert status["missing"] == ("failed", "invalid job")
    # anyverse lines' media are decoded when the job runs; OpenAI's parser decodes them while validating
    assert status["corrupt"][0] == "failed" and status["corrupt"][1].startswith(
        "input: " if fmt == "anyverse" else "invalid job")
    assert len(got) == len(lines)


def test_a_generator_error_fails_only_its_own_job_in_the_batch(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    from anyverse.generators.stable_diffusion import StableDiffusionGenerator as StableDiffusion

    real = StableDiffusion.generate_one

    def refuses_width_16(self, request, options, *args):  # type: ignore[no-untyped-def]
        if options.width == 16:
            raise ValueError("`height` and `width` have to be divisible by 8 but are 32 and 16")  # as diffusers says
        return real(self, request, options, *args)

    monkeypatch.setattr(StableDiffusion, "generate_one", refuses_width_16)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "good", "prompt": "draw", "outputs": ["image"]},
        {"id": "bad", "prompt": "draw", "outputs": ["image"], "options": {"image": {"width": 16}}},
        {"id": "also-good", "prompt": "draw again", "outputs": ["image"], "options": {"steps": 1}}])
    code, output = batch("run", jobs, "--out", tmp_path / "out", *SIGNAL)
    assert code == 0, output
    got = results(tmp_path / "out")
    assert got["good"]["status"] == got["also-good"]["status"] == "ok"
    assert got["also-good"]["media"][0]["request"]["options"]["steps"] == 1
    assert got["bad"]["status"] == "failed" and got["bad"]["reason"] == "output missing"
    assert "image generation failed" in got["bad"]["error"] and "divisible by 8" in got["bad"]["error"]


def test_an_error_decoding_one_row_fails_only_that_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from anyverse.batch import worker

    real = worker.decode_batch

    def breaks_on_seed_666(llm, rows, *args):  # type: ignore[no-untyped-def]
        if any(row.seed == 666 for row in rows):
            raise RuntimeError("row 666 breaks the batch")
        return real(llm, rows, *args)

    monkeypatch.setattr(worker, "decode_batch", breaks_on_seed_666)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a"}, {"id": "bad", "options": {"seed": 666}}, {"id": "b"}])
    code, output = batch("run", jobs, "--out", tmp_path / "out")
    assert code == 0, output
    got = results(tmp_path / "out")
    assert got["a"]["status"] == got["b"]["status"] == "ok"
    assert (got["bad"]["status"], got["bad"]["reason"]) == ("failed", "decode")
    assert "row 666 breaks the batch" in got["bad"]["error"]


def test_an_invalid_job_file_is_refused_whole_with_every_bad_line_numbered(batch_media: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.png").write_bytes(batch_media["image"].read_bytes())
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.png").symlink_to(outside / "x.png")
    jobs = write_jobs(root / "jobs.jsonl", [
        {"id": "a", "prompt": "ok"}, "[1, 2]", {"id": "a", "prompt": "again"}, {"id": "b", "colour": "red"},
        {"id": "c", "inputs": ["../elsewhere/x.png"]}, {"id": "d", "inputs": ["link.png"]},
        {"id": "e", "outputs": ["smell"]}])
    code, output = batch("run", jobs, "--out", tmp_path / "out")
    assert code == 2
    for number, words in [(2, "not list"), (3, "duplicate id 'a'"), (4, "colour"), (5, "outside the allowed root"),
                          (6, "outside the allowed root"), (7, "outputs.0")]:
        assert f"jobs.jsonl:{number}: " in output and words in output, output
    assert not (tmp_path / "out" / "results.jsonl").exists()
    code, output = batch("validate", jobs)
    assert code == 2 and "jobs.jsonl:7" in output
    empty = write_jobs(root / "empty.jsonl", [])
    code, output = batch("validate", empty)
    assert code == 2 and "empty" in output


def test_an_overlong_line_is_skipped_unread_and_the_next_line_still_counts(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path) -> None:
    monkeypatch.setattr("anyverse.batch.jobs.MAX_LINE_BYTES", 64)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "big", "prompt": "x" * 500}, {"id": "small"}])
    code, output = batch("validate", jobs)
    assert code == 2 and "jobs.jsonl:1: longer than 64 bytes" in output and "jobs.jsonl:2" not in output


def test_the_ray_engine_without_ray_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a"}])
    code, output = batch("run", jobs, "--out", tmp_path / "out", "--engine", "ray")
    assert code == 2 and "pip install 'anyverse[ray]'" in output


@pytest.mark.slow  # a fresh process loads the models (about 30 s on 2 shared cores)
def test_a_run_killed_mid_batch_resumes_with_nothing_lost_and_no_duplicates(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": f"j{i}", "prompt": f"say {i}"} for i in range(24)])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "anyverse.cli.app", "batch", "run", str(jobs), "--out", str(out),
               "--batch-size", "2"]
    log = open(tmp_path / "stderr.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=os.environ.copy())

    def finished() -> int:
        path = out / "results.jsonl"
        return len(path.read_text().splitlines()) if path.is_file() else 0

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and finished() < 4:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()
    before = (out / "results.jsonl").read_text().splitlines()
    assert 4 <= len(before) < 24, "killed mid-run"
    with open(out / "results.jsonl", "a") as f:  # a torn last line, as a power loss leaves it
        f.write('{"id": "j9", "status": "o')
    code, output = batch("run", jobs, "--out", out, "--batch-size", "2")
    assert code == 0, output
    assert "torn" in output
    after = (out / "results.jsonl").read_text().splitlines()
    assert after[: len(before)] == before, "finished results are kept as they were"
    assert sorted(results(out)) == sorted(f"j{i}" for i in range(24))
    assert json.loads(output.splitlines()[-1])["ran"] == 24 - len(before)


@pytest.mark.parametrize("signals", [1, 2])
def test_an_interrupt_finishes_the_batch_in_flight_and_a_second_abandons_it(signals: int, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": f"j{i}", "prompt": f"say {i}"} for i in range(12)])
    out = tmp_path / "out"

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out / "results.jsonl").is_file():
            time.sleep(0.01)
        for _ in range(signals):  # into the second batch (4 replies decoding), not between two batches
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    code, output = batch("run", jobs, "--out", out, "--batch-size", "4")
    assert code == 130, output
    assert ("abandoned" if signals == 2 else "stopped after the batch in flight") in output
    assert f"Resume with: anyverse batch run {jobs} --out {out}" in output
    written = results(out)
    assert len(written) == (4 if signals == 2 else 8), "the batch in flight was finished, or abandoned"
    code, output = batch("run", jobs, "--out", out, "--batch-size", "4")
    assert code == 0 and len(results(out)) == 12


def test_retry_failed_runs_only_the_failed_jobs_again(batch_media: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "photo.png"
    bad.write_bytes(batch_media["corrupt"].read_bytes())
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "ok", "prompt": "hi"},
                                                {"id": "fixme", "prompt": "describe", "inputs": ["photo.png"]}])
    out = tmp_path / "out"
    assert batch("run", jobs, "--out", out)[0] == 0
    assert results(out)["fixme"]["status"] == "failed"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bad)
    code, output = batch("run", jobs, "--out", out)
    assert code == 0 and json.loads(output.splitlines()[-1])["ran"] == 0
    first = results(out)["ok"]
    code, output = batch("run", jobs, "--out", out, "--retry-failed")
    assert code == 0 and json.loads(output.splitlines()[-1])["ran"] == 1
    got = results(out)
    assert got["fixme"]["status"] == "ok" and got["ok"] == first


def test_map_writes_a_reproducible_job_file_and_a_rerun_resumes_it(batch_media: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(batch_media["image"].read_bytes())
    out = tmp_path / "out"
    code, output = batch("map", "describe this and draw it", "--inputs", f"{folder}/*.png", "--outputs",
                         "text,image", "--out", out, *SIGNAL)
    assert code == 0, output
    written = [json.loads(line) for line in (out / "jobs.jsonl").read_text().splitlines()]
    assert [(j["id"], j["inputs"]) for j in written] == [(f"p{i}.png", [str(folder / f"p{i}.png")]) for i in range(3)]
    got = results(out)
    assert all(got[f"p{i}.png"]["status"] == "ok" and got[f"p{i}.png"]["media"] for i in range(3))
    code, output = batch("map", "describe this and draw it", "--inputs", f"{folder}/*.png", "--outputs",
                         "text,image", "--out", out, *SIGNAL)
    assert code == 0 and json.loads(output.splitlines()[-1])["ran"] == 0


def test_status_reports_done_failed_by_reason_and_pending(batch_media: dict[str, Path], tmp_path: Path) -> None:
    jobs = write_jobs(batch_media["image"].parent / "status.jsonl", [
        {"id": "bad", "inputs": [batch_media["corrupt"].name]}, *({"id": f"j{i}"} for i in range(4))])
    out = tmp_path / "out"
    assert batch("run", jobs, "--out", out, "--limit", "3")[0] == 0
    code, output = batch("status", out, "--json")
    report = json.loads(output)
    assert code == 0 and (report["done"], report["failed"], report["pending"]) == (2, 1, 2)
    assert list(report["failed_by_reason"]) == ["input: truncated or corrupt PNG image"]
    code, output = batch("status", out)
    assert code == 0 and "2 done, 1 failed, 2 pending" in output
    code, output = batch("status", tmp_path)
    assert code == 2 and "run.json" in output


@pytest.mark.parametrize("mode", ["meta", "signal"])
def test_batch_size_1_and_8_give_the_same_text_and_requests(mode: str, batch_media: dict[str, Path],
                                                            tmp_path: Path) -> None:
    jobs = write_jobs(batch_media["image"].parent / f"sizes-{mode}.jsonl", [
        {"id": f"j{i}", "prompt": f"job {i} " * (i % 4), "inputs": [batch_media["image"].name] * (i % 2),
         "outputs": ["image"] if i % 3 == 0 else ["text"]} for i in range(8)])
    runs = {}
    for size in (1, 8):
        code, output = batch("run", jobs, "--out", tmp_path / f"b{size}", "--batch-size", str(size), "--mode", mode)
        assert code == 0, output
        runs[size] = results(tmp_path / f"b{size}")
    for job_id, one in runs[1].items():
        eight = runs[8][job_id]
        assert one["text"] == eight["text"] and one["status"] == eight["status"]
        assert [m["request"]["options"] for m in one["media"]] == [m["request"]["options"] for m in eight["media"]]
        for a, b in zip(one["media"], eight["media"], strict=True):
            if a["modality"] != "image":
                continue
            pixels = [np.asarray(Image.open(tmp_path / f"b{n}" / m["path"]), np.int16) for n, m in ((1, a), (8, b))]
            assert np.abs(pixels[0] - pixels[1]).max() <= 2
    assert any(r["media"] for r in runs[1].values())


def test_resuming_with_another_config_is_refused_unless_forced(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [{"id": "a", "prompt": "hi"}])
    out = tmp_path / "out"
    assert batch("run", jobs, "--out", out)[0] == 0
    code, output = batch("run", jobs, "--out", out, "--set", "llm.temperature=0.5")
    assert code == 2 and "another config" in output
    code, output = batch("run", jobs, "--out", out, "--set", "llm.temperature=0.5", "--force")
    assert code == 0, output
    write_jobs(jobs, [{"id": "a", "prompt": "changed"}])
    code, output = batch("run", jobs, "--out", out, "--set", "llm.temperature=0.5")
    assert code == 0 and "changed since it finished" in output


def test_schema_prints_the_job_line_json_schema() -> None:
    code, output = batch("schema")
    schema = json.loads(output)
    assert code == 0 and schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"id", "prompt", "inputs", "outputs", "options"}
