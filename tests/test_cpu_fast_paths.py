"""The torch backend's CPU fast paths (row-gather warp, phase up-conv) against the reference,
when they step aside, and the CPU memory policy."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import film_fast
import film_fast.ops as ops
from film_fast import cpu_memory
from film_fast.ops import eager, gather_warp, phase_upconv, reference

from test_ops_reference import WARP_CASES, make_flow, np_warp

CL = torch.channels_last


# ---- gather warp ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(WARP_CASES))
def test_gather_warp_matches_float64_bilinear_more_tightly_than_grid_sample(case):
    b, c, h, w, kind = WARP_CASES[case]
    image = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(1))
    flow = make_flow(b, h, w, kind)
    assert gather_warp.eligible(image, flow)
    got = gather_warp.warp(image, flow)
    truth = np_warp(image.numpy(), flow.numpy())
    # pixel coordinates in fp32 (the reference's normalised grid rounds to ~W/2 * 6e-8 px)
    np.testing.assert_allclose(got.numpy(), truth, rtol=0, atol=1e-6)
    assert got.is_contiguous() and got.dtype == image.dtype
    torch.testing.assert_close(got, reference.warp(image, flow), rtol=0, atol=4e-6)


def test_gather_warp_layouts_slices_and_strided_flows():
    g = torch.Generator().manual_seed(2)
    b, h, w = 2, 11, 13
    buf = torch.rand(b, 20, h, w, generator=g).contiguous(memory_format=CL)
    flow_buf = (torch.randn(b, 9, h, w, generator=g) * 4).contiguous(memory_format=CL)
    flow = flow_buf[:, 3:5]  # a strided flow, as the fusion buffers hold them
    for image in (buf[:, 5:12],                      # channel slice: whole-row view, c0 = 5
                  buf[1:, 5:12].expand(b, -1, -1, -1),  # batch stride 0: copied once
                  buf[:, 5:12].contiguous(),          # NCHW
                  buf[:, 5:12].transpose(2, 3).contiguous().transpose(2, 3)):
        got = gather_warp.warp(image, flow)
        want = torch.from_numpy(np_warp(image.numpy(), flow.numpy()).astype(np.float32))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    rows, c0 = gather_warp.pixel_rows(buf[:, 5:12])
    assert c0 == 5 and rows.shape == (b * h * w, 20) and rows.is_contiguous()
    assert rows.data_ptr() == buf.data_ptr()  # no copy
    rows, c0 = gather_warp.pixel_rows(buf[1:, 3:])
    assert c0 == 3 and rows.shape == (h * w, 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_warp_into_a_nan_poisoned_slice_writes_only_it(dtype):
    g = torch.Generator().manual_seed(4)
    image = torch.rand(2, 5, 9, 13, generator=g).to(dtype).contiguous(memory_format=CL)
    flow = torch.randn(2, 2, 9, 13, generator=g) * 30  # mostly far outside: border clamp
    buf = torch.full((2, 12, 9, 13), float("nan"), dtype=dtype).contiguous(memory_format=CL)
    with torch.no_grad():
        ops.warp(image, flow, out=buf[:, 4:9], backend="torch")
    assert torch.isnan(buf[:, :4]).all() and torch.isnan(buf[:, 9:]).all()
    truth = torch.from_numpy(np_warp(image.float().numpy(), flow.numpy()).astype(np.float32))
    # sampled in fp32 whatever the dtype: only the final rounding to it is left
    tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert (buf[:, 4:9].float() - truth).abs().max() <= tol


def test_gather_warp_nan_flow_gives_nan_pixels_and_stays_in_bounds():
    image = torch.rand(1, 3, 6, 8)
    flow = torch.zeros(1, 2, 6, 8)
    flow[0, 0, 2, 3] = float("nan")
    flow[0, 1, 4, 4] = float("inf")
    out = gather_warp.warp(image, flow)
    bad = torch.isnan(out[0, 0])
    assert bad[2, 3] and bad.sum() == 1  # inf is clamped to the border, NaN stays NaN
    torch.testing.assert_close(out[0, :, 4, 4], image[0, :, 5, 4])


def test_upsample_flow_warp_fast_path_matches_reference():
    g = torch.Generator().manual_seed(6)
    flow = torch.randn(2, 2, 5, 7, generator=g) * 3
    buf = torch.rand(2, 19, 10, 14, generator=g).contiguous(memory_format=CL)
    features = buf[:, 3:]
    out = torch.full((2, 32, 10, 14), float("nan")).contiguous(memory_format=CL)
    with torch.no_grad():
        up, warped = ops.upsample_flow_warp(flow, features, out=out[:, 16:], backend="torch")
        ref_up, ref_warped = reference.upsample_flow_warp(flow, features)
    assert warped.data_ptr() == out[:, 16:].data_ptr() and torch.isnan(out[:, :16]).all()
    assert torch.equal(up, ref_up)
    torch.testing.assert_close(warped, ref_warped, rtol=0, atol=4e-6)


def test_fast_paths_step_aside_for_autograd_tracing_and_reference_only():
    image = torch.rand(1, 3, 5, 5, requires_grad=True)
    flow = torch.rand(1, 2, 5, 5)
    assert not gather_warp.eligible(image, flow)  # records a gradient: the reference
    with torch.no_grad():
        assert gather_warp.eligible(image, flow)
        with eager.reference_only():
            assert not gather_warp.eligible(image, flow)
            assert not phase_upconv.eligible(image, (10, 10), torch.rand(4, 3, 2, 2), None)
        assert phase_upconv.eligible(image, (10, 10), torch.rand(4, 3, 2, 2), None)
    from torch._subclasses.fake_tensor import FakeTensorMode
    plain = image.detach()
    with FakeTensorMode() as mode:
        fake_image, fake_flow = mode.from_tensor(plain), mode.from_tensor(flow)
        assert not gather_warp.eligible(fake_image, fake_flow)
        out = ops.warp(fake_image, fake_flow, backend="torch")  # the reference, on fake tensors
        assert out.shape == image.shape
    with torch.no_grad():
        assert not gather_warp.eligible(image.double(), flow)  # float64 (gradcheck)
        assert not phase_upconv.eligible(image, (9, 10), torch.rand(4, 3, 2, 2), None)  # not 2x
        assert not phase_upconv.eligible(image.bfloat16(), (10, 10),
                                         torch.rand(4, 3, 2, 2).bfloat16(), None)


def test_launch_counter_observes_the_fast_paths():
    """A counting dispatch mode only watches: the fast paths (and caches) stay on under it."""
    from film_fast.profiling import count_launches
    image, flow = torch.rand(1, 4, 8, 8), torch.rand(1, 2, 8, 8)
    with torch.no_grad():
        counter = count_launches(lambda: ops.warp(image, flow, backend="torch"))
    assert counter.by_op["aten.embedding_bag"] == 1 and counter.by_op["aten.grid_sampler_2d"] == 0


# ---- phase up-conv ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 5, 3, 4, 6), (2, 7, 4, 3, 5), (1, 1, 1, 1, 1), (2, 16, 8, 9, 1)])
def test_phase_upconv_equals_upsample_then_conv(shape):
    b, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, cin, h, w, generator=g).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, 2, 2, generator=g)
    bias = torch.randn(cout, generator=g)
    buf = torch.full((b, cout + 5, 2 * h, 2 * w), float("nan")).contiguous(memory_format=CL)
    with torch.no_grad():
        got = ops.upsample_conv2x2(x, (2 * h, 2 * w), weight, bias, out=buf[:, 2:2 + cout],
                                   backend="torch")
    want = reference.upsample_conv2x2(x.double(), (2 * h, 2 * w), weight.double(), bias.double())
    assert got.data_ptr() == buf[:, 2:2 + cout].data_ptr()
    assert torch.isnan(buf[:, :2]).all() and torch.isnan(buf[:, 2 + cout:]).all()
    # fp32 rounding of sums of up to 4 * cin products (values ~ sqrt(4 cin))
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * (4 * cin) ** 0.5)


def test_phase_weights_follow_in_place_weight_updates():
    weight = torch.randn(3, 2, 2, 2)
    first = phase_upconv.phase_weights(weight)
    assert phase_upconv.phase_weights(weight) is first  # cached
    with torch.no_grad():
        weight.mul_(2)
    second = phase_upconv.phase_weights(weight)
    torch.testing.assert_close(second[0], 2 * first[0])
    torch.testing.assert_close(second[0][:, :, 0, 0], weight.sum(dim=(2, 3)))


# ---- CPU memory policy ------------------------------------------------------------------------
_FAULTS = textwrap.dedent("""
    import resource, torch, film_fast
    from film_fast import cpu_memory
    print(cpu_memory.ensure())
    def churn():
        for _ in range(4):
            torch.empty(16 * 2 ** 20).fill_(1.0)  # 64 MiB, freed at once
    churn()
    churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or cpu_memory._glibc() is None,
                    reason="the policy applies to glibc only")
def test_reuse_policy_stops_refaulting_freed_tensors():
    faults = {}
    for mode in ("reuse", "system"):
        env = dict(os.environ, **{cpu_memory.ENV: mode})
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
        assert out[0] == mode
        faults[mode] = int(out[1])
    # 4 x 64 MiB = 65,536 pages: refaulted every time by default, reused under the policy (at
    # most one block may land elsewhere when a small allocation took part of a freed one)
    assert faults["system"] > 60000, faults
    assert faults["reuse"] <= 16384 + 500, faults


def test_policy_env_errors_and_model_applies_it(monkeypatch, small_model):
    monkeypatch.setenv(cpu_memory.ENV, "jemalloc")
    with pytest.raises(ValueError, match="FILM_FAST_CPU_MALLOC='jemalloc'"):
        cpu_memory.requested_mode()
    with pytest.raises(ValueError, match="unknown CPU malloc mode"):
        cpu_memory.configure("fast")
    monkeypatch.setenv(cpu_memory.ENV, "system")
    monkeypatch.setattr(cpu_memory, "_applied", None)
    with torch.no_grad():
        small_model(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), 0.5)
    assert cpu_memory.active() == "system"
    cpu_memory.configure("reuse")  # what the rest of the test session expects


def test_system_request_leaves_malloc_untouched(monkeypatch):
    """Any mallopt call switches glibc's adaptive mmap threshold off for good, so a process
    that asks for glibc's defaults must get no mallopt at all."""
    calls = []

    class Libc:
        def mallopt(self, *args):
            calls.append(("mallopt", args))
            return 1

        def malloc_trim(self, *args):
            calls.append(("malloc_trim", args))
            return 1

    monkeypatch.setattr(cpu_memory, "_glibc", lambda: Libc())
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.setenv(cpu_memory.ENV, "system")
    assert cpu_memory.ensure() == "system" and cpu_memory.ensure() == "system"
    assert calls == []
    monkeypatch.setattr(cpu_memory, "_applied", None)
    monkeypatch.setenv(cpu_memory.ENV, "reuse")
    assert cpu_memory.ensure() == "reuse"
    assert ("mallopt", (cpu_memory._M_MMAP_MAX, 0)) in calls


