"""``film_fast.ops`` as registered PyTorch custom ops (``torch.library``), for ``torch.compile``.

Eager calls of :mod:`film_fast.ops` go straight to the backend (no dispatcher hop,
no per-call overhead). While ``torch.compiler.is_compiling()`` is true, every
public op routes here instead, so that Dynamo records one opaque node per op
(``torch.ops.film_fast.<op>``) rather than tracing into Triton launchers, CuPy
kernels or the grid cache, which it cannot:

=============================  ===========================================================
op (schema, backend last)      notes
=============================  ===========================================================
``warp``                       ``(image, flow, backend) -> Tensor``
``warp_into``                  ``(image, flow, out!, backend) -> ()``: writes ``out``
``upsample_flow``              ``(flow, SymInt[] size, residual?, backend) -> Tensor``
``upsample_flow_warp``         ``(flow, features, backend) -> (up, warped)``
``upsample_flow_warp_into``    ``(flow, features, out!, backend) -> up``: warped -> ``out``
``conv2d``                     ``(x, weight, bias?, activation?, backend) -> Tensor``
``conv2d_levels``              ``(Tensor[] xs, weight, bias?, activation?, backend) -> Tensor[]``
``conv2d_pool``                ``(x, weight, bias?, activation?, backend) -> (y, pooled)``
``conv2d_levels_into``         ``(Tensor[] xs, weight, bias?, activation?, Tensor[] out!, backend)
                               -> ()``: level ``l`` -> ``out[l]``
``upsample_conv2x2``           ``(x, SymInt[] size, weight, bias?, backend) -> Tensor``
``upsample_conv2x2_into``      ``(x, SymInt[] size, weight, bias?, out!, backend) -> ()``
``avg_pool2x2``                ``(x, backend) -> Tensor``
``avg_pool2x2_into``           ``(x, out!, backend) -> ()``
``<op>_backward``              gradients of the differentiable ops for kernel backends
=============================  ===========================================================

``backend`` is a concrete name (``"torch"``, ``"triton"``, ``"cupy"``): ``"auto"`` and
``None`` are resolved while tracing (:func:`backend_for`), once per op and device, like
the eager dispatcher does per call. The ``*_into`` variants declare ``out`` in
``mutates_args``: that is how the model's concat buffers keep being written in place
(``out`` is usually a channel slice of a channels_last buffer); they are only used when
no gradient is recorded. With gradients recorded the compiled path runs the functional op
and copies into ``out`` (returning the functional result), as the eager torch backend does.

Fake (meta) implementations give each backend's exact output metadata:

* ``torch`` backend: the torch implementation itself runs on the fake tensors (meta
  kernels), so shapes, dtypes, strides and even storage offsets are those of the real
  run (grid_sample returns NCHW, the 2x2 conv returns a slice of a padded result, ...).
* kernel backends: outputs are dense in the layout family of their input
  (:func:`memory_format_of`: NHWC stays NHWC, as the Triton launchers allocate them);
  the real implementation makes its outputs conform (a no-op for Triton), so the
  compiled graph's stride assumptions always hold.

Autograd (``register_autograd``), per backend:

* ``torch``: the backward is the reference autograd, ``torch.func.vjp`` of the torch
  implementation, traced into the backward graph (inductor sees plain aten ops).
  It recomputes the op's forward inside the backward, like activation checkpointing.
* ``triton``: ``film_fast::<op>_backward`` calls the backend's own
  ``torch.autograd.Function.backward`` (``kernels/triton/*.py``) with a context rebuilt
  from the saved tensors: the same backward kernels as eager, nothing recomputed.
* any other backend (``cupy``): ``film_fast::<op>_backward`` re-runs the backend's
  eager op under autograd (its ``torch.autograd.Function``) and differentiates it:
  the backend's own backward kernels, at the price of one recomputed forward.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from . import dispatch, eager

NS = "film_fast"


def _resolve_name(op: str, backend: str, device: str) -> str:
    return dispatch.resolve(op, None if backend == "" else backend, torch.device(device))[0]


# Dynamo calls it once while tracing and bakes the name into the graph instead of tracing the
# dispatcher (which may import a kernel package on first use, and reads the environment). This
# is exactly what torch.compiler.assume_constant_result(fn) does, minus its `import torch._dynamo`
# (0.9 s of `import film_fast` on this machine).
_resolve_name._dynamo_marked_constant = True


def backend_for(op: str, backend: Optional[str], device: torch.device) -> str:
    """The concrete backend ``film_fast.ops.<op>`` would run on ``device``; a trace-time
    constant under ``torch.compile`` (``FILM_FAST_BACKEND`` is read when tracing)."""
    return _resolve_name(op, "" if backend is None else backend, str(device))


def memory_format_of(t: Tensor) -> torch.memory_format:
    """The layout family kernel backends allocate outputs derived from ``t`` in (mirrors
    ``film_fast.kernels.triton.utils.memory_format_of``): NHWC and NHWC-like channel
    slices -> channels_last, everything else contiguous."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1:
        return torch.channels_last
    return torch.contiguous_format


