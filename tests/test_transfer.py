"""film_fast.transfer: overlapped host<->GPU frame transfers, their delivery order, and the
host-sync audit of the GPU graph (on the meta device here, for real on a lent GPU)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import film_fast
from film_fast import memory_plan
from film_fast.imageio import to_uint8
from film_fast.stream import _Frame, prepare_frame
from film_fast.transfer import HostSyncs, PendingFrame, Transfers, deliver, to_device_async
from videokit import clip

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _Event:
    """Stands in for a CUDA event: counts waits, logs when it was waited for."""

    def __init__(self, log=None, name=None) -> None:
        self.waits, self.log, self.name = 0, log, name

    def synchronize(self) -> None:
        self.waits += 1
        if self.log is not None:
            self.log.append(("resolve", self.name))


def _pending(value: torch.Tensor, log=None, name=None) -> PendingFrame:
    return PendingFrame(value.clone(), _Event(log, name))


# ---- delivery ----------------------------------------------------------------------------
def test_pending_frame_resolves_once_to_pageable_copies():
    pixels = torch.arange(24, dtype=torch.uint8).view(2, 4, 3)
    frame = _pending(pixels)
    got = frame.result()
    assert isinstance(got, np.ndarray) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, pixels.numpy())
    assert frame.result() is got and frame._event.waits == 1  # waited for once
    assert frame._host is None  # the pinned buffer is released
    floats = torch.rand(3, 2, 4)
    f = PendingFrame(floats, _Event())
    out = f.result()
    assert torch.equal(out, floats) and out.data_ptr() != floats.data_ptr()


def test_deliver_holds_pending_frames_until_the_next_call_is_queued():
    """The engine's pattern at factor 2: per pair a model call, then its generated frame
    (pending) and the next pair's first frame. A pending frame must be resolved only after
    the engine has enqueued the *next* call (so its copy overlaps that call), and the items
    must come out in order."""
    log = []

    def engine(pairs):
        yield "in0", "frame0"
        for k in range(pairs):
            log.append(("call", k))
            yield f"mid{k}", _pending(torch.full((1, 1, 3), k, dtype=torch.uint8), log, k)
            yield f"in{k + 1}", f"frame{k + 1}"

    out = []
    for tag, frame in deliver(engine(4)):
        out.append(tag)
        if tag.startswith("mid"):
            assert int(frame[0, 0, 0]) == int(tag[3:])
    assert out == ["in0", "mid0", "in1", "mid1", "in2", "mid2", "in3", "mid3", "in4"]
    for k in range(3):  # resolved after call k + 1 was enqueued
        assert log.index(("resolve", k)) > log.index(("call", k + 1))
    assert log[-1] == ("resolve", 3)  # the last one at the end


def test_deliver_passes_ready_items_straight_through():
    seen = []

    def engine():
        for k in range(3):
            seen.append(k)
            yield k, f"frame{k}"

    for tag, frame in deliver(engine()):
        assert seen[-1] == tag  # nothing was read ahead
        assert frame == f"frame{tag}"


def test_deliver_yields_what_was_made_before_a_failure_then_raises():
    def engine():
        yield "a", _pending(torch.zeros(1, 1, 3, dtype=torch.uint8))
        yield "b", "ready"
        raise ValueError("frame 7: bad")

    got = []
    with pytest.raises(ValueError, match="frame 7"):
        for tag, _ in deliver(engine()):
            got.append(tag)
    assert got == ["a", "b"]


def test_deliver_closes_its_source_when_closed():
    closed = []

    def engine():
        try:
            for k in range(10):
                yield k, k
        finally:
            closed.append(True)

    stream = deliver(engine())
    next(stream)
    stream.close()
    assert closed == [True]


# ---- frames and the CPU path -------------------------------------------------------------
def test_numpy_frame_converts_lazily_and_exactly():
    pixels = clip("cafe", size=(64, 32))[0]
    frame = _Frame.wrap(pixels, 0)
    assert frame._x is None and frame.size == (32, 64)  # no conversion needed for the size
    expected = torch.from_numpy(pixels.astype(np.float32) / np.float32(255.0)).permute(2, 0, 1)
    assert torch.equal(frame.x, expected) and frame.x.is_contiguous()
    flipped = _Frame.wrap(np.ascontiguousarray(pixels)[:, ::-1], 0)  # negative strides
    assert torch.equal(flipped.x, expected.flip(2))


def test_cpu_transfers_are_the_plain_conversions():
    pixels = clip("cafe", size=(64, 32))[0]
    t = Transfers(torch.device("cpu"), torch.float32)
    frame = _Frame.wrap(pixels, 0)
    t.start_upload(frame)
    assert frame.upload is None  # no streams on a CPU
    assert torch.equal(t.device_image(frame), frame.x)
    image = torch.rand(3, 32, 64) * 1.2 - 0.1
    np.testing.assert_array_equal(t.download(image, "numpy"), to_uint8(image))
    assert torch.equal(t.download(image, "tensor"), image.clamp(0, 1))
    bf16 = Transfers(torch.device("cpu"), torch.bfloat16)
    assert torch.equal(bf16.device_image(frame), frame.x.to(torch.bfloat16))


def test_to_device_async_is_a_plain_copy_off_cuda():
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    got = to_device_async(t, torch.device("cpu"), torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, t.float())


# ---- the host-sync audit -----------------------------------------------------------------
def test_host_syncs_finds_blocking_copies_and_not_async_ones():
    t = torch.ones(3)
    with HostSyncs() as audit:
        t.to("meta")
        t.to("meta", torch.float16)  # (positional device and dtype: aten.to.device)
        t.to("meta", non_blocking=True)
        torch.empty(3, device="meta").copy_(t)
        torch.empty(3, device="meta").copy_(t, non_blocking=True)
        t + 1  # (no device involved)
    assert [detail for _, detail in audit.syncs] == ["cpu -> meta, blocking"] * 3
    with torch.inference_mode(), HostSyncs() as audit:  # (there: aten.to, not _to_copy)
        torch.tensor([0.5]).to(device="meta", dtype=torch.float32)
    assert len(audit.syncs) == 1


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_graph_has_no_host_syncs(backend):
    """The published model's GPU graph, dry-run on the meta device: after a first call (which
    builds cached index tables and descriptor tables), forward, encode and
    interpolate_encoded with scalar, per-sample CPU and device times do not make the host
    wait. A blocking ``dt.to(device)`` (what FILM did before) is one such sync per call."""
    with memory_plan.dry_run():
        model = memory_plan._meta_model(film_fast.Options(), torch.float16, backend, 1)
        with torch.device("meta"):
            x0 = torch.empty(2, 3, 128, 192, dtype=torch.float16)
            x1 = torch.empty_like(x0)
        with torch.inference_mode():
            model(x0, x1, 0.5)
            with HostSyncs() as audit:
                model(x0, x1, 0.5)
                model(x0, x1, torch.tensor([0.25, 0.75]))
                model(x0, x1, torch.full((2, 1), 0.5, device="meta"))
                f0, f1 = model.encode(x0), model.encode(x1)
                model.interpolate_encoded(f0, f1, 0.5)
                model.interpolate_encoded(f0, f1, torch.tensor([0.3, 0.6]))
    assert audit.syncs == []


def test_blocking_time_upload_would_be_caught(monkeypatch):
    """The audit above can fail: with the old blocking conversion of the time it reports one
    sync per call."""
    from film_fast import model as model_module
    monkeypatch.setattr(model_module, "to_device_async",
                        lambda t, device, dtype: t.to(device=device, dtype=dtype))
    with memory_plan.dry_run():
        model = memory_plan._meta_model(film_fast.Options(), torch.float16, "torch", 1)
        with torch.device("meta"):
            x0 = torch.empty(1, 3, 64, 64, dtype=torch.float16)
        with torch.inference_mode():
            model(x0, x0, 0.5)
            with HostSyncs() as audit:
                model(x0, x0, torch.tensor([0.5]))
    assert audit.syncs == [("aten.to", "cpu -> meta, blocking")]


# ---- on a GPU ----------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_uploads_equal_the_cpu_conversion(dtype):
    pixels = clip("cafe", size=(96, 64))[0]
    t = Transfers(torch.device("cuda"), dtype)
    for prepared in (prepare_frame(pixels, pin=True), _Frame.wrap(pixels, 0),
                     _Frame.wrap(torch.rand(3, 64, 96), 0)):
        expected = prepared.x.to(dtype)
        t.start_upload(prepared)
        got = t.device_image(prepared)
        assert got.device.type == "cuda" and got.is_contiguous()
        assert torch.equal(got.cpu(), expected)  # bitwise: an IEEE division by 255 on both


@needs_cuda
def test_downloads_equal_the_cpu_conversion():
    t = Transfers(torch.device("cuda"), torch.float16)
    image = (torch.rand(3, 64, 96, device="cuda") * 1.2 - 0.1).half()
    pending = t.download(image, "numpy")
    assert isinstance(pending, PendingFrame)
    np.testing.assert_array_equal(pending.result(), to_uint8(image.cpu()))
    floats = t.download(image, "tensor").result()
    assert floats.device.type == "cpu" and torch.equal(floats, image.cpu().float().clamp(0, 1))


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_stream_on_gpu_is_exact_and_sync_free(small_model, backend):
    """``interpolate`` on a GPU gives the frames of direct model calls, and after its first
    pairs nothing in the loop makes the host wait for the GPU (PyTorch's sync debug mode
    raises on blocking copies, ``.item()`` and stream synchronisations; the engine's own
    event waits are what the overlap is made of and are allowed)."""
    model = copy.deepcopy(small_model).cuda().set_backend(backend)
    frames = clip("cafe", size=(96, 64))[:6]
    stream = film_fast.interpolate(model, (prepare_frame(f, pin=True) for f in frames))
    got = [next(stream) for _ in range(4)]  # warm-up: caches, kernels, pinned blocks
    torch.cuda.set_sync_debug_mode("error")
    try:
        got += list(stream)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(got) == 2 * len(frames) - 1
    with torch.inference_mode():
        for k in range(len(frames) - 1):
            x0, x1 = (torch.from_numpy(f.astype(np.float32) / np.float32(255.0))
                      .permute(2, 0, 1)[None].cuda() for f in frames[k:k + 2])
            direct = to_uint8(model(x0, x1, 0.5)[0]).astype(np.int16)
            # (the engine encodes frames apart, forward encodes both as one batch: a GPU
            # kernel may pick another tile order for another batch, so allow one level)
            assert np.abs(got[2 * k + 1].astype(np.int16) - direct).max() <= 1
            assert got[2 * k] is frames[k] or np.array_equal(got[2 * k], frames[k])


def test_capture_arena_slices_are_never_reused(monkeypatch):
    """Descriptor tables of a CUDA graph capture come from pinned host slices that outlive
    the graph (a replay re-reads them): never handed out twice, a fresh arena once one is
    half used (outside a capture), a clear error inside a capture without one. Pinned memory
    needs CUDA, so the arena is pageable here; the bookkeeping is what is tested."""
    from film_fast.kernels.triton.conv2d import _CaptureArenas
    arenas = _CaptureArenas()
    monkeypatch.setattr(arenas, "ENTRIES", 64)
    monkeypatch.setattr(arenas, "_new_arena", lambda: torch.full((64,), -1, dtype=torch.int64))
    cpu = torch.device("cpu")
    rows = [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(RuntimeError, match="eager call"):
        arenas.upload(rows, cpu)
    arenas.reserve(cpu)
    first = arenas._arenas["cpu"][0]
    tables = [arenas.upload(rows, cpu) for _ in range(4)]  # 32 of 64 entries
    assert all(torch.equal(t, torch.tensor(rows)) for t in tables)
    assert torch.equal(first[:32], torch.tensor(rows).view(-1).repeat(4))  # 4 distinct slices
    arenas.reserve(cpu)  # exactly half used: kept
    assert arenas._arenas["cpu"][0] is first
    arenas.upload(rows, cpu)
    arenas.reserve(cpu)  # more than half: a new arena, the old one kept alive
    assert arenas._arenas["cpu"][0] is not first and arenas._retired == [first]
    for _ in range(8):
        arenas.upload(rows, cpu)
    with pytest.raises(RuntimeError, match="eager call"):
        arenas.upload(rows, cpu)  # full: refused rather than overwriting a slice


def test_stream_overlap_benchmark_on_cpu(tmp_path, capsys, monkeypatch):
    """benchmarks/stream_overlap.py (step 4a of gpu_session.sh) runs end to end; on a CPU both
    modes are the same code, and it restores the switch it flips."""
    import importlib.util
    import json
    import os
    from film_fast import transfer
    monkeypatch.delenv(transfer.OVERLAP_ENV, raising=False)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "stream_overlap.py")
    spec = importlib.util.spec_from_file_location("stream_overlap", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "overlap.json"
    assert script.main(["--device", "cpu", "--size", "64x32", "--frames", "3", "--rounds", "1",
                        "--dtype", "fp32", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["output_frames"] == 5 and report["speedup"] > 0
    assert len(report["seconds"]["blocking"]) == len(report["seconds"]["overlapped"]) == 1
    assert "frames/s" in capsys.readouterr().out
    assert transfer.OVERLAP_ENV not in os.environ


def test_overlap_switch_turns_the_cuda_path_off(monkeypatch):
    from film_fast import transfer
    monkeypatch.setenv(transfer.OVERLAP_ENV, "0")
    assert Transfers(torch.device("cuda"), torch.float16).cuda is False  # (no CUDA call made)


def test_engine_delivers_each_generated_frame_after_the_next_call(small_model, monkeypatch):
    """The real engine with downloads made pending (as on a GPU, emulated): the frames and
    their order are those of the plain run, and every generated frame but the last is
    resolved only after the engine has issued the next model call, i.e. its copy overlaps
    that call."""
    from film_fast import stream as stream_module
    log = []

    class PendingTransfers(Transfers):
        def download(self, image, kind):
            value = super().download(image, kind)
            host = torch.from_numpy(value) if kind == "numpy" else value
            name = len([e for e in log if e[0] == "made"])
            log.append(("made", name))
            return PendingFrame(host, _Event(log, name))

    frames = clip("cafe", size=(64, 32))[:5]
    plain = list(film_fast.interpolate(small_model, frames, times_to_interpolate=2))
    monkeypatch.setattr(stream_module, "Transfers", PendingTransfers)
    real_call = stream_module._Runner.call

    def logged_call(self, *args, **kwargs):
        log.append(("call",))
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(stream_module._Runner, "call", logged_call)
    got = list(film_fast.interpolate(small_model, frames, times_to_interpolate=2))
    assert len(got) == len(plain) == 17
    for a, b in zip(got, plain):
        np.testing.assert_array_equal(a, b)
    made = [i for i, e in enumerate(log) if e[0] == "made"]
    calls = [i for i, e in enumerate(log) if e[0] == "call"]
    for k, at in enumerate(made[:-1]):
        resolved = log.index(("resolve", k))
        assert any(at < c < resolved for c in calls), (k, log)
