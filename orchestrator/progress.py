"""Progress bars in a log (`ray job logs`, nohup, a pipe): one line per bar at most every $VIDEORL_PROGRESS_S
seconds (default 30), each with tqdm's rate and ETA, instead of a line per update."""

from __future__ import annotations

import os
from functools import partialmethod

PROGRESS_ENV = "VIDEORL_PROGRESS_S"


def progress_interval() -> float:
    """Seconds between a bar's lines in a log: $VIDEORL_PROGRESS_S, default 30."""
    text = os.environ.get(PROGRESS_ENV, "30")
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"{PROGRESS_ENV} must be a number of seconds > 0, got {text!r}")
    return seconds


def redraw_every(seconds: float) -> None:
    """Bars created from now on redraw at most once every `seconds`, whichever module made them.

    tqdm reads TQDM_MININTERVAL only when it is imported (its envwrap turns TQDM_* into default keywords of
    tqdm.__init__), which is before `videorl` could set it; so the defaults are replaced here the same way.
    maxinterval too: tqdm's monitor thread would otherwise redraw a slow bar every 10 s. And `set_postfix` redraws at
    once by default whatever the interval (the reward-model and engagement bars set one every step): its default
    becomes refresh=False, so the postfix shows with the next redraw.
    """
    from tqdm import std

    _defaults(std.tqdm, "__init__", mininterval=seconds, maxinterval=seconds)
    _defaults(std.tqdm, "set_postfix", refresh=False)


def _defaults(cls, method: str, **keywords) -> None:
    """Replace keyword defaults of cls.method, as tqdm's envwrap sets those of tqdm.__init__."""
    current = cls.__dict__[method]
    func, old = (current.func, current.keywords) if isinstance(current, partialmethod) else (current, {})
    setattr(cls, method, partialmethod(func, **{**old, **keywords}))
