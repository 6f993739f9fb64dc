"""The session API that chat, batch and serve build on: phases, ids from the history, undo, restore, stop."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from anyverse.media import save_image
from anyverse.session import Anyverse, next_id
from anyverse.types import Media, Message, Modality, TextDelta, TurnFinished


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Anyverse:
    return Anyverse.from_profile("tiny", output_dir=tmp_path_factory.mktemp("out"))


@pytest.fixture()
def picture(tmp_path: Path) -> Path:
    return save_image(np.random.default_rng(0).random((24, 24, 3)), tmp_path).path


def test_a_stream_ends_with_the_turn_result(session: Anyverse) -> None:
    session.reset()
    events = list(session.stream("draw", require=Modality.IMAGE, seed=0))
    assert isinstance(events[-1], TurnFinished) and not any(isinstance(e, TurnFinished) for e in events[:-1])
    result = events[-1].result
    assert result.assistant is not None and result.assistant.media[0].id == "img_1"
    assert session.history == [result.user, result.assistant]
    assert result.assistant.requests[0].options.seed == 0  # turn seed + request index, recorded


def test_undo_frees_the_last_ids_and_a_retry_gets_them_again(session: Anyverse, picture: Path) -> None:
    session.reset()
    first = session.turn("look", [picture], seed=0)
    second = session.turn("look again", [picture], require=Modality.IMAGE, seed=1)
    assert first.user.media[0].id == "img_1" and second.user.media[0].id == "img_2"
    assert second.assistant.media[0].id == "img_3"
    assert session.undo() and len(session.history) == 2
    again = session.turn("look again", [picture], require=Modality.IMAGE, seed=2)
    assert [again.user.media[0].id, again.assistant.media[0].id] == ["img_2", "img_3"]


def test_restore_keeps_logged_ids_and_leaves_out_a_vanished_file(session: Anyverse, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    kept, gone = (save_image(rng.random((16, 16, 3)), tmp_path / name) for name in ("a", "b"))
    history = [Message(role="user", text="two", media=[kept.with_id("img_1"), gone.with_id("img_2")]),
               Message(role="assistant", text="ok")]
    gone.path.unlink()
    notices = session.restore(history)
    assert len(notices) == 1 and notices[0].startswith("img_2:")
    assert list(session.media) == ["img_1"]
    assert next_id(Modality.IMAGE, history) == "img_3"  # never re-used while the log still names img_2


def test_setting_stop_ends_the_turn_and_adds_nothing(session: Anyverse) -> None:
    session.reset()
    stop = threading.Event()
    pieces = 0
    for event in session.stream("tell me a long story", seed=3, stop=stop):
        if isinstance(event, TextDelta):
            pieces += 1
            stop.set()
        last = event
    assert isinstance(last, TurnFinished) and last.result.stopped and pieces >= 1
    assert session.history == []


def test_streamed_text_equals_the_whole_decoded_reply(session: Anyverse) -> None:
    session.reset()
    events = list(session.stream("say something", seed=4))
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta)).strip()
    assert streamed == events[-1].result.text


def test_undecodable_text_is_replaced_not_raised(session: Anyverse) -> None:
    session.reset()
    broken = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")
    result = session.turn(broken, seed=5)
    assert result.user.text == "caf\ufffd \ufffd"


def test_events_print_shapes_not_tensors(tmp_path: Path) -> None:
    signal = Anyverse.from_profile("tiny", ["output.mode=signal"], output_dir=tmp_path)
    result = signal.turn("draw", require=Modality.IMAGE, seed=0)
    shown = str(result.media[0])
    assert "tensor(" not in shown and "prompt_embeds" in shown and len(shown) < 2000


def test_media_of_a_history_is_derived_not_stored(session: Anyverse) -> None:
    session.reset()
    assert session.media == {}
    item = Media(modality=Modality.AUDIO, path=Path("x.wav"), sha256="0" * 64, format="wav", original_name="x.wav")
    session.history = [Message(role="user", media=[item.with_id("aud_4")])]
    assert list(session.media) == ["aud_4"] and next_id(Modality.AUDIO, session.history) == "aud_5"


def test_a_long_history_keeps_its_newest_exchanges_that_fit(session: Anyverse) -> None:
    history = [Message(role=role, text=f"{role} message number {i} " * 8) for i in range(200)
               for role in ("user", "assistant")] + [Message(role="user", text="the question")]
    context = session.context(history)
    budget = session.config.llm.max_context_tokens - session.config.llm.max_new_tokens
    assert len(context.ids) <= budget
    assert "the question" in context.text and "number 199" in context.text and "number 0 " not in context.text
    kept = context.text.count("user message number")
    longer = session.model.render(history[-2 * kept - 3 :], session.config.output.mode)
    assert len(longer.ids) > budget  # one more exchange would not have fit
