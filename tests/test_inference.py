"""Tests of tversky_jax.inference (sliding-window inference).

conftest.py gives four simulated CPU devices.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tversky_jax import inference

CHANNELS = 3
CLASSES = 2
WINDOW = (16, 16, 16)

_RNG = np.random.default_rng(0)
_MIX = _RNG.normal(size=(CHANNELS, CLASSES)).astype(np.float32)
_BIAS = _RNG.normal(size=(CLASSES,)).astype(np.float32)


def _pointwise(x):
  """Translation-equivariant, voxel-by-voxel: a 1x1x1 linear map + sin."""
  return (jnp.einsum("nxyzc,ck->nxyzk", x, _MIX) + _BIAS
          + jnp.sin(2.0 * x[..., :1]))


def _positional(x):
  """Not flip-symmetric: adds a ramp along the window's own x, y, z."""
  n, wx, wy, wz, _ = x.shape
  ramp = (jnp.linspace(-2.0, 2.0, wx)[:, None, None]
          + jnp.linspace(-1.0, 1.0, wy)[None, :, None]
          - jnp.linspace(-1.5, 1.5, wz)[None, None, :])
  logits = _pointwise(x)
  return logits.at[..., 1].add(ramp[None])


pointwise_fn = jax.jit(_pointwise)
positional_fn = jax.jit(_positional)


def _image(shape, seed=1):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(*shape, CHANNELS)).astype(np.float32)


def _reference(fn, image):
  """fn on the whole volume as one batch, then softmax."""
  return np.asarray(jax.nn.softmax(fn(jnp.asarray(image)[None])[0], axis=-1))


