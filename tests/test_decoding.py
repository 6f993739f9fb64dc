"""Constrained decoding on the tiny profile: a meta-response opened near the end of the token budget still closes
as a valid request, and its JSON has no free whitespace."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from anyverse.decoding import GenerationStream, RequestConstraints, grammar_processor, request_closer
from anyverse.session import Anyverse
from anyverse.signals import REQUEST_CLOSE, REQUEST_OPEN, MetaResponse
from anyverse.types import Modality

pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Anyverse:
    return Anyverse.from_profile("tiny", output_dir=tmp_path_factory.mktemp("decoding"))


@pytest.fixture(scope="module")
def embeds(session: Anyverse) -> torch.Tensor:
    return session.model.embed(session.context([session.prepare("draw a red circle", [])]))


def decode(session: Anyverse, embeds: torch.Tensor, budget: int, seed: int, closing: bool = True) -> list[int]:
    """The raw reply ids under the grammar and constraints a session uses, with ``budget`` new tokens."""
    llm, prompt_chars = session.model.llm, session.config.output.max_prompt_chars
    image = frozenset({Modality.IMAGE})
    processors = [grammar_processor(llm, prompt_chars, (), image),
                  RequestConstraints(llm, "meta", budget, image, meta_reserve=budget - 2,
                                     closer=request_closer(llm, prompt_chars, (), image) if closing else None)]
    stream = GenerationStream(llm, embeds, processors, budget, temperature=1.0, top_p=1.0, seed=seed)
    list(stream)
    return stream.ids


def request_body(session: Anyverse, ids: list[int]) -> str:
    text = session.model.llm.tokenizer.decode(ids)
    return text.split(REQUEST_OPEN, 1)[1].split(REQUEST_CLOSE, 1)[0] if REQUEST_CLOSE in text else ""


@pytest.mark.parametrize("budget", [16, 24, 32])
def test_a_request_opened_near_the_end_of_the_budget_closes_validly(session: Anyverse, embeds: torch.Tensor,
                                                                    budget: int) -> None:
    ran_out = 0
    for seed in range(8):
        ids = decode(session, embeds, budget, seed)
        MetaResponse.model_validate_json(request_body(session, ids))
        ran_out += len(ids) == budget
    assert ran_out >= 4  # most replies were still writing the request when the budget ended


def test_without_the_closer_such_requests_stay_open(session: Anyverse, embeds: torch.Tensor) -> None:
    bodies = [request_body(session, decode(session, embeds, 20, seed, closing=False)) for seed in range(8)]
    assert bodies.count("") >= 4


@pytest.mark.parametrize("seed", range(6))
def test_request_json_has_no_free_whitespace(session: Anyverse, embeds: torch.Tensor, seed: int) -> None:
    body = request_body(session, decode(session, embeds, 48, seed))
    MetaResponse.model_validate(json.loads(body))
    structure = re.sub(r'"[^"]*"', '""', body)  # outside strings, a space only after ":" and ","
    assert structure.startswith("{") and not re.search(r"\s", re.sub(r"[:,] ", "", structure))


def test_a_request_that_cannot_fit_is_not_opened(session: Anyverse) -> None:
    llm = session.model.llm
    closer = request_closer(llm, 24, ())
    assert closer is not None
    constraints = RequestConstraints(llm, "meta", 40, closer=closer)
    opening = llm.token_id(REQUEST_OPEN)
    for used, allowed in [(40 - closer.window - 1, True), (40 - closer.window, False)]:
        scores = constraints(torch.zeros(1, used, dtype=torch.long), torch.zeros(1, len(llm.tokenizer)))
        assert bool(torch.isfinite(scores[0, opening])) is allowed


def test_replies_with_a_small_budget_always_make_the_required_request(tmp_path: Path) -> None:
    session = Anyverse.from_profile("tiny", ["llm.max_new_tokens=24"], output_dir=tmp_path)
    for seed in range(6):
        _, requests, notices = session.draft([session.prepare("draw it", [])], require=Modality.IMAGE,
                                             seed=seed)
        assert [r.modality for r in requests] == [Modality.IMAGE]
        assert not [n for n in notices if "request" in n], notices
