"""film_fast.interpolate: streaming sequences, feature reuse, batching, scene cuts, tiles."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import film_fast
from film_fast.imageio import to_uint8
from film_fast.interpolation import interpolate_pair
from film_fast.stream import (DEFAULT_SCENE_THRESHOLD, dyadic_subset_schedule, even_schedule,
                              recursive_schedule)
from film_fast.tiling import (PEAK_FACTOR, choose_tiling, estimate_bytes, feature_elements,
                              fusion_elements, make_grid)
from videokit import clip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions on a shared 2-core machine: OpenMP threads waiting for each other cost
    # 10x more than the work (measured: 0.3 s vs 5 s for the same video).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def as_tensor(frame: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(frame.astype(np.float32) / np.float32(255.0))
    return x.permute(2, 0, 1).contiguous()


@pytest.fixture(scope="module")
def cafe_small():
    """Four real consecutive frames at 64x32 as [3, H, W] tensors."""
    return [as_tensor(f) for f in clip("cafe", size=(64, 32))[:4]]


def reference(model, frames, **kw):
    """Pair by pair with interpolation.interpolate_pair (one FILM.forward per new frame)."""
    out = []
    for a, b in zip(frames, frames[1:]):
        out += interpolate_pair(model, a, b, **kw)[:-1]
    return out + [frames[-1]]


@pytest.mark.parametrize("kw", [dict(times_to_interpolate=2), dict(num_frames=3),
                                dict(times_to_interpolate=0)])
def test_sequence_equals_pairwise_reference(small_model, cafe_small, kw):
    expected = reference(small_model, cafe_small, **kw)
    got = list(film_fast.interpolate(small_model, iter(cafe_small), **kw))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert torch.equal(a, b)  # same calls, same bits: reusing features changes nothing
    # Batched pairs: oneDNN may sum in another order for another batch size (measured 1.2e-7).
    batched = list(film_fast.interpolate(small_model, iter(cafe_small), batch_size=3, **kw))
    assert len(batched) == len(expected)
    for a, b in zip(batched, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_frame_counts(small_model, cafe_small):
    n = len(cafe_small)
    assert len(list(film_fast.interpolate(small_model, cafe_small))) == 2 * (n - 1) + 1
    even = list(film_fast.interpolate(small_model, cafe_small, num_frames=2))
    assert len(even) == 3 * (n - 1) + 1
    assert len(list(film_fast.interpolate(small_model, cafe_small, times=[0.3]))) == 2 * (n - 1) + 1


def test_every_frame_encoded_once(small_model, cafe_small, monkeypatch):
    encoded = []
    real = type(small_model).encode

    def counting(self, frames):
        encoded.append(frames.shape[0])
        return real(self, frames)

    monkeypatch.setattr(type(small_model), "encode", counting)
    n = len(cafe_small)
    list(film_fast.interpolate(small_model, cafe_small, times_to_interpolate=2))
    # n inputs + the mid-point of each pair (the only generated frame used as an end point).
    assert sum(encoded) == n + (n - 1)
    encoded.clear()
    list(film_fast.interpolate(small_model, cafe_small, times=[0.25, 0.5, 0.75], batch_size=2))
    assert sum(encoded) == n


def test_direct_times_are_one_call_each(small_model, cafe_small):
    got = list(film_fast.interpolate(small_model, cafe_small[:2], times=[0.7, 0.2]))
    assert len(got) == 4  # x0, t=0.2, t=0.7, x1 (sorted)
    with torch.inference_mode():
        for t, frame in zip((0.2, 0.7), got[1:3]):
            direct = small_model(cafe_small[0][None], cafe_small[1][None], torch.tensor([[t]]))
            assert torch.equal(frame, direct[0].clamp(0, 1))


def test_numpy_uint8_frames(small_model):
    frames = clip("cafe", size=(64, 32))[:3]
    got = list(film_fast.interpolate(small_model, frames, times_to_interpolate=1))
    assert [g.dtype for g in got] == [np.uint8] * 5 and got[0].shape == (32, 64, 3)
    assert got[0] is frames[0] and got[2] is frames[1] and got[4] is frames[2]
    expected = reference(small_model, [as_tensor(f) for f in frames], times_to_interpolate=1)
    np.testing.assert_array_equal(got[1], to_uint8(expected[1]))
    np.testing.assert_array_equal(got[3], to_uint8(expected[3]))


def test_prepared_frames_give_the_same_outputs(small_model):
    """``film_fast.stream.prepare_frame`` (what ``film-fast video`` runs on its read-ahead
    thread) changes where the conversion and the scene thumbnail are computed, nothing else:
    the same frames and the same scene decisions, and originals still pass through."""
    from film_fast.stream import prepare_frame
    frames = clip("cafe", size=(64, 32))[:3]
    frames = frames + [np.ascontiguousarray(255 - frames[-1])]  # a cut before the last frame
    kw = dict(times_to_interpolate=1, scene_threshold=DEFAULT_SCENE_THRESHOLD)
    want = list(film_fast.interpolate(small_model, frames, **kw))
    prepared = [prepare_frame(f, thumb=True) for f in frames]
    assert all(p._thumb is not None for p in prepared)
    got = list(film_fast.interpolate(small_model, prepared, **kw))
    assert len(got) == len(want) == 7
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert got[0] is frames[0] and got[6] is frames[3]
    np.testing.assert_array_equal(got[5], frames[2])  # the cut: the earlier frame repeats


def test_streaming_reads_lazily(small_model):
    """Constant memory: the input is pulled at most one chunk (+1 frame) ahead of the output."""
    pulled = [0]
    frames = [torch.rand(3, 32, 32) for _ in range(5)]

    def source():
        for i in range(40):  # an 'arbitrarily long' iterable
            pulled[0] += 1
            yield frames[i % 5]

    batch = 2
    stream = film_fast.interpolate(small_model, source(), batch_size=batch)
    for count, _ in enumerate(stream, start=1):
        source_frames_emitted = (count + 1) // 2  # frame index k is output 2k
        assert pulled[0] <= source_frames_emitted + batch + 2
    assert count == 2 * 39 + 1


def test_bad_inputs(small_model, cafe_small):
    with pytest.raises(film_fast.InputError, match="need at least 2 frames to interpolate, got 1"):
        list(film_fast.interpolate(small_model, cafe_small[:1]))
    with pytest.raises(film_fast.InputError, match="no frames"):
        list(film_fast.interpolate(small_model, []))
    other = torch.rand(3, 16, 64)
    with pytest.raises(film_fast.InputError, match=r"frame 2 is 64x16, expected 64x32"):
        list(film_fast.interpolate(small_model, [cafe_small[0], cafe_small[1], other]))
    with pytest.raises(film_fast.InputError, match="frame 1: expected a"):
        list(film_fast.interpolate(small_model, [cafe_small[0], torch.zeros(3, 32, 64,
                                                                           dtype=torch.uint8)]))
    with pytest.raises(film_fast.InputError, match="frame 1: is a numpy frame"):
        list(film_fast.interpolate(small_model, [cafe_small[0], np.zeros((32, 64, 3), np.uint8)]))
    with pytest.raises(ValueError, match="at most one"):
        film_fast.interpolate(small_model, cafe_small, times_to_interpolate=1, times=[0.5])
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        film_fast.interpolate(small_model, cafe_small, times=[0.5, 1.0])
    with pytest.raises(ValueError, match="twice"):
        film_fast.interpolate(small_model, cafe_small, times=[0.5, 0.5])
    with pytest.raises(ValueError, match="batch_size"):
        film_fast.interpolate(small_model, cafe_small, batch_size=0)


# ---- schedules ----------------------------------------------------------------------------------
def test_schedules():
    rec = recursive_schedule(2)
    assert [(s.node, s.left, s.right, s.dt) for s in rec.steps] == [
        (3, 0, 1, 0.5), (2, 0, 3, 0.5), (4, 3, 1, 0.5)]  # nodes = position + 1
    assert rec.encode == {3} and rec.max_live == 1
    assert recursive_schedule(3).max_live == 2
    even = even_schedule(3)
    assert [s.node for s in even.steps] == [3, 2, 4] and even.clamp
    sub = dyadic_subset_schedule(3, frozenset({3}))  # 3/8 needs 4/8 and 2/8 first
    assert [(s.node, s.left, s.right) for s in sub.steps] == [(5, 0, 1), (3, 0, 5), (4, 3, 5)]


# ---- scene cuts ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cut_sequence():
    """3 cafe frames, then 3 drift frames: a cut between frames 2 and 3 (240x128 -> 120x64)."""
    return clip("cafe", size=(120, 64))[:3] + clip("drift", size=(120, 64))[:3]


def test_scene_score_separates_cuts_from_motion(cut_sequence):
    scores = [film_fast.scene_change_score(a, b) for a, b in zip(cut_sequence, cut_sequence[1:])]
    assert scores[2] > 0.3  # the cut
    assert max(scores[:2] + scores[3:]) < 0.05  # real motion
    assert DEFAULT_SCENE_THRESHOLD == 0.125


def test_no_interpolation_across_a_cut(small_model, cut_sequence):
    out = list(film_fast.interpolate(small_model, cut_sequence, times_to_interpolate=1,
                                     scene_threshold=DEFAULT_SCENE_THRESHOLD))
    assert len(out) == 11
    assert out[5] is cut_sequence[2]  # the in-between frame of the cut repeats the earlier frame
    assert not np.array_equal(out[3], cut_sequence[1])  # ordinary pairs are interpolated
    off = list(film_fast.interpolate(small_model, cut_sequence, scene_threshold=None))
    assert not np.array_equal(off[5], cut_sequence[2])
    for a, b in zip(out[:4] + out[6:], off[:4] + off[6:]):
        np.testing.assert_array_equal(a, b)


# ---- tiles --------------------------------------------------------------------------------------
def test_tile_grid_covers_and_weights_sum_to_one():
    grid = make_grid(130, 300, 64)
    assert grid.overlap == 16 and len(grid.boxes) > 1
    total = torch.zeros(130, 300, dtype=torch.float64)
    for (y0, y1, x0, x1), w in zip(grid.boxes, grid.weights("cpu", torch.float64)):
        assert y1 - y0 == 64 and x1 - x0 == 64
        total[y0:y1, x0:x1] += w[0, 0]
    torch.testing.assert_close(total, torch.ones_like(total))
    assert make_grid(100, 60, 128).full_frame


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


class LocalModel(torch.nn.Module):
    """FILM's encode / interpolate_encoded interface with a per-pixel 'model':
    (1 - t) a + t b. Tiled and full-frame results must then agree exactly."""

    def __init__(self, options):
        super().__init__()
        self.options = options
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def encode(self, frames):
        from film_fast.model import FrameFeatures
        return FrameFeatures([frames.clone()], (0, 0, 0, 0), tuple(frames.shape[-2:]))

    def interpolate_encoded(self, f0, f1, dt):
        t = torch.as_tensor(dt, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return (1 - t) * f0.levels[0] + t * f1.levels[0]


def test_tiling_plumbing_is_exact_for_a_local_model(small_model):
    frames = [as_tensor(f) for f in clip("drift")[:3]]
    model = LocalModel(small_model.options)
    full = list(film_fast.interpolate(model, frames, times=[0.3, 0.6], tile="off"))
    for tile in (64, 96):
        tiled = list(film_fast.interpolate(model, frames, times=[0.3, 0.6], tile=tile))
        for a, b in zip(full, tiled):
            torch.testing.assert_close(a, b, atol=2e-7, rtol=0)


@pytest.mark.parametrize("tile, max_mae, min_psnr", [(128, 0.015, 30.0), (64, 0.06, 21.0)])
def test_tiles_match_full_frame_on_real_motion(small_model, tile, max_mae, min_psnr):
    """drift frames 0 and 2 (a drifting car, ~10 px apart at 240x128), tiles vs full frame.

    Measured with the small golden model (untrained weights: its output depends on context
    far away, which tiles cut, so this bounds the worst kind of model; CPU fp32):
    128 px tiles (3 x 1, overlap 32) mean abs error 0.0128, PSNR 31.7 dB; 64 px tiles
    (5 x 3, overlap 16) 0.0533, 22.3 dB. Tile edges change the flows near them, so the
    comparison is on the mean and the PSNR, not the maximum.
    """
    frames = [as_tensor(f) for f in clip("drift")]
    pair = [frames[0], frames[2]]
    full = list(film_fast.interpolate(small_model, pair, tile="off"))[1]
    tiled = list(film_fast.interpolate(small_model, pair, tile=tile))[1]
    mae = float((full - tiled).abs().mean())
    assert mae < max_mae and psnr(full, tiled) > min_psnr, (mae, psnr(full, tiled))


def test_tiles_without_feature_reuse_are_identical(small_model):
    from film_fast.stream import run_stream, recursive_schedule, uniform_plan
    from film_fast.tiling import Tiling
    frames = [as_tensor(f) for f in clip("drift", size=(120, 64))[:3]]
    plan = uniform_plan(recursive_schedule(2), [0, 2, 3, 4])
    runs = [[f for _, f in run_stream(small_model, frames, lambda i: plan, tile=Tiling(64, reuse))]
            for reuse in (True, False)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_memory_model_and_auto_tiling(small_model):
    published = film_fast.Options()
    # Derived in film_fast/tiling.py; the measurements are in its docstring.
    assert feature_elements(published) == pytest.approx(163.9, abs=0.1)
    assert fusion_elements(published) == pytest.approx(450.8, abs=0.1)
    per_pixel = estimate_bytes(published, 768, 768, held=0, batch=1) / 768 ** 2
    assert 3040 < per_pixel < 3700  # measured 3.04-3.38 KB/pixel for a call (+10% margin)
    opts = small_model.options
    full = estimate_bytes(opts, 128, 240, held=3)
    # Budgets are compared with the estimate times PEAK_FACTOR (measured process growth).
    fits = int(full * PEAK_FACTOR) + 8
    assert choose_tiling("auto", opts, 128, 240, device="cpu", budget=fits).tile is None
    tight = choose_tiling("auto", opts, 128, 240, device="cpu", budget=fits * 9 // 10)
    assert tight.tile is None and not tight.reuse  # full frames, features re-encoded per call
    small = choose_tiling("auto", opts, 128, 240, device="cpu", budget=full // 3)
    assert small.tile is not None and small.tile % opts.size_multiple == 0
    assert choose_tiling(100, opts, 128, 240, device="cpu", budget=1 << 40).tile == 112
    assert choose_tiling("off", opts, 128, 240, device="cpu").tile is None


def test_auto_tiles_when_memory_is_short(small_model, monkeypatch):
    frames = [as_tensor(f) for f in clip("drift")[:2]]
    full = list(film_fast.interpolate(small_model, frames, tile="off"))[1]
    monkeypatch.setenv("FILM_FAST_MEMORY_BUDGET", str(estimate_bytes(small_model.options, 128, 240,
                                                                     held=3) // 3))
    seen = []
    from film_fast.stream import run_stream, recursive_schedule, uniform_plan
    plan = uniform_plan(recursive_schedule(1), [0, 2])
    got = [f for _, f in run_stream(small_model, frames, lambda i: plan, tile="auto",
                                    on_start=lambda t, h, w: seen.append(t))]
    assert seen[0].tile is not None and seen[0].tile < 240
    forced = list(film_fast.interpolate(small_model, frames, tile=seen[0].tile))
    assert torch.equal(got[1], forced[1]) and not torch.equal(got[1], full)


def test_auto_tiling_steps_down_when_the_first_chunk_runs_out_of_memory(small_model,
                                                                        monkeypatch):
    """tile="auto" is a prediction: an out-of-memory error in the first chunk, before any
    frame was made, retries the chunk with the next smaller tiling (no feature reuse, then
    half-size tiles), with a warning, and gives what that tiling gives. An explicit tile, or
    an error after frames were made, is raised as it is."""
    from film_fast import stream as stream_module
    from film_fast.tiling import Tiling, smaller_tiling
    frames = clip("cafe", size=(64, 32))[:3]
    real_call = stream_module._Runner.call
    calls = []

    def oom_on_full_frames(self, a, b, dts):
        calls.append(self.grid.full_frame)
        if self.grid.full_frame:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real_call(self, a, b, dts)
    monkeypatch.setattr(stream_module._Runner, "call", oom_on_full_frames)
    with pytest.warns(RuntimeWarning, match="out of memory") as record:
        got = list(film_fast.interpolate(small_model, frames, tile="auto"))
    assert len(record) == 2  # full frame -> without reuse -> tiles
    step = smaller_tiling(Tiling(None, False), small_model.options, 32, 64)
    assert step is not None and step.tile is not None and not step.reuse
    monkeypatch.setattr(stream_module._Runner, "call", real_call)
    want = list(stream_module.run_stream(small_model, iter(frames),
                                         lambda i: stream_module.uniform_plan(
                                             stream_module.recursive_schedule(1),
                                             [0, stream_module.grid_node(1, 2)]),
                                         tile=step))
    assert len(got) == len(want) == 5
    for a, (_, b) in zip(got, want):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setattr(stream_module._Runner, "call", oom_on_full_frames)
    with pytest.raises(torch.OutOfMemoryError):
        list(film_fast.interpolate(small_model, frames, tile="off"))

    def oom_on_second_call(self, a, b, dts):
        calls.append(None)
        if len(calls) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real_call(self, a, b, dts)
    calls.clear()
    monkeypatch.setattr(stream_module._Runner, "call", oom_on_second_call)
    with pytest.raises(torch.OutOfMemoryError):
        list(film_fast.interpolate(small_model, frames, tile="auto"))


def test_smaller_tiling_ladder():
    from film_fast.tiling import Tiling, smaller_tiling
    opts = film_fast.Options()  # size multiple 64
    steps, t = [], Tiling(None, True)
    while t is not None:
        steps.append(t)
        t = smaller_tiling(t, opts, 1080, 1920)
    assert steps == [Tiling(None, True), Tiling(None, False), Tiling(960, False),
                     Tiling(512, False), Tiling(256, False), Tiling(128, False)]
