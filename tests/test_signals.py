"""Parser and schema unit tests: injected model text, fed in every possible chunking."""

from __future__ import annotations

import json

import pytest

from anyverse.signals import (
    REQUEST_CLOSE,
    REQUEST_OPEN,
    MetaResponse,
    SignalVocabulary,
    StreamParser,
    meta_json_schema,
)
from anyverse.types import MediaRequested, Modality, Notice, TextDelta

VOCAB = SignalVocabulary({Modality.IMAGE: 4, Modality.VIDEO: 3, Modality.AUDIO: 2})


def run(text: str, mode: str, chunk: int) -> list:
    parser = StreamParser(VOCAB, mode, max_prompt_chars=40)  # type: ignore[arg-type]
    events = []
    for i in range(0, len(text), chunk):
        events += parser.feed(text[i : i + chunk])
    return events + parser.close()


def summary(events: list) -> tuple[str, list, list[str]]:
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    requests = [(e.request.modality.value, e.request.prompt, e.request.source) for e in events
                if isinstance(e, MediaRequested)]
    notices = [e.message for e in events if isinstance(e, Notice)]
    return text, requests, notices


META = (f'Sure! {REQUEST_OPEN}{{"modality": "image", "prompt": "a red circle", "source": "img_1"}}{REQUEST_CLOSE}'
        f" and {REQUEST_OPEN}{{\"modality\": \"audio\", \"prompt\": \"a beep\"}}{REQUEST_CLOSE} done")


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_meta_requests_parse_the_same_for_any_chunking(chunk: int) -> None:
    text, requests, notices = summary(run(META, "meta", chunk))
    assert text == "Sure!  and  done"
    assert requests == [("image", "a red circle", "img_1"), ("audio", "a beep", None)]
    assert notices == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("{not json}", "invalid JSON"),
        ('{"modality": "smell", "prompt": "x"}', "modality"),
        ('{"modality": "image"}', "prompt"),
        ('{"modality": "image", "prompt": "' + "x" * 41 + '"}', "longer than 40"),
        ('{"modality": "image", "prompt": "x", "source": "../../etc/passwd"}', "source"),
        ('{"modality": "image", "prompt": "x", "options": {"steps": 100000}}', "options.steps"),
        ('{"modality": "image", "prompt": "x", "shell": "rm -rf /"}', "shell"),
    ],
)
def test_malformed_meta_requests_become_notices(body: str, reason: str) -> None:
    text, requests, notices = summary(run(f"a{REQUEST_OPEN}{body}{REQUEST_CLOSE}b", "meta", 3))
    assert (text, requests) == ("ab", [])
    assert len(notices) == 1 and reason in notices[0]


def test_unfinished_request_and_stray_markers_are_reported_not_raised() -> None:
    _, requests, notices = summary(run(f"x{REQUEST_CLOSE}y{REQUEST_OPEN}{{\"modality\"", "meta", 4))
    assert requests == []
    assert any("without a start" in n for n in notices) and any("ended inside" in n for n in notices)


def test_partial_marker_at_end_is_released_as_text() -> None:
    text, _, _ = summary(run("hello <|requ", "meta", 1))
    assert text == "hello <|requ"


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_signal_runs(chunk: int) -> None:
    stream = "draw [IMG0][IMG1][IMG2][IMG3] now [VID0][VID1] x [AUD1] [AUD0][AUD1][IMG4]"
    text, requests, notices = summary(run(stream, "signal", chunk))
    assert requests == [("image", None, None), ("audio", None, None)]
    assert any("incomplete video signal (2 of 3" in n for n in notices)
    assert any("[AUD1] appeared outside" in n for n in notices)
    assert "[IMG4]" in text  # not in the vocabulary: plain text


def test_modes_ignore_each_others_syntax() -> None:
    _, requests, notices = summary(run("[IMG0][IMG1][IMG2][IMG3]", "meta", 100))
    assert requests == [] and len(notices) == 4
    _, requests, notices = summary(run(META, "signal", 100))
    assert requests == [] and all("output mode is 'signal'" in n for n in notices)


def test_constrained_schema_limits_prompt_and_sources() -> None:
    schema = json.loads(meta_json_schema(30, ("img_1", "aud_2")))
    assert schema["properties"]["prompt"]["maxLength"] == 30
    assert schema["properties"]["source"]["anyOf"][0]["enum"] == ["img_1", "aud_2"]
    assert set(schema["properties"]) == set(MetaResponse.model_fields) - {"generator"}  # as trained prompts had it
    named = json.loads(meta_json_schema(30, (), (), ("stable-diffusion", "edit")))
    assert named["properties"]["generator"]["anyOf"][0]["enum"] == ["stable-diffusion", "edit"]


def test_vocabulary_is_derived_from_counts() -> None:
    assert VOCAB.signal_tokens(Modality.VIDEO) == ["[VID0]", "[VID1]", "[VID2]"]
    assert VOCAB.parse_signal("[AUD2]") is None and VOCAB.parse_signal("[AUD1]") == (Modality.AUDIO, 1)
    assert len(set(VOCAB.special_tokens)) == len(VOCAB.special_tokens) == 5 + 4 + 3 + 2


def test_parser_counts_failed_requests_for_the_retry_decision() -> None:
    parser = StreamParser(VOCAB, "meta", max_prompt_chars=40)
    parser.feed(f'{REQUEST_OPEN}{{"modality": "image", "prompt": "ok"}}{REQUEST_CLOSE}')
    assert parser.failed_requests == 0
    parser.feed(f"{REQUEST_OPEN}{{broken}}{REQUEST_CLOSE} {REQUEST_OPEN}{{\"modality\"")
    parser.close()
    assert parser.failed_requests == 2
