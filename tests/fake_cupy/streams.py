"""The fake's streams and events, run lazily and adversarially (see below), with
``memcpyAsync`` and kernel launches queued on them."""

from __future__ import annotations

import collections
import ctypes
import os
import random
import time

import numpy as np


def install(ctx):
    """Define streams, events, ``memcpy_async`` and ``on_stream`` on ``ctx``."""
    COUNTS, strict, device_pool, _any_host = ctx.COUNTS, ctx.strict, ctx.device_pool, ctx._any_host

    # Streams run lazily and adversarially: work queued on a non-default
    # stream (kernel launches, memcpyAsync) runs only when the host waits for
    # it (stream or event synchronize), in a seeded random order among the
    # streams whose next operation's event waits are met. A missing
    # wait_event, or a pinned buffer reused before the copy that reads it has
    # finished, then gives wrong results instead of passing by luck. The
    # default stream (ptr 0) runs everything at once, like CuPy's own
    # synchronous-looking array operations.
    streams = {}
    order_rng = random.Random(int(os.environ.get("GPUMATCH_FAKE_STREAM_SEED", "0")))

    class Event:
        def __init__(self, block=False, disable_timing=False, interprocess=False):
            self.stream, self.position, self.time = None, 0, None

        def record(self, stream=None):
            self.stream = current_stream() if stream is None else stream
            self.stream.enqueue(lambda: setattr(self, "time", time.perf_counter()))
            self.position = self.stream.queued

        @property
        def done(self):
            return self.stream is None or self.stream.done >= self.position

        def synchronize(self):
            run_until(lambda: self.done)

    def get_elapsed_time(start, stop):
        assert start.done and stop.done, "elapsed time of events not yet completed"
        return 1e3 * (stop.time - start.time)

    class Stream:
        _current = []

        def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
            self.ptr = 0 if null else len(streams) + 1000
            streams[self.ptr] = self
            self.ops = collections.deque()
            self.queued = self.done = 0

        def enqueue(self, fn, event=None):
            self.queued += 1
            if self.ptr == 0:
                if event is not None:
                    event.synchronize()
                if fn is not None:
                    fn()
                self.done += 1
            else:
                self.ops.append((fn, event))

        def record(self, event=None):
            event = Event() if event is None else event
            event.record(self)
            return event

        def wait_event(self, event):
            assert isinstance(event, Event)
            self.enqueue(None, event)

        def synchronize(self):
            run_until(lambda: self.done == self.queued)

        def __enter__(self):
            Stream._current.append(self)
            return self

        def __exit__(self, *args):
            Stream._current.pop()
            return False

    null_stream = Stream.null = Stream(null=True)

    def current_stream():
        return Stream._current[-1] if Stream._current else null_stream

    def run_until(condition):
        while not condition():
            ready = [st for st in streams.values()
                     if st.ops and (st.ops[0][1] is None or st.ops[0][1].done)]
            if not ready:
                raise AssertionError("deadlock: every stream with work waits on an event "
                                     "that can never complete")
            st = order_rng.choice(ready)
            fn, _ = st.ops.popleft()
            if fn is not None:
                fn()
            st.done += 1

    def memcpy_async(dst, src, size, kind, stream):
        assert stream in streams and kind in (1, 2)
        streams[stream].enqueue(lambda: ctypes.memmove(dst, src, size))

    def on_stream(launch):
        """A kernel launch queued on the current stream, as CUDA does."""
        def queued(grid, block, args, *, shared_mem=0, stream=None,
                   enable_cooperative_groups=False):
            if strict and _any_host(args):
                raise TypeError(f"Unsupported type {np.ndarray} (a NumPy array as a kernel "
                                "argument; kernels take device arrays and NumPy scalars)")
            assert stream is None, "the fake launches on the current stream only"
            COUNTS["gpumatch kernel launches"] += 1
            # As on a GPU, a queued kernel does not keep its arguments' memory.
            detached = [device_pool.detach(a) for a in args]
            current_stream().enqueue(lambda: launch(
                grid, block, tuple(d() if callable(d) else d for d in detached),
                shared_mem=shared_mem))
        return queued

    ctx.__dict__.update(Stream=Stream, Event=Event, streams=streams, current_stream=current_stream,
                        run_until=run_until, memcpy_async=memcpy_async, on_stream=on_stream,
                        get_elapsed_time=get_elapsed_time)
