"""Silence library chatter (progress bars, resize and deprecation notices) around anyverse's own loads.

The previous verbosity and progress-bar settings are restored afterwards, so a user's own logging setup is untouched;
``ANYVERSE_VERBOSE=1`` keeps the chatter for debugging.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager


@contextmanager
def quiet_libraries() -> Iterator[None]:
    if os.environ.get("ANYVERSE_VERBOSE"):
        yield
        return
    import diffusers.utils.logging as dlog
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tlog

    with ExitStack() as stack:
        for lib in (tlog, dlog):
            level, bars = lib.get_verbosity(), lib.is_progress_bar_enabled()
            lib.set_verbosity_error()
            lib.disable_progress_bar()
            stack.callback(lib.set_verbosity, level)
            if bars:
                stack.callback(lib.enable_progress_bar)
        if not hub.are_progress_bars_disabled():
            hub.disable_progress_bars()
            stack.callback(hub.enable_progress_bars)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield
