"""Backend selection for ``film_fast.ops``.

A backend is a name (``"torch"``, ``"triton"``, ``"cupy"``) plus a table of op
implementations registered with :func:`register`. ``"auto"`` (the default, or
the ``FILM_FAST_BACKEND`` environment variable) resolves, per op and per
device, to the first backend in :data:`AUTO_ORDER` that implements the op and
can run on the tensors' device, falling back to the torch reference with a
logged reason. An explicitly requested backend that cannot run raises
:class:`BackendUnavailable` naming the reason.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Callable, Dict, Optional, Tuple

import torch

log = logging.getLogger("film_fast")

BACKENDS = ("torch", "triton", "cupy")
# "auto" preference per device type. On CPU the kernels only run under the Triton interpreter
# (a test tool, ~1000x slower than oneDNN), so auto means torch there.
AUTO_ORDER = {"cuda": ("triton", "cupy", "torch"), "cpu": ("torch",)}
ENV_VAR = "FILM_FAST_BACKEND"
# Kernel backends live in film_fast.kernels.<name>; importing one registers its ops and verifier.
KERNEL_MODULES = {"triton": "film_fast.kernels.triton", "cupy": "film_fast.kernels.cupy"}

# (op name, backend) -> implementation
_IMPLS: Dict[Tuple[str, str], Callable] = {}
# backend -> callable(device) -> (ok, reason)
_VERIFIERS: Dict[str, Callable[[torch.device], Tuple[bool, str]]] = {}
_logged: set = set()
_load_errors: Dict[str, str] = {}
_loaded: set = {"torch"}
# Dry runs on the meta device (film_fast.memory_plan): kernel backends pass their device
# verifier there, because the dry run skips every kernel launch and keeps the launchers'
# allocations. Thread-local: another thread's meta tensors are not affected.
_dry_run = threading.local()
DRY_RUN_BACKENDS = ("torch", "triton")


@contextlib.contextmanager
def dry_run():
    """Within it (this thread) ``triton`` resolves on the meta device; see
    :func:`film_fast.memory_plan.dry_run`, which also skips the kernel launches."""
    _dry_run.depth = getattr(_dry_run, "depth", 0) + 1
    try:
        yield
    finally:
        _dry_run.depth -= 1


def in_dry_run() -> bool:
    return getattr(_dry_run, "depth", 0) > 0


def _ensure_loaded(backend: str) -> None:
    """Imports a kernel backend's package on first use (keeps ``import film_fast`` light)."""
    if backend in _loaded or backend in _load_errors:
        return
    import importlib
    try:
        importlib.import_module(KERNEL_MODULES[backend])
        _loaded.add(backend)
    except ImportError as e:
        _load_errors[backend] = f"{backend} backend unavailable ({e})"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the op on the given device."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _IMPLS[(op, backend)] = fn
        return fn

    return deco


def register_verifier(backend: str, verifier: Callable[[torch.device], Tuple[bool, str]]) -> None:
    """``verifier(device) -> (ok, reason)`` says whether ``backend`` can run on ``device``."""
    _VERIFIERS[backend] = verifier


def normalize_backend(backend: Optional[str]) -> str:
    """Validates a backend name; ``None`` reads ``FILM_FAST_BACKEND`` (default ``"auto"``)."""
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    name = str(backend).strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    return name


def _can_run(op: str, backend: str, device: torch.device) -> Tuple[bool, str]:
    _ensure_loaded(backend)
    if backend in _load_errors:
        return False, _load_errors[backend]
    if (op, backend) not in _IMPLS:
        return False, f"backend {backend!r} has no implementation of {op!r}"
    verifier = _VERIFIERS.get(backend)
    if device.type == "meta" and in_dry_run():
        if backend in DRY_RUN_BACKENDS:
            return True, ""
        return False, f"dry runs (meta device) cover the {' and '.join(DRY_RUN_BACKENDS)} backends"
    if verifier is None:
        return True, ""
    return verifier(device)


def resolve(op: str, backend: Optional[str], device: torch.device) -> Tuple[str, Callable]:
    """Returns ``(backend name, implementation)`` for ``op`` on ``device``."""
    name = normalize_backend(backend)
    if name != "auto":
        ok, reason = _can_run(op, name, device)
        if not ok:
            raise BackendUnavailable(f"film_fast.ops.{op}: {reason} (device {device})")
        return name, _IMPLS[(op, name)]
    reasons = []
    for candidate in AUTO_ORDER.get(device.type, ("torch",)):
        ok, reason = _can_run(op, candidate, device)
        if ok:
            if reasons:
                key = (op, str(device.type), candidate)
                if key not in _logged:
                    _logged.add(key)
                    log.info("film_fast.ops.%s on %s: using %s backend (%s)", op, device,
                             candidate, "; ".join(reasons))
            return candidate, _IMPLS[(op, candidate)]
        reasons.append(reason)
    raise BackendUnavailable(f"film_fast.ops.{op}: no backend can run on {device}: "
                             + "; ".join(reasons))


def available_backends(device: torch.device | str = "cpu") -> Dict[str, str]:
    """Maps every backend to ``""`` when it can run all registered ops on ``device``, else why not."""
    device = torch.device(device)
    ops = sorted({op for op, _ in _IMPLS})
    out = {}
    for backend in BACKENDS:
        reason = ""
        for op in ops:
            ok, why = _can_run(op, backend, device)
            if not ok:
                reason = why
                break
        out[backend] = reason
    return out
