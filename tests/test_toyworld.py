"""The toy world: same bytes per seed, clean manifests, media that match their captions, a real held-out split."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from anyverse.cli.app import app
from typer.testing import CliRunner

from anyverse.config import Caps
from anyverse.media import decode_audio, decode_image, decode_video_clips, load_media
from anyverse.train.manifest import DialogRecord, PairRecord, SkipReport, read_manifest
from anyverse.train.toyworld import (
    COLOURS,
    HELD_OUT,
    MIN_N,
    PITCH_HZ,
    PRETRAIN_PER_ITEM,
    VOCABULARY,
    caption,
    is_held_out,
    language,
    make_toyworld,
)
from anyverse.types import Modality

N, SEED = 30, 1
CAPS = Caps()
HELD_OUT_WORDS = ("green triangle", "long high chirp")
runner = CliRunner()


def cli(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, ["data", "toyworld", *args])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("toyworld") / "world"
    result = cli(str(directory), "--n", str(N), "--seed", str(SEED))
    assert result.exit_code == 0, result.output
    assert str(directory) in result.output and "pairs compositional" in result.output
    return directory


def pairs(directory: Path, side: str) -> list[PairRecord]:
    report = SkipReport(directory / f"pairs-{side}.jsonl")
    records = list(read_manifest(report.source, PairRecord, report))
    assert not report.skipped, report.summary()
    return records


def dialogs(directory: Path, side: str) -> list[DialogRecord]:
    report = SkipReport(directory / f"dialogs-{side}.jsonl")
    records = list(read_manifest(report.source, DialogRecord, report))
    assert not report.skipped, report.summary()
    return records


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes(world: Path, tmp_path: Path) -> None:
    make_toyworld(tmp_path / "again", n=N, seed=SEED)
    expected = digests(world)
    made = [ref for side in ("train", "test") for d in dialogs(world, side) for t in d.messages
            if t.role == "assistant" for ref in t.media]  # what the conversations' assistant turns made
    # media, pretraining media, media made in conversations, 6 manifests, text.txt, README.md, toyworld.json
    assert len(expected) == (3 + sum(PRETRAIN_PER_ITEM.values())) * N + len(made) + 9
    assert digests(tmp_path / "again") == expected
    make_toyworld(tmp_path / "other", n=N, seed=SEED + 1)
    assert digests(tmp_path / "other")["media/image/000000.png"] != expected["media/image/000000.png"]


def test_manifests_cover_every_item_once(world: Path) -> None:
    extra = [r for r in pairs(world, "pretrain") if r.attributes["split"] == "pretrain"]
    records = pairs(world, "train") + pairs(world, "test")
    assert pairs(world, "pretrain") == pairs(world, "train") + extra
    for modality, ext in ((Modality.IMAGE, "png"), (Modality.AUDIO, "wav")):
        paths = [r.media for r in extra if r.modality == modality]
        count = PRETRAIN_PER_ITEM[modality] * N
        assert paths == [f"media/pretrain-{modality.value}/{i:06d}.{ext}" for i in range(count)]
    assert {r.modality for r in extra} == set(PRETRAIN_PER_ITEM)
    assert not any(is_held_out(r.modality, r.attributes) for r in extra)
    assert [r.caption for r in extra] == [caption(r.modality, r.attributes) for r in extra]
    for modality, ext in ((Modality.IMAGE, "png"), (Modality.AUDIO, "wav"), (Modality.VIDEO, "mp4")):
        paths = sorted(r.media for r in records if r.modality == modality)
        assert paths == [f"media/{modality.value}/{i:06d}.{ext}" for i in range(N)]
    records += extra
    meta = json.loads((world / "toyworld.json").read_text())
    assert (meta["seed"], meta["n"]) == (SEED, N)
    assert meta["vocabulary"]["audio"]["pitch"] == list(PITCH_HZ)
    for split, per_modality in meta["counts"]["pairs"].items():
        for modality, count in per_modality.items():
            assert count == sum(r.attributes["split"] == split and r.modality == modality for r in records)
    assert sum(meta["counts"]["dialogs"]["train"].values()) == len(dialogs(world, "train"))
    assert (world / "README.md").read_text().startswith("# Toy world")


def test_media_decode_as_captioned(world: Path) -> None:
    """Every file decodes as its modality, and what it shows or sounds like is what the caption says."""
    for record in pairs(world, "pretrain") + pairs(world, "test"):
        a = record.attributes
        assert record.caption == caption(record.modality, a)
        assert all(a[k] in values for k, values in VOCABULARY[record.modality].items())
        media = load_media(world / record.media, CAPS)
        assert media.modality == record.modality
        if record.modality == Modality.IMAGE:
            pixels = np.asarray(decode_image(media, CAPS), dtype=np.float32)
            assert pixels.shape == (64, 64, 3)
            ys, xs = np.nonzero(pixels.max(axis=2) > 80)
            assert ("bottom" if ys.mean() > 32 else "top") in a["position"]
            assert ("right" if xs.mean() > 32 else "left") in a["position"]
            mean = pixels[ys, xs].mean(axis=0)
            assert min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum()) == a["colour"]
        elif record.modality == Modality.AUDIO:
            x = decode_audio(media, CAPS)
            assert (len(x) > 16000) == (a["length"] == "long")
            if a["kind"] == "tone":
                peak = np.fft.rfftfreq(len(x), 1 / 16000)[np.abs(np.fft.rfft(x)).argmax()]
                assert min(PITCH_HZ, key=lambda p: abs(np.log(peak / PITCH_HZ[p]))) == a["pitch"]
        else:
            clips = decode_video_clips(media, CAPS, num_clips=1, frames_per_clip=2, clip_seconds=2.0)
            assert clips.shape == (1, 2, 64, 64, 3)
            centres = []
            for frame in clips[0]:
                ys, xs = np.nonzero(frame.max(axis=2) > 80)
                centres.append(np.array([xs.mean(), ys.mean()]))
            dx, dy = centres[1] - centres[0]
            expected = {"right": (dx > 10), "left": (dx < -10), "down": (dy > 10), "up": (dy < -10)}
            assert expected[a["direction"]], (record.media, dx, dy)


def test_held_out_combinations_never_reach_training(world: Path) -> None:
    train, test = pairs(world, "train"), pairs(world, "test")
    assert {r.attributes["split"] for r in train} == {"train"}
    assert {r.attributes["split"] for r in test} == {"test", "compositional"}
    for record in train + test:
        assert is_held_out(record.modality, record.attributes) == (record.attributes["split"] == "compositional")
    seen = {(r.modality, r.caption) for r in train}
    unseen = {(r.modality, r.caption) for r in test if r.attributes["split"] == "test"}
    assert unseen <= seen and len(unseen) >= 3
    assert {r.modality for r in test if r.attributes["split"] == "compositional"} == set(HELD_OUT)

    train_text = [t.text for d in dialogs(world, "train") for t in d.messages]
    train_text += [q.prompt for d in dialogs(world, "train") for t in d.messages for q in t.requests]
    assert not [line for line in train_text if any(w in line for w in HELD_OUT_WORDS)]
    # the LM's corpus holds each phrase of the language once, held-out ones included: held out as media, not words
    corpus = [line for line in (world / "text.txt").read_text().splitlines() if any(w in line for w in HELD_OUT_WORDS)]
    assert sorted(corpus) == sorted(line for _, line in language() if any(w in line for w in HELD_OUT_WORDS))
    test_prompts = [q.prompt for d in dialogs(world, "test") for t in d.messages for q in t.requests]
    assert any(w in p for p in test_prompts for w in HELD_OUT_WORDS)


def test_dialogs_follow_their_media(world: Path) -> None:
    split_of = {r.media: r.attributes["split"] for r in pairs(world, "train") + pairs(world, "test")}
    caption_of = {r.media: r.caption for r in pairs(world, "train") + pairs(world, "test")}
    for side in ("train", "test"):
        records = dialogs(world, side)
        assert {d.attributes["intent"] for d in records} == {"describe", "make_image", "make_video", "make_audio",
                                                             "describe_and_sound", "edit_image", "conversation"}
        for d in records:
            if d.attributes["intent"] == "conversation":
                continue  # multi-turn: tests/test_toyworld_dialogs.py
            user, reply = d.messages
            for ref in user.media:
                assert (split_of[ref.media] == "train") == (side == "train")
                assert ref.id in user.text
            intent = d.attributes["intent"]
            if intent in ("describe", "describe_and_sound"):
                assert reply.text == caption_of[user.media[0].media]
            if intent.startswith("make_"):
                assert reply.requests[0].modality.value == intent[5:] and reply.requests[0].prompt in user.text
            if intent == "edit_image":
                assert reply.requests[0].source == "img_1" and reply.requests[0].prompt.split()[1] in user.text


def test_every_item_is_described_in_each_modality_as_often_as_it_is_drawn(world: Path) -> None:
    """A describe turn per modality and item: with fewer, a sound written in the LM's words was answered as a sound
    to play (a caption plus a request), the nearest intent it had learnt."""
    records = dialogs(world, "train") + dialogs(world, "test")
    described = Counter(d.messages[0].media[0].modality for d in records if d.attributes["intent"] == "describe")
    drawn = sum(d.attributes["intent"] == "make_image" for d in records)
    assert described == {Modality.IMAGE: drawn, Modality.AUDIO: drawn, Modality.VIDEO: drawn}



def test_describe_dialogs_ask_in_every_phrasing_encoder_alignment_captions_with() -> None:
    """Instruction tuning must keep each caption instruction a plain caption request: one it never saw came back as a
    caption plus a sound request (the describe-and-sound intent) and failed caption_accuracy."""
    from anyverse.train.encoder_alignment import CAPTION_INSTRUCTIONS
    from anyverse.train.toyworld import _DESCRIBE

    for modality, phrasings in _DESCRIBE.items():
        assert set(CAPTION_INSTRUCTIONS) <= set(phrasings), modality

def test_rerun_replaces_an_earlier_world(tmp_path: Path) -> None:
    make_toyworld(tmp_path, n=MIN_N + 6, seed=0)
    make_toyworld(tmp_path, n=MIN_N, seed=0)
    assert len(list((tmp_path / "media" / "image").iterdir())) == MIN_N
    assert json.loads((tmp_path / "toyworld.json").read_text())["n"] == MIN_N


def test_refuses_foreign_directories_and_tiny_n(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = cli(str(tmp_path), "--n", str(N))
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and str(tmp_path) in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "media").exists()
    result = cli(str(tmp_path / "new"), "--n", str(MIN_N - 1))
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and str(MIN_N) in result.stderr
