"""Tests of the CuPy kernel backend (``film_fast.kernels.cupy``).

Three tiers:

1. **Build checks** (run everywhere, no GPU): every shipped ``.cu`` file, for every dtype,
   compiles through NVRTC alone (``compile_source_for_ci``) to PTX for compute_80 and
   compute_90 and to an sm_90 cubin (which runs ptxas over the inline PTX); every kernel a
   launcher uses is an ``.entry`` of its PTX; the compile inputs are (file, dtype) only; the
   sources are found through the installed package.
2. **Op parity on the GPU** (``cuda`` executor): every op, forward and every gradient,
   against the PyTorch reference / float64 truths; fp32 near rounding, fp16/bf16 at most 2x
   plain PyTorch's error in the same dtype plus a small floor. Skipped with a clear reason
   when ``torch.cuda.is_available()`` is False.
3. **The same parity tests on the CPU** (``emulated`` executor): the very same ``.cu``
   sources compiled with g++ against a small CUDA shim and run serially, block by block and
   thread by thread. The kernels use no shared memory, barriers or warp intrinsics (only
   grid-stride loops, plus atomicAdd), so a serial loop executes them faithfully; this
   checks indexing, strides, dtype conversion and every launcher's argument list on
   machines without a GPU. It cannot see races or GPU-only faults: tier 2 covers those.
   Skipped when g++ (with ``_Float16``) is unavailable.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import importlib.resources
import inspect
import os
import re
import shutil
import subprocess
import types

import numpy as np
import pytest
import torch

pytest.importorskip("cupy", reason="the CuPy backend needs the cupy package (cupy-cuda12x/13x)")

import film_fast.kernels.cupy as K  # noqa: E402
import film_fast.ops as ops  # noqa: E402
from film_fast.kernels.cupy import _runtime as rt  # noqa: E402
from film_fast.ops import dispatch, reference  # noqa: E402

LAUNCHERS = ("warp", "upsample_flow", "upsample_flow_warp", "conv2d", "upsample_conv2x2",
             "avg_pool2x2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAN = float("nan")


def launcher(name: str):
    return importlib.import_module(f"film_fast.kernels.cupy.{name}")


# =============================================================================================
# 1. Build checks (no GPU)
# =============================================================================================
def test_sources_are_found_through_the_installed_package():
    root = importlib.resources.files("film_fast.kernels.cupy")
    shipped = sorted(p.name for p in root.iterdir() if p.name.endswith(".cu"))
    assert shipped == list(rt.kernel_files())
    assert (root / rt.COMMON_HEADER).is_file()
    for name in LAUNCHERS:
        mod = launcher(name)
        assert mod.SOURCE in shipped, f"{name}.py launches {mod.SOURCE}, which is not shipped"
        text = (root / mod.SOURCE).read_text(encoding="utf-8")
        assert text in rt.kernel_source(mod.SOURCE)  # what gets compiled is the shipped file
    # setup.py ships them as package data of film_fast.kernels
    setup_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    if os.path.exists(setup_py):
        with open(setup_py, encoding="utf-8") as f:
            text = f.read()
        assert '"**/*.cu"' in text and '"**/*.cuh"' in text


@pytest.fixture(scope="module")
def nvrtc_builds():
    """{(file, dtype, arch): compile result}, filled lazily (each build is ~0.1-0.5 s)."""
    cache = {}

    def build(name, dtype, arch):
        key = (name, dtype, arch)
        if key not in cache:
            cache[key] = rt.compile_source_for_ci(name, dtype, arch)
        return cache[key]

    return build


@pytest.mark.parametrize("arch", ["compute_80", "compute_90", "sm_90"])
@pytest.mark.parametrize("dtype", rt.DTYPE_NAMES)
@pytest.mark.parametrize("source", rt.kernel_files())
def test_source_compiles_with_nvrtc(nvrtc_builds, source, dtype, arch):
    result = nvrtc_builds(source, dtype, arch)
    assert result["ok"], f"NVRTC failed for {source} {dtype} {arch}:\n{result['log']}"
    assert result["entries"], f"no kernels in the PTX of {source}"
    if arch.startswith("sm_"):
        assert result["cubin"], "no cubin although ptxas ran"


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_kernel_names_exist_in_ptx(nvrtc_builds, name):
    mod = launcher(name)
    entries = set(nvrtc_builds(mod.SOURCE, "float32", "compute_90")["entries"])
    missing = set(mod.KERNELS) - entries
    assert not missing, f"{name}.py declares kernels missing from {mod.SOURCE}'s PTX: {missing}"
    # Every kernel name literal in the launcher is declared (and so checked above).
    with open(mod.__file__, encoding="utf-8") as f:
        used = set(re.findall(r"\"(film_[a-z0-9_]+)\"", f.read()))
    assert used <= set(mod.KERNELS), f"{name}.py uses undeclared kernels {used - set(mod.KERNELS)}"
    # extern "C": PTX names are the plain source names, no C++ mangling.
    assert all(not e.startswith("_Z") for e in entries)


def test_compile_inputs_are_only_file_and_dtype():
    """The cache key (kernel, dtype, device) is complete: nothing shape-dependent reaches NVRTC."""
    assert list(inspect.signature(rt.kernel_source).parameters) == ["name"]
    assert list(inspect.signature(rt.compile_options).parameters) == ["dtype"]
    for value, dtype in enumerate(rt.DTYPE_NAMES):
        defines = [o for o in rt.compile_options(dtype) if o.startswith("-D")]
        assert defines == [f"-DFILM_DTYPE={value}"]
        assert "--use_fast_math" not in rt.compile_options(dtype)
    allowed_defines = {"KIND_F32", "KIND_F16", "KIND_BF16", "FILM_GRID_LOOP", "LEAKY_SLOPE",
                       "LEVEL_ROW", "OC_TILE", "FILM_INDEX32_LIMIT"}
    for source in rt.kernel_files() + (rt.COMMON_HEADER,):
        text = rt._read(source)
        defined = set(re.findall(r"^\s*#\s*define\s+(\w+)", text, re.M))
        assert defined <= allowed_defines, f"{source} defines {defined - allowed_defines}"
        # No conditional compilation on anything but the dtype, the target and the two test
        # hooks (host emulation, the 32/64-bit index switch), none of which the runtime sets.
        for cond in re.findall(r"^\s*#\s*(?:if|ifdef|ifndef|elif)\b(.*)$", text, re.M):
            names = set(re.findall(r"[A-Za-z_]\w*", cond)) - {"defined"}
            assert names <= {"FILM_DTYPE", "__CUDA_ARCH__", "FILM_HOST_EMULATION",
                             "FILM_INDEX32_LIMIT"}, (source, cond)
    assert rt.kernel_source("warp.cu") == rt.kernel_source("warp.cu")


def test_backend_registers_every_op_and_a_verifier():
    for op in ops.OPS:
        assert dispatch._IMPLS[(op, "cupy")] is K.OPS[op]
    ok, reason = K.verifier(torch.device("cpu"))
    assert (ok, reason) == (False, "CuPy kernels need a CUDA device")
    with pytest.raises(ops.BackendUnavailable, match="CuPy kernels need a CUDA device"):
        ops.resolve("warp", "cupy", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert K.verifier(torch.device("cuda"))[0] is False


def test_channel_groups_cover_every_channel():
    for pixels in (1, 7, 1000, 1 << 20):
        for channels in (1, 3, 67, 128):
            groups, per = rt.channel_groups(pixels, channels)
            assert groups * per >= channels > (groups - 1) * per
    assert rt.channel_groups(10, 0) == (1, 0)


# =============================================================================================
# Executors: the real GPU, or the host emulation of the same sources
# =============================================================================================
_SHIM = r"""
// Minimal host stand-in for the CUDA built-ins the kernels use.
#include <math.h>
#include <string.h>
#include <algorithm>
struct film_emu_dim3 { unsigned int x, y, z; };
static film_emu_dim3 blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
struct float4 { float x, y, z, w; };
static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline float atomicAdd(float* p, float v) { float old = *p; *p = old + v; return old; }
using std::min;
using std::max;
"""
_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)


def _kernel_signatures(source: str):
    """{kernel: [(C type, name), ...]} of every extern "C" __global__ function."""
    source = re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", source, flags=re.S))
    out = {}
    for name, params in _KERNEL_RE.findall(source):
        plist = []
        for param in params.split(","):
            param = " ".join(param.split())
            pname = re.findall(r"\w+", param)[-1]
            plist.append((param[:param.rfind(pname)].strip(), pname))
        out[name] = plist
    return out


def _arg_kind(ctype: str) -> str:
    if "*" in ctype:
        return "pointer"
    base = ctype.replace("const", "").strip()
    if base in ("i64", "long long"):
        return "int64"
    if base == "float":
        return "float32"
    raise TypeError(f"kernel parameter type {ctype!r} is not one the launchers can pass")


class EmulatedKernel:
    """A kernel compiled for the host; calls loop over every block and thread."""

    _CTYPES = {"pointer": ctypes.c_uint64, "int64": ctypes.c_int64, "float32": ctypes.c_float}
    _NUMPY = {"pointer": np.uint64, "int64": np.int64, "float32": np.float32}

    def __init__(self, name, params, lib):
        self.name = name
        self.kinds = [_arg_kind(t) for t, _ in params]
        self.fn = getattr(lib, "emu_" + name)
        self.fn.argtypes = [ctypes.c_uint] * 3 + [self._CTYPES[k] for k in self.kinds]
        self.fn.restype = None
        self.lib = lib  # keep the library loaded

    def __call__(self, grid, block, args):
        grid, block = tuple(grid) + (1, 1), tuple(block) + (1, 1)
        # The same limits the GPU enforces, so launch-configuration bugs show up here too.
        assert grid[2] == 1 and block[1] == 1 and block[2] == 1, (grid, block)
        assert 0 < grid[0] < 2 ** 31 and 0 < grid[1] < 65536 and 0 < block[0] <= 1024, (grid, block)
        assert len(args) == len(self.kinds), f"{self.name}: {len(args)} args for {len(self.kinds)} params"
        for i, (a, k) in enumerate(zip(args, self.kinds)):
            assert type(a) is self._NUMPY[k], f"{self.name} arg {i}: {type(a).__name__} for a {k} parameter"
        self.fn(grid[0], grid[1], block[0], *[a.item() for a in args])


class Emulator:
    """Builds the shipped sources with g++ (``-DFILM_HOST_EMULATION``) into shared libraries.

    ``defines`` are extra ``-D`` options (``FILM_INDEX32_LIMIT=0`` forces 64-bit indexing).
    """

    def __init__(self, workdir, defines=()):
        self.workdir = str(workdir)
        self.defines = tuple(defines)

    def compile_module(self, source: str, dtype: str, device: int):
        text = rt.kernel_source(source)
        signatures = _kernel_signatures(text)
        wrappers = []
        for name, params in signatures.items():
            decl = ", ".join(f"{t} {n}" for t, n in params)
            call = ", ".join(n for _, n in params)
            wrappers.append(
                f'extern "C" void emu_{name}(unsigned int emu_gx, unsigned int emu_gy, '
                f"unsigned int emu_bx, {decl}) {{\n"
                "  gridDim.x = emu_gx; gridDim.y = emu_gy; gridDim.z = 1;\n"
                "  blockDim.x = emu_bx; blockDim.y = 1; blockDim.z = 1;\n"
                "  for (unsigned int by = 0; by < emu_gy; ++by)\n"
                "    for (unsigned int bx = 0; bx < emu_gx; ++bx)\n"
                "      for (unsigned int t = 0; t < emu_bx; ++t) {\n"
                "        blockIdx.x = bx; blockIdx.y = by; blockIdx.z = 0;\n"
                "        threadIdx.x = t; threadIdx.y = 0; threadIdx.z = 0;\n"
                f"        {name}({call});\n"
                "      }\n}\n")
        defines = [rt.compile_options(dtype)[-1]] + [f"-D{d}" for d in self.defines]
        full = _SHIM + text + '\n#line 1 "emulation_wrappers"\n' + "".join(wrappers)
        digest = hashlib.sha1((full + " ".join(defines)).encode()).hexdigest()[:16]
        lib_path = os.path.join(self.workdir, f"{source}.{dtype}.{digest}.so")
        if not os.path.exists(lib_path):
            cpp = lib_path[:-3] + ".cpp"
            with open(cpp, "w", encoding="utf-8") as f:
                f.write(full)
            cmd = ["g++", "-O1", "-std=c++17", "-shared", "-fPIC", "-w", *defines,
                   "-DFILM_HOST_EMULATION", "-o", lib_path, cpp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            assert proc.returncode == 0, f"host build of {source} failed:\n{proc.stderr}"
        lib = ctypes.CDLL(lib_path)
        kernels = {n: EmulatedKernel(n, p, lib) for n, p in signatures.items()}
        return types.SimpleNamespace(get_function=kernels.__getitem__)

    @staticmethod
    def execute(kernel, grid, block, packed, device, shared_mem):
        assert shared_mem == 0
        kernel(grid, block, packed)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """An :class:`Emulator`, or None when no suitable host compiler exists."""
    if shutil.which("g++") is None:
        return None
    workdir = tmp_path_factory.mktemp("cupy_emulation")
    probe = workdir / "probe.cpp"
    probe.write_text("_Float16 h(float f) { return (_Float16)f; }\n")
    proc = subprocess.run(["g++", "-c", "-std=c++17", "-o", str(workdir / "probe.o"), str(probe)],
                          capture_output=True)
    return Emulator(workdir) if proc.returncode == 0 else None


class Executor:
    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device

    def __repr__(self):
        return self.name


@pytest.fixture(params=["cuda", "emulated"])
def ex(request, monkeypatch):
    """Where the kernels run: ``cuda`` (a real GPU) or ``emulated`` (host build, CPU tensors)."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("cuda executor: no CUDA GPU (torch.cuda.is_available() is False); the "
                        "emulated executor runs the same checks on the CPU")
        ok, why = K.verifier(torch.device("cuda"))
        if not ok:
            pytest.skip(f"cuda executor: {why}")
        # Parity with fp32 truths: cuDNN / cuBLAS must not use TF32.
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        yield Executor("cuda", torch.device("cuda"))
        return
    emu = request.getfixturevalue("emulator")
    if emu is None:
        pytest.skip("emulated executor: needs g++ with _Float16 support")
    rt.clear_cache()  # never mix host builds with GPU modules in the (kernel, dtype, device) cache
    monkeypatch.setattr(rt, "_compile_module", emu.compile_module)
    monkeypatch.setattr(rt, "_execute", emu.execute)
    yield Executor("emulated", torch.device("cpu"))
    rt.clear_cache()


