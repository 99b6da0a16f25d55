"""The level and fusion buffer layouts (``film_fast.buffers``): conv outputs first, aligned.

Level buffers are ``[features | image | pad]`` and fusion buffers ``[net | w0 | w1 | flows |
pad]``, so that in 16-bit every slice a convolution stores into starts 16 bytes in and the
Triton convs keep their big tensor-core tiles. The weights keep the official channel order;
the convs reading a rearranged buffer rearrange their weights (``Conv.input_blocks``).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import film_fast
from film_fast import buffers, memory_plan
from film_fast.checkpoints import read_checkpoint
from film_fast.api import BUILTIN_MODEL
from film_fast.options import Options

SMALL = Options(pyramid_levels=5, fusion_pyramid_levels=4, specialized_levels=2, sub_levels=3,
                filters=8, flow_convs=(2, 2, 2), flow_filters=(16, 32, 32))


@pytest.mark.parametrize("options", [Options(), SMALL, read_checkpoint(BUILTIN_MODEL).options],
                         ids=["published", "small", "builtin"])
def test_fusion_input_blocks_are_a_permutation_of_the_official_channels(options):
    fuse = film_fast.FILM(options).fuse
    n = options.fusion_pyramid_levels
    for i in range(n):
        layout = fuse.layout(i)
        blocks = buffers.fusion_input_blocks(layout)
        official = options.fusion_input_channels(i) + layout.net
        covered = sorted(c for a, b in blocks for c in range(a, b))
        assert covered == list(range(official)), i
        assert layout.channels == official
        # the net slot is at the front (where the up-conv stores), w0's image after its features
        assert (blocks[0] == (official - layout.net, official)) == (layout.net > 0)
        assert layout.image(0).start == layout.net + options.feature_channels(i)
    assert fuse.levels[0].convs[0].input_blocks == buffers.fusion_input_blocks(fuse.layout(0))
    assert fuse.levels[-1].up.input_blocks == buffers.fusion_input_blocks(fuse.layout(n - 1))


def test_fusion_forward_takes_the_official_order():
    """``Fusion.forward`` (official channel order in) equals the official decoder written out
    with plain convolutions and concatenations (``[level_i | net]``)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    opts = SMALL
    fuse = film_fast.FILM(opts).fuse.eval()
    pyramid = [torch.randn(2, opts.fusion_input_channels(i), 32 >> i, 48 >> i)
               for i in range(opts.fusion_pyramid_levels)]

    def conv(layer, x):
        k = layer.weight.shape[-1]
        pad = (k // 2, (k - 1) // 2) * 2 if k % 2 else (0, 1, 0, 1)  # TF 'same'
        y = F.conv2d(F.pad(x, pad), layer.weight, layer.bias)
        return F.leaky_relu(y, 0.2) if layer.activation else y

    net = pyramid[-1]
    for i in range(len(pyramid) - 2, -1, -1):
        level = fuse.levels[i]
        up = F.interpolate(net, size=pyramid[i].shape[-2:], mode="nearest")
        net = torch.cat([pyramid[i], conv(level.up, up)], dim=1)
        for c in level.convs:
            net = conv(c, net)
    want = conv(fuse.output, net)
    with torch.no_grad():
        got = fuse(pyramid)
    assert (got - want).abs().max().item() < 1e-5


def _triton_ok() -> bool:
    return importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_level_buffer_padding_is_never_read(monkeypatch, backend):
    """16-bit level buffers are padded to 16 channels and the padding is left uninitialised:
    filled with NaN, the output is the same."""
    if backend == "triton" and not _triton_ok():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = Options(pyramid_levels=3, fusion_pyramid_levels=3, specialized_levels=1, sub_levels=2,
                   flow_convs=(1, 1), flow_filters=(4, 4), filters=4)
    torch.manual_seed(0)
    model = film_fast.FILM(opts, backend=backend).eval().to(device=device, dtype=torch.bfloat16)
    x0, x1 = (torch.rand(1, 3, 32, 32, device=device).to(torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        want = model(x0, x1, 0.5)
    original = buffers.new_buffer
    seen = []

    def poisoned(batch, channels, height, width, *, zero_padding=True, **kw):
        buf = original(batch, channels, height, width, zero_padding=zero_padding, **kw)
        if not zero_padding and buf.shape[1] > channels:
            buf[:, channels:].fill_(float("nan"))
            seen.append(buf.shape[1] - channels)
        return buf

    monkeypatch.setattr("film_fast.feature_extractor.new_buffer", poisoned)
    with torch.no_grad():
        got = model(x0, x1, 0.5)
    assert seen, "no padded level buffer was made"
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_gpu_triton_convs_store_into_aligned_slices(monkeypatch, dtype):
    """The point of the layouts: on a GPU the published model's Triton convolutions all take the
    big (aligned) tiles except the 3-channel first conv and the 2-channel flow heads (0.2% of
    the FLOPs); with the image first in the level buffers it was 26% in fp16, and 55% in fp32
    before GPU fp32 buffers were padded to 16 channels too. Counted in a dry run at 1080p
    (the meta device stands for the GPU; no kernel runs)."""
    if not _triton_ok():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    from film_fast.kernels.triton import conv2d, conv2d_levels, conv2d_pool, upsample_conv2x2
    flops = {"small tiles": 0, "all": 0}

    def record(cin, cout, k, pixels, config):
        f = 2 * pixels * cin * cout * k * k
        flops["all"] += f
        if config.fwd[0] < 128:
            flops["small tiles"] += f

    fwd, fwd_levels = conv2d.conv_fwd, conv2d.conv_fwd_levels

    def conv_fwd(x, weight, bias, act, config, **kw):
        size = kw.get("upsample_size") or x.shape[2:]
        record(weight.shape[1], weight.shape[0], weight.shape[-1], x.shape[0] * size[0] * size[1],
               config)
        return fwd(x, weight, bias, act, config, **kw)

    def conv_fwd_levels(xs, weight, bias, act, config, outs=None):
        record(weight.shape[1], weight.shape[0], weight.shape[-1],
               sum(x.shape[0] * x.shape[2] * x.shape[3] for x in xs), config)
        return fwd_levels(xs, weight, bias, act, config, outs)

    for module in (conv2d, conv2d_pool, upsample_conv2x2):
        monkeypatch.setattr(module, "conv_fwd", conv_fwd)
    for module in (conv2d, conv2d_levels):
        monkeypatch.setattr(module, "conv_fwd_levels", conv_fwd_levels)
    memory_plan.plan(None, 1080, 1920, dtype=dtype, backend="triton")
    assert flops["all"] > 2 * 8e12  # both calls of the plan, ~8.9 TFLOP each
    assert flops["small tiles"] / flops["all"] < 0.005, flops