# ---- dtypes that crawl on this CPU -------------------------------------------------------------
def test_slow_dtype_warnings_name_the_reason(monkeypatch):
    from film_fast import cpu_features
    from film_fast.training.trainer import resolve_precision
    cpu = torch.device("cpu")
    assert cpu_features.slow_dtype_reason(cpu, torch.float32) is None
    assert "14x slower" in cpu_features.slow_dtype_reason(cpu, torch.float16)
    assert cpu_features.slow_dtype_reason(torch.device("cuda"), torch.float16) is None
    monkeypatch.setattr(cpu_features, "native_bf16", lambda: False)
    assert "no native bf16" in cpu_features.slow_dtype_reason(cpu, torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="no native bf16"):
        film_fast.load(dtype="bf16", device="cpu")
    with pytest.warns(RuntimeWarning, match="training precision bf16"):
        assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr("film_fast.training.trainer.native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr("film_fast.training.trainer.native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(cpu_features, "native_bf16", lambda: True)
    assert cpu_features.slow_dtype_reason(cpu, torch.bfloat16) is None


def test_tiling_reserves_memory_for_the_winograd_caches():
    from film_fast.tiling import choose_tiling, cpu_fast_path_reserve
    published, builtin_like = film_fast.Options(), film_fast.Options(filters=16, flow_filters=(16, 32, 64, 64))
    reserve = cpu_fast_path_reserve(published, "cpu")
    assert 0.5e9 < reserve < 1.5e9  # 6x the wide 3x3 weights + one band
    assert cpu_fast_path_reserve(published, "cpu", torch.bfloat16) == 0
    assert cpu_fast_path_reserve(published, "cuda") == 0
    small = film_fast.Options(pyramid_levels=3, fusion_pyramid_levels=3, specialized_levels=1,
                              sub_levels=2, filters=4, flow_convs=(1, 1), flow_filters=(4, 4))
    assert cpu_fast_path_reserve(small, "cpu") == 0  # nothing wide enough for Winograd
    assert 0 < cpu_fast_path_reserve(builtin_like, "cpu") < reserve
    # a budget the reserve eats entirely is "does not fit", not "unknown"
    tiling = choose_tiling("auto", published, 2160, 3840, device="cpu", budget=reserve // 2)
    assert tiling.tile is not None and not tiling.reuse
