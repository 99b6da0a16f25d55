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