# ---- per-op calling conventions ------------------------------------------------------------
# Every differentiable op is handled through one flat list of optional tensor inputs (``None``
# for an absent bias/residual) plus its non-tensor arguments (``size``, ``activation``). _CALL
# maps that convention back to the backend implementation's own signature.
_CALL: Dict[str, Callable] = {
    "warp": lambda f, t, size, act: f(t[0], t[1]),
    "upsample_flow": lambda f, t, size, act: f(t[0], size, t[1]),
    "conv2d": lambda f, t, size, act: f(t[0], t[1], t[2], act),
    "avg_pool2x2": lambda f, t, size, act: f(t[0]),
    "upsample_conv2x2": lambda f, t, size, act: f(t[0], size, t[1], t[2]),
    "upsample_flow_warp": lambda f, t, size, act: f(t[0], t[1]),
    "conv2d_levels": lambda f, t, size, act: f(list(t[:-2]), t[-2], t[-1], act),
    "conv2d_pool": lambda f, t, size, act: f(t[0], t[1], t[2], act),
}

Spec = Tuple[Tuple, torch.dtype, torch.memory_format]


def _spec(shape, dtype: torch.dtype, like: Tensor) -> Spec:
    return tuple(shape), dtype, memory_format_of(like)


def _rule_warp(t, size, act):
    image = t[0]
    return [_spec(image.shape, image.dtype, image)]


def _rule_upsample_flow(t, size, act):
    flow, residual = t
    b = flow.shape[0]
    if residual is None:
        return [_spec((b, 2, size[0], size[1]), flow.dtype, flow)]
    return [_spec((b, 2, size[0], size[1]), torch.promote_types(flow.dtype, residual.dtype),
                  residual)]


def _conv_spec(x, weight, h, w):
    return _spec((x.shape[0], weight.shape[0], h, w), x.dtype, x)


def _rule_conv2d(t, size, act):
    x, weight = t[0], t[1]
    return [_conv_spec(x, weight, x.shape[2], x.shape[3])]