# =============================================================================================
# Comparison helpers
# =============================================================================================
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(shape, seed, device, dtype=torch.float32, scale=1.0, offset=0.0, normal=False):
    """Reproducible random data (drawn on the CPU, so both executors see the same values)."""
    g = _gen(seed)
    t = torch.randn(shape, generator=g) if normal else torch.rand(shape, generator=g)
    return (t * scale + offset).to(device=device, dtype=dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def check(what: str, ours, truth, low=None, dtype=torch.float32):
    """fp32: ``|ours - truth| <= 1e-5 scale``; fp16/bf16: ``err(ours) <= 2 err(low) + eps scale``.

    ``truth`` is float64 (or exact); ``low`` is plain PyTorch's result in ``dtype``.
    """
    assert ours is not None, f"{what}: missing"
    assert tuple(ours.shape) == tuple(truth.shape), \
        f"{what}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    scale = truth.abs().max().item() if truth.numel() else 0.0
    err = max_err(ours, truth)
    if dtype == torch.float32:
        tol = 1e-5 * scale + 1e-6
        assert err <= tol, f"{what}: max |ours - truth| = {err:.3g} > {tol:.3g} (scale {scale:.3g})"
    else:
        err_low = max_err(low, truth)
        tol = 2 * err_low + torch.finfo(dtype).eps * scale + 1e-6
        assert err <= tol, (f"{what}: max |ours - truth| = {err:.3g} > 2 x plain torch "
                            f"{err_low:.3g} + floor = {tol:.3g}")


def grads(outputs, inputs, grad_outputs):
    """``torch.autograd.grad`` that returns None for inputs not requiring grad."""
    live = [i for i in inputs if i is not None and i.requires_grad]
    got = iter(torch.autograd.grad(outputs, live, grad_outputs, allow_unused=True))
    return [next(got) if (i is not None and i.requires_grad) else None for i in inputs]


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf requiring grad that keeps ``t``'s strides (non-contiguous stays so)."""
    return t.detach().requires_grad_(True)


def dtype_cases(cases: dict):
    """``{case id: spec}`` x dtypes -> pytest params with ids like ``B2-C67-H33-W47-fp16``."""
    return [pytest.param(spec, DTYPES[d], id=f"{cid}-{d}") for cid, spec in cases.items() for d in DTYPES]


# =============================================================================================
# 2/3. warp
# =============================================================================================
def warp_truth(image, flow, grad):
    """float64 ``(out, grad_image, grad_flow)`` of the border-clamped bilinear warp.

    Sample positions are ``x + dx`` summed in float32 exactly as the spec prescribes (so kinks
    at integer positions resolve like the kernels); everything after is float64. Gradient
    conventions are grid_sample's ``border`` ones: taps beyond the last pixel are absent,
    d position / d flow is 0 unless the position is strictly inside (0, size - 1).
    """
    b, c, h, w = image.shape
    dev = image.device
    img = image.double().reshape(b, c, h * w)
    g = grad.double()
    f32 = flow.float()
    sx_raw = (torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w) + f32[:, 0]).double()
    sy_raw = (torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1) + f32[:, 1]).double()
    sx, sy = sx_raw.clamp(0, w - 1), sy_raw.clamp(0, h - 1)
    x0, y0 = sx.floor(), sy.floor()
    ax, ay = (sx - x0).unsqueeze(1), (sy - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    hx, hy = x0 + 1 < w, y0 + 1 < h
    x1, y1 = torch.where(hx, x0 + 1, x0), torch.where(hy, y0 + 1, y0)
    hx, hy = hx.unsqueeze(1).double(), hy.unsqueeze(1).double()

    def index(yi, xi):
        return (yi * w + xi).reshape(b, 1, h * w).expand(b, c, h * w)

    def gather(yi, xi):
        return img.gather(2, index(yi, xi)).view(b, c, h, w)

    v00, v01 = gather(y0, x0), gather(y0, x1) * hx
    v10, v11 = gather(y1, x0) * hy, gather(y1, x1) * hx * hy
    w00, w01, w10, w11 = (1 - ay) * (1 - ax), (1 - ay) * ax * hx, ay * (1 - ax) * hy, ay * ax * hx * hy
    out = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
    grad_image = torch.zeros_like(img)
    for (yi, xi), wt in (((y0, x0), w00), ((y0, x1), w01), ((y1, x0), w10), ((y1, x1), w11)):
        grad_image.scatter_add_(2, index(yi, xi), (g * wt).reshape(b, c, h * w))
    inside_x = ((sx_raw > 0) & (sx_raw < w - 1)).double()
    inside_y = ((sy_raw > 0) & (sy_raw < h - 1)).double()
    gfx = (g * ((1 - ay) * (v01 - v00) + ay * (v11 - v10))).sum(1) * inside_x
    gfy = (g * ((1 - ax) * (v10 - v00) + ax * (v11 - v01))).sum(1) * inside_y
    return out, grad_image.view(b, c, h, w), torch.stack((gfx, gfy), 1)


def away_from_kinks(flow, margin=1e-3):
    """[B, H, W] mask of pixels whose sample position is not within ``margin`` of an integer
    (where the reference's grid normalisation may pick the other bilinear cell)."""
    b, _, h, w = flow.shape
    dev = flow.device
    sx = torch.arange(w, device=dev).view(1, 1, w) + flow[:, 0].double()
    sy = torch.arange(h, device=dev).view(1, h, 1) + flow[:, 1].double()
    far = lambda s: (s - s.round()).abs() > margin  # noqa: E731
    return far(sx) & far(sy)


WARP_CASES = {
    # id: (B, C, H, W, flow kind, layout)
    "B1-C3-H8-W8-zero": (1, 3, 8, 8, "zero", "nchw"),
    "B2-C5-H7-W13-integer": (2, 5, 7, 13, "integer", "nchw"),
    "B2-C67-H33-W47-moderate": (2, 67, 33, 47, "moderate", "nchw"),
    "B3-C4-H16-W24-far": (3, 4, 16, 24, "far", "nchw"),
    "B2-C67-H9-W11-far": (2, 67, 9, 11, "far", "nchw"),
    "B1-C1-H1-W5-single-row": (1, 1, 1, 5, "moderate", "nchw"),
    "B3-C6-H10-W12-per-batch-shift": (3, 6, 10, 12, "per-batch", "nchw"),
    "B2-C33-H17-W19-channels-last": (2, 33, 17, 19, "moderate", "channels_last"),
    "B2-C6-H12-W20-non-contiguous": (2, 6, 12, 20, "moderate", "strided"),
}


def make_flow(b, h, w, kind, seed, device):
    if kind == "zero":
        return torch.zeros(b, 2, h, w, device=device)
    if kind == "integer":
        return torch.randint(-4, 5, (b, 2, h, w), generator=_gen(seed)).float().to(device)
    if kind == "per-batch":  # each batch entry its own (fractional) shift
        shifts = torch.tensor([[0.25, -1.5], [2.75, 0.5], [-3.125, 4.0]])[:b]
        return (shifts.view(b, 2, 1, 1).expand(b, 2, h, w)
                + 0.1 * torch.randn(b, 2, h, w, generator=_gen(seed))).to(device)
    scale = 3.0 if kind == "moderate" else 4.0 * max(h, w)  # far: up to ~4 image sizes away
    return (torch.randn(b, 2, h, w, generator=_gen(seed)) * scale).to(device)


def warp_inputs(spec, dtype, device):
    b, c, h, w, kind, layout = spec
    image = rand((b, c, h, w), 1, device, dtype)
    flow = make_flow(b, h, w, kind, 2, device).to(dtype)
    grad = rand((b, c, h, w), 3, device, dtype, scale=2, offset=-1)
    if layout == "channels_last":
        image = image.contiguous(memory_format=torch.channels_last)
        flow = flow.contiguous(memory_format=torch.channels_last)
        grad = grad.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a channel slice, a transposed flow, a transposed gradient
        padded = torch.cat([torch.zeros_like(image[:, :1]), image, torch.zeros_like(image[:, :2])], 1)
        image = padded[:, 1:1 + c]
        flow = flow.transpose(2, 3).contiguous().transpose(2, 3)
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
        assert not image.is_contiguous() and not flow.is_contiguous()
    return image, flow, grad


@pytest.mark.parametrize("spec,dtype", dtype_cases(WARP_CASES))
def test_warp(ex, spec, dtype):
    image, flow, grad = warp_inputs(spec, dtype, ex.device)
    image_l, flow_l = leaf(image), leaf(flow)
    out = K.warp(image_l, flow_l)
    assert out.dtype == dtype and out.shape == image.shape
    gi, gf = grads(out, (image_l, flow_l), grad)
    assert gi.dtype == dtype and gf.dtype == flow.dtype

    t_out, t_gi, t_gf = warp_truth(image, flow, grad)
    low = low_gi = low_gf = None
    if dtype != torch.float32:
        image_r, flow_r = leaf(image), leaf(flow)
        low = reference.warp(image_r, flow_r)
        low_gi, low_gf = grads(low, (image_r, flow_r), grad)
    check("warp", out, t_out, low, dtype)
    check("d/d image", gi, t_gi, low_gi, dtype)
    check("d/d flow", gf, t_gf, low_gf, dtype)

    if dtype == torch.float32:
        # The truth itself agrees with the reference (grid_sample) ...
        image_r, flow_r = leaf(image), leaf(flow)
        ref = reference.warp(image_r, flow_r)
        assert max_err(out, ref) <= 2e-5
        r_gi, r_gf = grads(ref, (image_r, flow_r), grad)
        assert max_err(r_gi, t_gi) <= 1e-4
        # ... up to which bilinear cell an exactly-integer position uses for d/d flow.
        mask = away_from_kinks(flow).unsqueeze(1).expand_as(r_gf)
        assert max_err(r_gf[mask], t_gf[mask]) <= 1e-4 * max(1.0, t_gf.abs().max().item())
    if spec[4] == "zero":  # identity warp: exact copies
        assert torch.equal(out, image)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_warp_flow_may_have_another_dtype(ex, dtype):
    """The flow's dtype is a run-time argument: any float flow with any image dtype."""
    image = rand((2, 5, 9, 14), 4, ex.device, dtype)
    for flow_dtype in DTYPES.values():
        flow = leaf(make_flow(2, 9, 14, "moderate", 5, ex.device).to(flow_dtype))
        img = leaf(image)
        out = K.warp(img, flow)
        grad = torch.ones_like(out)
        gi, gf = grads(out, (img, flow), grad)
        t_out, t_gi, t_gf = warp_truth(image, flow.detach(), grad)
        tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
        assert out.dtype == dtype and gf.dtype == flow_dtype and gi.dtype == dtype
        assert max_err(out, t_out) <= tol
        assert max_err(gi, t_gi) <= tol * max(1.0, t_gi.abs().max().item())
        gf_tol = 1e-5 if flow_dtype == torch.float32 else torch.finfo(flow_dtype).eps
        assert max_err(gf, t_gf) <= 2 * gf_tol * max(1.0, t_gf.abs().max().item())


@pytest.fixture
def deterministic_mode():
    """Context manager toggling torch's deterministic-algorithms flag (restored afterwards)."""
    import contextlib
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())

    @contextlib.contextmanager
    def mode(on: bool):
        torch.use_deterministic_algorithms(on, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])

    yield mode
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_warp_deterministic_backward_matches_atomic(ex, dtype, deterministic_mode, monkeypatch):
    monkeypatch.delenv("FILM_FAST_DETERMINISTIC", raising=False)
    b, c, h, w = 2, 7, 15, 18
    image = rand((b, c, h, w), 6, ex.device, dtype)
    # Converging flow: many output pixels share taps, so the atomic order really varies.
    flow = (make_flow(b, h, w, "moderate", 7, ex.device) * 0.3).to(dtype)
    flow[:, :, 4:9, 4:9] = 0.5
    grad = rand((b, c, h, w), 8, ex.device, dtype, scale=2, offset=-1)

    def backward():
        img = leaf(image)
        out = K.warp(img, leaf(flow))
        return grads(out, (img,), grad)[0]

    with deterministic_mode(False):
        atomic = backward()
    with deterministic_mode(True):
        det1, det2 = backward(), backward()
    assert torch.equal(det1, det2), "deterministic backward is not bitwise reproducible"
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert max_err(det1, atomic) <= tol * max(1.0, atomic.abs().max().item())
    # The environment variable selects it too.
    monkeypatch.setenv("FILM_FAST_DETERMINISTIC", "1")
    with deterministic_mode(False):
        assert torch.equal(backward(), det1)


