"""Host threads for the independent pieces of a stage (docs/algorithm.md section 7.5).

The NumPy backend splits its heavy stages into pieces whose results do not
depend on each other: bands of FFT tiles and rows of the mask OR in the
application, chunks of candidates in the normal equations and the adaptive
moments. NumPy and SciPy release the GIL inside their loops, so the pieces run
in parallel on ``GPUMATCH_THREADS`` threads (default: every core). Each piece
is computed whole by one thread in a fixed order, so the results are the same
bits for any number of threads.
"""

from __future__ import annotations

import os

__all__ = ["host_threads", "map_in_threads", "piece_size"]


def host_threads():
    """Threads for the host stages: ``GPUMATCH_THREADS`` or every core.

    Returns
    -------
    int
        At least 1.

    Raises
    ------
    ValueError
        When ``GPUMATCH_THREADS`` is set but is not an integer.
    """
    env = os.environ.get("GPUMATCH_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"GPUMATCH_THREADS={env!r} is not a number of threads: set it to "
                             "a positive integer or unset it (every core)") from None
    return os.cpu_count() or 1


def map_in_threads(fn, items, threads=None):
    """``[fn(item) for item in items]``, the calls spread over threads.

    Parameters
    ----------
    fn : callable
        Called once per item; calls must not depend on each other.
    items : sequence
        The pieces, in order.
    threads : int, optional
        How many threads at most (default :func:`host_threads`). One thread,
        or one item, runs in the calling thread.

    Returns
    -------
    list
        The results in the order of ``items``.
    """
    items = list(items)
    workers = min(host_threads() if threads is None else threads, len(items))
    if workers <= 1:
        return [fn(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="gpumatch-host") as pool:
        return list(pool.map(fn, items))


def piece_size(n, least=64, most=512):
    """Items per piece when ``n`` independent items are shared out to the host
    threads: one piece per thread, but at least ``least`` (the Python work
    per piece holds the GIL; few large pieces run in parallel best) and at
    most ``most`` (a piece's temporaries stay in cache).

    Returns
    -------
    int
        At least 1.
    """
    return max(1, min(most, max(least, -(-int(n) // host_threads()))))
