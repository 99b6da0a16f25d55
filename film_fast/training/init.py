"""Initialisations for training FILM: from scratch, or edits of loaded weights.

``fusion_passthrough`` (an edit of the ``init`` weights, applied after loading them):
see :func:`fusion_passthrough`; the built-in model's stage 4 starts from it.

``widen`` (a way of loading the ``init`` weights): the config's model is wider than the
``init`` weights (e.g. ``fusion_widths``); see :func:`embed_narrower`. The wider model
starts as exactly the function of the narrower one.

``average_fusion``: the finest fusion level starts as a pass-through of the mean of
the two warped input images, so the untrained model already outputs
``(warp(x0) + warp(x1)) / 2`` (about frame averaging while flows are ~0) instead
of noise. Three of the level-0 channels carry it:

* fusion level 0, conv 0 (3x3): output channel k (k < 3) = 0.5 * w0[k] + 0.5 * w1[k]
  at the centre tap, nothing else, bias 0;
* fusion level 0, conv 1 (3x3): output channel k = input channel k (centre tap 1);
* the 1x1 output conv: RGB channel k = input channel k, bias 0;
* every flow predictor's last 1x1 conv (the flow head) is zero, so flows start at 0
  and the first output is exactly frame averaging.

Images are in [0, 1], so LeakyReLU passes these channels unchanged. The other
channels keep their random initialisation and everything is trained as usual: the
architecture is plain film_net.

Measured here, and why the built-in model does not use it: with the default
initialisation the 2.3 M-parameter built-in config needed ~3000 steps to reach frame
averaging on UCF101 (while beating it by 4-5 dB on DAVIS from step ~1500). With
``average_fusion`` it starts exactly at frame averaging, but after 750 steps of the
same recipe it was still there (DAVIS +0.2 dB, UCF101 0.0 dB): the zero flow heads
grow slowly, because at zero flow the only flow gradient is the local image gradient
through the warp. It may pay off in longer runs or with a flow warm-up; it is kept
as an option (``"model_init": "average_fusion"``) for such experiments.
"""
from __future__ import annotations

import torch

INITS = ("default", "average_fusion", "fusion_passthrough", "widen")
# Applied to the weights named by ``init`` (after they are loaded), not to a random model.
TRANSFORMS = ("fusion_passthrough",)
# Ways of loading ``init`` into a model of another shape (need ``init``).
LOADERS = ("widen",)
NEEDS_INIT = TRANSFORMS + LOADERS


@torch.no_grad()
def embed_narrower(model, state, source: str = "init") -> int:
    """Loads the weights of a narrower model of the same family into ``model``, keeping its function.

    Every tensor of ``state`` must have the shape of ``model``'s tensor of the same name or
    a smaller one with the same kernel size. A conv weight ``[o, i, kh, kw]`` goes into the
    leading block ``W[:o, :i]`` of the wide ``[O, I, kh, kw]`` (bias ``b[:o]``), and
    ``W[:o, i:] = 0``: the old output channels ignore the new input channels. The new
    output channels ``W[o:]`` keep the model's (random) initialisation and see every input.

    This preserves the function because film_fast puts a level's widened part last in
    each channel layout: a fusion buffer is ``[level input | net]``, and ``net`` is what
    ``fusion_widths`` widens. The new channels' outgoing weights are all 0, so the model
    computes exactly what the narrow one did (up to summation order); those weights get
    gradients on the first step (their inputs, the new channels, are non-zero), so the
    extra width is trained from there. Returns the number of tensors that were widened.

    Raises ValueError naming a missing, extra or ill-fitting tensor.
    """
    own = model.state_dict()
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"{source}: tensor {extra[0]!r} is not in the model")
    widened = 0
    for key, target in own.items():
        if key not in state:
            raise ValueError(f"{source}: missing tensor {key!r} (shape {list(target.shape)})")
        narrow = state[key].to(target.dtype)
        if narrow.shape == target.shape:
            target.copy_(narrow)
            continue
        fits = (narrow.dim() == target.dim()
                and all(a <= b for a, b in zip(narrow.shape, target.shape))
                and narrow.shape[2:] == target.shape[2:])
        if not fits:
            raise ValueError(f"{source}: tensor {key!r} has shape {list(narrow.shape)}, which "
                             f"does not fit the leading block of the model's {list(target.shape)}")
        o = narrow.shape[0]
        if narrow.dim() == 1:
            target[:o] = narrow
        else:
            target[:o].zero_()
            target[:o, :narrow.shape[1]] = narrow
        widened += 1
    return widened


