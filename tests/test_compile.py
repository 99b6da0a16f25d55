"""torch.compile of FILM through the custom ops of film_fast.ops.library (CPU).

* every registered op passes ``torch.library.opcheck`` (schema incl. ``mutates_args``, fake
  metadata = real, autograd registration, AOT dispatch with dynamic shapes) on channels_last
  inputs and non-contiguous ``out=`` slices: for the torch backend, the Triton backend (under
  the interpreter) and the generic recompute backward that CuPy uses (run here with the
  reference standing in for the CuPy kernels: there is no GPU);
* the registered ops' outputs and gradients equal the eager backend's autograd;
* ``torch.compile(FILM, fullgraph=True)`` traces with 0 graph breaks, equals eager in
  inference and in a training step (aot_eager), and runs under inductor;
* eager calls never touch the registered ops.
"""
from __future__ import annotations

import contextlib
import copy
import shutil
import signal

import pytest
import torch
import torch.utils._pytree as pytree

import film_fast.ops as ops
from film_fast.ops import dispatch, library, reference
from film_fast.profiling import LaunchCounter

CL = torch.channels_last


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _triton_ok() -> bool:
    return ops.available_backends("cpu")["triton"] == ""


def _cl(*shape, grad=True, scale=1.0):
    t = (scale * torch.randn(*shape)).contiguous(memory_format=CL)
    return t.requires_grad_(grad)


def _slice(b, c, h, w, lo, hi, grad=True):
    """Channels ``lo:hi`` of a channels_last ``[b, c, h, w]`` buffer: neither NCHW- nor
    NHWC-contiguous, like FILM's concat-buffer slices."""
    view = torch.randn(b, c, h, w).contiguous(memory_format=CL)[:, lo:hi]
    return view.detach().requires_grad_(True) if grad else view


# (id, registered op, args builder(backend)); every builder returns fresh tensors.
CASES = [
    ("warp-nhwc_slice", "warp",
     lambda be: (_slice(2, 8, 6, 7, 1, 6), _cl(2, 2, 6, 7, scale=3.0), be)),
    ("warp-nchw", "warp",
     lambda be: (torch.randn(2, 3, 5, 4, requires_grad=True),
                 (2 * torch.randn(2, 2, 5, 4)).requires_grad_(), be)),
    ("warp_into-out_slice", "warp_into",
     lambda be: (_slice(2, 8, 6, 7, 1, 6, grad=False), 3 * torch.randn(2, 2, 6, 7),
                 _slice(2, 9, 6, 7, 2, 7, grad=False), be)),
    ("upsample_flow", "upsample_flow", lambda be: (_cl(2, 2, 4, 5), [8, 10], None, be)),
    ("upsample_flow-residual", "upsample_flow",
     lambda be: (_cl(2, 2, 4, 5), [8, 10], _cl(2, 2, 8, 10), be)),
    ("conv2d-3x3_lrelu_slice", "conv2d",
     lambda be: (_slice(2, 7, 6, 7, 1, 6), torch.randn(4, 5, 3, 3, requires_grad=True),
                 torch.randn(4, requires_grad=True), "leaky_relu", be)),
    ("conv2d-1x1_linear", "conv2d",
     lambda be: (_cl(2, 5, 6, 7), torch.randn(2, 5, 1, 1, requires_grad=True),
                 torch.randn(2, requires_grad=True), None, be)),
    ("avg_pool2x2-odd", "avg_pool2x2", lambda be: (_cl(2, 4, 7, 9), be)),
    ("upsample_conv2x2", "upsample_conv2x2",
     lambda be: (_cl(2, 5, 3, 4), [6, 8], torch.randn(4, 5, 2, 2, requires_grad=True),
                 torch.randn(4, requires_grad=True), be)),
    ("upsample_flow_warp", "upsample_flow_warp",
     lambda be: (_cl(2, 2, 3, 4), _slice(2, 9, 6, 8, 4, 9), be)),
    ("upsample_flow_warp_into-out_slice", "upsample_flow_warp_into",
     lambda be: (_cl(2, 2, 3, 4, grad=False), _slice(2, 9, 6, 8, 4, 9, grad=False),
                 _slice(2, 12, 6, 8, 1, 6, grad=False), be)),
    ("conv2d_levels", "conv2d_levels",
     lambda be: ([_cl(2, 5, 8, 8), _cl(2, 5, 4, 4)], torch.randn(4, 5, 3, 3, requires_grad=True),
                 torch.randn(4, requires_grad=True), "leaky_relu", be)),
    ("conv2d_pool", "conv2d_pool",
     lambda be: (_cl(2, 5, 6, 8), torch.randn(4, 5, 3, 3, requires_grad=True),
                 torch.randn(4, requires_grad=True), "leaky_relu", be)),
    ("conv2d_levels_into-out_slices", "conv2d_levels_into",
     lambda be: ([_cl(2, 5, 8, 8, grad=False), _slice(2, 9, 4, 4, 2, 7, grad=False)],
                 torch.randn(4, 5, 3, 3), torch.randn(4), "leaky_relu",
                 [_slice(2, 11, 8, 8, 3, 7, grad=False), _slice(2, 6, 4, 4, 1, 5, grad=False)],
                 be)),
    ("avg_pool2x2_into-out_slice", "avg_pool2x2_into",
     lambda be: (_slice(2, 8, 7, 9, 1, 5, grad=False), _slice(2, 7, 3, 4, 0, 4, grad=False), be)),
    ("upsample_conv2x2_into-out_slice", "upsample_conv2x2_into",
     lambda be: (_cl(2, 5, 3, 4, grad=False), [6, 8], torch.randn(4, 5, 2, 2), torch.randn(4),
                 _slice(2, 9, 6, 8, 2, 6, grad=False), be)),
]
CASE_IDS = [c[0] for c in CASES]


