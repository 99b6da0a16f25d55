"""When a CPU fast path or a tensor cache may be used: plain eager execution on real tensors."""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.utils import _python_dispatch

_local = threading.local()
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_FUNCTIONALIZE = torch._C.DispatchKey.Functionalize


def untraced() -> bool:
    """False while ``torch.compile`` traces, under any torch dispatch mode (fake tensors,
    ``opcheck``'s schema checks, proxies), under functionalisation and inside functorch
    transforms (``torch.func.vjp``): their factory functions make wrapped, storage-less
    tensors, which must not outlive them in a cache.
    """
    return not (torch.compiler.is_compiling() or _foreign_dispatch_mode()
                or torch._C._dispatch_tls_is_dispatch_key_included(_FUNCTIONALIZE)
                or torch._C._are_functorch_transforms_active())


def _foreign_dispatch_mode() -> bool:
    """A torch dispatch mode is active that is not a mere observer (observers, such as
    :class:`film_fast.profiling.LaunchCounter`, set ``observes_only = True``: they see the
    real tensors and must see what really runs)."""
    if torch._C._len_torch_dispatch_stack() == 0:
        return False
    return not all(getattr(mode, "observes_only", False)
                   for mode in _python_dispatch._get_current_dispatch_mode_stack())


def plain_eager(*tensors) -> bool:
    """:func:`untraced`, every tensor a plain one (no subclass such as a fake tensor), and not
    inside :func:`reference_only`.

    The fast paths read data pointers, view storage with ``as_strided`` and cache derived
    tensors; everything traced or wrapped sees the readable reference instead.
    """
    if getattr(_local, "reference_only", 0):
        return False
    return untraced() and all(t is None or type(t) in _PLAIN for t in tensors)


@contextlib.contextmanager
def reference_only():
    """Within it (this thread) the fast paths step aside for the reference.

    For the forward of a differentiable custom op (:mod:`film_fast.ops.library`): its backward
    differentiates the reference, so its forward must compute the reference's values too
    (the fast paths agree only up to rounding).
    """
    _local.reference_only = getattr(_local, "reference_only", 0) + 1
    try:
        yield
    finally:
        _local.reference_only -= 1
