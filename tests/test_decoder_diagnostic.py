"""benchmarks/decoder_diagnostic.py: the decoder-versus-its-own-warps scores (model card)."""
import importlib.util
import os

import torch

from film_fast import FILM, Options
from film_fast.evaluation import psnr
from film_fast.training.init import fusion_passthrough

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(HERE), "benchmarks", "decoder_diagnostic.py")
TINY = Options(pyramid_levels=3, fusion_pyramid_levels=3, specialized_levels=1, sub_levels=2,
               flow_convs=(1, 1), flow_filters=(4, 4), filters=4)


def _script():
    spec = importlib.util.spec_from_file_location("decoder_diagnostic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scores_columns():
    diag = _script()
    torch.manual_seed(0)
    model = FILM(TINY, backend="torch").eval()
    for p in model.predict_flow.parameters():  # flows of a few pixels, so the warps differ
        p.data.mul_(3.0)
    x0, gt, x1 = torch.rand(1, 3, 40, 56), torch.rand(1, 3, 40, 56), torch.rand(1, 3, 40, 56)
    row = dict(zip(diag.COLUMNS, diag.scores(model, x0, gt, x1)))
    with torch.no_grad():
        out = model.debug_forward(x0, x1, 0.5)
    assert row["average"] == float(psnr(((x0 + x1) / 2).clamp(0, 1), gt))
    assert row["model"] == float(psnr(out["image"][0].clamp(0, 1), gt))
    assert row["w0"] != row["w1"]
    assert row["best_warp"] > max(row["w0"], row["w1"])
    # After fusion_passthrough the model outputs its warp average: the two columns agree.
    fusion_passthrough(model)
    row = dict(zip(diag.COLUMNS, diag.scores(model, x0, gt, x1)))
    assert abs(row["model"] - row["warp_avg"]) < 1e-4
    assert abs(row["model"] - row["average"]) > 1e-3