def test_every_public_op_is_registered():
    for name in ops.OPS:
        assert name in library.OPS
        assert isinstance(getattr(torch.ops.film_fast, name), torch._ops.OpOverloadPacket)
    # every differentiable op has a backward op; only the *_into variants mutate, their out
    for name in library.OPS:
        schema = getattr(torch.ops.film_fast, name).default._schema
        written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert written == (["out"] if name.endswith("_into") else []), (name, written)
        assert (name in library.BACKWARD_OPS) == (not name.endswith("_into"))


@pytest.fixture
def pseudo_cupy(monkeypatch):
    """Registers the reference implementations as the "cupy" backend on CPU, so the generic
    backward (re-running the backend's eager autograd inside ``<op>_backward``) is exercised."""
    for op in ops.OPS:
        monkeypatch.setitem(dispatch._IMPLS, (op, "cupy"), getattr(reference, op))
    monkeypatch.setitem(dispatch._VERIFIERS, "cupy", lambda device: (True, ""))
    monkeypatch.setattr(dispatch, "_loaded", dispatch._loaded | {"cupy"})
    monkeypatch.setattr(dispatch, "_load_errors",
                        {k: v for k, v in dispatch._load_errors.items() if k != "cupy"})
    return "cupy"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_opcheck_torch_backend(case):
    _, name, build = case
    torch.library.opcheck(library.OPS[name], build("torch"))


@pytest.mark.skipif(not _triton_ok(), reason="triton backend unavailable on CPU "
                    "(needs triton and TRITON_INTERPRET=1)")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_opcheck_triton_backend(case):
    _, name, build = case
    torch.library.opcheck(library.OPS[name], build("triton"))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_opcheck_recompute_backward(case, pseudo_cupy):
    _, name, build = case
    torch.library.opcheck(library.OPS[name], build(pseudo_cupy))


