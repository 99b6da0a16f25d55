"""Model-level behaviour: sizes and padding, time layouts, batching, layouts, dtypes, gradients."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import film_fast
from film_fast.checkpoints.naming import from_official, from_port, infer_options
from film_fast.pyramid import padding_for

from conftest import GOLDEN, golden, nchw


def _frames(b=2, h=64, w=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, h, w, generator=g)


def test_published_config_matches_both_public_name_tables():
    """The published model's 82 tensors, by official and by port name, map onto FILM()'s state dict."""
    official, port = {}, {}
    with open(os.path.join(GOLDEN, "full_config_names.tsv")) as f:
        for line in f:
            if line.startswith("#") or line.startswith("official_name"):
                continue
            oname, oshape, pkey, pshape = line.rstrip("\n").split("\t")
            official[oname] = np.zeros(eval(oshape), np.float32)  # shapes like "(3, 3, 3, 64)"
            port[pkey] = torch.zeros(eval(pshape))
    expected = {k: tuple(v.shape) for k, v in film_fast.FILM().state_dict().items()}
    for mapped in (from_official(official), from_port(port)):
        assert {k: tuple(v.shape) for k, v in mapped.items()} == expected
        assert infer_options(mapped) == film_fast.Options()
    assert len(expected) == 82
    n_params = sum(int(np.prod(s)) for s in expected.values())
    assert n_params == film_fast.FILM().num_parameters()
    assert n_params == 34_436_667  # "34 M parameters, 137.8 MB in fp32"
    assert abs(n_params * 4 / 1e6 - 137.8) < 0.5


def test_pyramid_levels_required_for_unpublished_config(small_model):
    with pytest.raises(film_fast.CheckpointError, match="pyramid_levels"):
        infer_options(small_model.state_dict())


@pytest.mark.parametrize("h,w", [(64, 96), (37, 61), (65, 64), (1, 1), (100, 17)])
def test_any_size_pads_centred_like_official(small_model, h, w):
    x0, x1 = _frames(1, h, w)
    m = small_model.options.size_multiple
    with torch.no_grad():
        out = small_model(x0, x1, 0.5)
        left, right, top, bottom = padding_for(h, w, m)
        padded = small_model(F.pad(x0, (left, right, top, bottom)), F.pad(x1, (left, right, top, bottom)), 0.5)
    assert out.shape == (1, 3, h, w)
    torch.testing.assert_close(out, padded[..., top:top + h, left:left + w], rtol=0, atol=0)


def test_padding_offsets_are_pad_over_two_before():
    assert padding_for(64, 64, 64) == (0, 0, 0, 0)
    assert padding_for(37, 61, 16) == (1, 2, 5, 6)  # pad_w=3 -> 1 left, 2 right; pad_h=11 -> 5, 6


def test_time_layouts_agree_and_bad_ones_fail(small_model):
    x0, x1 = _frames(2)
    with torch.no_grad():
        a = small_model(x0, x1, torch.tensor([[0.25], [0.75]]))
        b = small_model(x0, x1, torch.tensor([0.25, 0.75]))
        c = small_model(x0, x1, 0.5)
        d = small_model(x0, x1, torch.full((2, 1), 0.5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4  # t really changes the result
    for bad in (torch.zeros(3), torch.zeros(2, 2), torch.zeros(1, 1, 1)):
        with pytest.raises(ValueError, match="batch_dt"):
            small_model(x0, x1, bad)


def test_batch_equals_per_sample(small_model):
    x0, x1 = _frames(3)
    t = torch.tensor([0.5, 0.3, 0.9])
    with torch.no_grad():
        batched = small_model(x0, x1, t)
        single = torch.cat([small_model(x0[i:i + 1], x1[i:i + 1], t[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=0, atol=2e-6)


def test_layouts_channels_last_and_non_contiguous(small_model):
    x0, x1 = _frames(2)
    with torch.no_grad():
        ref = small_model(x0, x1, 0.5)
        cl = small_model(x0.contiguous(memory_format=torch.channels_last),
                         x1.contiguous(memory_format=torch.channels_last), 0.5)
        wide0, wide1 = torch.rand(2, 3, 64, 192), torch.rand(2, 3, 64, 192)
        wide0[..., ::2], wide1[..., ::2] = x0, x1
        strided = small_model(wide0[..., ::2], wide1[..., ::2], 0.5)
    torch.testing.assert_close(cl, ref, rtol=0, atol=0)
    torch.testing.assert_close(strided, ref, rtol=0, atol=0)


def test_input_validation_messages(small_model):
    x0, x1 = _frames(1)
    with pytest.raises(ValueError, match=r"x1 .*same shape"):
        small_model(x0, x1[..., :32], 0.5)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        small_model(x0[:, :2], x1[:, :2], 0.5)
    with pytest.raises(TypeError, match="floating"):
        small_model((x0 * 255).byte(), (x1 * 255).byte(), 0.5)


def test_gradients_reach_inputs_and_every_parameter(small_model):
    model = film_fast.FILM(small_model.options, backend="torch")
    model.load_state_dict(small_model.state_dict())
    x0, x1 = _frames(1, 32, 48)
    x0.requires_grad_(True)
    out = model(x0, x1, 0.5)
    out.square().mean().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_and_stays_close(small_model, dtype):
    """Low precision works on CPU (warp sampling stays fp32); accuracy vs fp32 is bounded."""
    low = film_fast.FILM(small_model.options, backend="torch").to(dtype)
    low.load_state_dict(small_model.state_dict())
    d = golden("official_small_realflow")
    x0, x1 = nchw(d["x0"]), nchw(d["x1"])
    with torch.no_grad():
        ref = small_model(x0, x1, 0.5)
        out = low(x0, x1, 0.5)
    assert out.dtype == dtype
    err = (out.float() - ref).abs()
    # bf16 has 8 mantissa bits (eps 3.9e-3), fp16 11 (eps 4.9e-4); errors stay within a few eps.
    eps = torch.finfo(dtype).eps
    assert err.mean() < 2 * eps and err.max() < 64 * eps, (err.mean().item(), err.max().item())


def test_backend_selection(small_model, monkeypatch):
    model = film_fast.FILM(small_model.options, backend="torch")
    assert all(getattr(m, "backend", "torch") == "torch" for m in model.modules())
    with pytest.raises(ValueError, match="unknown backend"):
        film_fast.FILM(small_model.options, backend="tensorflow")
    monkeypatch.setenv("FILM_FAST_BACKEND", "torch")
    assert film_fast.FILM(small_model.options, backend=None).backend == "torch"


def test_encoded_frames_reused_across_pairs_give_the_same_frames(small_model):
    """Video mode: encode each frame once, pair it with both neighbours."""
    frames = torch.rand(3, 3, 37, 61)
    with torch.no_grad():
        enc = [small_model.encode(frames[i:i + 1]) for i in range(3)]
        for i in range(2):
            direct = small_model(frames[i:i + 1], frames[i + 1:i + 2], 0.5)
            reused = small_model.interpolate_encoded(enc[i], enc[i + 1], 0.5)
            torch.testing.assert_close(reused, direct, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="differ in size"):
        small_model.interpolate_encoded(enc[0], small_model.encode(torch.rand(1, 3, 64, 64)))


@pytest.mark.parametrize("graph", ["cpu", "in_place"])
def test_kernel_launches_per_forward_stay_low(graph, monkeypatch):
    """Published config, torch backend: launch-counting guard (the port: 776, per the issue).

    ``total`` counts kernel-launching ops only; allocations (``empty``, ``detach_``: no kernel)
    are counted apart. ``in_place``: the graph the torch backend runs off the CPU (GPUs:
    buffers written in place, no CPU fast paths; 244 when written). ``cpu``: what runs here.
    The CPU path trades launches for passes over memory, because a CPU op launch costs
    microseconds: each of its 16 warps is a row gather preceded by ~13 small index ops on
    ``[B, 2, H, W]`` (film_fast.ops.gather_warp: 1.3-7x faster than one grid_sample), the 4
    decoder up-convs are 4 phase convs each (film_fast.ops.phase_upconv), the 23 wide 3x3
    convs are Winograd convs of ~50 elementwise transform ops around one bmm each
    (film_fast.ops.winograd: 1.3-3.2x faster than oneDNN's direct conv), and dense
    intermediates are copied into the buffers (FILM._dense_on_cpu); 1314 when written. With
    the C transforms (film_fast.kernels.cpu, where a C compiler is available) 55 convs are
    Winograd convs of one bmm between two C calls, which the counter does not see: 465.
    The Triton path's guard (99 kernels + 23 ATen ops) is in tests/test_triton_model.py.
    """
    from film_fast.ops import gather_warp, phase_upconv, winograd
    from film_fast.profiling import count_launches
    model = film_fast.FILM().eval()
    if graph == "in_place":
        monkeypatch.setattr(model, "_dense_on_cpu", lambda device: False)
        for fast_path in (gather_warp, phase_upconv, winograd):
            monkeypatch.setattr(fast_path, "eligible", lambda *a: False)
    x0, x1 = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        model(x0, x1, 0.5)  # builds the cached warp grids and swap indices
    counter = count_launches(lambda: model(x0, x1, 0.5))
    assert counter.by_op["aten.leaky_relu"] == 0  # fused into the convs
    assert counter.by_op["aten.cat"] <= 2  # concats are written in place
    assert counter.by_op["aten.index_select"] == 7  # row-swapped predictor halves: one gather each
    if graph == "cpu":
        native = winograd.native_library() is not None
        assert counter.total <= (480 if native else 1330), counter.by_op.most_common(8)
        assert counter.by_op["aten.grid_sampler_2d"] == 0  # every warp is a row gather
        assert counter.by_op["aten.embedding_bag"] == 16
        assert counter.by_op["aten._upsample_nearest_exact2d"] == 0  # phase up-convs
        assert counter.by_op["aten.bmm"] == (55 if native else 23)  # Winograd convs
        assert counter.allocations <= (185 if native else 170), counter.allocations_by_op
        return
    assert counter.total <= 244, counter.by_op.most_common(8)
    assert "aten.empty" not in counter.by_op and counter.allocations <= 25, \
        counter.allocations_by_op
    # copies left: 22 conv outputs, 6 pooled images, 4 up-convs (oneDNN and pooling have no
    # strided out=), 16 warps (nor grid_sample), 2 input frames, 1 predictor half; the
    # fusion flows are one mul per level
    assert counter.by_op["aten.copy_"] <= 51, counter.by_op["aten.copy_"]
    assert counter.by_op["aten.cat"] <= 1


def test_launch_counter_separates_allocations_and_sees_hidden_copies():
    from film_fast.profiling import count_launches
    x = torch.rand(2, 3, 8, 8)

    def fn():
        y = torch.empty(2, 3, 8, 8)  # allocation: no kernel
        y.copy_(x)  # 1
        y.contiguous()  # a no-op: not counted
        z = y.contiguous(memory_format=torch.channels_last)  # a copy: 1
        z.permute(0, 2, 3, 1).reshape(2, -1)  # a view: not counted
        y.permute(0, 2, 3, 1).reshape(2, -1)  # a copy: 1
        y.new_empty(3).detach_()

    counter = count_launches(fn)
    assert counter.total == 3, counter.by_op
    assert counter.allocations == 3, counter.allocations_by_op


def test_interpolate_encoded_reads_a_joint_batch_in_place(small_model):
    """Two frames encoded as one batch are decoded from that batch (a view, no copy of the
    levels: what keeps the streaming engine without feature reuse at a forward's memory),
    give the forward's frame, and leave the encoded features untouched; frames encoded
    apart are concatenated."""
    from film_fast.model import _pair_rows
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 64, 96, generator=g)
    with torch.inference_mode():
        enc = small_model.encode(x)
        before = [lv.clone() for lv in enc.levels]
        a, b = enc.rows(0, 1), enc.rows(1, 2)
        joint = _pair_rows(a.levels[0], b.levels[0])
        assert joint.data_ptr() == enc.levels[0].data_ptr() and torch.equal(joint, enc.levels[0])
        out = small_model.interpolate_encoded(a, b, 0.5)
        assert torch.equal(out, small_model(x[:1], x[1:], 0.5))
        assert all(torch.equal(lv, old) for lv, old in zip(enc.levels, before))
        apart = _pair_rows(b.levels[0], a.levels[0])  # wrong order: a copy
        assert apart.data_ptr() != enc.levels[0].data_ptr()
        assert torch.equal(apart, torch.cat([b.levels[0], a.levels[0]]))
        other = small_model.encode(x[1:])
        assert torch.equal(small_model.interpolate_encoded(a, other, 0.5), out)


def test_models_built_or_loaded_inside_inference_mode_have_normal_weights():
    """Inference tensors have no version counter, which the caches of arranged, cast and
    Winograd-transformed weights key on: FILM() and film_fast.load() called inside
    torch.inference_mode still make normal parameters, and a model whose parameters were made
    inference tensors anyway (assigned inside inference_mode) runs, uncached, to the same
    frames."""
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.rand(1, 3, 64, 96, generator=g), torch.rand(1, 3, 64, 96, generator=g)
    with torch.inference_mode():
        built = film_fast.FILM().eval()
        loaded = film_fast.load()
        assert not any(p.is_inference() for p in built.parameters())
        assert not any(p.is_inference() for p in loaded.parameters())
        want = loaded(x0, x1, 0.5)
        stuck = film_fast.load()
        stuck.load_state_dict({k: v.clone() for k, v in stuck.state_dict().items()},
                              assign=True)
        assert all(p.is_inference() for p in stuck.parameters())
        torch.testing.assert_close(stuck(x0, x1, 0.5), want, rtol=0, atol=0)
