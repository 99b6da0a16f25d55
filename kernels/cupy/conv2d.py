"""CuPy conv2d, conv2d_levels and conv2d_pool: cuDNN GEMM + one fused CuPy epilogue.

A hand-written CuPy convolution does not beat cuDNN's tensor-core GEMMs, so (as the backend
contract allows) the convolution itself runs through ``torch.nn.functional.conv2d``
**without bias**, and everything around it is one CuPy kernel over the GEMM output
(``conv2d.cu``):

* ``conv2d``: ``y = act(z + bias)``, in place on the GEMM output when no slicing is needed;
* ``conv2d_levels``: the same for every pyramid level in a single launch (a small device
  table of per-level pointers/shapes/strides);
* ``conv2d_pool``: ``y`` and ``avg_pool2x2(y)`` in the same pass.

TF 'same' padding of even kernels (one extra row/column at the bottom/right) is obtained
by running the GEMM with symmetric padding ``k // 2`` -- one row/column too many at the
top/left -- and letting the epilogue read the GEMM output from offset ``(1, 1)``: no
``F.pad`` copy.

Numerics: in fp16/bf16 the bias-free GEMM output is rounded to the storage dtype before the
bias is added -- exactly what PyTorch itself does on CUDA (aten's cuDNN path runs the GEMM,
then ``output.add_(bias)``); the epilogue then rounds once more, after bias and activation.

Backward: the epilogue's adjoint (LeakyReLU derivative from the saved output, plus the
pool's 2x2 spread) is a CuPy kernel writing ``dz`` straight into a GEMM-shaped buffer; the
bias gradient is ``dz.sum`` (float32) and the GEMM gradients come from
``torch.ops.aten.convolution_backward`` (cuDNN).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from film_fast.ops import reference

from . import _runtime as rt

SOURCE = "conv2d.cu"
KERNELS = ("film_bias_act_forward", "film_bias_act_levels_forward", "film_bias_act_pool_forward",
           "film_bias_act_backward")
LEVEL_ROW = 16  # int64 entries per level in film_bias_act_levels_forward's table


def _kernel(name: str, dtype: torch.dtype, device: int):
    assert name in KERNELS, name
    return rt.get_kernel(SOURCE, name, dtype, device)


def activation_code(activation: Optional[str]) -> int:
    """``None`` -> 0, ``"leaky_relu"`` -> 1 (the kernels' ``act`` argument)."""
    if activation is None:
        return 0
    if activation == "leaky_relu":
        return 1
    raise ValueError(f"unknown activation {activation!r}; expected None or 'leaky_relu'")


class _Gemm:
    """The bias-free cuDNN convolution of one input and how its output maps to 'same'."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor):
        kh, kw = weight.shape[-2:]
        self.padding = (kh // 2, kw // 2)
        # Even kernels: symmetric padding k/2 yields one extra leading row/column; skip it.
        self.offset = (1 - kh % 2, 1 - kw % 2)
        self.full = F.conv2d(x, weight, None, padding=self.padding)
        oy, ox = self.offset
        self.z = self.full[:, :, oy:, ox:] if (oy or ox) else self.full
        self.sliced = bool(oy or ox)


def _bias_arg(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if bias is None else bias.detach().to(torch.float32).contiguous()


def _epilogue(gemm: _Gemm, bias32: Optional[torch.Tensor], act: int, like: torch.Tensor) -> torch.Tensor:
    """``act(z + bias)``; in place on the GEMM output unless it must be sliced."""
    z = gemm.z
    if bias32 is None and act == 0 and not gemm.sliced:
        return z
    out = z if not gemm.sliced else torch.empty(z.shape, dtype=z.dtype, device=z.device,
                                                memory_format=rt.memory_format(like))
    if out.numel() == 0:
        return out
    b, c, h, w = z.shape
    dev = rt.device_index(z)
    rt.launch(_kernel("film_bias_act_forward", z.dtype, dev), (rt.blocks_for(out.numel()),),
              (rt.BLOCK,),
              (z, *rt.strides(z), bias32, int(bias32 is not None), act, out, *rt.strides(out),
               b, c, h, w, rt.is_channels_last(out)), dev)
    return out


def _epilogue_backward(gemm_shape: Sequence[int], offset: Tuple[int, int], dy, dp, y, act: int,
                       like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``dz`` for a ``[B, C, H, W]`` output, written into a GEMM-shaped buffer.

    Returns ``(d_full, dz)``: ``d_full`` has the GEMM output's shape (zero in the skipped
    leading row/column of even kernels) and feeds ``convolution_backward``; ``dz`` is its
    ``[B, C, H, W]`` view (for the bias gradient).
    """
    oy, ox = offset
    ref = dy if dy is not None else dp
    fmt = rt.memory_format(like)
    if dp is None and act == 0 and not (oy or ox):
        return dy, dy  # identity epilogue: the output gradient is the GEMM gradient
    d_full = torch.empty(tuple(gemm_shape), dtype=ref.dtype, device=ref.device, memory_format=fmt)
    if oy or ox:
        d_full.zero_()  # the skipped leading row/column gets no gradient
    dz = d_full[:, :, oy:, ox:] if (oy or ox) else d_full
    if dz.numel() == 0:
        return d_full, dz
    b, c, h, w = dz.shape
    dev = rt.device_index(dz)
    zero4 = (0, 0, 0, 0)
    rt.launch(_kernel("film_bias_act_backward", dz.dtype, dev), (rt.blocks_for(dz.numel()),),
              (rt.BLOCK,),
              (dy, *(rt.strides(dy) if dy is not None else zero4), int(dy is not None),
               dp, *(rt.strides(dp) if dp is not None else zero4), int(dp is not None),
               y, *(rt.strides(y) if y is not None else zero4), act,
               dz, *rt.strides(dz), b, c, h, w, rt.is_channels_last(dz)), dev)
    return d_full, dz


def _gemm_backward(d_full: torch.Tensor, dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   padding: Tuple[int, int], need_x: bool, need_w: bool, need_b: bool, bias_dtype):
    """``(grad_x, grad_weight, grad_bias)`` of the bias-free GEMM plus the bias."""
    grad_x = grad_w = grad_b = None
    if need_x or need_w:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            d_full, x, weight, None, [1, 1], list(padding), [1, 1], False, [0, 0], 1,
            [need_x, need_w, False])
    if need_b:
        grad_b = dz.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias_dtype)
    return grad_x, grad_w, grad_b


