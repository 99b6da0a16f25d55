"""Options.padding: inputs whose size is not a multiple of the model's size multiple are padded
with zeros (the official wrapper; the published weights' parity) or by repeating edge pixels
(the built-in model: +0.36 dB on DAVIS, see the README's model card)."""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

import film_fast
from film_fast import Options, cli
from film_fast.pyramid import crop_padding, fill_padding, pad_to_multiple, padding_for

TRIPLETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "triplets")


def tiny_options(padding="replicate"):
    # 3 pyramid levels: size multiple 4, so 13x18 pads to 16x20 (pads 1/2 rows, 1/1 columns).
    return Options(pyramid_levels=3, fusion_pyramid_levels=2, specialized_levels=1, sub_levels=2,
                   flow_convs=(1, 1), flow_filters=(4, 4), filters=4, padding=padding)


def tiny_model(padding="replicate"):
    torch.manual_seed(3)
    model = film_fast.FILM(tiny_options(padding), backend="torch").eval()
    with torch.no_grad():  # strong, varied weights: the border must reach the output
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


@pytest.mark.parametrize("size", [(13, 18), (16, 17), (9, 4), (1, 1)])
@pytest.mark.parametrize("mode", ["zeros", "replicate"])
def test_fill_padding_matches_pad_to_multiple(size, mode):
    x = torch.rand(2, 3, *size)
    padded, pads = pad_to_multiple(x, 8, mode)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    assert pads == padding_for(*size, 8)
    expected = F.pad(x, pads, mode="replicate") if mode == "replicate" else F.pad(x, pads)
    assert torch.equal(padded, expected)
    assert torch.equal(crop_padding(padded, pads), x)
    # In place, into a buffer whose border holds garbage (as a reused level buffer would).
    buf = torch.full_like(padded, float("nan"))
    left, right, top, bottom = pads
    buf[..., top:top + size[0], left:left + size[1]] = x
    fill_padding(buf, pads, mode)
    assert torch.equal(buf, expected)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="reflect"):
        pad_to_multiple(torch.rand(1, 3, 5, 5), 4, "reflect")
    with pytest.raises(ValueError, match="Options.padding must be one of zeros, replicate, got 'edge'"):
        Options(padding="edge")


def test_options_serialise_padding_only_when_not_zeros():
    assert "padding" not in Options().to_dict()  # film_net configs serialise as they always have
    opts = tiny_options("replicate")
    assert opts.to_dict()["padding"] == "replicate"
    assert Options.from_dict(opts.to_dict()) == opts
    assert Options.from_dict(tiny_options("zeros").to_dict()).padding == "zeros"


def explicit(model, x0, x1, mode):
    """The model on inputs padded by hand to its size multiple (so it pads nothing), cropped."""
    p0, pads = pad_to_multiple(x0, model.options.size_multiple, mode)
    p1, _ = pad_to_multiple(x1, model.options.size_multiple, mode)
    return crop_padding(model(p0, p1, 0.5), pads)


@pytest.mark.parametrize("path", ["dense", "in_place", "autograd"])
def test_model_pads_by_its_option(path, monkeypatch):
    x0, x1 = torch.rand(2, 3, 13, 18), torch.rand(2, 3, 13, 18)
    outs = {}
    for mode in ("zeros", "replicate"):
        model = tiny_model(mode)
        if path == "in_place":  # the GPU / Triton path: images written into the level buffers
            monkeypatch.setattr(model, "_dense_on_cpu", lambda device: False)
        with torch.set_grad_enabled(path == "autograd"):
            got = model(x0, x1, 0.5)
            want = explicit(model, x0, x1, mode)
        assert got.shape == x0.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        outs[mode] = got.detach()
    # The two modes really differ here (a test of padding that could not fail is no test).
    assert (outs["zeros"] - outs["replicate"]).abs().max() > 1e-3


def test_gradients_through_replicate_padding():
    model = tiny_model("replicate")
    x0 = torch.rand(1, 3, 13, 18, requires_grad=True)
    x1 = torch.rand(1, 3, 13, 18, requires_grad=True)
    model(x0, x1, 0.5).square().sum().backward()
    g0, g1 = x0.grad.clone(), x1.grad.clone()
    x0.grad = x1.grad = None
    explicit(model, x0, x1, "replicate").square().sum().backward()
    torch.testing.assert_close(g0, x0.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, x1.grad, rtol=1e-5, atol=1e-6)
    # The edge pixels collect the gradient of the border they were repeated into.
    assert g0[..., 0, :].abs().sum() > 0


def test_checkpoints_record_and_override_padding(tmp_path):
    model = tiny_model("replicate")
    path = str(tmp_path / "tiny.safetensors")
    film_fast.save_safetensors(model, path)
    assert film_fast.load(path, device="cpu").options == model.options
    zeros = film_fast.load(path, device="cpu", padding="zeros")
    assert zeros.options == dataclasses.replace(model.options, padding="zeros")
    assert film_fast.read_checkpoint(path, padding="zeros").options.padding == "zeros"
    with pytest.raises(ValueError, match="Options.padding"):
        film_fast.load(path, device="cpu", padding="mirror")


def test_builtin_model_uses_replicate_padding():
    assert film_fast.load(device="cpu").options.padding == "replicate"


def test_cli_padding_option(tmp_path, capsys):
    src = str(tmp_path / "tiny.safetensors")
    film_fast.save_safetensors(tiny_model("zeros"), src)
    dst = str(tmp_path / "tiny_replicate.safetensors")
    assert cli.main(["convert", src, dst, "--padding", "replicate"]) == 0
    capsys.readouterr()
    assert film_fast.load(dst, device="cpu").options.padding == "replicate"
    assert cli.main(["info", dst]) == 0
    out = capsys.readouterr().out
    assert "padded internally: replicate" in out and "padding: replicate" in out
    assert cli.main(["info", src]) == 0
    assert "padded internally: zeros" in capsys.readouterr().out

    # eval records the padding it ran with; --padding overrides the file's.
    for flag, want in (([], "replicate"), (["--padding", "zeros"], "zeros")):
        report = tmp_path / f"eval-{want}.json"
        argv = ["eval", os.path.join(TRIPLETS, "ucf101"), "--model", dst, "--max-examples", "1",
                "--backend", "torch", "--quiet", "--json", str(report)] + flag
        assert cli.main(argv) == 0, capsys.readouterr().err
        capsys.readouterr()
        with open(report) as f:
            assert json.load(f)["options"]["padding"] == want

    assert cli.main(["info", dst, "--padding", "reflect"]) == 2
    assert "invalid choice: 'reflect'" in capsys.readouterr().err
