"""The Triton kernels against the torch reference (``backend="torch"``), forward and every gradient.

Without a GPU the kernels run on CPU tensors through the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before any import); with one, the
same tests run the compiled kernels on CUDA tensors.

Accuracy contract:

* fp32 (and fp64): max abs error <= ``rtol * (1 + max |reference|)`` with
  ``rtol`` ~1e-5: rounding level;
* fp16 / bf16 (flash-attention style): the kernel's error against an fp32
  truth (the reference run in fp32 on the upcast low-precision inputs and
  output gradients) is at most twice the error of the torch reference run in
  that same dtype, plus a floor of one ulp at the output's magnitude.

Every buffer the Triton launchers allocate is pre-filled with NaN (autouse
fixture ``nan_poisoned_outputs``), so an element a kernel forgets to write
fails the comparison. Case ids name batch, channels, sizes, flow kind,
dtype and layout (``B2-C67-H17-W23-far-fp16-nhwc``).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import film_fast.ops as ops
from film_fast.ops import dispatch

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from film_fast.kernels.triton import utils as tutils  # noqa: E402
from film_fast.kernels.triton import warp as twarp  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAN = float("nan")


# ---- fixtures and helpers ---------------------------------------------------------------------
@pytest.fixture(autouse=True)
def nan_poisoned_outputs(monkeypatch):
    """Every float buffer allocated by the Triton launchers starts as NaN."""
    real_4d, real = tutils.empty_4d, tutils.empty

    def poison(t):
        return t.fill_(NAN) if t.is_floating_point() else t

    monkeypatch.setattr(tutils, "empty_4d", lambda *a, **k: poison(real_4d(*a, **k)))
    monkeypatch.setattr(tutils, "empty", lambda *a, **k: poison(real(*a, **k)))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` as NCHW, NHWC (channels_last) or a strided view inside a NaN-filled bigger tensor."""
    if kind == "nchw":
        return t.contiguous()
    if kind == "nhwc":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "strided":  # channel offset + every other column: no dense layout at all
        b, c, h, w = t.shape
        big = torch.full((b, c + 3, h, 2 * w), NAN, dtype=t.dtype, device=t.device)
        view = big[:, 2:2 + c, :, ::2]
        view.copy_(t)
        return view
    raise AssertionError(kind)


def prep(t: torch.Tensor, dtype, kind="nchw", grad=True) -> torch.Tensor:
    """fp32 master values -> device, dtype, layout; a leaf that requires grad."""
    out = layout(t.to(device=DEVICE, dtype=dtype), kind)
    return out.requires_grad_(grad)


def run(fn, inputs, grad_outputs=None):
    """``(outputs, grads w.r.t. every input that requires grad)``."""
    outs = fn(*inputs)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    if grad_outputs is None:
        return outs, []
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if g is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs])
    return outs, list(grads)


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_fp32_close(got, ref, what, rtol=1e-5):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
    assert not torch.isnan(got).any(), f"{what}: NaN in the output (an unwritten element?)"
    tol = rtol * (1.0 + (ref.abs().max().item() if ref.numel() else 0.0))
    err = max_err(got, ref)
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.3e}"


def assert_lowp_close(got, ref, truth, dtype, what):
    assert got.dtype == ref.dtype == dtype, f"{what}: dtype {got.dtype}, reference {ref.dtype}"
    assert not torch.isnan(got).any(), f"{what}: NaN in the output (an unwritten element?)"
    err_kernel = max_err(got, truth)
    err_ref = max_err(ref, truth)
    floor = torch.finfo(dtype).eps * (1.0 + (truth.abs().max().item() if truth.numel() else 0.0))
    assert err_kernel <= 2 * err_ref + floor, (
        f"{what}: kernel error {err_kernel:.3e} > 2 x reference error {err_ref:.3e} + {floor:.1e}")


def compare(op, inputs, dtype, rtol=1e-5, grads=True, mask=None):
    """Runs ``op(*inputs, backend=...)`` with triton and torch and compares outputs and gradients.

    ``mask(i)`` may return a boolean tensor selecting which elements of gradient ``i``
    are compared (used to skip measure-zero kinks of bilinear sampling).
    """
    tri = lambda *a: op(*a, backend="triton")  # noqa: E731
    ref = lambda *a: op(*a, backend="torch")  # noqa: E731
    ref_out, _ = run(ref, inputs)
    g = gen(99)
    gos = ([torch.randn(o.shape, generator=g).to(device=DEVICE, dtype=o.dtype) for o in ref_out]
           if grads else None)
    ref_out, ref_grads = run(ref, inputs, gos)
    tri_out, tri_grads = run(tri, inputs, gos)
    names = [f"output {i}" for i in range(len(ref_out))] + [f"grad {i}" for i in range(len(ref_grads))]
    pairs = list(zip(tri_out + tri_grads, ref_out + ref_grads))
    if dtype in (torch.float32, torch.float64):
        for i, ((a, b), name) in enumerate(zip(pairs, names)):
            if mask is not None and i >= len(ref_out):
                sel = mask(i - len(ref_out))
                if sel is not None:
                    assert not torch.isnan(a).any(), f"{name}: NaN"
                    a, b = a[sel], b[sel]
            assert_fp32_close(a, b, name, rtol)
        return tri_out, tri_grads
    # low precision: truth = the reference in fp32 on the upcast inputs and output gradients
    up = [x.detach().float().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
          for x in inputs]
    truth_out, truth_grads = run(ref, up, [g.float() for g in gos] if grads else None)
    for i, ((a, b), t, name) in enumerate(zip(pairs, truth_out + truth_grads, names)):
        if mask is not None and i >= len(ref_out):
            sel = mask(i - len(ref_out))
            if sel is not None:
                a, b, t = a[sel], b[sel], t[sel]
        assert_lowp_close(a, b, t, dtype, name)
    return tri_out, tri_grads


