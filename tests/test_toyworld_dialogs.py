"""Multi-turn toy-world dialogs: later turns refer to media made earlier, and routing is scored per turn position,
with the right source, and on captions of media the model made itself."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anyverse.session import Anyverse
from anyverse.train import toyworld
from anyverse.train.evaluation import routing_accuracy
from anyverse.train.instruction_tuning import Dialog, load_dialogs
from anyverse.train.manifest import DialogRecord, SkipReport, read_manifest
from anyverse.types import MediaRequest, Modality

N = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("conversations") / "world"
    toyworld.make_toyworld(directory, n=N, seed=2)
    return directory


def conversations(world: Path, side: str) -> list[DialogRecord]:
    report = SkipReport(world / f"dialogs-{side}.jsonl")
    records = [d for d in read_manifest(report.source, DialogRecord, report)
               if d.attributes["intent"] == "conversation"]
    assert not report.skipped and records
    return records


def test_conversations_run_two_to_four_exchanges_about_media_made_earlier(world: Path) -> None:
    lengths = set()
    for side in ("train", "test"):
        for dialog in conversations(world, side):
            roles = [t.role for t in dialog.messages]
            assert roles == ["user", "assistant"] * (len(roles) // 2)
            lengths.add(len(roles) // 2)
            known: set[str] = set()
            for turn in dialog.messages:
                named = set(re.findall(r"\b(?:img|aud)_\d+\b", turn.text)) if turn.role == "user" else set()
                assert named <= known | {ref.id for ref in turn.media}  # every id named exists by then
                assert all(r.source is None or r.source in known for r in turn.requests)
                known |= {ref.id for ref in turn.media}
            edit = dialog.messages[3].requests[0]
            assert edit.modality == Modality.IMAGE and edit.source in dialog.messages[2].text
    assert lengths == {2, 3, 4}


def test_training_conversations_may_ask_for_a_new_sound_by_name_after_the_edit(world: Path) -> None:
    verbs = tuple(phrase.replace("{p}", "a ") for phrase in toyworld.TEMPLATES["make_audio"][0])
    for side in ("train", "test"):
        later = [(d.messages[i], d.messages[i + 1]) for d in conversations(world, side)
                 for i in range(4, len(d.messages), 2)]
        named = [(ask, reply) for ask, reply in later if ask.text.startswith(verbs)]
        if side == "test":
            assert not named  # the test conversations are as they were
            continue
        assert named
        for ask, reply in named:
            (request,) = reply.requests
            assert request.modality == Modality.AUDIO and request.source is None
            assert ask.text.endswith(request.prompt) and reply.text == f"here is {request.prompt}"


def test_media_made_in_a_conversation_show_what_their_request_asked_for(world: Path) -> None:
    for dialog in conversations(world, "train")[:6]:
        for turn in dialog.messages:
            for ref, request in zip(turn.media, turn.requests, strict=False):
                if ref.modality == Modality.IMAGE:
                    pixels = np.asarray(Image.open(world / ref.media).convert("RGB"), np.float32) / 255
                    assert toyworld.read_image(pixels) == toyworld.read_caption(Modality.IMAGE, request.prompt)


def test_training_conversations_never_name_a_held_out_combination(world: Path) -> None:
    for dialog in conversations(world, "train"):
        text = " ".join(t.text for t in dialog.messages)
        assert "green triangle" not in text and "long high chirp" not in text


def oracle(dialogs: list[Dialog], keep_source: bool):
    """A stand-in for the model's draft that replies exactly what each dialog expects (maybe losing the source)."""
    expected = {id(d.history): d.reply for d in dialogs}

    def draft(self, history, **_):  # type: ignore[no-untyped-def]
        reply = expected[id(history)]
        return reply.text, [MediaRequest(modality=r.modality, prompt=r.prompt, origin="meta",
                                         source=r.source if keep_source else None) for r in reply.requests], []

    return draft


def test_routing_is_scored_per_turn_with_the_right_source(world: Path, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    model = Anyverse.from_profile("tiny", output_dir=tmp_path).model
    dialogs, _ = load_dialogs(model, world / "dialogs-test.jsonl")
    dialogs = [d for d in dialogs if d.record.attributes["intent"] == "conversation"]
    monkeypatch.setattr(Anyverse, "draft", oracle(dialogs, keep_source=True))
    scores = routing_accuracy(model, dialogs, ["meta", "signal"])
    turns = {k for k in scores if "/turn_" in k}
    assert {"routing_accuracy/meta/turn_1", "routing_accuracy/meta/turn_2", "routing_accuracy/meta/turn_4"} <= turns
    assert all(scores[k] == 1.0 for k in turns) and scores["made_caption_accuracy/meta"] == 1.0

    monkeypatch.setattr(Anyverse, "draft", oracle(dialogs, keep_source=False))
    scores = routing_accuracy(model, dialogs, ["meta", "signal"])
    assert scores["routing_accuracy/meta/turn_2"] == 0.0  # every second turn edits an earlier image
    assert scores["routing_accuracy/signal/turn_2"] == 1.0  # signal tokens carry no source


def test_instruction_tuning_sees_every_assistant_turn_of_a_conversation(world: Path, tmp_path: Path) -> None:
    model = Anyverse.from_profile("tiny", output_dir=tmp_path).model
    dialogs, _ = load_dialogs(model, world / "dialogs-test.jsonl")
    records = {id(d.record): d.record for d in dialogs if d.record.attributes["intent"] == "conversation"}
    turns = sum(len(r.messages) // 2 for r in records.values())
    assert len([d for d in dialogs if d.record.attributes["intent"] == "conversation"]) == turns
    made = [m for d in dialogs for message in d.history if message.role == "assistant" for m in message.media]
    assert made  # later turns see what earlier ones made, as a session splices it back