# ---- the registered ops against the eager backend (opcheck only checks self-consistency) ----
EAGER = {
    "warp": lambda i, f, be: ops.warp(i, f, backend=be),
    "upsample_flow": lambda f, s, r, be: ops.upsample_flow(f, s, r, backend=be),
    "conv2d": lambda x, w, b, a, be: ops.conv2d(x, w, b, a, backend=be),
    "avg_pool2x2": lambda x, be: ops.avg_pool2x2(x, backend=be),
    "upsample_conv2x2": lambda x, s, w, b, be: ops.upsample_conv2x2(x, s, w, b, backend=be),
    "upsample_flow_warp": lambda f, x, be: ops.upsample_flow_warp(f, x, backend=be),
    "conv2d_levels": lambda xs, w, b, a, be: ops.conv2d_levels(xs, w, b, a, backend=be),
    "conv2d_pool": lambda x, w, b, a, be: ops.conv2d_pool(x, w, b, a, backend=be),
}
DIFF_CASES = [c for c in CASES if c[1] in EAGER]


def _outputs_and_grads(fn, args):
    leaves = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    for leaf in leaves:
        leaf.grad = None
    outs = pytree.tree_leaves(fn(*args))
    g = torch.Generator().manual_seed(1)
    sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
    return [o.detach() for o in outs], [leaf.grad.clone() for leaf in leaves]


def _assert_same_as_eager(name, args):
    want_out, want_grad = _outputs_and_grads(EAGER[name], args)
    got_out, got_grad = _outputs_and_grads(library.OPS[name], args)
    assert len(want_grad) == len(got_grad) > 0
    for w, g in zip(want_out + want_grad, got_out + got_grad):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton", "pseudo_cupy"])
@pytest.mark.parametrize("case", DIFF_CASES, ids=[c[0] for c in DIFF_CASES])
def test_registered_op_gradients_equal_the_eager_backend(case, backend, request):
    if backend == "triton" and not _triton_ok():
        pytest.skip("triton backend unavailable on CPU")
    if backend == "pseudo_cupy":
        backend = request.getfixturevalue("pseudo_cupy")
    _, name, build = case
    _assert_same_as_eager(name, build(backend))


def test_out_slices_are_written_in_place_under_compile():
    """warp_into / upsample_flow_warp_into (mutates_args=out) write only their channel slice."""
    def step(image, flow, coarse, feats):
        buf = torch.zeros(2, 12, 6, 8).contiguous(memory_format=CL)
        ops.warp(image, flow, out=buf[:, 1:6], backend="torch")
        up, _ = ops.upsample_flow_warp(coarse, feats, out=buf[:, 7:12], backend="torch")
        return buf, up

    args = (_slice(2, 8, 6, 8, 1, 6, grad=False), 3 * torch.randn(2, 2, 6, 8),
            _cl(2, 2, 3, 4, grad=False), _slice(2, 9, 6, 8, 4, 9, grad=False))
    with torch.no_grad():
        want = step(*args)
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[0][:, 6].abs().max() == 0 and got[0][:, 0].abs().max() == 0


def test_new_out_slices_are_written_in_place_under_compile():
    """conv2d_levels_into / avg_pool2x2_into / upsample_conv2x2_into write only their slices."""
    w3, b3 = torch.randn(3, 5, 3, 3), torch.randn(3)
    w2, b2 = torch.randn(2, 5, 2, 2), torch.randn(2)

    def step(x, coarse):
        big = torch.zeros(2, 12, 8, 8).contiguous(memory_format=CL)
        small = torch.zeros(2, 12, 4, 4).contiguous(memory_format=CL)
        ys = ops.conv2d_levels([x, coarse], w3, b3, "leaky_relu",
                               out=[big[:, 1:4], small[:, 1:4]], backend="torch")
        ops.avg_pool2x2(x, out=small[:, 5:10], backend="torch")
        ops.upsample_conv2x2(coarse, (8, 8), w2, b2, out=big[:, 9:11], backend="torch")
        return big, small, ys[0] * 1

    args = (_slice(2, 9, 8, 8, 2, 7, grad=False), _cl(2, 5, 4, 4, grad=False))
    with torch.no_grad():
        want = step(*args)
        got = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    big, small, _ = got
    for t, written in ((big, [1, 2, 3, 9, 10]), (small, [1, 2, 3, 5, 6, 7, 8, 9])):
        for ch in range(12):
            assert (t[:, ch].abs().max() > 0) == (ch in written), ch


