"""film_fast.prefetch: read-ahead keeps order, forwards errors, stops its thread, overlaps work."""
import threading
import time

import pytest

from film_fast.prefetch import prefetch


def test_order_and_transform():
    assert list(prefetch(range(50), depth=3)) == list(range(50))
    assert list(prefetch(iter("abc"), depth=1, transform=str.upper)) == ["A", "B", "C"]
    assert list(prefetch([], depth=2)) == []
    assert list(prefetch(range(4), depth=0)) == [0, 1, 2, 3]  # inline


def test_error_is_raised_in_the_consumer_at_its_position():
    def source():
        yield 1
        yield 2
        raise ValueError("frame 2 is truncated")
    got = []
    with pytest.raises(ValueError, match="truncated"):
        for item in prefetch(source(), depth=4):
            got.append(item)
    assert got == [1, 2]


def test_closing_the_consumer_stops_the_reader_and_closes_the_source():
    closed = threading.Event()

    def source():
        try:
            for k in range(10**9):
                yield k
        finally:
            closed.set()
    it = prefetch(source(), depth=2)
    assert next(it) == 0
    it.close()
    assert closed.wait(2.0)
    assert not [t for t in threading.enumerate() if t.name == "film_fast-prefetch" and t.is_alive()]


def test_reads_ahead_while_the_consumer_works():
    def slow_source():
        for k in range(6):
            time.sleep(0.05)  # "decoding" (sleep releases the GIL, as FFmpeg and zlib do)
            yield k
    start = time.perf_counter()
    for _ in prefetch(slow_source(), depth=2):
        time.sleep(0.05)  # "the model"
    overlapped = time.perf_counter() - start
    # Serial would be 12 x 50 ms = 0.6 s; overlapped about 7 x 50 ms = 0.35 s.
    assert overlapped < 0.5, overlapped
