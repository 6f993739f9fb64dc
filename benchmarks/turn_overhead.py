"""Orchestration overhead of one turn as a fraction of model compute, measured in one run.

Model compute = time inside the encoder, the LLM's ``generate`` (and, in signal mode, its pass for the signal states
and the output projectors) and the generator plugin. Everything else in a
turn (rendering, tokenising, streaming, parsing, routing, saving files, the manifest) is overhead.
Target: <= 5 %. ``--llm-width`` scales the random LLM up to see the ratio at less toy-like compute.

    python benchmarks/turn_overhead.py [--turns 5] [--llm-width 512 --llm-layers 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def timed(store: dict[str, float], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store[key] += time.perf_counter() - start

    return wrapper


def scaled_llm(width: int | None, layers: int | None) -> list[str]:
    """Config overrides that scale the tiny profile's random LLM (width: hidden size, 4x in the MLP)."""
    overrides = []
    if width:
        overrides += [f"llm.tiny.arch.hidden_size={width}", f"llm.tiny.arch.intermediate_size={4 * width}"]
    if layers:
        overrides.append(f"llm.tiny.arch.num_hidden_layers={layers}")
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--mode", choices=["meta", "signal"], default="meta")
    parser.add_argument("--llm-width", type=int, default=None)
    parser.add_argument("--llm-layers", type=int, default=None)
    args = parser.parse_args()

    import torch

    from anyverse.session import Anyverse
    from anyverse.types import OUTPUT_MODALITIES, Modality

    torch.set_num_threads(1)
    overrides = [f"output.mode={args.mode}", *scaled_llm(args.llm_width, args.llm_layers)]
    session = Anyverse.from_profile("tiny", overrides, output_dir=tempfile.mkdtemp(prefix="anyverse-bench-"))
    compute: dict[str, float] = defaultdict(float)
    llm = session.model.llm.model
    llm.generate = timed(compute, "llm", llm.generate)  # type: ignore[method-assign]
    session.model.encoder.encode = timed(compute, "encoder", session.model.encoder.encode)  # type: ignore[method-assign]
    # signal mode's second LLM pass (hidden states at the signal tokens) and output projectors are model compute too
    session.model.signal_conditioning = timed(  # type: ignore[method-assign]
        compute, "llm-states", session.model.signal_conditioning)
    for modality in OUTPUT_MODALITIES:  # a random reply may ask for any of them
        plugin = session.generators.get(modality)
        plugin.generate = timed(compute, "generator", plugin.generate)  # type: ignore[method-assign]

    session.turn("warm up", require=Modality.IMAGE, seed=0)
    compute.clear()
    start = time.perf_counter()
    for turn in range(args.turns):
        session.turn(f"draw picture {turn}", require=Modality.IMAGE, seed=turn)
    total = time.perf_counter() - start
    model = sum(compute.values())
    print(f"turns: {args.turns}  mode: {args.mode}  llm params: {sum(p.numel() for p in llm.parameters()):,}")
    print(f"turn wall time: {1000 * total / args.turns:.1f} ms/turn")
    for key, seconds in sorted(compute.items()):
        print(f"  {key:9s} {1000 * seconds / args.turns:8.1f} ms/turn")
    print(f"orchestration overhead / model compute: {(total - model) / model:.3f}  (target <= 0.05)")


if __name__ == "__main__":
    main()
