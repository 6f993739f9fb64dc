"""The one-command toy-world build runs every stage, installs the toyworld profile, and the profile then answers."""

from __future__ import annotations

import json
import time

import pytest
from anyverse.cli.app import app
from typer.testing import CliRunner

from anyverse.checkpoint import MANIFEST
from anyverse.config import anyverse_home
from anyverse.train.config import load_train_config
from anyverse.train.toyworld import make_toyworld
from anyverse.train.toyworld_build import (
    BUILD_STAGES,
    REFERENCE_SECONDS,
    SIDE_BY_SIDE,
    BuildClock,
    build_toyworld,
    run_side_by_side,
    stage_config_path,
)


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


def test_side_by_side_stages_each_finish_and_a_failed_stages_error_comes_after_the_others(tmp_path) -> None:
    make_toyworld(tmp_path / "data", 24, 0)
    quick = ["steps=2", "batch_size=2", "log_every=1", "data.eval=null"]
    missing = tmp_path / "missing.jsonl"
    lm = load_train_config(stage_config_path("lm-pretrain"), [*quick, f"data.train={missing}",
                                                              f"data.text={tmp_path / 'data/text.txt'}",
                                                              f"output_dir={tmp_path / 'lm'}"])
    encoder = load_train_config(stage_config_path("encoder-pretrain"), [
        *quick, f"data.train={tmp_path / 'data/pairs-pretrain.jsonl'}", f"output_dir={tmp_path / 'encoder'}"])
    finished = []
    with pytest.raises(Exception, match=r"missing\.jsonl") as failure:
        for stage in run_side_by_side([lm, encoder], tmp_path / "logs"):
            finished.append(stage)
    assert "\n" not in str(failure.value)
    assert finished == ["encoder-pretrain"]
    assert (tmp_path / "encoder" / "step-000002" / MANIFEST).is_file()  # the other stage's work is kept
    assert (tmp_path / "logs" / "lm-pretrain.log").is_file()


def test_the_build_eta_counts_side_by_side_stages_once_and_scales_by_the_training_done() -> None:
    lines: list[str] = []
    clock = BuildClock(lines.append)
    clock.finish("data", time.perf_counter() - 60)  # a slow data step (imports, file writes) does not scale it
    clock.start("lm-pretrain")
    after = [step for step in REFERENCE_SECONDS if step not in {"data", *SIDE_BY_SIDE}]
    first = sum(REFERENCE_SECONDS[step] for step in after) + max(REFERENCE_SECONDS[step] for step in SIDE_BY_SIDE)
    assert lines[-1].endswith(f"build ETA {first / 60:.1f} min"), lines
    for stage in SIDE_BY_SIDE:  # this machine trains at half the reference speed
        clock.finish(stage, time.perf_counter() - 2 * REFERENCE_SECONDS[stage])
    clock.start("encoder-alignment")
    assert lines[-1].startswith("toyworld [4/7] encoder-alignment")
    assert lines[-1].endswith(f"build ETA {2 * sum(REFERENCE_SECONDS[step] for step in after) / 60:.1f} min"), lines
