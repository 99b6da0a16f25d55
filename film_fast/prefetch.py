"""Read-ahead of frames on a background thread, so decoding overlaps the model.

Decoding a 1080p H.264 frame (PyAV/FFmpeg) or a PNG (Pillow) takes 5-30 ms of CPU
time, and both release the GIL while they work; the model runs on the GPU or in
oneDNN/ATen threads, which release it too. Running the reader ``depth`` frames
ahead on one thread hides that time behind compute instead of adding it per
frame. Frames are handed over in order through a bounded queue (``depth`` items:
at most ``depth`` decoded frames wait in memory).

The consumer sees exactly the items of the source iterable, in order; an
exception raised by the source is re-raised in the consumer at the position it
happened; closing the consumer (``break``, an exception, garbage collection)
stops the reader thread.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(source: Iterable[T], depth: int = 2,
             transform: Optional[Callable[[T], T]] = None) -> Iterator[T]:
    """Yields the items of ``source`` (optionally ``transform``-ed on the reader thread),
    reading up to ``depth`` items ahead on a daemon thread. ``depth <= 0`` reads inline."""
    if depth <= 0:
        for item in source:
            yield transform(item) if transform is not None else item
        return
    slots: "queue.Queue[object]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        # Blocks while the queue is full, but wakes up to notice a stop request.
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        iterator = iter(source)
        try:
            while not stop.is_set():
                try:
                    item = next(iterator)
                except StopIteration:
                    break
                if transform is not None:
                    item = transform(item)
                if not put(item):
                    return
        except BaseException as e:  # forwarded to the consumer, raised there
            put(_Failure(e))
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None and stop.is_set():
                try:
                    close()  # a generator source runs its cleanup (closes the container)
                except Exception:
                    pass
        put(_END)

    thread = threading.Thread(target=reader, name="film_fast-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5.0)
