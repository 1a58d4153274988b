"""3D convolutions on CPU through oneDNN, called from XLA with ``jax.ffi``.

XLA:CPU computes convolutions with Eigen, which is slow with the few
channels of a U-Net's finest levels; PyTorch calls oneDNN there and is 2-3x
faster per training step (docs/benchmarks.md). This module brings the same
library to JAX: ``conv3d`` is a stride-1, zero-padded, channels-last float32
3D convolution whose forward pass and both gradients (of the input and of
the kernel) are oneDNN primitives, run as XLA FFI custom calls
(``csrc/onednn_conv.cc``); ``conv_transpose3d`` is the same for a strided
transposed convolution (the U-Net's upsampling). Results equal
``lax.conv_general_dilated``'s and ``lax.conv_transpose``'s up to float
rounding (checked by tests/test_onednn_conv.py).

The build. On first use the C++ source is compiled with the system C++
compiler (``$CXX``, else ``c++``) against jaxlib's FFI headers and the oneDNN
of the ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp`` wheels (dependencies
of this package on Linux x86-64) or of ``$DNNLROOT``, into
``$TVERSKY_JAX_CACHE`` (default ``~/.cache/tversky_jax``), once per source,
jaxlib and oneDNN; later processes load the cached library (a few seconds
the first time, nothing after). Set ``TVERSKY_JAX_ONEDNN=0`` to never use it.
Where it cannot be built (no compiler, no oneDNN, another platform),
``available()`` is False, ``unavailable_reason()`` says why in one line, and
the model's ``conv_impl="auto"`` falls back to ``conv3d_as_2d_sum``.

Transformations: ``jax.jit``, ``jax.grad`` (first order; reverse mode only,
``jax.jvp`` is not defined), ``jax.vmap`` (a loop over the mapped axis) and
sharded ``jax.jit`` (the partitioner gathers the batch, so every device
computes the whole convolution: use it on one device, as ``"auto"`` does).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

Array = jax.Array

SOURCE = Path(__file__).with_name("csrc") / "onednn_conv.cc"
_FORWARD, _BACKWARD_DATA, _BACKWARD_KERNEL = (
    "TjConv3dForward", "TjConv3dBackwardData", "TjConv3dBackwardKernel")


def _dnnl_root() -> Path | None:
  """The first prefix holding oneDNN's C++ header and shared library."""
  prefixes = [os.environ.get("DNNLROOT"), sysconfig.get_paths()["data"],
              sys.prefix, sys.base_prefix]
  for prefix in filter(None, prefixes):
    root = Path(prefix)
    if ((root / "include/oneapi/dnnl/dnnl.hpp").is_file()
        and (root / "lib/libdnnl.so").exists()):
      return root
  return None


def _cache_dir() -> Path:
  default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
  return Path(os.environ.get("TVERSKY_JAX_CACHE", default / "tversky_jax"))


def _build(compiler: str, root: Path) -> Path:
  """Compiles the handlers once per (source, jaxlib, oneDNN, compiler) and
  returns the shared library's path. Processes that start at once (the
  processes of a multi-process job on one host, test workers) compile it
  once: the first holds a lock file next to the library while it compiles,
  the others wait for it and load its library."""
  import fcntl  # pylint: disable=import-outside-toplevel  (POSIX only)
  key = hashlib.sha256(b"\0".join([
      SOURCE.read_bytes(), jaxlib.__version__.encode(),
      str((root / "lib/libdnnl.so").resolve()).encode(), compiler.encode(),
  ])).hexdigest()[:16]
  library = _cache_dir() / f"onednn_conv-{key}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  with open(library.with_suffix(".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not library.exists():
      _compile(compiler, root, library)
  return library


def _compile(compiler: str, root: Path, library: Path) -> None:
  """Writes ``library`` from SOURCE (into a temporary file renamed into
  place, so no process ever loads a partial one)."""
  partial = library.with_suffix(f".{os.getpid()}.tmp")
  command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
             f"-I{jax.ffi.include_dir()}", f"-I{root / 'include'}",
             str(SOURCE), f"-L{root / 'lib'}", "-ldnnl",
             f"-Wl,-rpath,{root / 'lib'}", "-o", str(partial)]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    partial.unlink(missing_ok=True)
    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"{compiler} failed: {last}")
  os.replace(partial, library)


