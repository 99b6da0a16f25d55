"""Stage-by-stage golden parity of the whole model on every kernel backend, on a CUDA GPU.

On CPU the Triton backend is covered by tests/test_triton_model.py (interpreter); these run
every fixture through each kernel backend on a real GPU and skip cleanly without one.
"""
from __future__ import annotations

import pytest
import torch

import film_fast

from conftest import golden, nchw
from test_golden_parity import FIXTURES, assert_matches_fixture, canonical_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (CPU coverage: test_triton_model.py)")


@pytest.mark.parametrize("fixture", FIXTURES)
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_kernel_backend_matches_golden_on_gpu(backend, fixture):
    reason = film_fast.ops.available_backends("cuda")[backend]
    if reason:
        pytest.skip(reason)
    d = golden(fixture)
    from conftest import small_options
    model = film_fast.FILM(small_options(), backend=backend)
    model.load_state_dict(canonical_weights(fixture))
    model = model.cuda().eval()
    with torch.no_grad():
        out = model.debug_forward(nchw(d["x0"]).cuda(), nchw(d["x1"]).cuda(),
                                  torch.from_numpy(d["time"]).cuda())
    out = {k: ([t.cpu() for t in v] if isinstance(v, list) else v.cpu()) for k, v in out.items()}
    assert_matches_fixture(out, d, fixture)