def case_id(**kw) -> str:
    return "-".join(f"{k}{v}" if k in "BCHW" or k in ("Ci", "Co", "k") else str(v)
                    for k, v in kw.items())


# ---- warp -------------------------------------------------------------------------------------
def make_flow(b, h, w, kind, seed=0):
    g = gen(seed)
    if kind == "zero":
        return torch.zeros(b, 2, h, w)
    if kind == "integer":
        return torch.randint(-5, 6, (b, 2, h, w), generator=g).float()
    if kind == "far":  # most samples clamp: up to 3 image sizes outside
        return torch.randn(b, 2, h, w, generator=g) * 3.0 * max(h, w)
    if kind == "mixed":  # batch > 1 with unrelated motions per sample
        f = torch.randn(b, 2, h, w, generator=g) * 2.5
        f[0] = 0
        if b > 2:
            f[2] *= 20.0
        return f
    return torch.randn(b, 2, h, w, generator=g) * 2.5  # "moderate"


def smooth_sample_mask(flow: torch.Tensor, margin=3e-5):
    """Pixels whose sample point is away from integer coordinates and borders in both axes.

    Bilinear sampling has kinks there; the reference rebuilds coordinates through
    grid_sample's normalisation (a few ulp off), so it may sit on the other side of a kink.
    """
    b, _, h, w = flow.shape
    f = flow.detach().double().cpu()
    sx = torch.arange(w, dtype=torch.float64).view(1, 1, w) + f[:, 0]
    sy = torch.arange(h, dtype=torch.float64).view(1, h, 1) + f[:, 1]

    def smooth(s, size):
        frac = s - torch.round(s)
        inside = (s > margin) & (s < size - 1 - margin)
        return (frac.abs() > margin) & inside | (s < -margin) | (s > size - 1 + margin)

    ok = smooth(sx, w) & smooth(sy, h)  # [B, H, W]
    return ok.unsqueeze(1).to(flow.device)


WARP_CASES = [
    # (B, C, H, W, flow kind, dtype, image layout)
    (2, 5, 33, 47, "moderate", "fp32", "nchw"),
    (2, 67, 17, 23, "far", "fp32", "nhwc"),
    (3, 6, 19, 21, "mixed", "fp32", "strided"),
    (1, 3, 32, 64, "zero", "fp32", "nchw"),       # power-of-two sizes: the reference's coordinates
    (2, 4, 16, 32, "integer", "fp32", "nhwc"),    # are exact, so even kinks compare exactly
    (1, 1, 1, 9, "moderate", "fp32", "nchw"),     # one row: the y taps collapse
    (2, 67, 17, 23, "moderate", "fp16", "nhwc"),
    (2, 5, 33, 47, "far", "bf16", "nchw"),
    (2, 6, 19, 21, "mixed", "fp16", "strided"),
]


@pytest.mark.parametrize("case", WARP_CASES, ids=[
    f"B{b}-C{c}-H{h}-W{w}-{k}-{d}-{lay}" for b, c, h, w, k, d, lay in WARP_CASES])
def test_warp_matches_reference(case):
    b, c, h, w, kind, dname, lay = case
    dtype = DTYPES[dname]
    image = prep(torch.rand(b, c, h, w, generator=gen(1)), dtype, lay)
    flow32 = make_flow(b, h, w, kind)
    flow = prep(flow32, dtype, "nchw" if lay != "nhwc" else "nhwc")
    exact = kind in ("zero", "integer")
    grad_mask = None if exact else smooth_sample_mask(flow)
    compare(ops.warp, (image, flow), dtype,
            mask=lambda i: grad_mask.expand(b, 2, h, w) if i == 1 and grad_mask is not None else None)


def test_warp_fp32_flow_with_fp16_image_and_1920px_coordinates():
    """Coordinates are fp32 even for fp16 images: at x ~ 1900 an fp16 grid would be 1 px coarse."""
    w = 1920
    image = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(1, 1, 2, w) / w
    flow = torch.zeros(1, 2, 2, w)
    flow[:, 0] = 0.3
    out = ops.warp(image.to(DEVICE, torch.float16), flow.to(DEVICE, torch.float16),
                   backend="triton").float().cpu()
    expected = torch.clamp(torch.arange(w) + flow.half().float()[0, 0, 0], max=w - 1) / w
    assert (out[0, 0, 0] - expected).abs().max() < 1e-3


def test_warp_flow_gradient_is_zero_where_clamped():
    image = prep(torch.rand(1, 2, 6, 6), torch.float32)
    flow = prep(torch.full((1, 2, 6, 6), 50.0), torch.float32)
    ops.warp(image, flow, backend="triton").sum().backward()
    assert torch.all(flow.grad == 0)