# ---- the whole model ---------------------------------------------------------------------------
def _frames(b=1, h=64, w=64):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, h, w, generator=g),
            torch.full((b, 1), 0.5))


def _film_ops_in(gm: torch.fx.GraphModule) -> set:
    return {str(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("film_fast.")}


def test_explain_reports_no_graph_breaks(small_model):
    x0, x1, dt = _frames()
    with torch.no_grad():
        explanation = torch._dynamo.explain(small_model)(x0, x1, dt)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    used = _film_ops_in(explanation.graphs[0])
    # (the image pyramid's avg_pool2x2_into is a GPU-path op: on CPU the torch backend pools
    # dense images, see FILM._dense_on_cpu)
    for name in ("conv2d_levels", "conv2d_levels_into", "avg_pool2x2", "upsample_flow",
                 "upsample_flow_warp_into", "warp_into", "upsample_conv2x2_into", "conv2d"):
        assert f"film_fast.{name}" in used, used


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_compiled_forward_equals_eager(small_model, mode):
    x0, x1, dt = _frames()
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        want = small_model(x0, x1, dt)
        got = torch.compile(small_model, backend="aot_eager", fullgraph=True)(x0, x1, dt)
    assert got.shape == want.shape == (1, 3, 64, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the fake-tensor trace left nothing but real tensors in the warp-grid cache
    from torch._subclasses.fake_tensor import FakeTensor
    assert not any(isinstance(t, FakeTensor) for v in reference._GRIDS.values() for t in v)


def test_compiled_bf16_forward_with_padded_channels_equals_eager(small_model):
    """bf16 buffers are channel-aligned to 16: Conv.weight_for pads in the graph."""
    model = copy.deepcopy(small_model).to(torch.bfloat16)
    x0, x1, dt = _frames(h=40, w=56)  # not multiples of 16: padded and cropped in the graph
    with torch.no_grad():
        want = model(x0, x1, dt)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x0, x1, dt)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-5)


def test_compiled_training_step_gradients_equal_eager(small_model):
    model = copy.deepcopy(small_model).train()
    x0, x1, dt = _frames()

    def step(m):
        model.zero_grad(set_to_none=True)
        out = m(x0, x1, dt)
        (out - 0.3).abs().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_out, want = step(model)
    got_out, got = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=1e-5)
    assert set(got) == set(want) and len(want) == len(list(model.parameters()))
    for name, w in want.items():
        scale = w.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(got[name], w, rtol=0, atol=1e-5 * scale, msg=name)


@contextlib.contextmanager
def _time_limit(seconds: int):
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"inductor compile + run took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="CPU inductor needs a C++ compiler")
def test_inductor_forward_equals_eager(small_model):
    x0, x1, dt = _frames()
    with torch.no_grad():
        want = small_model(x0, x1, dt)
        with _time_limit(600), torch._inductor.config.patch(compile_threads=1):
            got = torch.compile(small_model, backend="inductor", fullgraph=True)(x0, x1, dt)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_eager_calls_bypass_the_registered_ops(small_model):
    """The library is for compiled graphs only: eager runs launch exactly what they did."""
    x0, x1, dt = _frames()
    with torch.inference_mode(), LaunchCounter() as counter:
        small_model(x0, x1, dt)
    assert counter.total > 0
    assert not [op for op in counter.by_op if op.startswith("film_fast")], counter.by_op
    with LaunchCounter() as counter:  # with autograd recording as well
        small_model(x0, x1, dt)
    assert not [op for op in counter.by_op if op.startswith("film_fast")], counter.by_op
