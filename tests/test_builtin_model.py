"""The built-in model: shipped, small, loaded by default, better than frame averaging on real
triplets (a few DAVIS and UCF101 triplets copied into tests/data/triplets; the full evaluation
is in the README's model card)."""
import json
import os

import pytest
import torch

import film_fast
from film_fast import cli
from film_fast.api import BUILTIN_MODEL
from film_fast.evaluation import discover_triplets, evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
TRIPLETS = os.path.join(HERE, "data", "triplets")
PHOTOS = os.path.join(HERE, "data", "photos")

# Mean PSNR gain over frame averaging on the copied triplets (DAVIS subset +7.42 dB, UCF101
# subset +2.25 dB; see the README's model card), minus a margin for rounding differences between
# platforms. The four UCF101 triplets include two nearly static ones where averaging is already
# at 40-45 dB (full UCF101 set: +3.06 dB). The thresholds fail if the shipped weights fall back to
# the stage-3 model (+6.56 / +0.80 here, before its decoder learned a correction of the warp
# average) or to zero padding (+7.11 / +2.30: these 320x180 DAVIS frames pad to 320x192).
MIN_GAIN_DB = {"davis": 7.25, "ucf101": 2.00}


@pytest.fixture(scope="module")
def builtin():
    return film_fast.load()


def test_shipped_and_small():
    assert os.path.isfile(BUILTIN_MODEL)
    assert os.path.getsize(BUILTIN_MODEL) <= 10 * 1024 * 1024


def test_loads_by_default(builtin):
    assert isinstance(builtin, film_fast.FILM)
    assert builtin.dtype == torch.float32 and not builtin.training
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "configs", "film_fast_default.json")) as f:
        trained = json.load(f)["model"]
    assert builtin.options.to_dict() == dict(film_fast.Options().to_dict(), **trained)


@pytest.mark.parametrize("dataset", sorted(MIN_GAIN_DB))
def test_against_frame_averaging(builtin, dataset):
    triplets = discover_triplets(os.path.join(TRIPLETS, dataset))
    assert len(triplets) >= 3
    result = evaluate(builtin, triplets, device=torch.device("cpu"), dtype=torch.float32)
    assert result.psnr - result.avg_psnr >= MIN_GAIN_DB[dataset], (result.psnr, result.avg_psnr)
    assert result.ssim > result.avg_ssim


def test_cli_uses_the_builtin_model(tmp_path, capsys):
    out = tmp_path / "out"
    clip = tmp_path / "clip.mp4"
    pytest.importorskip("av")
    assert cli.main(["interpolate", os.path.join(PHOTOS, "one.png"), os.path.join(PHOTOS, "two.png"),
                     "-o", str(out), "--clip", str(clip)]) == 0
    assert sorted(os.listdir(out)) == ["frame_000.png", "frame_001.png", "frame_002.png"]
    assert "film_fast_default.safetensors" in capsys.readouterr().out
    import av
    with av.open(str(clip)) as c:
        assert c.streams.video[0].frames == 3