def test_warp_gradcheck_fp64():
    """fp64 images and flows (coordinates then fp64 too, like the reference): finite differences."""
    g = gen(3)
    image = torch.rand(2, 2, 4, 5, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    # keep samples away from integer positions and borders (bilinear kinks)
    flow = (torch.rand(2, 2, 4, 5, generator=g, dtype=torch.float64) * 0.6 + 0.2).to(DEVICE)
    flow.requires_grad_()
    assert torch.autograd.gradcheck(lambda i, f: ops.warp(i, f, backend="triton"), (image, flow),
                                    fast_mode=True)


def _warp_grads(image, flow, gout):
    image = image.detach().requires_grad_()
    flow = flow.detach().requires_grad_()
    out = ops.warp(image, flow, backend="triton")
    return torch.autograd.grad(out, (image, flow), gout)


@pytest.mark.parametrize("dname", ["fp32", "fp16"])
def test_warp_deterministic_backward(monkeypatch, dname):
    """The sorted-gather grad_image equals the atomic one and is bitwise reproducible."""
    dtype = DTYPES[dname]
    b, c, h, w = 2, 37, 9, 14
    image = prep(torch.rand(b, c, h, w, generator=gen(4)), dtype, "nhwc", grad=False)
    # moderate motion plus a band of samples clamped onto the right border: many collisions
    f = make_flow(b, h, w, "moderate", seed=5)
    f[:, 0, :, -4:] = 40.0
    flow = prep(f, dtype, grad=False)
    gout = torch.randn(b, c, h, w, generator=gen(6)).to(DEVICE, dtype)
    calls = []
    real = twarp._grad_image_deterministic
    monkeypatch.setattr(twarp, "_grad_image_deterministic",
                        lambda *a: calls.append(1) or real(*a))
    atomic = _warp_grads(image, flow, gout)
    assert not calls
    monkeypatch.setenv(tutils.DETERMINISTIC_ENV, "1")
    det1 = _warp_grads(image, flow, gout)
    det2 = _warp_grads(image, flow, gout)
    assert len(calls) == 2
    assert torch.equal(det1[0], det2[0]) and torch.equal(det1[1], det2[1])  # bitwise
    assert torch.equal(det1[1], atomic[1])  # grad_flow never used atomics
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert max_err(det1[0], atomic[0]) <= tol * (1 + atomic[0].abs().max().item())
    monkeypatch.delenv(tutils.DETERMINISTIC_ENV)
    # torch's global switch selects the same path
    torch.use_deterministic_algorithms(True)
    try:
        det3 = _warp_grads(image, flow, gout)
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(calls) == 3 and torch.equal(det3[0], det1[0])


def test_warp_backward_launches_only_needed_gradients(monkeypatch):
    image = prep(torch.rand(1, 3, 8, 9), torch.float32)
    flow = prep(make_flow(1, 8, 9, "moderate"), torch.float32, grad=False)
    seen = []
    real = twarp.warp_bwd
    monkeypatch.setattr(twarp, "warp_bwd", lambda *a, **k: seen.append(a[3:5]) or real(*a, **k))
    ops.warp(image, flow, backend="triton").sum().backward()
    assert seen == [(True, False)] and flow.grad is None and image.grad is not None


# ---- upsample_flow ----------------------------------------------------------------------------
UPFLOW_CASES = [
    # (B, h, w, H, W, residual, dtype, layout)
    (2, 16, 24, 32, 48, True, "fp32", "nchw"),
    (1, 5, 7, 11, 13, False, "fp32", "nhwc"),     # non-2x ratios
    (1, 1, 1, 2, 2, True, "fp32", "nchw"),
    (2, 9, 7, 4, 3, True, "fp32", "strided"),     # downsampling works too
    (2, 16, 24, 33, 47, True, "fp16", "nhwc"),
    (2, 16, 24, 32, 48, False, "bf16", "nchw"),
]


@pytest.mark.parametrize("case", UPFLOW_CASES, ids=[
    f"B{b}-h{h}-w{w}-H{H}-W{W}-{'res' if r else 'nores'}-{d}-{lay}"
    for b, h, w, H, W, r, d, lay in UPFLOW_CASES])
def test_upsample_flow_matches_reference(case):
    b, h, w, H, W, with_res, dname, lay = case
    dtype = DTYPES[dname]
    flow = prep(torch.randn(b, 2, h, w, generator=gen(1)) * 6, dtype, lay)
    inputs = (flow, (H, W))
    if with_res:
        inputs += (prep(torch.randn(b, 2, H, W, generator=gen(2)), dtype, lay),)
    compare(ops.upsample_flow, inputs, dtype)


# ---- upsample_flow_warp -----------------------------------------------------------------------
UFW_CASES = [
    # (B, C, h, w, H, W, dtype, features layout, out)
    (2, 67, 8, 12, 16, 24, "fp32", "nhwc", "slice"),
    (1, 5, 9, 11, 17, 23, "fp32", "nchw", None),
    (2, 19, 8, 12, 16, 24, "fp16", "nhwc", "slice"),
    (2, 5, 9, 11, 17, 23, "bf16", "strided", None),
]


@pytest.mark.parametrize("case", UFW_CASES, ids=[
    f"B{b}-C{c}-h{h}-w{w}-H{H}-W{W}-{d}-{lay}-out{o}" for b, c, h, w, H, W, d, lay, o in UFW_CASES])
def test_upsample_flow_warp_matches_reference(case):
    b, c, h, w, H, W, dname, lay, out_kind = case
    dtype = DTYPES[dname]
    flow = prep(torch.randn(b, 2, h, w, generator=gen(1)) * 2, dtype)
    features = prep(torch.rand(b, c, H, W, generator=gen(2)), dtype, lay)
    ref_up, _ = ops.upsample_flow_warp(flow.detach(), features.detach(), backend="torch")
    mask = smooth_sample_mask(ref_up.float())

    def op(flow, features, backend):
        if out_kind is None:
            return ops.upsample_flow_warp(flow, features, backend=backend)
        # the predictor's input buffer: [a | warped b], NHWC, poisoned with NaN
        buf = torch.full((b, 7 + c, H, W), NAN, dtype=dtype, device=DEVICE)
        buf = buf.contiguous(memory_format=torch.channels_last)
        up, warped = ops.upsample_flow_warp(flow, features, out=buf[:, 7:], backend=backend)
        assert warped.data_ptr() == buf[:, 7:].data_ptr() and warped.stride() == buf[:, 7:].stride()
        assert torch.isnan(buf[:, :7]).all(), "wrote outside the out= slice"
        return up, warped

    # the flow gradient sums warp derivatives over all fine pixels: compare where no fine
    # sample sits on a kink (both checks are exact elsewhere)
    clean = bool(mask.all())
    compare(op, (flow, features), dtype,
            mask=lambda i: None if (i != 0 or clean) else torch.zeros_like(flow, dtype=torch.bool))


def test_upsample_flow_warp_inference_and_out_identity():
    flow = prep(torch.randn(1, 2, 4, 5, generator=gen(1)), torch.float32, grad=False)
    features = prep(torch.rand(1, 3, 8, 10, generator=gen(2)), torch.float32, grad=False)
    out = torch.full((1, 3, 8, 10), NAN, device=DEVICE)
    with torch.no_grad():
        up, warped = ops.upsample_flow_warp(flow, features, out=out, backend="triton")
    assert warped is out
    ref_up, ref_warped = ops.upsample_flow_warp(flow, features, backend="torch")
    assert_fp32_close(up, ref_up, "up")
    assert_fp32_close(warped, ref_warped, "warped")


@pytest.mark.parametrize("fill", ["a_half", "whole"])
def test_upsample_flow_warp_out_slice_keeps_the_rest_of_the_buffer_differentiable(fill):
    """Regression: with ``out=buf[:, Ca:]`` under autograd, the gradient of the buffer's *other*
    channels (the predictor's ``a`` features, copied in before the op) must still flow back.

    The triton backward returned None for ``out``; autograd's CopySlices then dropped the gradient
    of the whole base buffer, so the feature extractor got no gradient through the flow
    predictor's ``a`` half (25% error on its weights in a training step). ``whole``: the buffer's
    old content in the ``out`` region came from a leaf too, and must get a zero gradient there.
    """
    b, ca, c, h, w, H, W = 2, 3, 5, 4, 5, 8, 10
    flow0 = torch.randn(b, 2, h, w, generator=gen(1)) * 2
    feat0 = torch.rand(b, c, H, W, generator=gen(2))
    src0 = torch.rand(b, ca + c if fill == "whole" else ca, H, W, generator=gen(3))
    gout = [torch.randn(b, 2, H, W, generator=gen(4)).to(DEVICE),
            torch.randn(b, ca + c, H, W, generator=gen(5)).to(DEVICE)]
    grads = {}
    for backend in ("torch", "triton"):
        flow = prep(flow0, torch.float32)
        features = prep(feat0, torch.float32, "nhwc")
        src = prep(src0, torch.float32, "nhwc")
        buf = torch.full((b, ca + c, H, W), NAN, device=DEVICE).contiguous(
            memory_format=torch.channels_last)
        buf[:, :src.shape[1]].copy_(src)
        up, _ = ops.upsample_flow_warp(flow, features, out=buf[:, ca:], backend=backend)
        grads[backend] = torch.autograd.grad([up, buf], [flow, features, src], gout,
                                             allow_unused=True)
    ref_up, _ = ops.upsample_flow_warp(flow0.to(DEVICE), feat0.to(DEVICE), backend="torch")
    for name, got, ref in zip(("flow", "features", "src"), grads["triton"], grads["torch"]):
        assert got is not None, f"grad {name}: None (gradient lost through the out= slice)"
        if name == "flow" and not bool(smooth_sample_mask(ref_up).all()):
            continue  # a fine sample on a bilinear kink: the flow gradient is not comparable
        assert_fp32_close(got, ref, f"grad {name}")
    if fill == "whole":  # the overwritten old content does not reach the result
        assert torch.equal(grads["triton"][2][:, ca:], torch.zeros_like(grads["triton"][2][:, ca:]))


# ---- conv2d -----------------------------------------------------------------------------------
CONV_CASES = [
    # (B, Cin, Cout, H, W, k, activation, bias, dtype, layout)
    (2, 5, 7, 9, 11, 3, "leaky_relu", True, "fp32", "nchw"),
    (1, 19, 33, 8, 10, 2, None, True, "fp32", "nhwc"),
    (1, 40, 3, 7, 6, 1, "leaky_relu", False, "fp32", "strided"),
    (2, 67, 18, 13, 17, 3, "leaky_relu", True, "fp32", "nhwc"),
    (1, 16, 16, 32, 40, 3, "leaky_relu", True, "fp32", "nhwc"),
    (2, 67, 18, 13, 17, 3, "leaky_relu", True, "fp16", "nhwc"),
    (2, 32, 16, 12, 20, 3, "leaky_relu", True, "fp16", "nhwc"),   # 16-aligned: the big-tile config
    (1, 19, 33, 9, 10, 2, None, True, "bf16", "nchw"),
    (2, 20, 2, 11, 7, 1, None, True, "fp16", "strided"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[
    f"B{b}-Ci{ci}-Co{co}-H{h}-W{w}-k{k}-{a or 'linear'}-{'bias' if bb else 'nobias'}-{d}-{lay}"
    for b, ci, co, h, w, k, a, bb, d, lay in CONV_CASES])
def test_conv2d_matches_reference(case):
    b, cin, cout, h, w, k, act, with_bias, dname, lay = case
    dtype = DTYPES[dname]
    x = prep(torch.randn(b, cin, h, w, generator=gen(1)), dtype, lay)
    # channels_last weights as well (a model converted with .to(memory_format=...) has them)
    weight = prep(torch.randn(cout, cin, k, k, generator=gen(2)) / math.sqrt(cin * k * k), dtype,
                  "nhwc" if lay == "nhwc" else "nchw")
    bias = prep(torch.randn(cout, generator=gen(3)) * 0.1, dtype) if with_bias else None
    compare(lambda x, w, bias, backend: ops.conv2d(x, w, bias, act, backend=backend),
            (x, weight, bias), dtype, rtol=2e-5)


def test_conv2d_output_layout_follows_input():
    x = prep(torch.randn(1, 4, 5, 6), torch.float32, "nhwc", grad=False)
    w = prep(torch.randn(3, 4, 3, 3), torch.float32, grad=False)
    y = ops.conv2d(x, w, None, backend="triton")
    assert y.is_contiguous(memory_format=torch.channels_last)
    y = ops.conv2d(x.contiguous(), w, None, backend="triton")
    assert y.is_contiguous()


def test_conv2d_rejects_mixed_dtypes_and_unknown_activation():
    x = torch.randn(1, 4, 5, 6, device=DEVICE)
    w = torch.randn(3, 4, 3, 3, device=DEVICE)
    with pytest.raises(TypeError, match="weight dtype"):
        ops.conv2d(x.half(), w, None, backend="triton")
    with pytest.raises(ValueError, match="unknown activation"):
        ops.conv2d(x, w, None, "relu", backend="triton")


# ---- conv2d_levels ----------------------------------------------------------------------------
LEVELS_CASES = {
    # misaligned channels, mixed layouts: descriptors carry every stride
    "Ci13-Co17-mixed-layouts-fp32": (13, 17, "fp32", [(2, 23, 31, "nhwc"), (2, 11, 15, "nchw"),
                                                     (1, 5, 7, "strided"), (2, 1, 3, "nhwc")]),
    # 16-aligned NHWC levels: the kernel restates alignment facts (LEVELS_*_NHWC16)
    "Ci16-Co32-nhwc-aligned-fp16": (16, 32, "fp16", [(2, 23, 31, "nhwc"), (2, 11, 15, "nhwc"),
                                                    (1, 5, 7, "nhwc")]),
}


@pytest.mark.parametrize("name", list(LEVELS_CASES))
def test_conv2d_levels_matches_reference(monkeypatch, name):
    cin, cout, dname, shapes = LEVELS_CASES[name]
    dtype = DTYPES[dname]
    xs = [prep(torch.randn(b, cin, h, w, generator=gen(i)), dtype, lay)
          for i, (b, h, w, lay) in enumerate(shapes)]
    weight = prep(torch.randn(cout, cin, 3, 3, generator=gen(9)) / 10, dtype)
    bias = prep(torch.randn(cout, generator=gen(10)) * 0.1, dtype)
    from film_fast.kernels.triton import conv2d as tconv
    launches = []
    real = tconv._conv2d_fwd_kernel
    monkeypatch.setattr(tconv, "_conv2d_fwd_kernel", _CountingKernel(real, launches))
    n = len(xs)
    compare(lambda *a, backend: ops.conv2d_levels(list(a[:n]), a[n], a[n + 1], "leaky_relu",
                                                  backend=backend),
            (*xs, weight, bias), dtype, rtol=2e-5)
    assert launches.count("fwd") == 1  # one launch for all levels


class _CountingKernel:
    """Wraps a jitted kernel: ``kernel[grid](...)`` records a launch, then runs it."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append("fwd")
        return self.kernel[grid]


# ---- conv2d_pool ------------------------------------------------------------------------------
POOL_CASES = [
    # (B, Cin, Cout, H, W, k, dtype, layout)
    (2, 5, 7, 9, 11, 3, "fp32", "nhwc"),      # odd H and W: last row / column dropped by the pool
    (1, 8, 19, 12, 10, 3, "fp32", "nchw"),
    (1, 6, 5, 7, 3, 3, "fp32", "nchw"),        # W = 3: one pooled column
    (2, 17, 9, 11, 14, 3, "fp16", "nhwc"),
    (1, 8, 19, 12, 9, 2, "bf16", "strided"),
]


@pytest.mark.parametrize("case", POOL_CASES, ids=[
    f"B{b}-Ci{ci}-Co{co}-H{h}-W{w}-k{k}-{d}-{lay}" for b, ci, co, h, w, k, d, lay in POOL_CASES])
def test_conv2d_pool_matches_reference(case):
    b, cin, cout, h, w, k, dname, lay = case
    dtype = DTYPES[dname]
    x = prep(torch.randn(b, cin, h, w, generator=gen(1)), dtype, lay)
    weight = prep(torch.randn(cout, cin, k, k, generator=gen(2)) / math.sqrt(cin * k * k), dtype)
    bias = prep(torch.randn(cout, generator=gen(3)) * 0.1, dtype)
    compare(lambda x, w, bias, backend: ops.conv2d_pool(x, w, bias, "leaky_relu", backend=backend),
            (x, weight, bias), dtype, rtol=2e-5)


def test_conv2d_pool_gradient_through_pooled_output_only():
    x = prep(torch.randn(1, 4, 9, 10, generator=gen(1)), torch.float32)
    weight = prep(torch.randn(6, 4, 3, 3, generator=gen(2)) / 6, torch.float32)
    grads = []
    for backend in ("triton", "torch"):
        _, pooled = ops.conv2d_pool(x, weight, None, "leaky_relu", backend=backend)
        grads.append(torch.autograd.grad(pooled.square().sum(), (x, weight)))
    for a, b in zip(*grads):
        assert_fp32_close(a, b, "grad")


# ---- upsample_conv2x2 -------------------------------------------------------------------------
UPCONV_CASES = [
    # (B, Cin, Cout, h, w, H, W, dtype, layout)
    (2, 6, 9, 4, 6, 8, 12, "fp32", "nhwc"),
    (1, 19, 5, 5, 7, 11, 13, "fp32", "nchw"),   # odd fine sizes (FILM's crops do this)
    (1, 6, 9, 3, 4, 9, 12, "fp32", "strided"),  # 3x ratio
    (2, 5, 4, 6, 5, 4, 3, "fp32", "nchw"),      # shrinking "resize"
    (2, 33, 17, 6, 7, 12, 14, "fp16", "nhwc"),
    (1, 19, 5, 5, 7, 11, 13, "bf16", "nchw"),
]


@pytest.mark.parametrize("case", UPCONV_CASES, ids=[
    f"B{b}-Ci{ci}-Co{co}-h{h}-w{w}-H{H}-W{W}-{d}-{lay}"
    for b, ci, co, h, w, H, W, d, lay in UPCONV_CASES])
def test_upsample_conv2x2_matches_reference(case):
    b, cin, cout, h, w, H, W, dname, lay = case
    dtype = DTYPES[dname]
    x = prep(torch.randn(b, cin, h, w, generator=gen(1)), dtype, lay)
    weight = prep(torch.randn(cout, cin, 2, 2, generator=gen(2)) / math.sqrt(4 * cin), dtype)
    bias = prep(torch.randn(cout, generator=gen(3)) * 0.1, dtype)
    compare(lambda x, w, bias, backend: ops.upsample_conv2x2(x, (H, W), w, bias, backend=backend),
            (x, weight, bias), dtype, rtol=2e-5)


# ---- avg_pool2x2 ------------------------------------------------------------------------------
AVGPOOL_CASES = [(2, 5, 9, 11, "fp32", "nchw"), (1, 67, 16, 24, "fp32", "nhwc"),
                 (2, 3, 7, 6, "fp32", "strided"), (1, 2, 3, 2, "fp32", "nchw"),
                 (2, 35, 13, 10, "fp16", "nhwc"), (1, 5, 9, 11, "bf16", "nchw")]


@pytest.mark.parametrize("case", AVGPOOL_CASES, ids=[
    f"B{b}-C{c}-H{h}-W{w}-{d}-{lay}" for b, c, h, w, d, lay in AVGPOOL_CASES])
def test_avg_pool2x2_matches_reference(case):
    b, c, h, w, dname, lay = case
    dtype = DTYPES[dname]
    x = prep(torch.randn(b, c, h, w, generator=gen(1)), dtype, lay)
    out, _ = compare(ops.avg_pool2x2, (x,), dtype, rtol=1e-6)
    if lay == "nhwc":
        assert out[0].is_contiguous(memory_format=torch.channels_last)


# ---- out= (in-place stores into buffer slices) -------------------------------------------------
def _out_case(op_name):
    """``(op(inputs, outs, backend) -> results, fp32 inputs, [B, C_out, H, W] per out)``."""
    if op_name == "conv2d_levels":
        xs0 = [torch.randn(2, 5, 9, 11, generator=gen(1)), torch.randn(2, 5, 4, 5, generator=gen(2))]
        w0 = torch.randn(6, 5, 3, 3, generator=gen(3)) / 6
        b0 = torch.randn(6, generator=gen(4)) * 0.1

        def op(inputs, outs, backend):
            *xs, w, b = inputs
            return ops.conv2d_levels(list(xs), w, b, "leaky_relu", out=outs, backend=backend)
        return op, [*xs0, w0, b0], [(2, 6, 9, 11), (2, 6, 4, 5)]
    if op_name == "upsample_conv2x2":
        x0 = torch.randn(2, 5, 4, 6, generator=gen(1))
        w0 = torch.randn(6, 5, 2, 2, generator=gen(3)) / 4
        b0 = torch.randn(6, generator=gen(4)) * 0.1

        def op(inputs, outs, backend):
            x, w, b = inputs
            return [ops.upsample_conv2x2(x, (9, 11), w, b, out=outs[0], backend=backend)]
        return op, [x0, w0, b0], [(2, 6, 9, 11)]
    x0 = torch.randn(2, 6, 9, 11, generator=gen(1))

    def op(inputs, outs, backend):
        return [ops.avg_pool2x2(inputs[0], out=outs[0], backend=backend)]
    return op, [x0], [(2, 6, 4, 5)]


@pytest.mark.parametrize("fill", ["other_channels", "whole"])
@pytest.mark.parametrize("op_name", ["conv2d_levels", "upsample_conv2x2", "avg_pool2x2"])
def test_out_slices_under_autograd_match_the_torch_backend(op_name, fill):
    """out= into channel slices of buffers whose other channels come from a leaf: outputs and
    every gradient (inputs, weights, and the buffer's other channels) equal the torch
    backend's. ``whole``: the overwritten old content of the slice gets a zero gradient."""
    op, inputs0, shapes = _out_case(op_name)
    ca = 3
    results = {}
    for backend in ("torch", "triton"):
        inputs = [prep(t, torch.float32, "nhwc" if t.dim() == 4 and i == 0 else "nchw")
                  for i, t in enumerate(inputs0)]
        srcs, outs, bufs = [], [], []
        for k, (b, c, h, w) in enumerate(shapes):
            src = prep(torch.rand(b, ca + c if fill == "whole" else ca, h, w, generator=gen(10 + k)),
                       torch.float32, "nhwc")
            buf = torch.full((b, ca + c + 2, h, w), NAN, device=DEVICE).contiguous(
                memory_format=torch.channels_last)
            buf[:, ca + c:].zero_()
            buf[:, :src.shape[1]].copy_(src)
            srcs.append(src)
            bufs.append(buf)
            outs.append(buf[:, ca:ca + c])
        got = op(inputs, outs, backend)
        if backend == "triton" and op_name != "avg_pool2x2":  # stored in place, also with autograd
            assert all(r.data_ptr() == o.data_ptr() for r, o in zip(got, outs))
        gouts = [torch.randn(bf.shape, generator=gen(20 + k)).to(DEVICE) for k, bf in enumerate(bufs)]
        grads = torch.autograd.grad(bufs, [*inputs, *srcs], gouts)
        results[backend] = ([bf.detach() for bf in bufs], grads)
    (ref_bufs, ref_grads), (tri_bufs, tri_grads) = results["torch"], results["triton"]
    for k, (a, b) in enumerate(zip(tri_bufs, ref_bufs)):
        assert_fp32_close(a, b, f"buffer {k}")
    for i, (a, b) in enumerate(zip(tri_grads, ref_grads)):
        assert a is not None, f"grad {i}: None (gradient lost through the out= slice)"
        assert_fp32_close(a, b, f"grad {i}", rtol=2e-5)
    if fill == "whole":
        for k, (b, c, h, w) in enumerate(shapes):
            g = tri_grads[len(inputs0) + k]
            assert torch.equal(g[:, ca:], torch.zeros_like(g[:, ca:]))


def test_conv2d_levels_out_is_one_launch_without_copies(monkeypatch):
    from film_fast.profiling import count_launches
    xs = [prep(torch.randn(2, 5, 9, 11, generator=gen(1)), torch.float32, "nhwc", grad=False),
          prep(torch.randn(2, 5, 4, 5, generator=gen(2)), torch.float32, "nhwc", grad=False)]
    w = prep(torch.randn(6, 5, 3, 3, generator=gen(3)) / 6, torch.float32, grad=False)
    bufs = [torch.full((2, 9, h, wd), NAN, device=DEVICE).contiguous(memory_format=torch.channels_last)
            for h, wd in ((9, 11), (4, 5))]
    want = ops.conv2d_levels(xs, w, None, "leaky_relu", backend="triton")
    with torch.inference_mode():  # warm-up: packs (and caches) the weight
        ops.conv2d_levels(xs, w, None, "leaky_relu", out=[b[:, 2:8] for b in bufs],
                          backend="triton")
    counter = count_launches(lambda: ops.conv2d_levels(
        xs, w, None, "leaky_relu", out=[b[:, 2:8] for b in bufs], backend="triton"), triton=True)
    assert counter.by_op == {"triton._conv2d_fwd_kernel": 1}, counter.by_op
    for b, y in zip(bufs, want):
        assert torch.equal(b[:, 2:8], y)
        assert torch.isnan(b[:, :2]).all() and torch.isnan(b[:, 8:]).all()


def test_conv2d_levels_into_misaligned_slices_of_aligned_inputs():
    """16-aligned fp16 NHWC inputs (the big-tile config) stored into misaligned slices (FILM's
    3 + C channel level buffers): the forward takes the misaligned tiles (big tiles spill with
    unaligned stores on sm_90), same values as the functional op."""
    from film_fast.kernels.triton import conv2d_levels as tlevels
    xs = [prep(torch.randn(2, 16, 9, 11, generator=gen(1)), torch.float16, "nhwc", grad=False),
          prep(torch.randn(2, 16, 4, 6, generator=gen(2)), torch.float16, "nhwc", grad=False)]
    w = prep(torch.randn(32, 16, 3, 3, generator=gen(3)) / 12, torch.float16, grad=False)
    b = prep(torch.randn(32, generator=gen(4)) * 0.1, torch.float16, grad=False)
    bufs = [torch.full((2, 35, h, wd), NAN, dtype=torch.float16, device=DEVICE).contiguous(
        memory_format=torch.channels_last) for h, wd in ((9, 11), (4, 6))]
    outs = [buf[:, 3:] for buf in bufs]
    assert tlevels._into_config(xs, w, outs).fwd[0] == 64  # misaligned-output tiles
    assert tlevels._into_config(xs, w, [torch.empty_like(o) for o in outs]).fwd[0] == 128
    want = ops.conv2d_levels(xs, w, b, "leaky_relu", backend="triton")
    ops.conv2d_levels(xs, w, b, "leaky_relu", out=outs, backend="triton")
    truth = ops.conv2d_levels([x.float() for x in xs], w.float(), b.float(), "leaky_relu",
                              backend="torch")
    for buf, y, t in zip(bufs, want, truth):
        assert torch.isnan(buf[:, :3]).all()
        assert_lowp_close(buf[:, 3:], y, t, torch.float16, "out= slice")


def test_packed_conv_weights_are_cached_until_the_weight_changes():
    from film_fast.kernels.triton import conv2d as tconv
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    with torch.inference_mode():  # (how film_fast runs inference)
        a = tconv._packed_weight(w, 0)
        assert tconv._packed_weight(w, 0) is a
        assert tconv._packed_weight(w, 1) is not a
        w.mul_(2)  # an in-place update (optimiser step, load_state_dict) bumps the version
        b = tconv._packed_weight(w, 0)
        assert b is not a and torch.equal(b, w) and torch.equal(a * 2, b)
        w.data.mul_(2)  # invisible to the version counter: cleared by hand
        tconv.clear_packed_weights()
        assert torch.equal(tconv._packed_weight(w, 0), w)
    # outside inference mode (training, gradcheck's .data perturbations) every call packs afresh
    assert tconv._packed_weight(w, 0) is not tconv._packed_weight(w, 0)
    with torch.no_grad():
        assert tconv._packed_weight(w, 0) is not tconv._packed_weight(w, 0)


# ---- fp64: finite differences ------------------------------------------------------------------
def _f64(*shape, seed=0, scale=1.0):
    t = torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale
    return t.to(DEVICE).requires_grad_()


GRADCHECK_CASES = {
    "conv2d-k3-lrelu": (lambda x, w, b: ops.conv2d(x, w, b, "leaky_relu", backend="triton"),
                        lambda: (_f64(1, 3, 5, 6), _f64(4, 3, 3, 3, seed=1), _f64(4, seed=2))),
    "conv2d_pool-k3-lrelu": (lambda x, w, b: ops.conv2d_pool(x, w, b, "leaky_relu",
                                                             backend="triton"),
                             lambda: (_f64(1, 3, 5, 6), _f64(4, 3, 3, 3, seed=1), _f64(4, seed=2))),
    "upsample_conv2x2-5x6-to-11x13": (
        lambda x, w, b: ops.upsample_conv2x2(x, (11, 13), w, b, backend="triton"),
        lambda: (_f64(1, 3, 5, 6), _f64(4, 3, 2, 2, seed=1), _f64(4, seed=2))),
    "upsample_flow-3x4-to-7x9-res": (
        lambda f, r: ops.upsample_flow(f, (7, 9), r, backend="triton"),
        lambda: (_f64(1, 2, 3, 4), _f64(1, 2, 7, 9, seed=1))),
    "upsample_flow_warp-3x4-to-7x9": (
        lambda f, x: ops.upsample_flow_warp(f, x, backend="triton"),
        lambda: (_f64(1, 2, 3, 4, scale=0.3), _f64(1, 3, 7, 9, seed=1))),
    "avg_pool2x2-5x7": (lambda x: ops.avg_pool2x2(x, backend="triton"),
                        lambda: (_f64(2, 3, 5, 7),)),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_fp64(name):
    """fp64 runs through the same kernels (fp64 accumulation): backward = finite differences."""
    fn, make = GRADCHECK_CASES[name]
    assert torch.autograd.gradcheck(fn, make(), fast_mode=True)


# ---- registration -----------------------------------------------------------------------------
def test_every_op_is_registered_and_available():
    for op in ops.OPS:
        name, _ = dispatch.resolve(op, "triton", torch.device(DEVICE))
        assert name == "triton"
    assert ops.available_backends(DEVICE)["triton"] == ""


def test_verifier_needs_cuda_or_the_interpreter(monkeypatch):
    verifier = dispatch._VERIFIERS["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = verifier(torch.device("cpu"))
    assert not ok and reason == "Triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    assert verifier(torch.device("cuda"))[0] == torch.cuda.is_available()
    with pytest.raises(dispatch.BackendUnavailable, match="TRITON_INTERPRET=1"):
        ops.avg_pool2x2(torch.rand(1, 1, 2, 2), backend="triton")
    # auto on CPU stays with the torch reference (the interpreter is a test tool)
    assert dispatch.resolve("warp", "auto", torch.device("cpu"))[0] == "torch"