# ---- conv2d ------------------------------------------------------------------------------------
class CupyConv2dFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(x, weight, bias_or_None, act_code) -> y``."""

    @staticmethod
    def forward(ctx, x, weight, bias, act):
        gemm = _Gemm(x, weight)
        y = _epilogue(gemm, _bias_arg(bias), act, x)
        ctx.save_for_backward(x, weight, y if act else None)
        ctx.act, ctx.padding, ctx.offset = act, gemm.padding, gemm.offset
        ctx.gemm_shape = tuple(gemm.full.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, y = ctx.saved_tensors
        d_full, dz = _epilogue_backward(ctx.gemm_shape, ctx.offset, dy.to(x.dtype), None, y,
                                        ctx.act, x)
        need = ctx.needs_input_grad
        gx, gw, gb = _gemm_backward(d_full, dz, x, weight, ctx.padding, need[0], need[1],
                                    need[2] and ctx.bias_dtype is not None, ctx.bias_dtype)
        return gx, gw, gb, None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           activation: Optional[str] = None) -> torch.Tensor:
    """``film_fast.ops.conv2d`` on the CuPy backend (float64 uses the reference)."""
    act = activation_code(activation)
    if not rt.supported(x, weight, bias):
        return reference.conv2d(x, weight, bias, activation)
    return CupyConv2dFunction.apply(x, weight, bias, act)


# ---- conv2d_levels -----------------------------------------------------------------------------
def _levels_epilogue(gemms: List[_Gemm], xs: Sequence[torch.Tensor], bias32, act: int,
                     dests: Optional[Sequence[torch.Tensor]] = None):
    """One launch applying ``act(z + bias)`` to every level's GEMM output, stored in place on
    the GEMM output where possible, or into ``dests`` (any strides) when given."""
    outs, rows, total = [], [], 0
    for i, (gemm, x) in enumerate(zip(gemms, xs)):
        z = gemm.z
        if dests is not None:
            out = dests[i]
        else:
            out = z if not gemm.sliced else torch.empty(z.shape, dtype=z.dtype, device=z.device,
                                                        memory_format=rt.memory_format(x))
        outs.append(out)
        if out.numel() == 0:
            continue
        b, _, h, w = z.shape
        row = [z.data_ptr(), out.data_ptr(), total, b, h, w, *rt.strides(z), *rt.strides(out),
               rt.is_channels_last(out)]
        rows.append(row + [0] * (LEVEL_ROW - len(row)))
        total += out.numel()
    if total == 0 or (dests is None and bias32 is None and act == 0
                      and not any(g.sliced for g in gemms)):
        return outs
    device = gemms[0].z.device
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":  # pinned staging + non_blocking: stream-ordered, no host sync
        table = table.pin_memory().to(device, non_blocking=True)
    dev = rt.device_index(gemms[0].z)
    rt.launch(_kernel("film_bias_act_levels_forward", gemms[0].z.dtype, dev),
              (rt.blocks_for(total),), (rt.BLOCK,),
              (table, len(rows), total, bias32, int(bias32 is not None), act, gemms[0].z.shape[1]),
              dev)
    return outs


class CupyConv2dLevelsFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(weight, bias_or_None, act_code, *xs) -> tuple of ys``."""

    @staticmethod
    def forward(ctx, weight, bias, act, *xs):
        ctx.set_materialize_grads(False)
        gemms = [_Gemm(x, weight) for x in xs]
        ys = _levels_epilogue(gemms, xs, _bias_arg(bias), act)
        ctx.save_for_backward(weight, *xs, *(ys if act else ()))
        ctx.act, ctx.levels = act, len(xs)
        ctx.geometry = [(g.padding, g.offset, tuple(g.full.shape)) for g in gemms]
        ctx.bias_dtype = None if bias is None else bias.dtype
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        saved = ctx.saved_tensors
        weight, xs = saved[0], saved[1:1 + ctx.levels]
        ys = saved[1 + ctx.levels:] if ctx.act else (None,) * ctx.levels
        need_w = ctx.needs_input_grad[0]
        need_b = ctx.needs_input_grad[1] and ctx.bias_dtype is not None
        grad_w = grad_b = None
        grad_xs = []
        for i, (x, y, dy) in enumerate(zip(xs, ys, dys)):
            need_x = ctx.needs_input_grad[3 + i]
            if dy is None:
                grad_xs.append(None)
                continue
            padding, offset, gemm_shape = ctx.geometry[i]
            d_full, dz = _epilogue_backward(gemm_shape, offset, dy.to(x.dtype), None, y, ctx.act, x)
            gx, gw, gb = _gemm_backward(d_full, dz, x, weight, padding, need_x, need_w, need_b,
                                        ctx.bias_dtype)
            grad_xs.append(gx)
            if gw is not None:
                grad_w = gw if grad_w is None else grad_w + gw
            if gb is not None:
                grad_b = gb if grad_b is None else grad_b + gb
        return (grad_w, grad_b, None, *grad_xs)


