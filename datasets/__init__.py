"""Data only: dataset cards, manifest formats and tiny fixtures, read with importlib.resources."""