def _rule_avg_pool2x2(t, size, act):
    x = t[0]
    b, c, h, w = x.shape
    return [_spec((b, c, h // 2, w // 2), x.dtype, x)]


def _rule_upsample_conv2x2(t, size, act):
    return [_conv_spec(t[0], t[1], size[0], size[1])]


def _rule_upsample_flow_warp(t, size, act):
    flow, features = t
    b, _, h, w = features.shape
    return [_spec((b, 2, h, w), flow.dtype, features),
            _spec(features.shape, features.dtype, features)]


def _rule_conv2d_levels(t, size, act):
    weight = t[-2]
    return [_conv_spec(x, weight, x.shape[2], x.shape[3]) for x in t[:-2]]


def _rule_conv2d_pool(t, size, act):
    x, weight = t[0], t[1]
    b, _, h, w = x.shape
    return [_conv_spec(x, weight, h, w), _conv_spec(x, weight, h // 2, w // 2)]


_RULES: Dict[str, Callable] = {
    "warp": _rule_warp, "upsample_flow": _rule_upsample_flow, "conv2d": _rule_conv2d,
    "avg_pool2x2": _rule_avg_pool2x2, "upsample_conv2x2": _rule_upsample_conv2x2,
    "upsample_flow_warp": _rule_upsample_flow_warp, "conv2d_levels": _rule_conv2d_levels,
    "conv2d_pool": _rule_conv2d_pool,
}


def _empty(spec: Spec, device) -> Tensor:
    shape, dtype, fmt = spec
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


def _conform(t: Tensor, spec: Spec) -> Tensor:
    """``t`` with the dtype and layout the fake implementation promised (normally itself)."""
    shape, dtype, fmt = spec
    if tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"film_fast op returned shape {list(t.shape)}, expected {list(shape)}")
    if t.dtype != dtype:
        t = t.to(dtype)
    if not t.is_contiguous(memory_format=fmt):
        t = t.contiguous(memory_format=fmt)
    return t


def _unaliased(outs: List[Tensor], *args) -> List[Tensor]:
    """Custom ops may not return (views of) their inputs: clone any output that does (e.g. a
    residual's gradient, which is the incoming gradient itself)."""
    storages = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves(list(args))
                if isinstance(t, Tensor)}
    return [o.clone() if o.untyped_storage().data_ptr() in storages else o for o in outs]


def _as_list(out) -> List[Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _impl(op: str, backend: str, device: torch.device) -> Callable:
    return dispatch.resolve(op, backend, device)[1]


def _forward(op: str, backend: str, inputs: List[Optional[Tensor]], size, act) -> List[Tensor]:
    """Real forward: the backend's eager implementation (inference path: autograd is handled
    by the registered op), outputs conformed to the fake metadata for kernel backends."""
    device = next(t for t in inputs if t is not None).device
    # The torch backend's backward differentiates its reference, so the forward computes the
    # reference too (its CPU fast paths agree with it only up to rounding).
    scope = eager.reference_only() if backend == "torch" else contextlib.nullcontext()
    with torch.no_grad(), scope:
        outs = _as_list(_CALL[op](_impl(op, backend, device), inputs, size, act))
    if backend != "torch":
        outs = [_conform(o, s) for o, s in zip(outs, _RULES[op](inputs, size, act))]
    return _unaliased(outs, inputs)


def _fake_forward(op: str, backend: str, inputs: List[Optional[Tensor]], size, act) -> List[Tensor]:
    if backend == "torch":
        with torch.no_grad():  # the torch implementation itself, on fake tensors
            return _as_list(_CALL[op](dispatch._IMPLS[(op, "torch")], inputs, size, act))
    device = next(t for t in inputs if t is not None).device
    return [_empty(s, device) for s in _RULES[op](inputs, size, act)]


# ---- autograd ------------------------------------------------------------------------------
class _Ctx:
    """Stands in for the ``ctx`` a backend ``torch.autograd.Function.forward`` filled in, so
    that its ``backward`` can run from the tensors the registered op saved."""

    def __init__(self, saved=(), needs=(), **attrs) -> None:
        self.saved_tensors = tuple(saved)
        self.needs_input_grad = tuple(needs)
        self.__dict__.update(attrs)


def _triton_backward(op, inputs, outputs, grads, needs, size, act) -> List[Optional[Tensor]]:
    """Gradients (aligned with ``inputs``) from the Triton backend's autograd Functions."""
    from film_fast.kernels.triton import (avg_pool2x2, conv2d, conv2d_levels, conv2d_pool,
                                          upsample_conv2x2, upsample_flow, upsample_flow_warp,
                                          utils, warp)
    if op == "warp":
        image, flow = inputs
        ctx = _Ctx((image, flow), needs, config=warp.launch_config(image.shape[1]))
        return list(warp.TritonWarpFunction.backward(ctx, grads[0]))
    if op == "upsample_flow":
        flow, residual = inputs
        ctx = _Ctx((), (needs[0], False, needs[1]), coarse=tuple(flow.shape[-2:]),
                   flow_dtype=flow.dtype, res_dtype=None if residual is None else residual.dtype)
        g_flow, _, g_res = upsample_flow.TritonUpsampleFlowFunction.backward(ctx, grads[0])
        return [g_flow, g_res]
    if op == "conv2d":
        x, weight, _ = inputs
        a = conv2d.check_activation(act)
        ctx = _Ctx((x, weight, outputs[0] if a else None), needs, act=a,
                   config=conv2d.config_for(x, weight))
        return list(conv2d.TritonConv2dFunction.backward(ctx, grads[0])[:3])
    if op == "conv2d_levels":
        xs, weight = inputs[:-2], inputs[-2]
        a = conv2d.check_activation(act)
        config = conv2d.conv_config(weight.shape[1], weight.shape[0], xs[0].dtype,
                                    x_aligned=all(conv2d.nhwc16_aligned(x) for x in xs))
        ctx = _Ctx((weight, *xs, *(outputs if a else ())), (needs[-2], needs[-1], False, *needs[:-2]),
                   act=a, config=config, num_levels=len(xs))
        g_w, g_b, _, *g_xs = conv2d_levels.TritonConv2dLevelsFunction.backward(ctx, *grads)
        return [*g_xs, g_w, g_b]
    if op == "conv2d_pool":
        x, weight, _ = inputs
        ctx = _Ctx((x, weight, outputs[0]), needs, act=conv2d.check_activation(act),
                   config=conv2d.config_for(x, weight))
        return list(conv2d_pool.TritonConv2dPoolFunction.backward(ctx, *grads)[:3])
    if op == "upsample_conv2x2":
        x, weight, _ = inputs
        ctx = _Ctx((x, weight), (needs[0], False, needs[1], needs[2]),
                   size=(int(size[0]), int(size[1])), config=conv2d.config_for(x, weight))
        g_x, _, g_w, g_b = upsample_conv2x2.TritonUpsampleConv2x2Function.backward(ctx, grads[0])
        return [g_x, g_w, g_b]
    if op == "avg_pool2x2":
        x = inputs[0]
        ctx = _Ctx((), needs, shape=tuple(x.shape), dtype=x.dtype, device=x.device,
                   memory_format=utils.memory_format_of(x))
        return [avg_pool2x2.TritonAvgPool2x2Function.backward(ctx, grads[0])]
    if op == "upsample_flow_warp":
        # Eager autograd sees two Functions (see kernels/triton/upsample_flow_warp.py): the warp
        # of the features by ``up`` and the flow upsampling; chain their backwards the same way.
        flow, features = inputs
        up = outputs[0]
        g_up, g_warped = grads
        g_features = None
        if g_warped is not None and any(needs):
            ctx = _Ctx((features, up), (False, needs[0], needs[1]),
                       config=warp.launch_config(features.shape[1]))
            _, g_up_warp, g_features = upsample_flow_warp.TritonWarpIntoFunction.backward(
                ctx, g_warped)
            if g_up_warp is not None:
                g_up = g_up_warp if g_up is None else g_up + g_up_warp
        g_flow = None
        if needs[0] and g_up is not None:
            ctx = _Ctx((), (True, False, False), coarse=tuple(flow.shape[-2:]), flow_dtype=flow.dtype)
            g_flow = upsample_flow_warp.TritonUpsampleFlowWarpFunction.backward(ctx, g_up)[0]
        return [g_flow, g_features]
    raise NotImplementedError(op)


# Outputs the Triton backward reads (everything else is recomputed from the inputs' metadata).
_TRITON_SAVED_OUTPUTS = {
    "conv2d": lambda act: act is not None, "conv2d_levels": lambda act: act is not None,
    "conv2d_pool": lambda act: True, "upsample_flow_warp": lambda act: True,
}


class _AutogradBelowDispatch:
    """Re-enables autograd inside an op implementation, which the dispatcher runs below the
    autograd keys (``_AutoDispatchBelowAutograd``): the recompute path differentiates the
    backend's eager op there."""

    KEYS = ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView")

    def __enter__(self):
        self._guards = []
        for name in self.KEYS:
            key = getattr(torch._C.DispatchKey, name, None)
            if key is not None:
                guard = torch._C._SetExcludeDispatchKeyGuard(key, False)
                guard.__enter__()
                self._guards.append(guard)
        return self

    def __exit__(self, *exc):
        for guard in reversed(self._guards):
            guard.__exit__(*exc)
        return False


def _vjp(fn: Callable, inputs: List[Optional[Tensor]], grads: List[Optional[Tensor]],
         needs: Sequence[bool]) -> List[Optional[Tensor]]:
    """``torch.func.vjp`` of ``fn(inputs)`` w.r.t. the needed inputs (traceable)."""
    idx = [i for i, (t, n) in enumerate(zip(inputs, needs)) if n and t is not None]
    if not idx:
        return [None] * len(inputs)

    def f(*primals):
        args = list(inputs)
        for i, p in zip(idx, primals):
            args[i] = p
        return fn(args)

    outs, vjp_fn = torch.func.vjp(f, *[inputs[i] for i in idx])
    flat, spec = pytree.tree_flatten(outs)
    cot = [torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(flat, grads)]
    res = vjp_fn(pytree.tree_unflatten(cot, spec))
    out: List[Optional[Tensor]] = [None] * len(inputs)
    for i, r in zip(idx, res):
        out[i] = r
    return out


def _recompute_backward(op, backend, inputs, grads, needs, size, act) -> List[Optional[Tensor]]:
    """Gradients through the backend's eager autograd (its Functions), recomputing the forward."""
    device = next(t for t in inputs if t is not None).device
    impl = _impl(op, backend, device)
    with _AutogradBelowDispatch(), torch.enable_grad():
        args = [None if t is None else t.detach().requires_grad_(bool(n))
                for t, n in zip(inputs, needs)]
        leaves = [a for a, n in zip(args, needs) if a is not None and n]
        outs = _as_list(_CALL[op](impl, args, size, act))
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        res = [None] * len(leaves)
        if leaves and pairs:
            res = list(torch.autograd.grad([o for o, _ in pairs], leaves,
                                           [g.to(o.dtype) for o, g in pairs], allow_unused=True))
    it = iter(res)
    return [next(it) if (t is not None and n) else None for t, n in zip(inputs, needs)]


def _grad_spec(t: Tensor) -> Spec:
    return _spec(t.shape, t.dtype, t)


def _backward_impl(op: str):
    def impl(inputs: List[Optional[Tensor]], outputs: List[Tensor], grads: List[Optional[Tensor]],
             needs: List[bool], size: List[int], activation: Optional[str],
             backend: str) -> List[Tensor]:
        if backend == "triton":
            res = _triton_backward(op, list(inputs), list(outputs), list(grads), list(needs),
                                   list(size), activation)
        else:
            res = _recompute_backward(op, backend, list(inputs), list(grads), list(needs),
                                      list(size), activation)
        out = []
        for t, n, g in zip(inputs, needs, res):
            if t is None or not n:
                continue
            spec = _grad_spec(t)
            out.append(_conform(g, spec) if g is not None else _empty(spec, t.device).zero_())
        return _unaliased(out, inputs, outputs, grads)

    def fake(inputs, outputs, grads, needs, size, activation, backend):
        return [_empty(_grad_spec(t), t.device) for t, n in zip(inputs, needs) if t is not None and n]

    return impl, fake


BACKWARD_SCHEMA = ("(Tensor?[] inputs, Tensor[] outputs, Tensor?[] grads, bool[] needs, "
                   "SymInt[] size, str? activation, str backend) -> Tensor[]")
BACKWARD_OPS: Dict[str, object] = {}
for _op in _CALL:
    _fn, _fake = _backward_impl(_op)
    BACKWARD_OPS[_op] = torch.library.custom_op(f"{NS}::{_op}_backward", _fn, mutates_args=(),
                                                schema=BACKWARD_SCHEMA)
    BACKWARD_OPS[_op].register_fake(_fake)


def _register_autograd(custom, op: str, unpack: Callable, pack: Callable) -> None:
    """``register_autograd`` for ``op`` whose arguments ``unpack(*args) -> (inputs, size, act,
    backend)`` flatten into the ``_CALL`` convention; ``pack(flat grads)`` maps the flat
    gradients back onto the op's arguments."""

    def setup_context(ctx, inputs, output):
        flat, size, act, backend = unpack(*inputs)
        outs = _as_list(output)
        ctx.present = [t is not None for t in flat]
        ctx.n_out = len(outs)
        ctx.size, ctx.act, ctx.backend = list(size), act, backend
        ctx.save_for_backward(*[t for t in flat if t is not None], *outs)

    def backward(ctx, *grads):
        saved = list(ctx.saved_tensors)
        outs = saved[len(saved) - ctx.n_out:]
        it = iter(saved[:len(saved) - ctx.n_out])
        flat = [next(it) if p else None for p in ctx.present]
        grads = pytree.tree_leaves(list(grads))  # list outputs arrive as one list
        # ctx.needs_input_grad is aligned with the op's arguments: flatten it like them.
        needs = [bool(n) and p for n, p in zip(unpack(*ctx.needs_input_grad)[0], ctx.present)]
        if ctx.backend == "torch":
            impl = dispatch._IMPLS[(op, "torch")]
            flat_grads = _vjp(lambda args: _CALL[op](impl, args, ctx.size, ctx.act), flat, grads,
                              needs)
        else:
            keep = ctx.backend == "triton" and _TRITON_SAVED_OUTPUTS.get(op, lambda a: False)(ctx.act)
            res = BACKWARD_OPS[op](flat, outs if keep else [], grads, needs, ctx.size, ctx.act,
                                   ctx.backend)
            it = iter(res)
            flat_grads = [next(it) if n else None for n in needs]
        return pack(flat_grads)

    custom.register_autograd(backward, setup_context=setup_context)


# ---- the forward ops -----------------------------------------------------------------------
@torch.library.custom_op(f"{NS}::warp", mutates_args=())
def _warp(image: Tensor, flow: Tensor, backend: str) -> Tensor:
    return _forward("warp", backend, [image, flow], (), None)[0]


@_warp.register_fake
def _(image, flow, backend):
    return _fake_forward("warp", backend, [image, flow], (), None)[0]


_register_autograd(_warp, "warp", lambda image, flow, backend: ([image, flow], (), None, backend),
                   lambda g: (g[0], g[1], None))


@torch.library.custom_op(f"{NS}::warp_into", mutates_args=("out",))
def _warp_into(image: Tensor, flow: Tensor, out: Tensor, backend: str) -> None:
    _impl("warp_into", backend, image.device)(image, flow, out)


@_warp_into.register_fake
def _(image, flow, out, backend):
    return None


@torch.library.custom_op(f"{NS}::upsample_flow", mutates_args=())
def _upsample_flow(flow: Tensor, size: Sequence[int], residual: Optional[Tensor],
                   backend: str) -> Tensor:
    return _forward("upsample_flow", backend, [flow, residual], list(size), None)[0]


@_upsample_flow.register_fake
def _(flow, size, residual, backend):
    return _fake_forward("upsample_flow", backend, [flow, residual], list(size), None)[0]


_register_autograd(_upsample_flow, "upsample_flow",
                   lambda flow, size, residual, backend: ([flow, residual], size, None, backend),
                   lambda g: (g[0], None, g[1], None))


@torch.library.custom_op(f"{NS}::conv2d", mutates_args=())
def _conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
            backend: str) -> Tensor:
    return _forward("conv2d", backend, [x, weight, bias], (), activation)[0]


@_conv2d.register_fake
def _(x, weight, bias, activation, backend):
    return _fake_forward("conv2d", backend, [x, weight, bias], (), activation)[0]


_register_autograd(_conv2d, "conv2d",
                   lambda x, w, b, act, backend: ([x, w, b], (), act, backend),
                   lambda g: (g[0], g[1], g[2], None, None))


@torch.library.custom_op(f"{NS}::avg_pool2x2", mutates_args=())
def _avg_pool2x2(x: Tensor, backend: str) -> Tensor:
    return _forward("avg_pool2x2", backend, [x], (), None)[0]


@_avg_pool2x2.register_fake
def _(x, backend):
    return _fake_forward("avg_pool2x2", backend, [x], (), None)[0]


_register_autograd(_avg_pool2x2, "avg_pool2x2", lambda x, backend: ([x], (), None, backend),
                   lambda g: (g[0], None))


@torch.library.custom_op(f"{NS}::upsample_conv2x2", mutates_args=())
def _upsample_conv2x2(x: Tensor, size: Sequence[int], weight: Tensor, bias: Optional[Tensor],
                      backend: str) -> Tensor:
    return _forward("upsample_conv2x2", backend, [x, weight, bias], list(size), None)[0]


@_upsample_conv2x2.register_fake
def _(x, size, weight, bias, backend):
    return _fake_forward("upsample_conv2x2", backend, [x, weight, bias], list(size), None)[0]


_register_autograd(_upsample_conv2x2, "upsample_conv2x2",
                   lambda x, size, w, b, backend: ([x, w, b], size, None, backend),
                   lambda g: (g[0], None, g[1], g[2], None))


@torch.library.custom_op(f"{NS}::upsample_flow_warp", mutates_args=())
def _upsample_flow_warp(flow: Tensor, features: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    up, warped = _forward("upsample_flow_warp", backend, [flow, features], (), None)
    return up, warped


@_upsample_flow_warp.register_fake
def _(flow, features, backend):
    up, warped = _fake_forward("upsample_flow_warp", backend, [flow, features], (), None)
    return up, warped


_register_autograd(_upsample_flow_warp, "upsample_flow_warp",
                   lambda flow, features, backend: ([flow, features], (), None, backend),
                   lambda g: (g[0], g[1], None))


@torch.library.custom_op(f"{NS}::upsample_flow_warp_into", mutates_args=("out",))
def _upsample_flow_warp_into(flow: Tensor, features: Tensor, out: Tensor, backend: str) -> Tensor:
    with torch.no_grad():
        up, _ = _impl("upsample_flow_warp", backend, features.device)(flow, features, out)
    if backend != "torch":
        up = _conform(up, _rule_upsample_flow_warp([flow, features], (), None)[0])
    return _unaliased([up], flow, features, out)[0]


@_upsample_flow_warp_into.register_fake
def _(flow, features, out, backend):
    return _fake_forward("upsample_flow_warp", backend, [flow, features], (), None)[0]


@torch.library.custom_op(f"{NS}::conv2d_levels", mutates_args=())
def _conv2d_levels(xs: List[Tensor], weight: Tensor, bias: Optional[Tensor],
                   activation: Optional[str], backend: str) -> List[Tensor]:
    return _forward("conv2d_levels", backend, [*xs, weight, bias], (), activation)


@_conv2d_levels.register_fake
def _(xs, weight, bias, activation, backend):
    return _fake_forward("conv2d_levels", backend, [*xs, weight, bias], (), activation)


_register_autograd(_conv2d_levels, "conv2d_levels",
                   lambda xs, w, b, act, backend: ([*xs, w, b], (), act, backend),
                   lambda g: (list(g[:-2]), g[-2], g[-1], None, None))


@torch.library.custom_op(f"{NS}::conv2d_pool", mutates_args=())
def _conv2d_pool(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
                 backend: str) -> Tuple[Tensor, Tensor]:
    y, pooled = _forward("conv2d_pool", backend, [x, weight, bias], (), activation)
    return y, pooled


@_conv2d_pool.register_fake
def _(x, weight, bias, activation, backend):
    y, pooled = _fake_forward("conv2d_pool", backend, [x, weight, bias], (), activation)
    return y, pooled


_register_autograd(_conv2d_pool, "conv2d_pool",
                   lambda x, w, b, act, backend: ([x, w, b], (), act, backend),
                   lambda g: (g[0], g[1], g[2], None, None))

@torch.library.custom_op(f"{NS}::conv2d_levels_into", mutates_args=("out",))
def _conv2d_levels_into(xs: List[Tensor], weight: Tensor, bias: Optional[Tensor],
                        activation: Optional[str], out: List[Tensor], backend: str) -> None:
    with torch.no_grad():
        _impl("conv2d_levels_into", backend, weight.device)(list(xs), weight, bias, activation,
                                                            list(out))


@_conv2d_levels_into.register_fake
def _(xs, weight, bias, activation, out, backend):
    return None


@torch.library.custom_op(f"{NS}::avg_pool2x2_into", mutates_args=("out",))
def _avg_pool2x2_into(x: Tensor, out: Tensor, backend: str) -> None:
    with torch.no_grad():
        _impl("avg_pool2x2_into", backend, x.device)(x, out)


@_avg_pool2x2_into.register_fake
def _(x, out, backend):
    return None


@torch.library.custom_op(f"{NS}::upsample_conv2x2_into", mutates_args=("out",))
def _upsample_conv2x2_into(x: Tensor, size: Sequence[int], weight: Tensor, bias: Optional[Tensor],
                           out: Tensor, backend: str) -> None:
    with torch.no_grad():
        _impl("upsample_conv2x2_into", backend, x.device)(x, list(size), weight, bias, out)


@_upsample_conv2x2_into.register_fake
def _(x, size, weight, bias, out, backend):
    return None


#: Every registered forward op by name (``torch.ops.film_fast.<name>``).
OPS = {
    "warp": _warp, "warp_into": _warp_into, "upsample_flow": _upsample_flow, "conv2d": _conv2d,
    "avg_pool2x2": _avg_pool2x2, "avg_pool2x2_into": _avg_pool2x2_into,
    "upsample_conv2x2": _upsample_conv2x2, "upsample_conv2x2_into": _upsample_conv2x2_into,
    "upsample_flow_warp": _upsample_flow_warp, "upsample_flow_warp_into": _upsample_flow_warp_into,
    "conv2d_levels": _conv2d_levels, "conv2d_levels_into": _conv2d_levels_into,
    "conv2d_pool": _conv2d_pool,
}


# ---- the compiled path of film_fast.ops (arguments already validated there) -----------------
def _recording(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def warp(image: Tensor, flow: Tensor, out: Optional[Tensor] = None,
         backend: Optional[str] = None) -> Tensor:
    if out is not None and not _recording(image, flow):
        torch.ops.film_fast.warp_into(image, flow, out, backend_for("warp_into", backend, image.device))
        return out
    result = torch.ops.film_fast.warp(image, flow, backend_for("warp", backend, image.device))
    if out is None:
        return result
    out.copy_(result)
    return out


def upsample_flow(flow: Tensor, size: Sequence[int], residual: Optional[Tensor] = None,
                  backend: Optional[str] = None) -> Tensor:
    return torch.ops.film_fast.upsample_flow(flow, list(size), residual,
                                             backend_for("upsample_flow", backend, flow.device))


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           activation: Optional[str] = None, backend: Optional[str] = None) -> Tensor:
    return torch.ops.film_fast.conv2d(x, weight, bias, activation,
                                      backend_for("conv2d", backend, x.device))


def avg_pool2x2(x: Tensor, out: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    if out is not None and not _recording(x, out):
        torch.ops.film_fast.avg_pool2x2_into(x, out, backend_for("avg_pool2x2_into", backend,
                                                                 x.device))
        return out
    result = torch.ops.film_fast.avg_pool2x2(x, backend_for("avg_pool2x2", backend, x.device))
    if out is not None:
        out.copy_(result)  # (returns the result: equal to out, and not a view of its buffer)
    return result


def upsample_conv2x2(x: Tensor, size: Sequence[int], weight: Tensor, bias: Optional[Tensor] = None,
                     out: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    if out is not None and not _recording(x, weight, bias, out):
        name = backend_for("upsample_conv2x2_into", backend, x.device)
        torch.ops.film_fast.upsample_conv2x2_into(x, list(size), weight, bias, out, name)
        return out
    name = backend_for("upsample_conv2x2", backend, x.device)
    result = torch.ops.film_fast.upsample_conv2x2(x, list(size), weight, bias, name)
    if out is not None:
        out.copy_(result)
    return result


def upsample_flow_warp(flow: Tensor, features: Tensor, out: Optional[Tensor] = None,
                       backend: Optional[str] = None):
    name = backend_for("upsample_flow_warp", backend, features.device)
    if out is not None and not _recording(flow, features, out):
        return torch.ops.film_fast.upsample_flow_warp_into(flow, features, out, name), out
    up, warped = torch.ops.film_fast.upsample_flow_warp(flow, features, name)
    if out is None:
        return up, warped
    out.copy_(warped)
    return up, out


def conv2d_levels(xs: Sequence[Tensor], weight: Tensor, bias: Optional[Tensor] = None,
                  activation: Optional[str] = None, out: Optional[Sequence[Tensor]] = None,
                  backend: Optional[str] = None) -> list:
    if out is not None and not _recording(weight, bias, *xs, *out):
        torch.ops.film_fast.conv2d_levels_into(
            list(xs), weight, bias, activation, list(out),
            backend_for("conv2d_levels_into", backend, xs[0].device))
        return list(out)
    ys = list(torch.ops.film_fast.conv2d_levels(
        list(xs), weight, bias, activation, backend_for("conv2d_levels", backend, xs[0].device)))
    if out is not None:
        for o, y in zip(out, ys):
            o.copy_(y)
    return ys


def conv2d_pool(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                activation: Optional[str] = None, backend: Optional[str] = None):
    y, pooled = torch.ops.film_fast.conv2d_pool(x, weight, bias, activation,
                                                backend_for("conv2d_pool", backend, x.device))
    return y, pooled