def test_one_window_is_plain_softmax():
  image = _image(WINDOW)
  for fn in (pointwise_fn, positional_fn):
    out = inference.sliding_window_inference(fn, image, window=WINDOW)
    assert out.shape == (*WINDOW, CLASSES) and out.dtype == np.float32
    # Only w * p / w rounding separates the two.
    np.testing.assert_allclose(out, _reference(fn, image), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("shape", [
    (40, 40, 40),  # windows fit evenly with overlap 0.5
    (37, 21, 29),  # not multiples of the window or the step
    (10, 16, 7),  # smaller than the window: padded, then cropped
    (40, 9, 23),  # mixed
])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_pointwise_fn_matches_whole_volume(shape, overlap):
  image = _image(shape)
  out = inference.sliding_window_inference(pointwise_fn, image, window=WINDOW,
                                           overlap=overlap, batch_size=3)
  assert out.shape == (*shape, CLASSES) and out.dtype == np.float32
  np.testing.assert_allclose(out, _reference(pointwise_fn, image), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_blending_is_gaussian_weighted_average():
  # A positional fn makes overlapping windows disagree; check one voxel
  # covered by several windows against the weighted average by hand.
  shape = (24, 16, 16)
  image = _image(shape)
  out = inference.sliding_window_inference(positional_fn, image,
                                           window=WINDOW, overlap=0.5)
  weights = inference.gaussian_importance_map(WINDOW)
  voxel = (10, 3, 5)
  num = np.zeros(CLASSES)
  den = 0.0
  for sx, sy, sz in inference.window_starts(shape, WINDOW, 0.5):
    local = tuple(v - s for v, s in zip(voxel, (sx, sy, sz)))
    if all(0 <= l < w for l, w in zip(local, WINDOW)):
      crop = image[sx:sx + 16, sy:sy + 16, sz:sz + 16]
      p = _reference(positional_fn, crop)[local]
      num += weights[local] * p
      den += weights[local]
  np.testing.assert_allclose(out[voxel], num / den, rtol=1e-5)
  # ...and it is not what either window alone says.
  assert not np.allclose(out[voxel], _reference(
      positional_fn, image[0:16])[voxel], atol=1e-3)


@pytest.mark.parametrize("shape,overlap", [
    ((40, 40, 40), 0.5), ((37, 21, 29), 0.5), ((16, 17, 100), 0.25),
    ((10, 16, 7), 0.5), ((33, 33, 33), 0.0), ((20, 20, 20), 0.9),
])
def test_window_starts_cover_and_stay_in_bounds(shape, overlap):
  starts = inference.window_starts(shape, WINDOW, overlap)
  padded = [max(s, w) for s, w in zip(shape, WINDOW)]
  covered = np.zeros(padded, bool)
  for start in starts:
    assert all(0 <= s and s + w <= p for s, w, p in zip(start, WINDOW, padded))
    covered[tuple(slice(s, s + w) for s, w in zip(start, WINDOW))] = True
  assert covered.all()
  assert len(set(starts)) == len(starts)
  # Regular step from 0, last tile flush with the end.
  for axis in range(3):
    axis_starts = sorted({s[axis] for s in starts})
    assert axis_starts[0] == 0
    assert axis_starts[-1] == padded[axis] - WINDOW[axis]
    step = max(1, int(WINDOW[axis] * (1 - overlap) + 1e-9))
    assert all(b - a == step for a, b in zip(axis_starts[:-2],
                                             axis_starts[1:-1]))


def test_window_starts_counts():
  assert inference.window_starts((40, 16, 8), WINDOW, 0.5) == [
      (0, 0, 0), (8, 0, 0), (16, 0, 0), (24, 0, 0)]
  assert len(inference.window_starts((32, 32, 32), WINDOW, 0.0)) == 8
  # Step 16 * 0.3 = 4.8 -> 4: starts 0, 4, 8, 12, 16, then flush 20.
  assert [s[0] for s in inference.window_starts(
      (36, 16, 16), WINDOW, 0.7)] == [0, 4, 8, 12, 16, 20]


@pytest.mark.parametrize("window", [(16, 16, 16), (8, 13, 20), (1, 4, 5)])
def test_gaussian_importance_map(window):
  g = inference.gaussian_importance_map(window)
  assert g.shape == window and g.dtype == np.float32
  assert g.max() == 1.0
  assert g.min() > 0
  for axis in range(3):  # symmetric under every flip
    np.testing.assert_array_equal(g, np.flip(g, axis))
  # Peaks in the centre, decays towards every border.
  centre = tuple((w - 1) // 2 for w in window)
  assert g[centre] == g.max()
  if window == (16, 16, 16):
    assert g[0, 0, 0] < 1e-3 < g[centre]
    line = g[:, 7, 7]
    assert np.all(np.diff(line[:8]) > 0) and np.all(np.diff(line[8:]) < 0)
    # sigma = 0.125 * 16 = 2 voxels: exp(-0.5 (d / 2)^2) relative falloff.
    np.testing.assert_allclose(g[3, 7, 7] / g[7, 7, 7],
                               np.exp(-0.5 * ((4.5**2 - 0.5**2) / 4)),
                               rtol=1e-5)


def test_gaussian_importance_map_floor():
  g = inference.gaussian_importance_map((32, 32, 32), sigma_scale=0.02)
  assert g.min() > 0  # the pure Gaussian underflows float32 here
  with pytest.raises(ValueError):
    inference.gaussian_importance_map((16, 16, 16), sigma_scale=0.0)


def test_mirror_with_pointwise_fn_equals_no_mirror():
  image = _image((37, 21, 29))
  plain = inference.sliding_window_inference(pointwise_fn, image,
                                             window=WINDOW)
  mirrored = inference.sliding_window_inference(pointwise_fn, image,
                                                window=WINDOW, mirror=True)
  np.testing.assert_allclose(mirrored, plain, rtol=1e-5, atol=1e-6)


def _flip_spatial(x, axes):
  return jnp.flip(x, axes) if axes else x


def test_mirror_one_window_is_average_over_flips():
  image = _image(WINDOW)
  x = jnp.asarray(image)[None]
  expected = np.mean([
      np.asarray(jax.nn.softmax(_flip_spatial(
          positional_fn(_flip_spatial(x, axes)), axes), axis=-1))[0]
      for r in range(4) for axes in itertools.combinations((1, 2, 3), r)
  ], axis=0)
  mirrored = inference.sliding_window_inference(positional_fn, image,
                                                window=WINDOW, mirror=True)
  plain = inference.sliding_window_inference(positional_fn, image,
                                             window=WINDOW)
  np.testing.assert_allclose(mirrored, expected, rtol=1e-5, atol=1e-6)
  assert np.abs(mirrored - plain).max() > 1e-2


def test_mirror_many_windows_is_average_of_flipped_models():
  # mirror=True == the mean over flips f of sliding-window inference with the
  # model x -> flip_f(model(flip_f(x))), flips taken in window coordinates.
  image = _image((37, 21, 29))
  flips = [axes for r in range(4)
           for axes in itertools.combinations((1, 2, 3), r)]
  assert len(flips) == 8
  runs = []
  for axes in flips:
    fn = jax.jit(lambda x, axes=axes: _flip_spatial(
        _positional(_flip_spatial(x, axes)), axes))
    runs.append(inference.sliding_window_inference(fn, image, window=WINDOW))
  mirrored = inference.sliding_window_inference(positional_fn, image,
                                                window=WINDOW, mirror=True)
  np.testing.assert_allclose(mirrored, np.mean(runs, axis=0), rtol=1e-5,
                             atol=1e-6)
  assert np.abs(mirrored - runs[0]).max() > 1e-2


def test_one_device_and_four_devices_agree():
  assert jax.device_count() == 4
  image = _image((37, 21, 29))
  kwargs = dict(window=WINDOW, batch_size=4, mirror=True)
  one = inference.sliding_window_inference(
      positional_fn, image, devices=jax.devices()[:1], **kwargs)
  four = inference.sliding_window_inference(
      positional_fn, image, devices=jax.devices(), **kwargs)
  default = inference.sliding_window_inference(positional_fn, image, **kwargs)
  np.testing.assert_allclose(one, four, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(four, default)


@pytest.mark.parametrize("n_devices", [4, 1])
def test_inside_training_mesh(n_devices):
  # Validation runs inside jax.set_mesh(jax.make_mesh(...)), whose axes are
  # Explicit, with parameters replicated on that mesh.
  mesh = jax.make_mesh((4,), ("data",))
  image = _image((37, 21, 29))
  expected = inference.sliding_window_inference(positional_fn, image,
                                                window=WINDOW, mirror=True)
  with jax.set_mesh(mesh):
    if n_devices == 4:
      mix = jax.device_put(_MIX, NamedSharding(mesh, PartitionSpec()))
    else:  # parameters not committed to the training mesh
      mix = _MIX
    fn = jax.jit(lambda x: _positional(x) + jnp.einsum(
        "nxyzc,ck->nxyzk", x, mix - _MIX))
    out = inference.sliding_window_inference(
        fn, image, window=WINDOW, mirror=True,
        devices=jax.devices()[:n_devices])
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_windows_are_spread_over_devices():
  seen = []

  def fn(x):
    seen.append(x.sharding)  # a concrete array: fn itself is not jitted
    return pointwise_fn(x)

  inference.sliding_window_inference(fn, _image((20, 16, 16)),
                                     window=WINDOW, batch_size=4)
  assert len(seen) == 1
  assert seen[0].num_devices == 4
  assert seen[0].shard_shape((4, *WINDOW, CHANNELS))[0] == 1


@pytest.mark.parametrize("batch_size,devices,expected_n", [
    (3, 4, 4),  # rounded up to the device count
    (5, 4, 8),
    (3, 1, 3),
    (1, 2, 2),
    (7, 1, 6),  # 30 windows: 5 calls either way, of 6 (none padded), not 7
    (8, 4, 8),
])
@pytest.mark.parametrize("mirror", [False, True])
def test_logits_fn_compiles_once_with_constant_batch(batch_size, devices,
                                                     expected_n, mirror):
  traced_shapes = []

  def fn(x):
    traced_shapes.append(x.shape)  # runs once per trace
    return _pointwise(x)

  jitted = jax.jit(fn)
  calls = []

  def counting(x):
    calls.append(x.shape)
    return jitted(x)

  # 5 x 2 x 3 = 30 windows, not a multiple of any padded batch size here.
  image = _image((48, 24, 32))
  out = inference.sliding_window_inference(
      counting, image, window=WINDOW, overlap=0.5, batch_size=batch_size,
      mirror=mirror, devices=jax.devices()[:devices])
  assert traced_shapes == [(expected_n, *WINDOW, CHANNELS)]
  assert jitted._cache_size() == 1
  n_windows = len(inference.window_starts(image.shape[:3], WINDOW, 0.5))
  assert n_windows == 30
  assert set(calls) == {(expected_n, *WINDOW, CHANNELS)}
  assert len(calls) == -(-n_windows // expected_n) * (8 if mirror else 1)
  np.testing.assert_allclose(out, _reference(pointwise_fn, image), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("windows, batch, devices, expected", [
    (9, 4, 1, 3), (8, 4, 1, 4), (1, 4, 1, 1), (5, 4, 1, 3), (13, 4, 2, 4),
    (30, 7, 1, 6), (3, 3, 4, 4), (9, 8, 4, 8), (17, 8, 4, 8), (16, 12, 4, 8), (100, 4, 1, 4)])
def test_balanced_batch_needs_no_more_calls_and_pads_least(windows, batch, devices,
                                                           expected):
  n = inference._balanced_batch(windows, batch, devices)
  assert n == expected
  per_call = -(-batch // devices) * devices
  assert n % devices == 0 and n <= per_call
  assert -(-windows // n) == -(-windows // per_call)  # as few calls
  # No smaller multiple of the device count needs as few calls.
  assert n == devices or -(-windows // (n - devices)) > -(-windows // per_call)


def test_progress_bar(capsys):
  out = inference.sliding_window_inference(
      pointwise_fn, _image((32, 16, 16)), window=WINDOW, progress=True)
  assert out.shape == (32, 16, 16, CLASSES)
  assert "3/3" in capsys.readouterr().err


def test_integer_image_is_cast_to_float32():
  image = np.arange(16**3 * CHANNELS).reshape(16, 16, 16, CHANNELS) % 5
  out = inference.sliding_window_inference(pointwise_fn, image, window=WINDOW)
  np.testing.assert_allclose(
      out, _reference(pointwise_fn, image.astype(np.float32)), rtol=1e-6,
      atol=1e-7)


@pytest.mark.parametrize("kwargs,match", [
    (dict(image=np.zeros((16, 16, 16))), "4-D"),
    (dict(image=np.zeros((1, 16, 16, 16, 3))), "4-D"),
    (dict(window=(16, 16)), "window"),
    (dict(window=(16, 16, 0)), "window"),
    (dict(window=(16, 16, 8.0)), "window"),
    (dict(window=16), "window"),
    (dict(overlap=1.0), "overlap"),
    (dict(overlap=-0.1), "overlap"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=2.0), "batch_size"),
    (dict(devices=[]), "devices"),
])
def test_bad_arguments(kwargs, match):
  args = dict(image=np.zeros((16, 16, 16, CHANNELS), np.float32),
              window=WINDOW)
  args.update(kwargs)
  image = args.pop("image")
  with pytest.raises(ValueError, match=match):
    inference.sliding_window_inference(pointwise_fn, image, **args)


def test_bad_logits_shape():
  with pytest.raises(ValueError, match="logits_fn"):
    inference.sliding_window_inference(
        jax.jit(lambda x: _pointwise(x)[:, :8]), _image(WINDOW),
        window=WINDOW)


def test_window_starts_bad_arguments():
  with pytest.raises(ValueError, match="overlap"):
    inference.window_starts((32, 32, 32), WINDOW, 1.0)
  with pytest.raises(ValueError, match="window"):
    inference.window_starts((32, 32, 32), (16, -1, 16), 0.5)
  with pytest.raises(ValueError, match="volume_shape"):
    inference.window_starts((32, 32), WINDOW, 0.5)