@functools.cache
def _load() -> str:
  """Builds and registers the handlers; returns "" or why it could not."""
  if os.environ.get("TVERSKY_JAX_ONEDNN", "1") == "0":
    return "disabled by TVERSKY_JAX_ONEDNN=0"
  if sys.platform != "linux":
    return f"built on Linux only, not {sys.platform}"
  root = _dnnl_root()
  if root is None:
    return ("oneDNN not found (pip install onednn-cpu-gomp "
            "onednn-devel-cpu-gomp, or set DNNLROOT)")
  compiler = shutil.which(os.environ.get("CXX", "c++"))
  if compiler is None:
    return f"no C++ compiler ({os.environ.get('CXX', 'c++')!r} is not on PATH)"
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(compiler, root)))
  except (OSError, RuntimeError) as error:
    return f"could not build or load the oneDNN convolution: {error}"
  for name in (_FORWARD, _BACKWARD_DATA, _BACKWARD_KERNEL):
    jax.ffi.register_ffi_target(
        name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
  return ""


def available() -> bool:
  """Whether ``conv3d`` and ``conv_transpose3d`` can run here (builds the
  library on the first call)."""
  return not _load()


def unavailable_reason() -> str:
  """Why ``conv3d`` and ``conv_transpose3d`` cannot run here, in one line
  ("" when they can)."""
  return _load()


def _call(target: str, out: jax.ShapeDtypeStruct, a: Array, b: Array,
          padding: tuple[tuple[int, int], ...],
          strides: tuple[int, ...] = (1, 1, 1), transposed: bool = False
          ) -> Array:
  lo = np.array([p[0] for p in padding], np.int64)
  hi = np.array([p[1] for p in padding], np.int64)
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      a, b, padding_lo=lo, padding_hi=hi,
      strides=np.array(strides, np.int64), transposed=transposed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3d(x: Array, kernel: Array,
           padding: tuple[tuple[int, int], ...]) -> Array:
  """A 3D convolution (cross-correlation, as ``lax.conv_general_dilated``)
  with stride 1, computed by oneDNN.

  Args:
    x: ``[batch, x, y, z, in_features]`` float32.
    kernel: ``[kx, ky, kz, in_features, out_features]`` float32 (Flax's
      layout; ``DHWIO``).
    padding: ``((lo, hi),) * 3`` zeros added before and after each spatial
      axis, e.g. ``((1, 1),) * 3`` for a 3x3x3 'SAME' convolution.

  Returns:
    ``[batch, x + lo + hi - kx + 1, ..., out_features]`` float32.

  Requires ``available()``; see the module docstring.
  """
  out_spatial = tuple(s + lo + hi - k + 1 for s, k, (lo, hi)
                      in zip(x.shape[1:4], kernel.shape[:3], padding))
  out = jax.ShapeDtypeStruct((x.shape[0], *out_spatial, kernel.shape[4]),
                             jnp.float32)
  return _call(_FORWARD, out, x, kernel, padding)


def _conv3d_forward(x, kernel, padding):
  return conv3d(x, kernel, padding), (x, kernel)


def _conv3d_backward(padding, residuals, d_out):
  x, kernel = residuals
  d_x = _call(_BACKWARD_DATA, jax.ShapeDtypeStruct(x.shape, jnp.float32),
              d_out, kernel, padding)
  d_kernel = _call(_BACKWARD_KERNEL,
                   jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
                   x, d_out, padding)
  return d_x, d_kernel


conv3d.defvjp(_conv3d_forward, _conv3d_backward)


_NO_PADDING = ((0, 0),) * 3


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_transpose3d(x: Array, kernel: Array,
                     strides: tuple[int, int, int]) -> Array:
  """A 3D transposed convolution with no padding, computed by oneDNN:
  ``out[:, s * v + i] += x[:, v] @ kernel[i]`` for every voxel ``v`` and
  kernel offset ``i`` (per axis, ``s`` the stride), the transpose of a
  convolution with these strides.

  Equals ``lax.conv_transpose(x, kernel[::-1, ::-1, ::-1], strides,
  "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))`` (``lax`` does
  not flip the kernel) up to float rounding.

  Args:
    x: ``[batch, x, y, z, in_features]`` float32.
    kernel: ``[kx, ky, kz, in_features, out_features]`` float32.
    strides: ``(sx, sy, sz)``.

  Returns:
    ``[batch, (x - 1) * sx + kx, ..., out_features]`` float32, e.g.
    ``[batch, sx * x, sy * y, sz * z, out_features]`` when the kernel is as
    large as the stride (``models.unet3d.UpConv``).

  Requires ``available()``; see the module docstring.
  """
  out_spatial = tuple((s - 1) * st + k for s, k, st
                      in zip(x.shape[1:4], kernel.shape[:3], strides))
  out = jax.ShapeDtypeStruct((x.shape[0], *out_spatial, kernel.shape[4]),
                             jnp.float32)
  return _call(_FORWARD, out, x, kernel, _NO_PADDING, strides, True)


def _conv_transpose3d_forward(x, kernel, strides):
  return conv_transpose3d(x, kernel, strides), (x, kernel)


def _conv_transpose3d_backward(strides, residuals, d_out):
  x, kernel = residuals
  d_x = _call(_BACKWARD_DATA, jax.ShapeDtypeStruct(x.shape, jnp.float32),
              d_out, kernel, _NO_PADDING, strides, True)
  d_kernel = _call(_BACKWARD_KERNEL,
                   jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
                   x, d_out, _NO_PADDING, strides, True)
  return d_x, d_kernel


conv_transpose3d.defvjp(_conv_transpose3d_forward, _conv_transpose3d_backward)
