"""Epoch time of encoder alignment with vs without the frozen-encoder feature table, measured in one run.

Both epochs run the same batches through the same recipe (``EncoderAlignment``): projector + frozen LLM forward,
backward and an optimizer step. Without the table, every batch first decodes and encodes its media with the
frozen encoder (no embedding cache), as a naive training loop would; with it, the features were computed once
beforehand (a precompute step, reported but not timed in the epoch) and every epoch reads them from memory.
Target: >= 10x.

    python benchmarks/embedding_cache.py [--n 60] [--batch-size 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60, help="toy world items per modality")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from anyverse.encoders.imagebind import ImageBindEncoder
    from anyverse.train.common import Example, FeatureTable
    from anyverse.train.config import TrainConfig
    from anyverse.train.encoder_alignment import EncoderAlignment
    from anyverse.train.loop import batch_indices
    from anyverse.train.toyworld import make_toyworld

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(tempfile.mkdtemp(prefix="anyverse-bench-"))
    make_toyworld(work / "world", n=args.n, seed=args.seed)
    config = TrainConfig.model_validate({
        "stage": "encoder-alignment", "model": "tiny", "data": {"train": str(work / "world" / "pairs-train.jsonl")},
        "output_dir": str(work / "out"), "steps": 1, "batch_size": args.batch_size, "seed": args.seed})

    start = time.perf_counter()
    recipe = EncoderAlignment(config, torch.device("cpu"))  # builds the feature table: the precompute step
    setup = time.perf_counter() - start
    table = recipe.features
    encoder = recipe.model.encoder
    uncached = ImageBindEncoder(encoder.model, encoder.arch, encoder.id, encoder.batch_size, cache=None)
    caps = recipe.model.config.caps
    optimizer = torch.optim.AdamW(recipe.param_groups())
    items = len(recipe.items)
    steps = -(-items // args.batch_size)
    batches = [[recipe.items[i] for i in batch_indices(s, args.batch_size, items, args.seed)] for s in range(steps)]

    def step(batch: list[Example], features: FeatureTable) -> None:
        recipe.features = features
        recipe.train()
        loss, _ = recipe(recipe.collate(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def encode_batch(batch: list[Example]) -> FeatureTable:
        files = [(media.path, media.modality) for example in batch for media, _, _ in example.slots]
        return FeatureTable.build(uncached, files, caps)

    step(batches[0], encode_batch(batches[0]))  # warm up both paths (first-call allocations, lazy imports)
    step(batches[0], table)

    times: dict[str, float] = {}
    encode_time = 0.0
    start = time.perf_counter()
    for batch in batches:
        tick = time.perf_counter()
        features = encode_batch(batch)
        encode_time += time.perf_counter() - tick
        step(batch, features)
    times["without cache"] = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches:
        step(batch, table)
    times["with cache"] = time.perf_counter() - start

    info: dict[str, Any] = {"items": items, "batch size": args.batch_size, "steps/epoch": steps,
                            "threads": args.threads}
    print("  ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"precompute (feature table + model load, once): {setup:.2f} s")
    for name, seconds in times.items():
        print(f"epoch {name:14s} {seconds:7.3f} s  ({1000 * seconds / steps:.1f} ms/step)")
    print(f"  of which decode + encode: {encode_time:.3f} s")
    print(f"epoch time ratio without/with cache: {times['without cache'] / times['with cache']:.1f}x  (target >= 10x)")


if __name__ == "__main__":
    main()
