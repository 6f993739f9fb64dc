"""``anyverse chat``, ``run -c`` and ``logs``: a real terminal (pexpect), pipes, JSON lines, and the log on disk."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pexpect
import pytest
import soundfile as sf
from anyverse.cli.app import app
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture()
def home(tmp_path: Path, anyverse_home: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ANYVERSE_HOME (own log, media store and input history) sharing the session's tiny weights."""
    fresh = tmp_path / "home"
    fresh.mkdir()
    shared = Path(anyverse_home) / "tiny"
    shared.mkdir(parents=True, exist_ok=True)
    (fresh / "tiny").symlink_to(shared)
    monkeypatch.setenv("ANYVERSE_HOME", str(fresh))
    return fresh


def chat(*args: str, script: str = "") -> tuple[int, str, str]:
    """Piped chat in signal mode, where a required request is always made (forced signal-token runs)."""
    result = runner.invoke(app, ["chat", "--seed", "0", "--mode", "signal", *args], input=script)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, result.stderr


def logged(*args: str) -> dict | list:
    result = runner.invoke(app, ["logs", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def media_rows(stdout: str) -> list[list[str]]:
    return [line.split("  ") for line in stdout.splitlines() if line[:4] in ("img_", "aud_", "vid_")]


def test_piped_chat_attaches_media_lists_it_and_refers_to_it_by_id(home: Path, inputs: dict[str, Path]) -> None:
    script = (f"/attach {inputs['image']}\n/attach {inputs['audio']}\nwhat is this?\n/set require image\n"
              "draw it\n/media\n/set require none\nnow describe img_2\n/exit\n")
    code, out, err = chat(script=script)
    assert code == 0 and err == ""
    rows = media_rows(out)
    assert [(r[0], r[1], r[2]) for r in rows] == [("img_1", "image", "user"), ("aud_1", "audio", "user"),
                                                  ("img_2", "image", "assistant")]
    assert all(Path(r[3]).is_file() and Path(r[3]).parent == home / "media" for r in rows)
    conversation = logged("list")[0]
    assert conversation["exchanges"] == 3 and conversation["profile"] == "tiny"
    shown = logged("show", conversation["id"])
    assert shown["exchanges"][2]["user"]["text"] == "now describe img_2"
    assert shown["exchanges"][1]["assistant"]["requests"][0]["options"]["seed"] == 0


def test_chat_c_and_run_c_continue_with_the_same_ids(home: Path, inputs: dict[str, Path]) -> None:
    chat(script=f"/attach {inputs['image']}\nlook\n/set require audio\nplay it\n/exit\n")
    code, out, _ = chat("-c", script="/media\n/exit\n")
    assert code == 0 and [r[0] for r in media_rows(out)] == ["img_1", "aud_1"]
    result = runner.invoke(app, ["run", "make img_1 darker", "-c", "--require", "image", "--seed", "1", "--json",
                                 "--out", str(home / "run-out")])
    # -c reused the logged overrides (signal mode), so the same model continues
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)
    assert "img_2" in [m["media"]["id"] for m in reply["media"]]
    conversations = logged("list")
    assert len(conversations) == 1 and conversations[0]["exchanges"] == 3


def test_a_vanished_media_file_is_reported_and_its_id_left_out(home: Path, inputs: dict[str, Path]) -> None:
    chat(script=f"/attach {inputs['image']}\n/attach {inputs['audio']}\nlook\n/exit\n")
    stored = {r[0]: Path(r[3]) for r in media_rows(chat("-c", script="/media\n/exit\n")[1])}
    stored["img_1"].unlink()
    code, out, err = chat("-c", script=f"/media\n/attach {inputs['video']}\nand this\n/media\n/exit\n")
    assert code == 0 and "img_1: left out" in err and len(err.strip().splitlines()) == 1
    assert [r[0] for r in media_rows(out)] == ["aud_1", "aud_1", "vid_1"]


def test_a_conversation_from_another_model_is_refused_in_one_line(home: Path) -> None:
    chat(script="hello\n/exit\n")
    code, _, err = chat("-c", "--set", "output.signal_tokens.image=2", script="/exit\n")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "made with another model" in err and "signal_tokens" in err


def test_a_corrupt_log_is_reported_and_left_untouched(home: Path) -> None:
    garbage = b"this is not a database" * 100
    (home / "logs.db").write_bytes(garbage)
    code, _, err = chat(script="hello\n/exit\n")
    assert code == 2 and "logs.db" in err and "left untouched" in err and len(err.strip().splitlines()) == 1
    assert (home / "logs.db").read_bytes() == garbage
    code, _, _ = chat("--no-log", script="hello\n/exit\n")
    assert code == 0 and (home / "logs.db").read_bytes() == garbage


@pytest.mark.slow
def test_two_chat_processes_share_the_log(home: Path) -> None:
    command = [sys.executable, "-m", "anyverse.cli.app", "chat", "--seed", "0", "--set", "llm.max_new_tokens=8"]
    env = {**os.environ, "ANYVERSE_HOME": str(home)}
    script = "".join(f"message {i}\n" for i in range(3)) + "/exit\n"
    procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, text=True) for _ in range(2)]
    outputs = [p.communicate(script, timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    conversations = logged("list")
    assert sorted(c["exchanges"] for c in conversations) == [3, 3]
    with sqlite3.connect(home / "logs.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_json_mode_writes_one_event_per_line(home: Path) -> None:
    code, out, _ = chat("--json", "--require", "audio", script="make a sound\n/nope\n/exit\n")
    events = [json.loads(line) for line in out.splitlines()]
    kinds = [e["kind"] for e in events]
    assert code == 0 and kinds.count("done") == 1 and "media" in kinds and kinds[-1] == "error"
    assert events[kinds.index("done")]["result"]["media"][0]["media"]["modality"] == "audio"


def test_a_pasted_quoted_path_is_attached(home: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    spaced = tmp_path / "my photos" / "cat picture.png"
    spaced.parent.mkdir()
    spaced.write_bytes(inputs["image"].read_bytes())
    escaped = str(spaced).replace(" ", "\\ ")
    code, out, _ = chat(script=f"what is in '{spaced}'?\nand {escaped}\n/media\n/exit\n")
    assert code == 0 and [r[0] for r in media_rows(out)] == ["img_1", "img_2"]
    texts = [e["user"]["text"] for e in logged("show", logged("list")[0]["id"])["exchanges"]]
    assert texts == ["what is in ?", "and"]


def test_bad_attachments_and_bad_text_never_end_the_chat(home: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    nan = tmp_path / "nan.wav"
    samples = np.zeros(16000, np.float32)
    samples[::7] = np.nan
    sf.write(nan, samples, 16000, subtype="FLOAT")
    script = (f"/attach {tmp_path / 'missing.png'}\n/attach {corrupt}\n/attach {nan}\nlisten\n"
              "caf\udce9 [IMG0] <|request|>{}\n/exit\n")
    result = runner.invoke(app, ["chat", "--seed", "0", "--mode", "signal"],
                           input=script.encode("utf-8", "surrogateescape"))
    assert result.exit_code == 0 and "Traceback" not in result.output
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "missing.png" in errors[0] and "broken.png" in errors[1]
    exchanges = logged("show", logged("list")[0]["id"])["exchanges"]
    assert exchanges[0]["user"]["media"][0]["modality"] == "audio"
    assert exchanges[1]["user"]["text"].startswith("caf\ufffd")
    assert all(not r["requests"] for r in (exchanges[1]["assistant"],))  # typed tokens requested nothing


def test_debug_parse_prints_undecodable_input() -> None:
    result = runner.invoke(app, ["debug", "parse"], input=b"caf\xe9 \xff ok")
    assert result.exit_code == 0 and json.loads(result.stdout.splitlines()[0])["text"].startswith("caf\ufffd")


@pytest.mark.slow
def test_the_terminal_repl(home: Path, inputs: dict[str, Path]) -> None:
    """A person at a terminal: attach, stream, list, retry, undo, Ctrl-C mid-generation, exit, continue."""
    env = {**os.environ, "ANYVERSE_HOME": str(home), "TERM": "dumb"}
    command = ["-m", "anyverse.cli.app", "chat", "--seed", "0", "--mode", "signal"]
    child = pexpect.spawn(sys.executable, command, env=env, encoding="utf-8", timeout=120, dimensions=(50, 200))
    child.logfile_read = open(home.parent / "tty.log", "w")  # noqa: SIM115
    try:
        child.expect("anyverse chat")
        child.expect("> ")
        child.sendline(f"/attach {inputs['image']}")
        child.expect("attached image")
        child.sendline(f"/attach {inputs['audio']}")
        child.expect("attached audio")
        child.sendline("/set require image")
        child.sendline("what is this? draw it")
        child.expect(r"(img_\d) image: (\S+\.png)")
        first = child.match.group(2)
        child.sendline("/retry")
        child.expect("retrying with seed")
        child.expect(r"(img_\d) image: (\S+\.png)")
        made, again = child.match.group(1), child.match.group(2)
        assert again != first and made == "img_2"  # the retry reuses the id the undone reply had freed
        child.sendline("/media")
        child.expect("img_2  image  assistant")
        child.sendline("/set require none")
        child.sendline("hello")
        child.expect("> ")
        child.sendline("/set require video")
        child.expect("require = video")
        before = sorted((home / "media").iterdir())
        child.sendline("/set steps 500")
        child.sendline("make a long film")
        child.expect("video requested")
        child.expect(r"step \d+/500")  # the film is being made: Ctrl-C now reaches the generation, not the prompt
        child.sendcontrol("c")
        child.expect("stopped: the conversation is as it was")
        left = set((home / "media").iterdir()) - set(before)  # what the stopped reply left: no film, no part file
        assert not [f for f in left if f.suffix == ".mp4" or f.name.startswith(".tmp")]
        child.sendline("/undo")  # drops "hello": the stopped film was never part of the conversation
        child.expect("dropped the last exchange")
        child.sendline("/media")
        child.expect("/media")
        child.expect("> ")
        listed = [r[0] for r in media_rows(child.before.replace("\r", ""))]
        assert listed[:2] == ["img_1", "aud_1"] and "img_2" in listed
        time.sleep(0.3)  # Ctrl-D reaches the line editor, not the tty between prompts
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    code, out, _ = chat("-c", script="/media\n/exit\n")
    ids = [r[0] for r in media_rows(out)]
    assert code == 0 and ids == listed  # the log holds what the terminal showed: no stopped film, no undone reply
    assert logged("list")[0]["exchanges"] == 1
