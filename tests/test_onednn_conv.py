"""oneDNN's 3D convolutions (tversky_jax.models.onednn_conv) against lax and NumPy."""

import concurrent.futures
import os
import pathlib
import subprocess
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from tests import helpers
from tversky_jax import parallel, train_state
from tversky_jax.models import UNet3D, onednn_conv, unet3d

DN = ("NDHWC", "DHWIO", "NDHWC")


def _arrays(x_shape, k_shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(x_shape).astype(np.float32)
  k = (rng.standard_normal(k_shape) / np.sqrt(np.prod(k_shape[:4]))).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(k)


def _numpy_conv(x, k, pads):
  """Cross-correlation by summing shifted copies: out[p] = sum_t x[p + t] k[t]."""
  x = np.pad(np.asarray(x, np.float64), [(0, 0), *pads, (0, 0)])
  k = np.asarray(k, np.float64)
  out_shape = [x.shape[i + 1] - k.shape[i] + 1 for i in range(3)]
  out = 0
  for i, j, l in np.ndindex(*k.shape[:3]):
    window = x[:, i:i + out_shape[0], j:j + out_shape[1], l:l + out_shape[2]]
    out = out + window @ k[i, j, l]
  return out


def _loss_and_grads(conv, x, k, padding):
  weights = helpers.normal(7, conv(x, k, padding).shape)
  return jax.jit(jax.value_and_grad(
      lambda x, k: jnp.sum(conv(x, k, padding) * weights), argnums=(0, 1)))(x, k)


def _assert_same_loss_and_grads(conv, reference, x, k, arg):
  """A weighted sum of ``conv(x, k, arg)`` and its gradients in ``x`` and
  ``k`` equal ``reference``'s to 1e-5 relative."""
  (value, grads) = _loss_and_grads(conv, x, k, arg)
  (ref_value, ref_grads) = _loss_and_grads(reference, x, k, arg)
  assert abs(float(value - ref_value)) <= 1e-5 * abs(float(ref_value)) + 1e-5
  for grad, ref in zip(grads, ref_grads):
    assert grad.shape == ref.shape
    assert _max_rel(grad, ref) < 1e-5


def _onednn(x, k, padding):
  return unet3d.conv3d_onednn(x, k, (1, 1, 1), padding, dimension_numbers=DN)


def _native(x, k, padding):
  return lax.conv_general_dilated(x, k, (1, 1, 1), padding, dimension_numbers=DN)


def _max_rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_available_here():
  # Linux x86-64 with the oneDNN wheels of pyproject.toml and a compiler.
  assert onednn_conv.available(), onednn_conv.unavailable_reason()
  assert onednn_conv.unavailable_reason() == ""


@pytest.mark.parametrize("x_shape, k_shape, padding", [
    ((2, 8, 8, 8, 16), (3, 3, 3, 16, 16), "SAME"),
    ((1, 5, 6, 7, 3), (3, 3, 3, 3, 5), "SAME"),
    ((2, 6, 5, 4, 4), (3, 3, 1, 4, 8), "SAME"),       # anisotropic kernel
    ((1, 6, 7, 5, 2), (3, 3, 3, 2, 3), "VALID"),
    ((1, 6, 7, 5, 2), (3, 3, 3, 2, 3), ((1, 1), (0, 2), (2, 0))),
    ((2, 4, 3, 5, 6), (1, 1, 1, 6, 2), "SAME"),       # 1x1x1
])
def test_forward_and_gradients_equal_lax(x_shape, k_shape, padding):
  x, k = _arrays(x_shape, k_shape)
  pads = unet3d._pads(x, k, padding)
  out = jax.jit(_onednn, static_argnums=2)(x, k, padding)
  np.testing.assert_allclose(out, _numpy_conv(x, k, pads), rtol=1e-5, atol=1e-5)
  _assert_same_loss_and_grads(_onednn, _native, x, k, padding)


@pytest.mark.parametrize("x_shape, k_shape, strides", [
    ((2, 3, 4, 2, 5), (2, 2, 2, 5, 3), (2, 2, 2)),  # the U-Net's upsampling
    ((1, 3, 2, 4, 4), (2, 2, 1, 4, 2), (2, 2, 1)),  # anisotropic
    ((1, 3, 3, 2, 2), (3, 3, 2, 2, 3), (2, 2, 1)),  # overlapping windows
])
def test_transposed_convolution_and_gradients_equal_lax(x_shape, k_shape, strides):
  x, k = _arrays(x_shape, k_shape)

  def onednn(x, k, strides):
    return onednn_conv.conv_transpose3d(x, k, strides)

  def native(x, k, strides):  # lax does not flip the kernel
    return lax.conv_transpose(x, k[::-1, ::-1, ::-1], strides, "VALID",
                              dimension_numbers=DN)

  out = jax.jit(onednn, static_argnums=2)(x, k, strides)
  assert out.shape == native(x, k, strides).shape == (
      x_shape[0], *((n - 1) * s + w for n, s, w in zip(x_shape[1:4], strides, k_shape)),
      k_shape[-1])
  assert _max_rel(out, native(x, k, strides)) < 1e-5
  _assert_same_loss_and_grads(onednn, native, x, k, strides)


def test_upconv_with_onednn_equals_the_einsum():
  x, _ = _arrays((2, 3, 4, 2, 4), (1, 1, 1, 1, 1))

  def up(onednn):  # the same parameters for the same seed
    return unet3d.UpConv(4, 3, strides=(2, 1, 2), onednn=onednn, rngs=nnx.Rngs(0))

  def loss_and_grad(module):
    return nnx.jit(nnx.value_and_grad(lambda m, x: jnp.sum(m(x) ** 3)))(module, x)

  assert "TjConv3dForward" in str(jax.make_jaxpr(up(True))(x))
  (value, grads), (ref_value, ref_grads) = loss_and_grad(up(True)), loss_and_grad(up(False))
  assert abs(float(value - ref_value)) <= 1e-5 * abs(float(ref_value))
  for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert _max_rel(got, ref) < 1e-5


def test_pooling_gradient_goes_to_each_maximum():
  x = helpers.normal(1, (2, 4, 6, 2, 3))
  x = x.at[0, :2, :2, :, 0].set(0.5)  # windows whose maxima are all tied
  tied = np.zeros(x.shape, bool)
  tied[0, :2, :2, :, 0] = True
  for window in [(2, 2, 2), (2, 1, 2)]:
    out, vjp = jax.vjp(lambda x: unet3d._max_pool_to_maxima(x, window), x)
    ref_out, ref_vjp = jax.vjp(lambda x: unet3d._max_pool(x, window), x)
    np.testing.assert_array_equal(out, ref_out)
    g = helpers.normal(2, out.shape)
    (d_x,), (ref_d_x,) = vjp(g), ref_vjp(g)
    np.testing.assert_allclose(d_x[~tied], ref_d_x[~tied], rtol=1e-6)
    # a tied maximum gets the window's whole gradient, not its share
    np.testing.assert_allclose(d_x[tied], ref_d_x[tied] * np.prod(window), rtol=1e-6)


def _has_onednn_call(fn, *args):
  return "TjConv3dForward" in str(jax.make_jaxpr(fn)(*args))


def test_only_plain_float32_convolutions_go_to_onednn():
  x, k = _arrays((1, 8, 8, 8, 4), (3, 3, 3, 4, 4))
  assert _has_onednn_call(lambda x, k: _onednn(x, k, "SAME"), x, k)
  falls_back = {
      "bfloat16": lambda x, k: _onednn(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16), "SAME"),
      "strided": lambda x, k: unet3d.conv3d_onednn(x, k, (2, 2, 2), "SAME", dimension_numbers=DN),
      "dilated": lambda x, k: unet3d.conv3d_onednn(
          x, k, (1, 1, 1), "SAME", rhs_dilation=(2, 2, 2), dimension_numbers=DN),
      "channels first": lambda x, k: unet3d.conv3d_onednn(
          x.transpose(0, 4, 1, 2, 3), k.transpose(4, 3, 0, 1, 2), (1, 1, 1), "SAME",
          dimension_numbers=("NCDHW", "OIDHW", "NCDHW")),
  }
  for name, fn in falls_back.items():
    assert not _has_onednn_call(fn, x, k), name
  ref = lax.conv_general_dilated(x, k, (2, 2, 2), "SAME", dimension_numbers=DN)
  np.testing.assert_array_equal(falls_back["strided"](x, k), ref)


