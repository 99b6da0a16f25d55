"""Shared fixtures: golden data from the two public FILM implementations, small models."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

# Without a GPU every Triton kernel runs on CPU tensors through the interpreter. It must be set
# before triton.jit decorates anything, i.e. before any film_fast.kernels.triton import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# fp32 parity is checked against fp32 truths. On Ampere and later GPUs PyTorch lets cuDNN run
# fp32 convolutions in TF32 by default (10-bit mantissa), which would put the torch and CuPy
# backends (cuDNN convs) ~1e-3 off the golden outputs and off the Triton backend's IEEE fp32:
# the suite runs IEEE fp32 everywhere. (No effect on a CPU.)
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
GOLDEN = os.path.join(DATA, "golden")
PHOTOS = os.path.join(DATA, "photos")
SMALL_PYRAMID_LEVELS = 5
PYRAMID_KEYS = ("forward_residual_flow_pyramid", "backward_residual_flow_pyramid",
                "forward_flow_pyramid", "backward_flow_pyramid")


def golden(name: str) -> dict:
    """Loads ``tests/data/golden/<name>.npz`` as a dict of numpy arrays (no pickles)."""
    with np.load(os.path.join(GOLDEN, name + ".npz"), allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def nchw(a: np.ndarray) -> torch.Tensor:
    """NHWC numpy (the fixtures' layout) -> NCHW torch."""
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()


def small_options():
    import film_fast
    with open(os.path.join(GOLDEN, "meta.json")) as f:
        return film_fast.Options.from_dict(json.load(f)["small_config"])


def official_variables(fixture: str = "official_small") -> dict:
    """``{official name: HWIO array}`` of a fixture; realflow/bigflow scale every flow head."""
    base = golden("official_small")
    variables = {k[len("var/"):]: v for k, v in base.items() if k.startswith("var/")}
    if fixture != "official_small":
        scale = float(golden(fixture)["flow_head_scale"])
        heads = {}
        for name in variables:
            if name.startswith("predict_flow/"):
                pred = name.split("/")[1]
                n = int(name.split("/")[2].split("_")[1])
                heads[pred] = max(heads.get(pred, -1), n)
        for name in list(variables):
            parts = name.split("/")
            if parts[0] == "predict_flow" and int(parts[2].split("_")[1]) == heads[parts[1]]:
                variables[name] = variables[name] * np.float32(scale)
    return variables


@pytest.fixture(scope="session")
def small_model():
    """The official small-config weights in a film_fast FILM (fp32, CPU, torch backend)."""
    import film_fast
    from film_fast.checkpoints.naming import from_official
    model = film_fast.FILM(small_options(), backend="torch")
    model.load_state_dict(from_official(official_variables()))
    return model.eval()


@pytest.fixture(scope="session")
def small_safetensors(tmp_path_factory, small_model):
    """Path of a film_fast .safetensors holding the small-config golden weights."""
    import film_fast
    path = tmp_path_factory.mktemp("models") / "small.safetensors"
    film_fast.save_safetensors(small_model, str(path))
    return str(path)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state: random cases are reproducible, never flaky."""
    torch.manual_seed(0)
    np.random.seed(0)
    yield