@pytest.mark.parametrize("grouping", ["one-group", "one-channel-per-group", "uneven-groups"])
def test_channel_grouping_does_not_change_results(ex, grouping, monkeypatch):
    """Per-pixel kernels split channels over grid.y on small images; any split is exact."""
    b, c, h, w = 2, 67, 9, 13
    image = rand((b, c, h, w), 160, ex.device)
    flow = make_flow(b, h, w, "moderate", 161, ex.device)
    coarse = rand((b, 2, 5, 7), 162, ex.device, scale=2, normal=True)
    grad = rand((b, c, h, w), 163, ex.device, normal=True)

    def run():
        img, fl, co = leaf(image), leaf(flow), leaf(coarse)
        out = K.warp(img, fl)
        up, warped = K.upsample_flow_warp(co, img)
        return [out, up, warped, *torch.autograd.grad((out * grad).sum() + (warped * grad).sum()
                                                      + up.sum(), (img, fl, co))]

    expected = run()
    split = {"one-group": lambda pixels, channels: (1, channels),
             "one-channel-per-group": lambda pixels, channels: (max(channels, 1), 1),
             "uneven-groups": lambda pixels, channels: (-(-channels // 3), 3)}[grouping]
    monkeypatch.setattr(rt, "channel_groups", split)
    for got, want in zip(run(), expected):
        assert max_err(got, want) <= 1e-6 * max(1.0, want.abs().max().item())


# =============================================================================================
# upsample_flow
# =============================================================================================
UPSAMPLE_FLOW_CASES = {
    # id: (B, h, w, H, W, residual, layout)
    "B2-h4-w6-H8-W12-residual": (2, 4, 6, 8, 12, True, "nchw"),
    "B1-h3-w5-H7-W9-residual": (1, 3, 5, 7, 9, True, "nchw"),
    "B1-h1-w1-H2-W2": (1, 1, 1, 2, 2, False, "nchw"),
    "B2-h17-w23-H33-W47-residual": (2, 17, 23, 33, 47, True, "nchw"),
    "B1-h9-w9-H4-W5-downscale": (1, 9, 9, 4, 5, False, "nchw"),
    "B2-h8-w8-H16-W16-channels-last": (2, 8, 8, 16, 16, True, "channels_last"),
    "B3-h5-w7-H10-W14-non-contiguous": (3, 5, 7, 10, 14, True, "strided"),
}


@pytest.mark.parametrize("spec,dtype", dtype_cases(UPSAMPLE_FLOW_CASES))
def test_upsample_flow(ex, spec, dtype):
    b, h, w, H, W, with_residual, layout = spec
    flow = rand((b, 2, h, w), 10, ex.device, dtype, scale=5, normal=True)
    residual = rand((b, 2, H, W), 11, ex.device, dtype, normal=True) if with_residual else None
    grad = rand((b, 2, H, W), 12, ex.device, dtype, normal=True)
    if layout == "channels_last":
        flow = flow.contiguous(memory_format=torch.channels_last)
        residual = residual.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        flow = flow.transpose(2, 3).contiguous().transpose(2, 3)
        residual = torch.cat([residual, residual], 1)[:, 1:3]
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)

    flow_l, res_l = leaf(flow), (leaf(residual) if residual is not None else None)
    out = K.upsample_flow(flow_l, (H, W), res_l)
    assert out.dtype == dtype
    g_flow, g_res = grads(out, (flow_l, res_l), grad)

    flow_t = leaf(flow.double())
    res_t = leaf(residual.double()) if residual is not None else None
    truth = reference.upsample_flow(flow_t, (H, W), res_t)
    t_flow, t_res = grads(truth, (flow_t, res_t), grad.double())
    low = l_flow = l_res = None
    if dtype != torch.float32:
        flow_r, res_r = leaf(flow), (leaf(residual) if residual is not None else None)
        low = reference.upsample_flow(flow_r, (H, W), res_r)
        l_flow, l_res = grads(low, (flow_r, res_r), grad)
    check("upsample_flow", out, truth, low, dtype)
    check("d/d flow", g_flow, t_flow, l_flow, dtype)
    if residual is not None:
        check("d/d residual", g_res, t_res, l_res, dtype)


# =============================================================================================
# upsample_flow_warp
# =============================================================================================
UFW_CASES = {
    # id: (B, C, h, w, H, W, out, flow scale)
    "B2-C67-h16-w23-H33-W47": (2, 67, 16, 23, 33, 47, None, 2.0),
    "B1-C5-h4-w6-H8-W12-out-nchw-slice": (1, 5, 4, 6, 8, 12, "nchw", 2.0),
    "B2-C16-h5-w5-H10-W11-out-nhwc-slice": (2, 16, 5, 5, 10, 11, "nhwc", 2.0),
    "B1-C3-h3-w3-H7-W5-far": (1, 3, 3, 3, 7, 5, None, 30.0),
    "B3-C4-h4-w4-H8-W8-zero-flow": (3, 4, 4, 4, 8, 8, None, 0.0),
}


def upsample_backward_truth(grad_up, flow_shape, size):
    """float64 d/d flow of resize_bilinear(2 flow) (the adjoint of a linear map)."""
    probe = torch.zeros(flow_shape, dtype=torch.float64, device=grad_up.device, requires_grad=True)
    up = reference.upsample_flow(probe, size)
    return torch.autograd.grad(up, probe, grad_up.double())[0]


@pytest.mark.parametrize("spec,dtype", dtype_cases(UFW_CASES))
def test_upsample_flow_warp(ex, spec, dtype):
    b, c, h, w, H, W, out_kind, flow_scale = spec
    flow = rand((b, 2, h, w), 20, ex.device, dtype, scale=flow_scale, normal=True)
    features = rand((b, c, H, W), 21, ex.device, dtype)
    g_up = rand((b, 2, H, W), 22, ex.device, dtype, normal=True)
    g_warped = rand((b, c, H, W), 23, ex.device, dtype, scale=2, offset=-1)

    out = None
    if out_kind is not None:  # the predictor's input buffer: [B, 3 + C + 2, H, W], NaN-poisoned
        buf = torch.full((b, 3 + c + 2, H, W), NAN, device=ex.device, dtype=dtype)
        if out_kind == "nhwc":
            buf = buf.contiguous(memory_format=torch.channels_last)
        out = buf[:, 3:3 + c]
    flow_l, feat_l = leaf(flow), leaf(features)
    up, warped = K.upsample_flow_warp(flow_l, feat_l, out)
    if out is not None:
        assert warped.data_ptr() == out.data_ptr() and warped.stride() == out.stride()
        assert torch.isnan(buf[:, :3]).all() and torch.isnan(buf[:, 3 + c:]).all(), \
            "wrote outside the out slice"
    assert up.dtype == dtype and warped.dtype == dtype
    gf, gfeat = grads((up, warped), (flow_l, feat_l), (g_up, g_warped))

    # Truth: up from the float64 resize; warped = warp(features, up) with the kernel's own up
    # (the op's contract), so integer positions resolve identically.
    up_t = reference.upsample_flow(flow.double(), (H, W))
    w_t, gfeat_t, gup_from_warp = warp_truth(features, up.detach(), g_warped)
    gf_t = upsample_backward_truth(g_up.double() + gup_from_warp, flow.shape, (H, W))
    low = {}
    if dtype != torch.float32:
        flow_r, feat_r = leaf(flow), leaf(features)
        up_r, warped_r = reference.upsample_flow_warp(flow_r, feat_r)
        low = dict(zip(("up", "warped", "gf", "gfeat"),
                       (up_r, warped_r, *grads((up_r, warped_r), (flow_r, feat_r), (g_up, g_warped)))))
    check("up", up, up_t, low.get("up"), dtype)
    check("warped", warped, w_t, low.get("warped"), dtype)
    check("d/d features", gfeat, gfeat_t, low.get("gfeat"), dtype)
    check("d/d flow", gf, gf_t, low.get("gf"), dtype)
    if out is not None:  # inference writes into `out` directly: same values, nothing else touched
        buf2 = torch.full_like(buf, NAN)
        with torch.no_grad():
            up2, warped2 = K.upsample_flow_warp(flow, features, buf2[:, 3:3 + c])
        assert warped2.data_ptr() == buf2[:, 3:3 + c].data_ptr()
        assert torch.equal(up2, up) and torch.equal(buf2.nan_to_num(7.0), buf.nan_to_num(7.0))
    if dtype == torch.float32:  # and the composition equals the reference ops
        up_r, warped_r = reference.upsample_flow_warp(flow, features)
        assert max_err(up, up_r) <= 1e-5 * max(1.0, up_r.abs().max().item())
        assert max_err(warped, reference.warp(features, up.detach())) <= 2e-5


# =============================================================================================
# convolutions
# =============================================================================================
CONV_CASES = {
    # id: (B, Cin, Cout, H, W, k, activation, bias, layout)
    "B2-Ci67-Co35-H9-W11-k3-leaky": (2, 67, 35, 9, 11, 3, "leaky_relu", True, "nchw"),
    "B1-Ci5-Co4-H7-W9-k2-linear": (1, 5, 4, 7, 9, 2, None, True, "nchw"),
    "B2-Ci8-Co16-H6-W6-k1-leaky-nobias": (2, 8, 16, 6, 6, 1, "leaky_relu", False, "nchw"),
    "B1-Ci16-Co8-H5-W7-k3-linear-nobias": (1, 16, 8, 5, 7, 3, None, False, "nchw"),
    "B2-Ci12-Co10-H8-W10-k2-leaky-channels-last": (2, 12, 10, 8, 10, 2, "leaky_relu", True, "channels_last"),
    "B1-Ci4-Co3-H1-W1-k3-leaky": (1, 4, 3, 1, 1, 3, "leaky_relu", True, "nchw"),
}


def conv_inputs(spec, dtype, device, seed=30):
    b, cin, cout, h, w, k, act, with_bias, layout = spec
    x = rand((b, cin, h, w), seed, device, dtype, normal=True)
    weight = rand((cout, cin, k, k), seed + 1, device, dtype, scale=(cin * k * k) ** -0.5, normal=True)
    bias = rand((cout,), seed + 2, device, dtype, scale=0.5, normal=True) if with_bias else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, weight, bias, act


_reference_conv2d = reference.conv2d


def _cudnn_like_conv2d(x, weight, bias, activation=None):
    """reference.conv2d as PyTorch computes it on CUDA: cuDNN GEMM, *then* ``add_(bias)``
    (aten's ConvBackend::Cudnn), so the GEMM output is rounded to the dtype before the bias."""
    y = _reference_conv2d(x, weight, None, None)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return torch.nn.functional.leaky_relu(y, reference.LEAKY_SLOPE) if activation else y


@contextlib.contextmanager
def plain_torch_numerics(ex):
    """Plain PyTorch as it runs on the GPU. On the CPU (emulated executor) oneDNN fuses the
    bias into the GEMM; the CuPy backend (GEMM without bias + fused epilogue) is compared with
    PyTorch's CUDA numerics, where bias is added after the rounded GEMM output."""
    if ex.name == "cuda":
        yield
        return
    reference.conv2d = _cudnn_like_conv2d
    try:
        yield
    finally:
        reference.conv2d = _reference_conv2d


def run_conv_like(ex, dtype, op, ref_op, inputs, grad_outs, names):
    """Runs ``op`` and ``ref_op`` (float64 truth, plain low-precision torch) and checks every
    output and every input gradient. ``op(*leaves) -> tuple of outputs``."""
    mine = [leaf(t) if t is not None else None for t in inputs]
    outs = op(*mine)
    my_grads = grads(outs, mine, grad_outs)
    truth_in = [leaf(t.double()) if t is not None else None for t in inputs]
    truth = ref_op(*truth_in)
    t_grads = grads(truth, truth_in, [g.double() for g in grad_outs])
    low, low_grads = [None] * len(outs), [None] * len(inputs)
    if dtype != torch.float32:
        low_in = [leaf(t) if t is not None else None for t in inputs]
        with plain_torch_numerics(ex):
            low = ref_op(*low_in)
        low_grads = grads(low, low_in, grad_outs)
    for name, o, t, l in zip(names, outs, truth, low):
        assert o.dtype == dtype
        check(name, o, t, l, dtype)
    for i, (g, t, l) in enumerate(zip(my_grads, t_grads, low_grads)):
        if inputs[i] is not None:
            check(f"d/d input {i}", g, t, l, dtype)
    return outs


@pytest.mark.parametrize("spec,dtype", dtype_cases(CONV_CASES))
def test_conv2d(ex, spec, dtype):
    x, weight, bias, act = conv_inputs(spec, dtype, ex.device)
    b, _, cout, h, w = spec[:5]
    g = rand((b, cout, h, w), 40, ex.device, dtype, normal=True)
    outs = run_conv_like(ex, dtype,
                         lambda x_, w_, b_: (K.conv2d(x_, w_, b_, act),),
                         lambda x_, w_, b_: (reference.conv2d(x_, w_, b_, act),),
                         (x, weight, bias), (g,), ("conv2d",))
    if spec[-1] == "channels_last":
        assert outs[0].is_contiguous(memory_format=torch.channels_last)


CONV_POOL_CASES = {
    "B2-Ci6-Co5-H9-W11-k3-leaky": (2, 6, 5, 9, 11, 3, "leaky_relu", True, "nchw"),
    "B1-Ci4-Co7-H8-W6-k2-linear": (1, 4, 7, 8, 6, 2, None, True, "nchw"),
    "B2-Ci3-Co4-H5-W5-k1-leaky-channels-last": (2, 3, 4, 5, 5, 1, "leaky_relu", False, "channels_last"),
    "B1-Ci3-Co2-H3-W2-k3-leaky-single-quad": (1, 3, 2, 3, 2, 3, "leaky_relu", True, "nchw"),
}


@pytest.mark.parametrize("spec,dtype", dtype_cases(CONV_POOL_CASES))
def test_conv2d_pool(ex, spec, dtype):
    x, weight, bias, act = conv_inputs(spec, dtype, ex.device, seed=50)
    b, _, cout, h, w = spec[:5]
    g_y = rand((b, cout, h, w), 51, ex.device, dtype, normal=True)
    g_p = rand((b, cout, h // 2, w // 2), 52, ex.device, dtype, normal=True)
    y, p = run_conv_like(ex, dtype,
                         lambda x_, w_, b_: K.conv2d_pool(x_, w_, b_, act),
                         lambda x_, w_, b_: reference.conv2d_pool(x_, w_, b_, act),
                         (x, weight, bias), (g_y, g_p), ("y", "pool(y)"))
    # pool is avg_pool2x2 of the stored y: bit-exact in fp32 (same summation order), and
    # within one final rounding for 16-bit dtypes
    pool_of_y = reference.avg_pool2x2(y.detach())
    if dtype == torch.float32:
        assert torch.equal(p, pool_of_y)
    else:
        assert max_err(p, pool_of_y) <= torch.finfo(dtype).eps * max(1.0, pool_of_y.abs().max().item())
    # only one of the outputs used: the other's gradient is absent, not zero-filled garbage
    x_l = leaf(x)
    y2, p2 = K.conv2d_pool(x_l, weight, bias, act)
    gx = torch.autograd.grad(p2, x_l, g_p)[0]
    x_r = leaf(x.double())
    gx_t = torch.autograd.grad(reference.conv2d_pool(x_r, weight.double(),
                                                     bias.double() if bias is not None else None,
                                                     act)[1], x_r, g_p.double())[0]
    if dtype == torch.float32:
        check("d/d x via pool only", gx, gx_t)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("k,act", [(3, "leaky_relu"), (2, None), (1, "leaky_relu")])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_conv2d_levels(ex, dtype, k, act, layout):
    cin, cout = 13, 11
    sizes = [(2, 17, 23), (2, 8, 11), (2, 4, 5), (2, 2, 2), (2, 1, 1)]  # a pyramid, odd sizes
    xs = [rand((b, cin, h, w), 60 + i, ex.device, dtype, normal=True) for i, (b, h, w) in enumerate(sizes)]
    if layout == "channels_last":
        xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    weight = rand((cout, cin, k, k), 70, ex.device, dtype, scale=(cin * k * k) ** -0.5, normal=True)
    bias = rand((cout,), 71, ex.device, dtype, normal=True)
    gs = [rand((b, cout, h, w), 80 + i, ex.device, dtype, normal=True) for i, (b, h, w) in enumerate(sizes)]
    n = len(xs)
    run_conv_like(ex, dtype,
                  lambda w_, b_, *xs_: tuple(K.conv2d_levels(list(xs_), w_, b_, act)),
                  lambda w_, b_, *xs_: tuple(reference.conv2d_levels(list(xs_), w_, b_, act)),
                  (weight, bias, *xs), tuple(gs), tuple(f"level {i}" for i in range(n)))


UPCONV_CASES = {
    # id: (B, Cin, Cout, h, w, H, W, bias, layout)
    "B2-Ci67-Co35-h8-w12-H16-W24": (2, 67, 35, 8, 12, 16, 24, True, "nchw"),
    "B1-Ci5-Co3-h5-w3-H11-W7-non-2x": (1, 5, 3, 5, 3, 11, 7, True, "nchw"),
    "B1-Ci8-Co9-h4-w4-H9-W8-odd": (1, 8, 9, 4, 4, 9, 8, False, "nchw"),
    "B2-Ci16-Co8-h5-w6-H10-W12-channels-last": (2, 16, 8, 5, 6, 10, 12, True, "channels_last"),
    "B1-Ci4-Co4-h1-w1-H2-W2": (1, 4, 4, 1, 1, 2, 2, True, "nchw"),
    "B2-Ci6-Co5-h6-w5-H12-W10-non-contiguous": (2, 6, 5, 6, 5, 12, 10, True, "strided"),
}


@pytest.mark.parametrize("spec,dtype", dtype_cases(UPCONV_CASES))
def test_upsample_conv2x2(ex, spec, dtype):
    b, cin, cout, h, w, H, W, with_bias, layout = spec
    x = rand((b, cin, h, w), 90, ex.device, dtype, normal=True)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    weight = rand((cout, cin, 2, 2), 91, ex.device, dtype, scale=(cin * 4) ** -0.5, normal=True)
    bias = rand((cout,), 92, ex.device, dtype, normal=True) if with_bias else None
    g = rand((b, cout, H, W), 93, ex.device, dtype, normal=True)
    run_conv_like(ex, dtype,
                  lambda x_, w_, b_: (K.upsample_conv2x2(x_, (H, W), w_, b_),),
                  lambda x_, w_, b_: (reference.upsample_conv2x2(x_, (H, W), w_, b_),),
                  (x, weight, bias), (g,), ("upsample_conv2x2",))


# =============================================================================================
# avg_pool2x2
# =============================================================================================
POOL_CASES = {
    "B2-C67-H9-W11": (2, 67, 9, 11, "nchw"),
    "B1-C3-H8-W6": (1, 3, 8, 6, "nchw"),
    "B2-C16-H7-W5-channels-last": (2, 16, 7, 5, "channels_last"),
    "B1-C4-H3-W5-single-row": (1, 4, 3, 5, "nchw"),
    "B2-C6-H10-W12-non-contiguous": (2, 6, 10, 12, "strided"),
}


@pytest.mark.parametrize("spec,dtype", dtype_cases(POOL_CASES))
def test_avg_pool2x2(ex, spec, dtype):
    b, c, h, w, layout = spec
    x = rand((b, c, h, w), 100, ex.device, dtype, normal=True)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.cat([x, x], 1)[:, 3:3 + c]
    g = rand((b, c, h // 2, w // 2), 101, ex.device, dtype, normal=True)
    outs = run_conv_like(ex, dtype, lambda x_: (K.avg_pool2x2(x_),),
                         lambda x_: (reference.avg_pool2x2(x_),), (x,), (g,), ("avg_pool2x2",))
    if dtype == torch.float32:  # same summation order as avg_pool2d: bit-exact
        assert torch.equal(outs[0], reference.avg_pool2x2(x))
    if layout == "channels_last":
        assert outs[0].is_contiguous(memory_format=torch.channels_last)


# =============================================================================================
# out= variants (film_fast.ops ... out=): stored into buffer slices by the same kernels
# =============================================================================================
def _nan_slice(b, c, h, w, lo, hi, device, dtype):
    buf = torch.full((b, c, h, w), NAN, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    return buf, buf[:, lo:hi]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("act,with_bias,k",
                         [("leaky_relu", True, 3), (None, False, 1), (None, True, 2)])
def test_conv2d_levels_into(ex, dtype, act, with_bias, k):
    cin, cout = 6, 5
    sizes = [(2, 9, 11), (2, 4, 5), (2, 1, 2)]
    xs = [rand((b, cin, h, w), 160 + i, ex.device, dtype, normal=True).contiguous(
        memory_format=torch.channels_last) for i, (b, h, w) in enumerate(sizes)]
    weight = rand((cout, cin, k, k), 170, ex.device, dtype, scale=(cin * k * k) ** -0.5,
                  normal=True)
    bias = rand((cout,), 171, ex.device, dtype, normal=True) if with_bias else None
    bufs, outs = zip(*[_nan_slice(b, cout + 4, h, w, 3, 3 + cout, ex.device, dtype)
                       for b, h, w in sizes])
    with torch.no_grad():
        want = K.conv2d_levels(xs, weight, bias, act)
        got = K.conv2d_levels_into(xs, weight, bias, act, list(outs))
    for buf, out, r, y in zip(bufs, outs, got, want):
        assert r.data_ptr() == out.data_ptr()
        assert torch.equal(out, y), max_err(out, y)  # the same epilogue, through other strides
        assert torch.isnan(buf[:, :3]).all() and torch.isnan(buf[:, 3 + cout:]).all()


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_avg_pool2x2_and_upsample_conv2x2_into(ex, dtype):
    x = rand((2, 6, 9, 11), 180, ex.device, dtype, normal=True).contiguous(
        memory_format=torch.channels_last)
    weight = rand((5, 6, 2, 2), 181, ex.device, dtype, scale=0.2, normal=True)
    bias = rand((5,), 182, ex.device, dtype, normal=True)
    pool_buf, pool_out = _nan_slice(2, 9, 4, 5, 1, 7, ex.device, dtype)
    up_buf, up_out = _nan_slice(2, 8, 18, 22, 2, 7, ex.device, dtype)
    with torch.no_grad():
        assert K.avg_pool2x2_into(x, pool_out).data_ptr() == pool_out.data_ptr()
        assert K.upsample_conv2x2_into(x, (18, 22), weight, bias, up_out).data_ptr() == \
            up_out.data_ptr()
        assert torch.equal(pool_out, K.avg_pool2x2(x))
        assert torch.equal(up_out, K.upsample_conv2x2(x, (18, 22), weight, bias))
    assert torch.isnan(pool_buf[:, :1]).all() and torch.isnan(pool_buf[:, 7:]).all()
    assert torch.isnan(up_buf[:, :2]).all() and torch.isnan(up_buf[:, 7:]).all()


def test_into_variants_under_autograd_compute_and_copy(ex):
    """With gradients recorded the *_into ops fall back to the autograd ops plus a copy: the
    gradients through the buffer are those of the plain ops."""
    x = leaf(rand((2, 4, 6, 8), 190, ex.device, normal=True))
    weight = leaf(rand((3, 4, 3, 3), 191, ex.device, scale=0.3, normal=True))
    buf = torch.zeros((2, 10, 6, 8), device=ex.device).contiguous(memory_format=torch.channels_last)
    small = torch.zeros((2, 4, 3, 4), device=ex.device).contiguous(
        memory_format=torch.channels_last)
    ys = K.conv2d_levels_into([x], weight, None, "leaky_relu", [buf[:, 2:5]])
    K.upsample_conv2x2_into(x[:, :, :3, :4], (6, 8), weight[:, :, :2, :2], None, buf[:, 6:9])
    K.avg_pool2x2_into(x, small)
    g = rand((2, 10, 6, 8), 192, ex.device, normal=True)
    gs = rand((2, 4, 3, 4), 193, ex.device, normal=True)
    got = torch.autograd.grad([buf, small], [x, weight], [g, gs])
    x2, w2 = leaf(x), leaf(weight)
    want = torch.autograd.grad(
        [K.conv2d(x2, w2, None, "leaky_relu"),
         K.upsample_conv2x2(x2[:, :, :3, :4], (6, 8), w2[:, :, :2, :2], None), K.avg_pool2x2(x2)],
        [x2, w2], [g[:, 2:5], g[:, 6:9], gs])
    # computed, then copied
    assert ys[0].untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
    for a, b in zip(got, want):
        assert max_err(a, b) <= 1e-5 * max(1.0, b.abs().max().item())


# =============================================================================================
# Every output element written; compile cache; streams; dispatch; fallbacks
# =============================================================================================
def all_ops_forward_backward(device, dtype):
    """Runs every op forward and backward; returns every output and gradient."""
    results = []
    image = leaf(rand((2, 5, 9, 11), 110, device, dtype))
    flow = leaf(make_flow(2, 9, 11, "moderate", 111, device).to(dtype))
    out = K.warp(image, flow)
    results += [out, *torch.autograd.grad(out.sum(), (image, flow))]
    coarse = leaf(rand((2, 2, 4, 5), 112, device, dtype, normal=True))
    up = K.upsample_flow(coarse, (9, 11))
    results += [up, *torch.autograd.grad(up.sum(), (coarse,))]
    up2, warped = K.upsample_flow_warp(coarse, image)
    results += [up2, warped, *torch.autograd.grad(up2.sum() + warped.sum(), (coarse, image))]
    x = leaf(rand((2, 6, 9, 11), 113, device, dtype, normal=True))
    weight = leaf(rand((4, 6, 3, 3), 114, device, dtype, scale=0.2, normal=True))
    weight2 = leaf(rand((4, 6, 2, 2), 115, device, dtype, scale=0.2, normal=True))
    bias = leaf(rand((4,), 116, device, dtype, normal=True))
    y = K.conv2d(x, weight2, bias, "leaky_relu")
    results += [y, *torch.autograd.grad(y.sum(), (x, weight2, bias))]
    y, p = K.conv2d_pool(x, weight, bias, "leaky_relu")
    results += [y, p, *torch.autograd.grad(y.sum() + p.sum(), (x, weight, bias))]
    ys = K.conv2d_levels([x, x[:, :, :4, :5]], weight2, bias, "leaky_relu")
    results += [*ys, *torch.autograd.grad(sum(t.sum() for t in ys), (x, weight2, bias))]
    z = K.upsample_conv2x2(x, (18, 22), weight2, bias)
    results += [z, *torch.autograd.grad(z.sum(), (x, weight2, bias))]
    q = K.avg_pool2x2(x)
    results += [q, *torch.autograd.grad(q.sum(), (x,))]
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_every_output_element_is_written(ex, dtype, deterministic_mode):
    """Outputs come from torch.empty: poison it with NaN and check nothing NaN comes back."""
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with deterministic_mode(True):  # makes torch.empty return NaN-filled memory
            assert torch.isnan(torch.empty(4, device=ex.device)).all()
            results = all_ops_forward_backward(ex.device, dtype)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill_before
    for i, t in enumerate(results):
        assert torch.isfinite(t).all(), f"result {i} ({tuple(t.shape)}) has unwritten (NaN) elements"
    if ex.name == "cuda":  # the non-deterministic paths too, with the caching allocator poisoned
        # Small tensors come from the allocator's small-block pool: fill many freed blocks of
        # the sizes these tests allocate with NaN, so fresh outputs likely land on NaN memory.
        poison = [torch.full((1 << k,), NAN, device=ex.device) for k in range(6, 19) for _ in range(16)]
        del poison
        for i, t in enumerate(all_ops_forward_backward(ex.device, dtype)):
            assert torch.isfinite(t).all(), f"result {i} ({tuple(t.shape)}) has NaN elements"


def test_64bit_index_path_matches_the_32bit_one(emulator, monkeypatch):
    """Tensors of >= 2^31 elements take 64-bit index math; run that path on small tensors by
    building the host emulation with the 32-bit limit at 0, and compare with the default."""
    if emulator is None:
        pytest.skip("needs the host emulation (g++ with _Float16)")
    monkeypatch.setattr(rt, "_execute", emulator.execute)
    results = {}
    for name, emu in (("32-bit", emulator), ("64-bit", Emulator(emulator.workdir, ["FILM_INDEX32_LIMIT=0"]))):
        rt.clear_cache()
        monkeypatch.setattr(rt, "_compile_module", emu.compile_module)
        results[name] = all_ops_forward_backward(torch.device("cpu"), torch.float32)
    rt.clear_cache()
    for i, (a, b) in enumerate(zip(results["32-bit"], results["64-bit"])):
        assert torch.equal(a, b), f"result {i} differs between the 32- and 64-bit index paths"


def test_compile_count_is_per_kernel_and_dtype(ex):
    """Two resolutions (two pyramid levels / video sizes) compile each kernel once per dtype."""
    rt.clear_cache()
    rt.compile_counts.clear()
    rt.module_compile_counts.clear()
    device_index = rt.device_index(torch.empty(0, device=ex.device))
    for h, w in [(16, 24), (33, 47)]:
        for dtype in (torch.float32, torch.float16):
            image = leaf(rand((2, 5, h, w), 120, ex.device, dtype))
            flow = leaf(make_flow(2, h, w, "moderate", 121, ex.device).to(dtype))
            out = K.warp(image, flow)
            torch.autograd.grad(out.sum(), (image, flow))
    for name in ("film_warp_forward", "film_warp_backward_image_atomic", "film_warp_backward_flow"):
        for dtype in ("float32", "float16"):
            assert rt.compile_counts[(name, dtype, device_index)] == 1, (name, dtype)
    for dtype in ("float32", "float16"):
        assert rt.module_compile_counts[("warp.cu", dtype, device_index)] == 1
    assert set(rt.compile_counts.values()) == {1}
    assert all(len(key) == 3 for key in rt._FUNCTIONS)  # (kernel, dtype, device), nothing else


def test_kernels_run_on_the_current_torch_stream(ex):
    if ex.name != "cuda":
        pytest.skip("streams only exist on the GPU")
    side = torch.cuda.Stream()
    image_src = rand((2, 8, 33, 47), 130, ex.device)
    flow_src = make_flow(2, 33, 47, "moderate", 131, ex.device)
    x_src = rand((2, 8, 33, 47), 132, ex.device, normal=True)
    weight = rand((5, 8, 2, 2), 133, ex.device, scale=0.3, normal=True)
    expected = (reference.warp(image_src, flow_src), reference.avg_pool2x2(x_src),
                reference.upsample_conv2x2(x_src, (66, 94), weight, None),
                reference.upsample_flow(flow_src, (66, 94)))
    image, flow, x = torch.zeros_like(image_src), torch.zeros_like(flow_src), torch.zeros_like(x_src)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        # Delay `side`: a kernel wrongly launched on another stream would read the zeros.
        torch.cuda._sleep(100_000_000)
        image.copy_(image_src)
        flow.copy_(flow_src)
        x.copy_(x_src)
        got = (K.warp(image, flow), K.avg_pool2x2(x), K.upsample_conv2x2(x, (66, 94), weight, None),
               K.upsample_flow(flow, (66, 94)))
    side.synchronize()
    for name, a, b in zip(("warp", "avg_pool2x2", "upsample_conv2x2", "upsample_flow"), got, expected):
        assert max_err(a, b) <= 1e-4 * max(1.0, b.abs().max().item()), name


def test_public_ops_dispatch_to_cupy_on_cuda(ex):
    if ex.name != "cuda":
        pytest.skip("the dispatcher only picks the CuPy backend for CUDA tensors")
    device = torch.device("cuda")
    assert dispatch.available_backends(device)["cupy"] == ""
    for op in ops.OPS:
        name, impl = ops.resolve(op, "cupy", device)
        assert name == "cupy" and impl is K.OPS[op]
    image = rand((1, 3, 8, 8), 140, device)
    flow = torch.zeros(1, 2, 8, 8, device=device)
    assert torch.equal(ops.warp(image, flow, backend="cupy"), image)


def test_float64_falls_back_to_the_reference(ex):
    image = rand((1, 3, 6, 7), 150, ex.device, torch.float64)
    flow = make_flow(1, 6, 7, "moderate", 151, ex.device).double()
    assert torch.equal(K.warp(image, flow), reference.warp(image, flow))
    x = rand((1, 3, 6, 7), 152, ex.device, torch.float64)
    assert torch.equal(K.avg_pool2x2(x), reference.avg_pool2x2(x))