def test_vmap_over_inputs_and_kernels():
  x, k = _arrays((2, 1, 6, 5, 4, 2), (2, 3, 3, 3, 2, 4))
  out = jax.jit(jax.vmap(lambda x, k: _onednn(x, k, "SAME")))(x, k)
  for i in range(2):
    assert _max_rel(out[i], _native(x[i], k[i], "SAME")) < 1e-5


def test_sharded_jit_over_four_devices_is_correct():
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  shardings = (NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec()))
  x, k = _arrays((4, 6, 6, 6, 3), (3, 3, 3, 3, 5))

  def value_and_grads(conv):
    fn = jax.value_and_grad(lambda x, k: jnp.sum(conv(x, k, "SAME") ** 2), argnums=(0, 1))
    return jax.jit(fn, in_shardings=shardings)(x, k)

  for got, ref in zip(jax.tree.leaves(value_and_grads(_onednn)),
                      jax.tree.leaves(value_and_grads(_native))):
    assert _max_rel(got, ref) < 1e-5


def test_unet_with_onednn_equals_native():
  kwargs = dict(in_channels=2, base_features=4, normalization="instance",
                strides=((2, 2, 1),))
  rngs = lambda: nnx.Rngs(jax.random.key(0, impl="rbg"))  # fast eager init
  graphdef_native, state = nnx.split(UNet3D(conv_impl="native", rngs=rngs(), **kwargs))
  graphdef_onednn, _ = nnx.split(nnx.eval_shape(
      lambda: UNet3D(conv_impl="onednn", rngs=rngs(), **kwargs)))
  x, _ = _arrays((2, 4, 4, 2, 2), (1, 1, 1, 1, 1))

  @jax.jit(static_argnums=0)
  def loss_and_grad(graphdef, state):
    return nnx.value_and_grad(lambda m: jnp.mean(m(x)[..., 1] ** 2))(nnx.merge(graphdef, state))

  (v_native, g_native), (v_onednn, g_onednn) = (
      loss_and_grad(graphdef_native, state), loss_and_grad(graphdef_onednn, state))
  assert abs(float(v_onednn - v_native)) < 1e-5 * float(v_native)
  for got, ref in zip(jax.tree.leaves(g_onednn), jax.tree.leaves(g_native)):
    assert float(jnp.max(jnp.abs(got - ref))) <= 1e-4 * float(jnp.max(jnp.abs(ref))) + 1e-7


