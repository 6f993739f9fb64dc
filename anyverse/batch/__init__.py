"""Batch transformation jobs: a JSONL job file in, one result line per job out, resumable, run locally or on Ray.

``jobs`` reads and validates job files, ``store`` owns the output folder (results, run.json, status), ``decode``
samples a left-padded batch of replies together, ``engine`` runs batches on one machine and ``ray_engine`` on Ray.
"""
