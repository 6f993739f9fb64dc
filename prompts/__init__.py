"""Data only: versioned system prompts and chat templates, read with importlib.resources."""
