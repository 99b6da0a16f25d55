"""film_fast.interpolation: the official recursive schedule and the PyTorch port's evenly spaced one."""
from __future__ import annotations

import pytest
import torch

from film_fast.interpolation import (even_times, frame_times, interpolate_pair, iter_frames,
                                     recursive_times)


class Recorder(torch.nn.Module):
    """A stand-in model: frames are constant images whose value is their time.

    ``linear=True`` returns ``a + dt (b - a)`` (exact for any schedule);
    otherwise ``(a + b) / 2 + offset``. Every call's inputs and dt are recorded.
    """

    def __init__(self, linear: bool = False, offset: float = 0.0, dtype=torch.float32) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.linear, self.offset = linear, offset
        self.calls = []

    def forward(self, a, b, dt):
        assert a.shape[0] == 1 and dt.shape == (1, 1) and a.dtype == self.weight.dtype
        self.calls.append((float(a.max()), float(b.max()), float(dt)))
        if self.linear:
            return a + dt.to(a.dtype).view(1, 1, 1, 1) * (b - a)
        return (a + b) / 2 + self.offset


def const(value: float, dtype=torch.float32) -> torch.Tensor:
    return torch.full((3, 4, 5), value, dtype=dtype)


def values(frames):
    return [round(float(f.mean()), 6) for f in frames]


def test_recursive_times():
    assert recursive_times(0) == []
    assert recursive_times(1) == [0.5]
    assert recursive_times(2) == [0.25, 0.5, 0.75]
    assert recursive_times(10) == [j / 1024 for j in range(1, 1024)]
    assert even_times(3) == [0.25, 0.5, 0.75]
    assert frame_times() == [0.0, 0.5, 1.0]
    assert frame_times(num_frames=2) == [0.0, 1 / 3, 2 / 3, 1.0]
    for bad in (-1, 11, 1.0, True):
        with pytest.raises(ValueError, match="times_to_interpolate"):
            recursive_times(bad)


def test_recursive_schedule_matches_the_official_generator():
    model = Recorder()
    frames = interpolate_pair(model, const(0.0), const(1.0), times_to_interpolate=3)
    assert len(frames) == 9
    assert values(frames) == [j / 8 for j in range(9)]
    # Mid-point of mid-points, depth first, always t = 0.5.
    assert [(a, b) for a, b, _ in model.calls] == [(0, 1), (0, .5), (0, .25), (.25, .5),
                                                   (.5, 1), (.5, .75), (.75, 1)]
    assert all(dt == 0.5 for _, _, dt in model.calls)


def test_times_to_interpolate_zero_and_default():
    model = Recorder()
    assert values(interpolate_pair(model, const(0.2), const(0.6), times_to_interpolate=0)) == [0.2, 0.6]
    assert model.calls == []
    assert values(interpolate_pair(model, const(0.2), const(0.6))) == [0.2, 0.4, 0.6]


def test_num_frames_three_gives_quarter_times_in_the_ports_order():
    model = Recorder(linear=True)
    frames = interpolate_pair(model, const(0.0), const(1.0), num_frames=3)
    assert values(frames) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert model.calls == [(0, 1, 0.5), (0, 0.5, 0.5), (0.5, 1, 0.5)]


def test_num_frames_ties_break_like_the_port():
    # The port's float32 linspace puts 2/3 slightly closer to its interval's middle than 1/3,
    # so 2/3 is made first (dt = 2/3 between the inputs), then 1/3 at dt = 0.5.
    model = Recorder(linear=True)
    frames = interpolate_pair(model, const(0.0), const(1.0), num_frames=2)
    assert [(a, b) for a, b, _ in model.calls] == [(0, 1), (0, pytest.approx(2 / 3))]
    assert [dt for _, _, dt in model.calls] == [pytest.approx(2 / 3), pytest.approx(0.5)]
    assert values(frames) == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=1e-6)


@pytest.mark.parametrize("n", [0, 1, 4, 6, 9])
def test_num_frames_are_evenly_spaced(n):
    model = Recorder(linear=True)
    frames = interpolate_pair(model, const(0.0), const(1.0), num_frames=n)
    assert len(frames) == n + 2 and len(model.calls) == n
    assert values(frames) == pytest.approx([i / (n + 1) for i in range(n + 2)], abs=1e-6)
    assert all(0.0 < dt < 1.0 for _, _, dt in model.calls)


def test_clamping_follows_each_reference():
    # (a + b) / 2 + 0.5 overshoots 1; whether the overshoot is fed back depends on the mode.
    official = Recorder(offset=0.5)
    frames = interpolate_pair(official, const(0.8), const(0.8), times_to_interpolate=2)
    assert official.calls[1][1] == pytest.approx(1.3)  # official recursion: raw mid frame reused
    assert max(values(frames)) == 1.0  # what is handed back is always clamped

    clamped = Recorder(offset=0.5)
    interpolate_pair(clamped, const(0.8), const(0.8), times_to_interpolate=2, clamp_between=True)
    assert clamped.calls[1][1] == 1.0

    port = Recorder(offset=0.5)
    interpolate_pair(port, const(0.8), const(0.8), num_frames=3)
    assert max(max(a, b) for a, b, _ in port.calls) == 1.0  # the port clamps before reuse


def test_outputs_are_float32_cpu_ordinary_tensors_and_progress_is_reported():
    model = Recorder(dtype=torch.float64)
    seen = []
    frames = interpolate_pair(model, const(0.0), const(1.0), times_to_interpolate=2,
                              progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    for f in frames:
        assert f.dtype == torch.float32 and f.device.type == "cpu" and f.shape == (3, 4, 5)
        f.add_(0)  # not an inference tensor: usable outside inference_mode
    assert not torch.is_inference_mode_enabled()


def test_iter_frames_yields_indices_and_times():
    items = list(iter_frames(Recorder(linear=True), const(0.0), const(1.0), num_frames=3))
    assert sorted((i, t) for i, t, _ in items) == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    items = list(iter_frames(Recorder(), const(0.0), const(1.0), times_to_interpolate=2))
    assert [(i, t) for i, t, _ in items] == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]


def test_validation():
    model = Recorder()
    x = const(0.0)
    cases = [(dict(times_to_interpolate=1, num_frames=1), "not both"),
             (dict(times_to_interpolate=11), "0..10"),
             (dict(times_to_interpolate=-1), "0..10"),
             (dict(num_frames=-1), ">= 0"),
             (dict(num_frames=2.0), "int")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            iter_frames(model, x, x, **kwargs)  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="same size"):
        interpolate_pair(model, x, torch.zeros(3, 4, 6))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        interpolate_pair(model, x[None], x[None])
    assert model.calls == []


def test_real_model_middle_frame_is_one_model_call(small_model):
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.rand(3, 48, 64, generator=g), torch.rand(3, 48, 64, generator=g)
    with torch.inference_mode():
        direct = small_model(x0[None], x1[None], torch.full((1, 1), 0.5))[0].clamp(0, 1)
    recursive = interpolate_pair(small_model, x0, x1, times_to_interpolate=1)
    even = interpolate_pair(small_model, x0, x1, num_frames=1)
    assert torch.equal(recursive[0], x0) and torch.equal(recursive[2], x1)
    assert torch.equal(recursive[1], direct) and torch.equal(even[1], direct)
