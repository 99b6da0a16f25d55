"""FILM.ensemble: the test-time flip ensemble (identity, horizontal, vertical, both flips; each
output flipped back, then averaged) through forward, encode/interpolate_encoded, the streaming
engine, autograd, load() and the CLI."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import film_fast
from film_fast import Options, cli
from film_fast.model import FLIPS

HERE = os.path.dirname(os.path.abspath(__file__))
TRIPLETS = os.path.join(HERE, "data", "triplets")


def tiny_model():
    torch.manual_seed(5)
    opts = Options(pyramid_levels=3, fusion_pyramid_levels=2, specialized_levels=1, sub_levels=2,
                   flow_convs=(1, 1), flow_filters=(4, 4), filters=4, padding="replicate")
    model = film_fast.FILM(opts, backend="torch").eval()
    with torch.no_grad():  # strong weights: flows of a few pixels, outputs far from symmetric
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model


def flipped(x, dims):
    return x.flip(dims) if dims else x


def by_hand(model, x0, x1, dt, k):
    """The ensemble written out: plain forwards on flipped pairs, flipped back, averaged."""
    old = model.ensemble
    model.set_ensemble(1)
    try:
        outs = [flipped(model(flipped(x0, d), flipped(x1, d), dt), d) for d in FLIPS[:k]]
    finally:
        model.set_ensemble(old)
    return torch.stack(outs).mean(0)


@pytest.mark.parametrize("path", ["dense", "in_place"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_forward_is_the_mean_of_flipped_passes(k, path, monkeypatch):
    model = tiny_model()
    if path == "in_place":  # the GPU / Triton layout: frames written into the level buffers
        monkeypatch.setattr(model, "_dense_on_cpu", lambda device: False)
    x0, x1 = torch.rand(2, 3, 13, 18), torch.rand(2, 3, 13, 18)
    dt = torch.tensor([[0.3], [0.8]])  # per-sample times catch a mis-ordered repeat
    with torch.no_grad():
        want = by_hand(model, x0, x1, dt, k)
        plain = model(x0, x1, dt)
        got = model.set_ensemble(k)(x0, x1, dt)
    assert got.shape == x0.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - plain).abs().max() > 1e-3  # the ensemble really changes the frame


def test_encoded_frames_carry_their_variants():
    model = tiny_model().set_ensemble(3)
    x0, x1 = torch.rand(2, 3, 13, 18), torch.rand(2, 3, 13, 18)
    with torch.no_grad():
        f0, f1 = model.encode(x0), model.encode(x1)
        assert f0.variants == 3 and f0.frames == 2 and f0.levels[0].shape[0] == 6
        got = model.interpolate_encoded(f0, f1, 0.5)
        torch.testing.assert_close(got, model(x0, x1, 0.5), rtol=0, atol=1e-6)
        # Frame 1 alone, with its variants: the second row of the batch.
        one = model.interpolate_encoded(f0.rows(1, 2), f1.rows(1, 2), 0.5)
        torch.testing.assert_close(one, got[1:], rtol=0, atol=1e-6)
        plain = film_fast.FILM(model.options, backend="torch").eval()
        plain.load_state_dict(model.state_dict())
        with pytest.raises(ValueError, match="flip variants: 3 vs 1"):
            model.interpolate_encoded(f0, plain.encode(x1), 0.5)


def test_streaming_engine_uses_the_ensemble():
    model = tiny_model().set_ensemble(2)
    frames = [torch.rand(3, 21, 26) for _ in range(3)]
    out = list(film_fast.interpolate(model, frames, times_to_interpolate=1, tile="off"))
    assert len(out) == 5
    with torch.no_grad():
        for i in range(2):
            want = model(frames[i][None], frames[i + 1][None], 0.5)[0].clamp(0, 1)
            torch.testing.assert_close(out[2 * i + 1], want, rtol=0, atol=1e-6)


def test_gradients_flow_through_every_variant():
    model = tiny_model().set_ensemble(4)
    x0 = torch.rand(1, 3, 13, 18, requires_grad=True)
    x1 = torch.rand(1, 3, 13, 18)
    model(x0, x1, 0.5).square().sum().backward()
    got = x0.grad.clone()
    x0.grad = None
    by_hand(model, x0, x1, 0.5, 4).square().sum().backward()
    # One batch of 4 variants against 4 separate passes: the backward sums in another order
    # (these strong random weights give gradients up to ~70), so compare relative to the scale.
    scale = x0.grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got, x0.grad, rtol=0, atol=1e-3 * scale)


def test_debug_forward_is_the_plain_model():
    model = tiny_model()
    x0, x1 = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        plain = model(x0, x1, 0.5)
        debug = model.set_ensemble(2).debug_forward(x0, x1, 0.5)
    torch.testing.assert_close(debug["image"][0], plain, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, 5, True, 2.0, "2"])
def test_bad_ensemble_is_refused(bad, tmp_path):
    with pytest.raises(ValueError, match="ensemble must be an int from 1 \\(off\\) to 4"):
        tiny_model().set_ensemble(bad)
    with pytest.raises(ValueError, match="ensemble must be an int"):
        film_fast.load(str(tmp_path / "missing.safetensors"), ensemble=bad)  # before the file


def test_load_and_cli(tmp_path, capsys):
    model = tiny_model()
    path = str(tmp_path / "tiny.safetensors")
    film_fast.save_safetensors(model, path)
    assert film_fast.load(path, device="cpu", ensemble=3).ensemble == 3
    assert film_fast.load(path, device="cpu").ensemble == 1

    a, b = np.random.rand(20, 30, 3), np.random.rand(20, 30, 3)
    for name, img in (("a.png", a), ("b.png", b)):
        Image.fromarray((img * 255).round().astype(np.uint8)).save(tmp_path / name)
    out = tmp_path / "out"
    argv = ["interpolate", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(out),
            "--model", path, "--backend", "torch", "--ensemble", "2"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "flip ensemble of 2" in capsys.readouterr().out
    from film_fast.imageio import read_image
    x0, x1 = read_image(str(tmp_path / "a.png"))[None], read_image(str(tmp_path / "b.png"))[None]
    with torch.no_grad():
        want = film_fast.load(path, device="cpu", ensemble=2)(x0, x1, 0.5)[0].clamp(0, 1)
    got = read_image(str(out / "frame_001.png"))
    assert (got - want).abs().max() <= 1 / 255 + 1e-6

    report = tmp_path / "eval.json"
    assert cli.main(["eval", os.path.join(TRIPLETS, "ucf101"), "--model", path, "--quiet",
                     "--max-examples", "1", "--ensemble", "4", "--json", str(report)]) == 0
    capsys.readouterr()
    assert json.loads(report.read_text())["ensemble"] == 4
    assert cli.main(argv[:-1] + ["5"]) == 2
    assert "invalid choice: 5" in capsys.readouterr().err
