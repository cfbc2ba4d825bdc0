"""Wall-clock timing shared by the basics benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_s(fn: Callable[[], object], n: int) -> float:
    """Median wall time in seconds of ``n`` calls of ``fn``, after one untimed warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
