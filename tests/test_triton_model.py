"""The whole small FILM model through the Triton backend: golden parity.

``FILM(backend="triton")`` routes every hot op (convs, pools, warps, flow
upsampling, and whichever fused ops the model uses) through the Triton
kernels. On CPU this runs under the Triton interpreter, so the test uses the
first of the two ``official_small`` samples at the fixture's full 64 x 96
size (FILM treats batch elements independently, and the model still runs
both flow directions as a batch of 2): ~40 s on a 2-core CPU (both samples
take ~75 s), well under a second on a GPU, where both samples run.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

import film_fast
from film_fast.checkpoints.naming import from_official

from conftest import PYRAMID_KEYS, golden, nchw, official_variables, small_options

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

ATOL = 2e-5  # the golden-parity tolerance of the torch backend (tests/test_golden_parity.py)


def _model(backend: str):
    model = film_fast.FILM(small_options(), backend=backend)
    model.load_state_dict(from_official(official_variables()))
    return model.eval().to(DEVICE)


SAMPLES = 2 if DEVICE == "cuda" else 1


def _outputs(model, d):
    n = SAMPLES
    with torch.no_grad():
        out = model.debug_forward(nchw(d["x0"][:n]).to(DEVICE), nchw(d["x1"][:n]).to(DEVICE),
                                  torch.from_numpy(d["time"][:n]).to(DEVICE))
    return {k: [t.cpu() for t in v] if isinstance(v, list) else v.cpu() for k, v in out.items()}


def test_film_triton_backend_matches_torch_backend_and_golden():
    d = golden("official_small")
    tri = _outputs(_model("triton"), d)
    ref = _outputs(_model("torch"), d)
    # every intermediate against the torch backend
    for key in ("image",) + PYRAMID_KEYS:
        assert len(tri[key]) == len(ref[key]), key
        for i, (a, b) in enumerate(zip(tri[key], ref[key])):
            assert a.shape == b.shape, (key, i)
            err = (a - b).abs().max().item()
            assert err <= ATOL, f"{key}[{i}] triton vs torch: {err:.3e}"
    for key in ("x0_warped", "x1_warped"):
        err = (tri[key] - ref[key]).abs().max().item()
        assert err <= ATOL, f"{key} triton vs torch: {err:.3e}"
    # and against the official TF model's outputs
    n = SAMPLES
    err = (tri["image"][0] - nchw(d["image"][:n])).abs().max().item()
    assert err <= ATOL, f"image vs golden: {err:.3e}"
    for key in PYRAMID_KEYS:
        for i, got in enumerate(tri[key]):
            err = (got - nchw(d[f"{key}/{i}"][:n])).abs().max().item()
            assert err <= ATOL, f"{key}[{i}] vs golden: {err:.3e}"
    for key in ("x0_warped", "x1_warped"):
        err = (tri[key] - nchw(d[key][:n])).abs().max().item()
        assert err <= ATOL, f"{key} vs golden: {err:.3e}"
    assert np.isfinite(tri["image"][0].numpy()).all()


@pytest.mark.parametrize("widths,dtype,aten_ops", [
    ("tiny", torch.float32, 23), ("published", torch.float32, 23), ("published", torch.bfloat16, 40)])
def test_triton_kernel_launches_per_forward(monkeypatch, widths, dtype, aten_ops):
    """The GPU path's launches per forward ("Engine speed": at most a fifth of the port's 776).

    The published graph (``tiny``: the issue's widths, ``filters=2``), counted after a warm-up
    call (packed conv weights, descriptor tables and the fp32 head weights are cached). Under
    the interpreter the kernels are counted but not run (the graph's control flow does not
    depend on values), which keeps this a second instead of minutes.
    """
    from film_fast.options import Options
    from film_fast.profiling import count_launches
    if DEVICE == "cpu":
        from triton.runtime import interpreter
        monkeypatch.setattr(interpreter.InterpretedFunction, "run", lambda *a, **k: None)
    options = Options(filters=2, flow_filters=(2, 2, 2, 2)) if widths == "tiny" else Options()
    model = film_fast.FILM(options, backend="triton").eval().to(device=DEVICE, dtype=dtype)
    x0, x1 = torch.rand(1, 3, 64, 64, device=DEVICE), torch.rand(1, 3, 64, 64, device=DEVICE)
    with torch.inference_mode():
        model(x0, x1, 0.5)
    counter = count_launches(lambda: model(x0, x1, 0.5), triton=True)
    kernels = {op: n for op, n in counter.by_op.items() if op.startswith("triton.")}
    aten = {op: n for op, n in counter.by_op.items() if not op.startswith("triton.")}
    # 56 convs (8 multi-level), 21 pools, 10 warps, 6 fused flow-upsample + warps, 6 flow upsamples
    assert sum(kernels.values()) == 99, kernels
    # fp32: 7 row-swapped predictor halves (gathers), 6 residual adds, 5 fusion flow scalings,
    # 2 input frames, 1 coarsest predictor half, t / 1 - t; everything else is stored in place
    # by the kernels. 16-bit adds 7 activation casts for the fp32 flow heads, 5 flow copies
    # (the warps sample with fp32 flows, the buffers hold 16-bit ones) and 5 zeroed padding
    # channel ranges. On a GPU, up to 8 descriptor-table uploads when buffers move.
    slack = 8 if DEVICE == "cuda" else 0
    if DEVICE == "cuda" and dtype == torch.float32:
        slack += 5  # GPU fp32 buffers are padded to 16 channels too: 5 zeroed fusion paddings
    assert sum(aten.values()) <= aten_ops + slack, aten
    assert counter.total <= 155, counter.by_op
    assert "aten.contiguous" not in aten  # conv weights are packed once, not per call


def _torch_and_triton(options):
    """Two models with the same random weights (seed 0), on the torch and Triton backends."""
    torch.manual_seed(0)
    ref = film_fast.FILM(options, backend="torch").eval().to(DEVICE)
    tri = film_fast.FILM(options, backend="triton").eval().to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    return ref, tri


def test_wider_decoder_triton_backend_matches_torch_backend():
    """``Options.fusion_widths`` (the built-in model widens its level-0 decoder 16 -> 32): the
    Triton convs, which read the fusion buffers ``[level input | net | pad]`` in place, get
    the widened ``net`` slice right. Random weights, a 32 x 32 pair, tiny widths, so the
    interpreter takes seconds; a non-default width at two levels, one of them not a multiple
    of the channel alignment."""
    from film_fast.options import Options
    options = Options(pyramid_levels=3, fusion_pyramid_levels=3, specialized_levels=1,
                      sub_levels=2, flow_convs=(1, 1), flow_filters=(4, 4), filters=4,
                      fusion_widths=(12, 6))
    ref, tri = _torch_and_triton(options)
    x0, x1 = torch.rand(1, 3, 32, 32, device=DEVICE), torch.rand(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        want, got = ref(x0, x1, 0.5), tri(x0, x1, 0.5)
    assert want.abs().max() > 0.01  # the decoder output is not trivially zero
    err = (got - want).abs().max().item()
    assert err <= ATOL, f"wide decoder, triton vs torch: {err:.3e}"


def test_replicate_padding_triton_backend_matches_torch_backend():
    """``Options.padding = "replicate"`` (the built-in model's) on a size that needs padding:
    the Triton path writes the frames into the level buffers and fills their border in place,
    the torch CPU path pads dense tensors; both crop back to 29 x 30."""
    from film_fast.options import Options
    options = Options(pyramid_levels=3, fusion_pyramid_levels=3, specialized_levels=1,
                      sub_levels=2, flow_convs=(1, 1), flow_filters=(4, 4), filters=4,
                      padding="replicate")
    ref, tri = _torch_and_triton(options)
    x0, x1 = torch.rand(2, 3, 29, 30, device=DEVICE), torch.rand(2, 3, 29, 30, device=DEVICE)
    with torch.no_grad():
        want, got = ref(x0, x1, 0.5), tri(x0, x1, 0.5)
        zeros = film_fast.FILM(dataclasses.replace(options, padding="zeros"),
                               backend="torch").eval().to(DEVICE)
        zeros.load_state_dict(ref.state_dict())
        other = zeros(x0, x1, 0.5)
    assert got.shape == x0.shape
    assert (other - want).abs().max() > 1e-4  # the padding reaches the output here
    err = (got - want).abs().max().item()
    assert err <= ATOL, f"replicate padding, triton vs torch: {err:.3e}"