def test_auto_picks_onednn_on_one_cpu_device_else_2d_sum(monkeypatch):
  # Over several devices a oneDNN call is not partitioned: 2d_sum there.
  assert jax.device_count() == 4 and unet3d.default_conv_impl() == "2d_sum"
  assert unet3d.default_conv_impl(num_devices=2) == "2d_sum"
  assert unet3d.default_conv_impl(num_devices=1) == "onednn"
  monkeypatch.setattr(onednn_conv, "_load", lambda: "no C++ compiler (test)")
  unet3d._warn_once.cache_clear()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert unet3d.default_conv_impl(num_devices=1) == "2d_sum"
    assert unet3d.default_conv_impl(num_devices=1) == "2d_sum"
  assert [str(w.message) for w in caught] == [
      "conv_impl='auto' uses the slower '2d_sum' convolution: no C++ compiler (test)"]
  assert caught[0].category is RuntimeWarning


def test_trainer_on_one_device_builds_the_onednn_model(tiny_dataset):
  config = helpers.tiny_config(tiny_dataset)
  assert config.model.conv_impl == "auto"
  for devices, impl in ((jax.devices()[:1], "onednn"), (jax.devices(), "2d_sum")):
    graphdef, state = train_state.create_train_state(config, 1, parallel.make_mesh(devices))
    model, _ = nnx.merge(graphdef, state)
    assert model.conv_impl == impl


@pytest.mark.parametrize("env, expected", [
    ({"TVERSKY_JAX_ONEDNN": "0"}, "disabled by TVERSKY_JAX_ONEDNN=0"),
    ({"CXX": "no-such-compiler-here"}, "no C++ compiler ('no-such-compiler-here' is not on PATH)"),
    ({"CXX": "false"}, "could not build or load the oneDNN convolution: "),
])
def test_unavailable_reasons_are_one_line(env, expected, monkeypatch, tmp_path):
  monkeypatch.setenv("TVERSKY_JAX_CACHE", str(tmp_path))
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  reason = onednn_conv._load.__wrapped__()  # uncached: the real one stays loaded
  assert reason.startswith(expected) and "\n" not in reason
  assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))


def test_library_is_built_once_and_reused():
  assert onednn_conv.available()  # built (or found) in the session's cache
  root, compiler = onednn_conv._dnnl_root(), onednn_conv.shutil.which("c++")
  cache = onednn_conv._cache_dir()
  built = list(cache.glob("onednn_conv-*.so"))
  mtime = built[0].stat().st_mtime_ns
  assert onednn_conv._build(compiler, root) == built[0]
  assert built[0].stat().st_mtime_ns == mtime
  # Only the other pytest-xdist worker may still be writing its own copy.
  assert not list(cache.glob(f"*.{os.getpid()}.tmp"))
  assert len(built) == 1


def test_processes_building_at_once_compile_once(tmp_path, monkeypatch):
  """Three builds start together (as the processes of a job on one host
  do); the compiler runs once and all three get its library."""
  monkeypatch.setenv("TVERSKY_JAX_CACHE", str(tmp_path / "cache"))
  runs = []

  def compiler(command, **kwargs):  # a stand-in: logs, waits, writes -o
    del kwargs
    runs.append(command[0])
    time.sleep(0.2)  # room for the others to start (not needed to pass)
    pathlib.Path(command[command.index("-o") + 1]).write_bytes(b"")
    return subprocess.CompletedProcess(command, 0, "", "")

  monkeypatch.setattr(onednn_conv.subprocess, "run", compiler)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    built = list(pool.map(
        lambda _: onednn_conv._build("c++", tmp_path), range(3)))
  assert len(set(built)) == 1 and built[0].exists()
  assert runs == ["c++"]
