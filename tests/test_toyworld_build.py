"""The one-command toy-world build runs every stage, installs the toyworld profile, and the profile then answers."""

from __future__ import annotations

import json

import pytest
from anyverse.cli.app import app
from typer.testing import CliRunner

from anyverse.config import anyverse_home
from anyverse.train.toyworld_build import BUILD_STAGES, build_toyworld


@pytest.mark.slow
def test_build_installs_a_working_toyworld_profile(tmp_path) -> None:
    quick = ["steps=2", "batch_size=2", "log_every=1"]
    scores = build_toyworld(n=24, seed=0, overrides=dict.fromkeys(BUILD_STAGES, quick), eval_limit=3)
    for key in ("caption_accuracy", "decoder_retrieval", "decoder_cosine", "routing_accuracy/meta",
                "routing_accuracy/signal"):
        assert key in scores
    assert all(0.0 <= v <= 1.0 for k, v in scores.items() if k != "decoder_cosine")
    root = anyverse_home() / "toyworld"
    for piece in ("encoder/model.safetensors", "llm/config.json", "adapter/adapter_config.json",
                  "projectors.safetensors", "eval.json"):
        assert (root / piece).is_file(), piece

    runner = CliRunner()
    result = runner.invoke(app, ["run", "what is in img_1?", "--profile", "toyworld", "--attach",
                                 str(root / "data/media/image/000000.png"), "--out", str(tmp_path / "out"),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["text"] is not None

    result = runner.invoke(app, ["eval", "toyworld", "--data", str(root / "data"), "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert "routing_accuracy" in json.loads(result.output.splitlines()[-1])
