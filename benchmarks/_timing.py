"""Shared by the benchmark scripts: CPU time spent inside chosen methods of live objects."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any


def clock_cpu(targets: Iterable[tuple[object, Iterable[str]]]) -> list[float]:
    """Wrap the named methods of each object so that the CPU seconds spent inside them add up in the
    returned one-element list (read ``[0]`` after the run)."""
    spent = [0.0]

    def clocked(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.process_time() - start

        return wrapper

    for obj, names in targets:
        for name in names:
            setattr(obj, name, clocked(getattr(obj, name)))
    return spent
