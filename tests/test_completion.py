"""The shortest valid completion of a meta-response prefix, read against the schema constrained decoding uses."""

from __future__ import annotations

import json

import pytest

from anyverse.completion import Incomplete, shortest_completion
from anyverse.signals import MetaResponse, meta_json_schema

SCHEMA = json.loads(meta_json_schema(24, ("img_1", "img_12"), ()))
REQUESTS = [
    '{"modality": "audio", "prompt": "a long high chirp"}',
    '{"modality": "image", "prompt": "make it blue", "source": "img_12"}',
    '{"modality": "video", "prompt": "a dot", "source": null, "options": {"seed": 3, "width": 64, "seconds": 0.5}}',
]


@pytest.mark.parametrize("request_json", REQUESTS)
def test_every_prefix_of_a_request_completes_to_a_valid_request(request_json: str) -> None:
    for end in range(len(request_json) + 1):
        prefix = request_json[:end]
        rest = shortest_completion(prefix, SCHEMA)
        MetaResponse.model_validate_json(prefix + rest)
        assert rest == "" or end < len(request_json)


@pytest.mark.parametrize("request_json", REQUESTS)
def test_following_a_completion_leaves_the_rest_of_it(request_json: str) -> None:
    for end in range(0, len(request_json), 3):
        rest = shortest_completion(request_json[:end], SCHEMA)
        for step in range(len(rest)):
            assert shortest_completion(request_json[:end] + rest[:step], SCHEMA) == rest[step:]


@pytest.mark.parametrize(("prefix", "rest"), [
    ('{"modality": "image", "prompt": "', 'x"}'),  # a prompt needs a character
    ('{"modality": "image", "prompt": "a", ', '"options": {}}'),  # after a comma a property must follow
    ('{"modality": "image", "prompt": "a", "source": "img_1', '"}'),
    ('{"modality": "image", "prompt": "a", "options": {"width": 1', "0}}"),  # width >= 8
    ('{"modality": "image", "prompt": "a", "options": {"seconds": 0', ".1}}"),  # seconds > 0
    ('{"modality": "vi', 'deo", "prompt": "x"}'),
])
def test_completions_are_the_shortest_the_schema_allows(prefix: str, rest: str) -> None:
    assert shortest_completion(prefix, SCHEMA) == rest


def test_an_unfinished_utf8_character_is_finished_first() -> None:
    prefix = '{"modality": "image", "prompt": "caf\xc3'  # one byte per character: the first byte of "é"
    whole = (prefix + shortest_completion(prefix, SCHEMA)).encode("latin-1").decode("utf-8")
    assert MetaResponse.model_validate_json(whole).prompt.startswith("caf")


@pytest.mark.parametrize("prefix", ['{"x', '{"modality": "im", ', '{"modality": "image"}', '{"prompt": "a"'])
def test_a_prefix_no_valid_request_starts_with_is_refused(prefix: str) -> None:
    with pytest.raises(Incomplete):
        shortest_completion(prefix, SCHEMA)


@pytest.mark.parametrize(("prefix", "rest"), [("", "[0, 0]"), ("[", "0, 0]"), ("[7", ", 0]"), ("[7,", " 0]"),
                                              ("[7, 8", "]"), ("[7, 8, 9", "]")])
def test_arrays_get_the_items_they_still_need(prefix: str, rest: str) -> None:
    assert shortest_completion(prefix, {"type": "array", "items": {"type": "integer"}, "minItems": 2}) == rest