def _carry_warp_average(model, channels) -> None:
    """Rewires fusion level 0 so that ``channels`` (3 of them) carry ``(w0 + w1) / 2`` to the
    output, and makes the output conv read only them: conv 0 writes ``0.5 * w0[rgb] +
    0.5 * w1[rgb]`` into channel ``channels[rgb]`` (centre tap), conv 1 copies it (centre
    tap 1), the output conv maps it to RGB ``rgb`` with weight 1; every other output-conv
    weight and its bias are 0. Other channels keep their weights."""
    level = model.fuse.levels[0]
    conv0, conv1 = level.convs[0], level.convs[1]
    out = model.fuse.output
    c = 3 + model.options.feature_channels(0)  # w0 occupies [0, c), w1 [c, 2c) of the buffer
    centre0 = conv0.weight.shape[-1] // 2
    centre1 = conv1.weight.shape[-1] // 2
    out.weight.zero_()
    out.bias.zero_()
    for rgb, k in enumerate(channels):
        conv0.weight[k].zero_()
        conv0.weight[k, rgb, centre0, centre0] = 0.5
        conv0.weight[k, c + rgb, centre0, centre0] = 0.5
        conv0.bias[k] = 0.0
        conv1.weight[k].zero_()
        conv1.weight[k, k, centre1, centre1] = 1.0
        conv1.bias[k] = 0.0
        out.weight[rgb, k, 0, 0] = 1.0


@torch.no_grad()
def average_fusion(model) -> None:
    """Applies the ``average_fusion`` initialisation to ``model`` (a film_fast FILM) in place."""
    _carry_warp_average(model, (0, 1, 2))
    # Flow heads start at zero (the last 1x1 conv of every predictor), so the first output is
    # exactly frame averaging; their inputs are non-zero, so they get gradients from step 0.
    predictors = list(model.predict_flow.predictors) + [model.predict_flow.shared]
    for predictor in predictors:
        head = predictor.convs[-1]
        head.weight.zero_()
        head.bias.zero_()


@torch.no_grad()
def fusion_passthrough(model) -> list:
    """Turns a trained model's finest fusion level into a correction of the warp average.

    For fine-tuning a trained model whose decoder is the weak part: at t = 0.5 the
    average of the two warped inputs, ``(w0 + w1) / 2``, can beat the decoder's own
    output (the built-in model after its stage 3: DAVIS +3.66 dB over frame averaging
    against +3.58 for its decoder, UCF101 +2.66 against +1.74). This edits fusion
    level 0 in place, keeping plain film_net:

    * the 3 level-0 channels the output conv weighs least (``||W_out[:, k]||``) are
      repurposed: conv 0 writes ``0.5 * w0[k] + 0.5 * w1[k]`` there (centre tap), conv 1
      copies them (centre tap 1), and the output conv maps them to RGB with weight 1;
    * the output conv's weights from the other channels, and its bias, become 0.

    So the model starts as exactly the warp average (LeakyReLU passes the
    non-negative warped images unchanged), with its flows and features as trained;
    the zeroed output weights get gradients from the first step, and the decoder
    learns a correction on top of the average. Returns the repurposed channels.
    """
    importance = model.fuse.output.weight.flatten(2).norm(dim=(0, 2))  # [fusion_filters(0)]
    chosen = sorted(torch.argsort(importance)[:3].tolist())
    _carry_warp_average(model, chosen)
    return chosen


def apply(model, name: str) -> None:
    if name in ("default", "widen"):  # widen acts when ``init`` is loaded (trainer)
        return
    if name == "average_fusion":
        average_fusion(model)
        return
    if name == "fusion_passthrough":
        fusion_passthrough(model)
        return
    raise ValueError(f"unknown model_init {name!r}; choose from {list(INITS)}")
