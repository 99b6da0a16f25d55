"""film_fast: a fast, drop-in FILM (Frame Interpolation for Large Motion) engine.

Quick use::

    import film_fast, torch
    model = film_fast.load("film_net_fp32.pt")           # or a TF2 SavedModel dir, .safetensors
    with torch.inference_mode():
        mid = model(x0, x1, torch.full((x0.shape[0], 1), 0.5))   # x: [B, 3, H, W] in [0, 1]

    # A whole sequence, streaming (frames: any iterable of [3, H, W] tensors / HWC uint8 arrays):
    for frame in film_fast.interpolate(model, frames, times_to_interpolate=2):
        ...
"""
from .api import load, resolve_device, resolve_dtype
from .checkpoints import read_checkpoint, save_safetensors
from .errors import CheckpointError, FilmFastError, InputError
from .model import FILM
from .options import Options
from .stream import interpolate, scene_change_score

__version__ = "0.1.0"

__all__ = ["load", "FILM", "Options", "interpolate", "scene_change_score", "read_checkpoint",
           "save_safetensors", "CheckpointError", "FilmFastError", "InputError", "resolve_device",
           "resolve_dtype", "__version__"]
