"""CUDA-graph replay (film_fast.cuda_graphs): clear refusals on CPU, exact replay on a GPU."""
import copy
import warnings

import pytest
import torch

from film_fast.cuda_graphs import CUDAGraphError, CUDAGraphFILM, capture, maybe_graphed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_refuses_cpu_model(small_model):
    with pytest.raises(CUDAGraphError, match="CUDA device"):
        CUDAGraphFILM(small_model)
    assert maybe_graphed(small_model, None) is small_model
    with pytest.raises(CUDAGraphError, match="CUDA"):
        capture(lambda x: x * 2, [torch.zeros(2)])


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_replay_equals_eager(small_model, backend):
    model = copy.deepcopy(small_model).cuda().set_backend(backend)
    graphed = CUDAGraphFILM(model, max_graphs=2)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        for shape in [(1, 3, 64, 96), (2, 3, 45, 70), (1, 3, 64, 96)]:
            x0 = torch.rand(shape, device="cuda", generator=g)
            x1 = torch.rand(shape, device="cuda", generator=g)
            eager = model(x0, x1, 0.5)
            replay = graphed(x0, x1, 0.5)
            torch.testing.assert_close(replay, eager, rtol=0, atol=1e-6)
        assert graphed.captures == 2  # the third call replays the first shape
        # New values in the same static buffers give new outputs.
        x0 = torch.rand(1, 3, 64, 96, device="cuda", generator=g)
        torch.testing.assert_close(graphed(x0, x0, 0.5), model(x0, x0, 0.5), rtol=0, atol=1e-6)
        for shape in [(1, 3, 32, 32), (1, 3, 32, 64)]:  # LRU: beyond max_graphs, oldest dropped
            x = torch.rand(shape, device="cuda", generator=g)
            graphed(x, x, 0.5)
        assert len(graphed._graphs) == 2
        # A flip ensemble set after a capture gets a capture of its own, not the old replay.
        x1 = torch.rand(1, 3, 32, 64, device="cuda", generator=g)
        model.set_ensemble(2)
        torch.testing.assert_close(graphed(x, x1, 0.5), model(x, x1, 0.5), rtol=0, atol=1e-6)
        model.set_ensemble(1)
    with pytest.raises(CUDAGraphError, match="inference"):
        graphed(x0, x0, 0.5)  # grad mode on


# ---- the streaming engine's calls (CUDAGraphEncoded) ---------------------------------------
from film_fast.cuda_graphs import CUDAGraphEncoded, _Captured  # noqa: E402


class _Replay:
    """A capture emulated on the CPU: a replay reruns the function on the static inputs and
    writes the results into the static outputs, as a CUDA graph overwrites its outputs. What
    the wrapper returns must therefore be copies, and what it feeds must go through the
    static inputs: aliasing mistakes show up as wrong frames."""

    def __init__(self, fn, inputs, output) -> None:
        self.fn, self.inputs, self.output = fn, inputs, output
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        new = self.fn(*self.inputs)
        if isinstance(new, torch.Tensor):
            self.output.copy_(new)
        else:
            for static, value in zip(self.output.levels, new.levels):
                static.copy_(value)


def fake_capture(fn, example, *, warmup=2, pool=None):
    inputs = tuple(t.detach().clone() for t in example)
    for _ in range(warmup):
        fn(*inputs)
    output = fn(*inputs)
    return _Captured(_Replay(fn, inputs, output), inputs, output)


def test_encoded_graphs_equal_eager_calls(small_model):
    graphs = CUDAGraphEncoded(small_model, capture_fn=fake_capture, max_graphs=2)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 3, 45, 70, generator=g)
    with torch.inference_mode():
        eager = [small_model.encode(x[i:i + 1]) for i in range(3)]
        graphed = [graphs.encode(x[i:i + 1]) for i in range(3)]  # one capture, two replays
        assert graphs.captures == 1
        # every returned feature is the caller's own: later replays did not overwrite it
        for e, f in zip(eager, graphed):
            assert all(torch.equal(a, b) for a, b in zip(e.levels, f.levels))
        for dt in (0.5, torch.tensor([0.3])):
            want = small_model.interpolate_encoded(eager[0], eager[1], dt)
            got = graphs.interpolate_encoded(graphed[0], graphed[1], dt)
            assert torch.equal(got, want)
        first = graphs.interpolate_encoded(graphed[0], graphed[1], 0.5)
        graphs.interpolate_encoded(graphed[1], graphed[2], 0.5)  # a replay: new static output
        assert torch.equal(first, small_model.interpolate_encoded(eager[0], eager[1], 0.5))
        assert graphs.captures == 2  # encode x1, decode x1
        pair = graphs.encode(x[:2])  # another shape: a capture of its own
        assert torch.equal(graphs.interpolate_encoded(pair.rows(0, 1), pair.rows(1, 2), 0.5),
                           small_model(x[:1], x[1:2], 0.5))
        assert graphs.captures == 3
        with pytest.raises(ValueError, match="size or count"):
            graphs.interpolate_encoded(graphed[0], pair, 0.5)
    with pytest.raises(CUDAGraphError, match="inference"):
        graphs.encode(x[:1])  # grad mode on