def conv2d_levels(xs: Sequence[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                  activation: Optional[str] = None) -> list:
    """``film_fast.ops.conv2d_levels`` on the CuPy backend (float64 uses the reference)."""
    act = activation_code(activation)
    xs = list(xs)
    if not xs:
        return []
    if not rt.supported(weight, bias, *xs) or len({x.dtype for x in xs}) != 1:
        return reference.conv2d_levels(xs, weight, bias, activation)
    return list(CupyConv2dLevelsFunction.apply(weight, bias, act, *xs))


def conv2d_levels_into(xs: Sequence[torch.Tensor], weight: torch.Tensor,
                       bias: Optional[torch.Tensor], activation: Optional[str],
                       out: Sequence[torch.Tensor]) -> list:
    """``film_fast.ops.conv2d_levels(..., out=out)`` on the CuPy backend: the GEMMs, then one
    epilogue launch storing every level into ``out[l]`` (returned). With gradients recorded
    (or float64 / mixed dtypes) it computes, copies, and returns the computed tensors."""
    act = activation_code(activation)
    xs, out = list(xs), list(out)
    if not xs:
        return []
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (weight, bias, *xs, *out))
    if (recording or not rt.supported(weight, bias, *xs) or len({x.dtype for x in xs}) != 1
            or any(o.dtype != xs[0].dtype for o in out)):
        ys = conv2d_levels(xs, weight, bias, activation)
        for o, y in zip(out, ys):
            o.copy_(y)
        return ys
    gemms = [_Gemm(x, weight) for x in xs]
    _levels_epilogue(gemms, xs, _bias_arg(bias), act, dests=out)
    return out


