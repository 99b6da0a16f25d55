"""CUDA-graph replay (film_fast.cuda_graphs): clear refusals on CPU, exact replay on a GPU."""
import copy

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