def _engine(model, frames, graphs, batch=1, k=2):
    from film_fast.stream import (_stream_items, grid_node, recursive_schedule, uniform_plan)
    from film_fast.tiling import Tiling
    from film_fast.transfer import deliver
    plan = uniform_plan(recursive_schedule(k), [grid_node(p, 1 << k) for p in range(1 << k)])
    items = _stream_items(model, iter(frames), lambda i: plan, batch, None, Tiling(None, True),
                          lambda n: (None,), None, None, None, graphs)
    return [frame for _, frame in deliver(items)]


@pytest.mark.parametrize("batch", [1, 2])
def test_engine_with_graphs_gives_the_eager_frames(small_model, batch):
    """The streaming engine with its calls replayed (feature reuse, recursion depth 2, the
    first chunk's larger encode, a shorter last chunk) gives the eager engine's frames."""
    g = torch.Generator().manual_seed(6)
    frames = [torch.rand(3, 40, 56, generator=g) for _ in range(4)]
    graphs = CUDAGraphEncoded(small_model, capture_fn=fake_capture)
    got = _engine(small_model, frames, graphs, batch=batch)
    want = _engine(small_model, frames, None, batch=batch)
    assert len(got) == len(want) == 13
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert graphs.captures >= 2


def test_engine_falls_back_to_eager_when_capture_fails(small_model):
    def failing(fn, example, *, warmup=2, pool=None):
        raise CUDAGraphError("CUDA graph capture failed (test)")
    g = torch.Generator().manual_seed(7)
    frames = [torch.rand(3, 40, 56, generator=g) for _ in range(3)]
    graphs = CUDAGraphEncoded(small_model, capture_fn=failing)
    with pytest.warns(RuntimeWarning, match="CUDA graphs are off"):
        got = _engine(small_model, frames, graphs, k=1)
    want = _engine(small_model, frames, None, k=1)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_cuda_graphs_option_needs_a_cuda_model(small_model, tmp_path, capsys):
    import film_fast
    from film_fast import cli
    frames = [torch.rand(3, 32, 32) for _ in range(2)]
    with pytest.raises(ValueError, match="CUDA device"):
        next(film_fast.interpolate(small_model, frames, cuda_graphs=True))
    with pytest.raises(CUDAGraphError, match="CUDA device"):
        CUDAGraphEncoded(small_model)
    from PIL import Image
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 24), (10, 20, 30)).save(tmp_path / name)
    code = cli.main(["interpolate", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o",
                     str(tmp_path / "out"), "--device", "cpu", "--cuda-graphs"])
    err = capsys.readouterr().err
    assert code == 2 and "--cuda-graphs needs a CUDA device" in err
    assert not (tmp_path / "out").exists()
    pytest.importorskip("av")
    code = cli.main(["video", str(tmp_path / "in.mp4"), "-o", str(tmp_path / "out.mp4"),
                     "--factor", "2", "--device", "cpu", "--cuda-graphs"])
    err = capsys.readouterr().err
    assert code == 2 and "--cuda-graphs needs a CUDA device" in err


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_engine_with_real_graphs_on_gpu(small_model, backend):
    """interpolate(cuda_graphs=True) on a GPU: real captures, the eager engine's frames."""
    import film_fast
    model = copy.deepcopy(small_model).cuda().set_backend(backend)
    g = torch.Generator().manual_seed(8)
    frames = [torch.rand(3, 64, 96, generator=g) for _ in range(5)]
    with torch.inference_mode():
        want = list(film_fast.interpolate(model, frames, times_to_interpolate=2))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed capture would warn and go eager
            got = list(film_fast.interpolate(model, frames, times_to_interpolate=2,
                                             cuda_graphs=True))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_interpolate_keeps_given_graphs_across_calls(small_model):
    import film_fast
    g = torch.Generator().manual_seed(9)
    frames = [torch.rand(3, 40, 56, generator=g) for _ in range(3)]
    graphs = CUDAGraphEncoded(small_model, capture_fn=fake_capture)
    want = list(film_fast.interpolate(small_model, frames))
    with torch.inference_mode():
        got = list(film_fast.interpolate(small_model, frames, cuda_graphs=graphs))
        captured = graphs.captures
        again = list(film_fast.interpolate(small_model, frames, cuda_graphs=graphs))
    assert graphs.captures == captured  # the second run only replays
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(want, got, again))
    other = copy.deepcopy(small_model)
    with pytest.raises(ValueError, match="another model"):
        next(film_fast.interpolate(other, frames, cuda_graphs=graphs))