# ---- conv2d_pool -------------------------------------------------------------------------------
class CupyConv2dPoolFunction(torch.autograd.Function):
    """Autograd wrapper: ``apply(x, weight, bias_or_None, act_code) -> (y, pool(y))``."""

    @staticmethod
    def forward(ctx, x, weight, bias, act):
        ctx.set_materialize_grads(False)
        gemm = _Gemm(x, weight)
        z = gemm.z
        b, c, h, w = z.shape
        fmt = rt.memory_format(x)
        y = z if not gemm.sliced else torch.empty(z.shape, dtype=z.dtype, device=z.device,
                                                  memory_format=fmt)
        pool = torch.empty((b, c, h // 2, w // 2), dtype=z.dtype, device=z.device, memory_format=fmt)
        if y.numel():
            bias32 = _bias_arg(bias)
            dev = rt.device_index(z)
            rt.launch(_kernel("film_bias_act_pool_forward", z.dtype, dev),
                      (rt.blocks_for(b * c * ((h + 1) // 2) * ((w + 1) // 2)),), (rt.BLOCK,),
                      (z, *rt.strides(z), bias32, int(bias32 is not None), act,
                       y, *rt.strides(y), pool, *rt.strides(pool), b, c, h, w,
                       rt.is_channels_last(y)), dev)
        ctx.save_for_backward(x, weight, y if act else None)
        ctx.act, ctx.padding, ctx.offset = act, gemm.padding, gemm.offset
        ctx.gemm_shape = tuple(gemm.full.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y, pool

    @staticmethod
    def backward(ctx, dy, dp):
        x, weight, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dy is None and dp is None:
            return None, None, None, None
        dy = None if dy is None else dy.to(x.dtype)
        dp = None if dp is None else dp.to(x.dtype)
        d_full, dz = _epilogue_backward(ctx.gemm_shape, ctx.offset, dy, dp, y, ctx.act, x)
        gx, gw, gb = _gemm_backward(d_full, dz, x, weight, ctx.padding, need[0], need[1],
                                    need[2] and ctx.bias_dtype is not None, ctx.bias_dtype)
        return gx, gw, gb, None


def conv2d_pool(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                activation: Optional[str] = None):
    """``film_fast.ops.conv2d_pool`` on the CuPy backend (float64 uses the reference)."""
    act = activation_code(activation)
    if not rt.supported(x, weight, bias):
        return reference.conv2d_pool(x, weight, bias, activation)
    return CupyConv2dPoolFunction.apply(x, weight, bias, act)
