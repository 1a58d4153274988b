"""Deep supervision: UNet3D.multi_scale and tversky_jax.deep_supervision.

Tiny networks (4 base features), NumPy inputs and shapes traced without
compiling keep the file under a minute; one 3-step training run through
train_lib checks the wiring end to end.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import default
from tests import helpers
from tversky_jax import configuration
from tversky_jax import deep_supervision as ds
from tversky_jax import parallel
from tversky_jax import predict
from tversky_jax import train_lib
from tversky_jax import train_state
from tversky_jax.data import nifti
from tversky_jax.models import unet3d

ANISOTROPIC = ((2, 2, 1), (2, 2, 2))


def _rngs():
  # "rbg" initialises in seconds, threefry compiles a kernel per shape.
  return nnx.Rngs(jax.random.key(0, impl="rbg"))


def _model(deep_supervision=True, **kwargs):
  kwargs.setdefault("depth", None if "strides" in kwargs else 2)
  return unet3d.UNet3D(in_channels=1, base_features=4,
                       deep_supervision=deep_supervision, rngs=_rngs(),
                       **kwargs)


# NumPy draws: jax.random compiles a threefry kernel per shape (seconds each
# on CPU).
def _normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _labels(shape, num_classes, seed=0):
  return jnp.asarray(
      np.random.default_rng(seed).integers(0, num_classes, shape), jnp.int32)


def _image(shape, seed=0):
  return _normal((1, *shape, 1), seed)


def _param_paths(model):
  return {path: np.asarray(value) for path, value in
          nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _multi_scale_shapes(shape, **kwargs):
  """``multi_scale`` traced, not run (nothing is compiled)."""
  return jax.eval_shape(lambda x: _model(**kwargs).multi_scale(x),
                        jax.ShapeDtypeStruct((1, *shape, 1), jnp.float32))


def test_multi_scale_shapes_isotropic():
  outputs = _multi_scale_shapes((16, 16, 16))
  assert [o.shape for o in outputs] == [(1, 16, 16, 16, 2), (1, 8, 8, 8, 2)]
  assert all(o.dtype == jnp.float32 for o in outputs)


def test_multi_scale_shapes_anisotropic():
  outputs = _multi_scale_shapes((16, 16, 8), strides=ANISOTROPIC,
                                num_classes=3)
  # Stage 1 is pooled by (2, 2, 1): z keeps its 8 voxels.
  assert [o.shape for o in outputs] == [(1, 16, 16, 8, 3), (1, 8, 8, 8, 3)]


def test_call_is_the_finest_scale_exactly():
  model = _model(strides=ANISOTROPIC)
  x = _image((16, 16, 8), seed=1)
  np.testing.assert_array_equal(model(x), model.multi_scale(x)[0])


def test_without_deep_supervision_the_parameter_tree_is_unchanged():
  old = _param_paths(unet3d.UNet3D(in_channels=1, base_features=4, depth=2,
                                   rngs=_rngs()))
  off = _param_paths(_model(deep_supervision=False))
  on = _param_paths(_model(depth=3))
  assert off.keys() == old.keys()
  assert not any("aux_heads" in path for path in off)
  assert [o.shape for o in _multi_scale_shapes(
      (16, 16, 16), deep_supervision=False)] == [(1, 16, 16, 16, 2)]
  # With it: the same tree plus one head per coarser stage, and (same seed)
  # the same initial values elsewhere, the finest head included.
  off3 = _param_paths(_model(deep_supervision=False, depth=3))
  extra = {path for path in on if path not in off3}
  assert extra == {("aux_heads", i, name) for i in (0, 1)
                   for name in ("kernel", "bias")}
  assert on[("aux_heads", 1, "kernel")].shape == (1, 1, 1, 16, 2)
  for path, value in off3.items():
    np.testing.assert_array_equal(on[path], value)


def test_scale_weights_follow_nnunet():
  np.testing.assert_allclose(ds.scale_weights(1), [1.0])
  np.testing.assert_allclose(ds.scale_weights(2), [1.0, 0.0])
  # [1, 1/2, 1/4] with the coarsest masked: [1, 1/2, 0] / 1.5.
  np.testing.assert_allclose(ds.scale_weights(3), [2 / 3, 1 / 3, 0.0])
  # [1, 1/2, 1/4, 1/8] -> [1, 1/2, 1/4, 0] / 1.75.
  np.testing.assert_allclose(ds.scale_weights(4), [4 / 7, 2 / 7, 1 / 7, 0.0])
  with pytest.raises(ValueError, match="num_scales"):
    ds.scale_weights(0)


def test_scale_factors_are_cumulative_strides():
  assert ds.scale_factors(((2, 2, 1), (2, 2, 2), (2, 2, 2)), 3) == [
      (1, 1, 1), (2, 2, 1), (4, 4, 2)]
  with pytest.raises(ValueError, match="stages"):
    ds.scale_factors(((2, 2, 2),), 3)


@pytest.mark.parametrize("factors", [(1, 1, 1), (2, 2, 1), (4, 2, 2)])
def test_downsample_labels_matches_numpy(factors):
  labels = np.asarray(_labels((2, 8, 4, 6), 3))
  got = ds.downsample_labels(jnp.asarray(labels), 3, factors)
  b, x, y, z = labels.shape
  fx, fy, fz = factors
  one_hot = np.eye(3, dtype=np.float32)[labels]
  expected = one_hot.reshape(b, x // fx, fx, y // fy, fy, z // fz, fz,
                             3).mean(axis=(2, 4, 6))
  assert got.shape == expected.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_allclose(np.sum(got, -1), 1.0, rtol=1e-6)


def test_downsample_labels_rejects_indivisible_sizes():
  with pytest.raises(ValueError, match="cannot be pooled"):
    ds.downsample_labels(jnp.zeros((1, 6, 4, 4), jnp.int32), 2, (4, 2, 2))


@pytest.mark.parametrize("name", ["tversky", "dice", "focal_tversky",
                                  "tversky_ce"])
def test_losses_take_soft_labels(name):
  # One-hot labels as soft targets give the loss of the class map.
  config = default.get_config()
  config.loss.name = name
  loss_fn = train_state.make_loss_fn(config)
  labels = _labels((2, 4, 4, 2), 2, seed=1)
  logits = _normal((2, 4, 4, 2, 2), seed=2)
  soft, hard = jax.jit(lambda x, y: (
      loss_fn(x, ds.downsample_labels(y, 2, (1, 1, 1))), loss_fn(x, y)))(
          logits, labels)
  np.testing.assert_allclose(soft, hard, rtol=1e-6)


def test_deep_supervision_loss_is_the_weighted_sum():
  strides = ((2, 2, 1), (2, 2, 2), (2, 2, 2))
  labels = _labels((2, 16, 16, 8), 3)
  grids = [(16, 16, 8), (8, 8, 8), (4, 4, 4), (2, 2, 2)]
  logits = [_normal((2, *grid, 3), seed) for seed, grid in enumerate(grids)]
  loss_fn = train_state.make_loss_fn(default.get_config())  # tversky_ce
  calls = []

  def spy(logits_i, labels_i):
    calls.append(logits_i.shape)
    return loss_fn(logits_i, labels_i)

  def separately(logits, labels):  # the coarsest (weight 0) left out
    return (4 / 7 * loss_fn(logits[0], labels)
            + 2 / 7 * loss_fn(logits[1], ds.downsample_labels(
                labels, 3, (2, 2, 1)))
            + 1 / 7 * loss_fn(logits[2], ds.downsample_labels(
                labels, 3, (4, 4, 2))))

  got = jax.jit(lambda x, y: ds.deep_supervision_loss(spy, x, y, 3, strides))(
      logits, labels)
  np.testing.assert_allclose(got, jax.jit(separately)(logits, labels),
                             rtol=1e-6)
  assert calls == [(2, 16, 16, 8, 3), (2, 8, 8, 8, 3), (2, 4, 4, 4, 3)]
  with pytest.raises(ValueError, match="scale 1"):
    ds.deep_supervision_loss(loss_fn, [logits[0], logits[2]], labels, 3,
                             strides)


def test_gradients_reach_the_auxiliary_heads():
  model = _model(depth=3)
  image = _image((16, 16, 16), seed=2)
  labels = (image[..., 0] > 0.5).astype(jnp.int32)
  loss_fn = train_state.make_loss_fn(default.get_config())

  @nnx.jit
  def loss_and_grads(model):
    return nnx.value_and_grad(
        lambda m: ds.training_loss(m, image, labels, loss_fn))(model)

  loss, grads = loss_and_grads(model)
  assert np.isfinite(loss)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  aux = grads["aux_heads"]
  assert np.any(aux[0]["kernel"][...] != 0)  # weight 1/3
  assert not np.any(aux[1]["kernel"][...])  # the coarsest: weight 0
  # Without deep supervision the same step is the plain loss of the logits.
  plain = _model(deep_supervision=False, depth=3)
  got, expected = nnx.jit(lambda m: (
      ds.training_loss(m, image, labels, loss_fn),
      loss_fn(m(image), labels)))(plain)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_config_key_is_a_checked_structural_bool(tmp_path):
  config = default.get_config()
  # ConfigDict keeps a key's type; a config built from a dict does not.
  config.model = ml_collections.ConfigDict(
      dict(config.model.to_dict(), deep_supervision="maybe"))
  with pytest.raises(configuration.ConfigError,
                     match="config.model.deep_supervision='maybe': expected "
                           "True or False"):
    configuration.validate_config(config, num_devices=1)
  # Its heads change the parameter tree: a run cannot resume with it flipped.
  config = default.get_config()
  configuration.write_config(config, str(tmp_path))
  config.model.deep_supervision = True
  with pytest.raises(configuration.ConfigError,
                     match="trained with model.deep_supervision=False"):
    configuration.check_resumable(config, str(tmp_path))


def test_training_run_with_deep_supervision(tiny_dataset, tmp_path):
  # depth 3: scales weigh [2/3, 1/3, 0], so an auxiliary head is trained.
  config = helpers.tiny_config(tiny_dataset, **{
      "model.deep_supervision": True, "model.depth": 3,
      "train.num_steps": 3, "train.checkpoint_every": 0})
  workdir = str(tmp_path / "run")
  summary = train_lib.train_and_evaluate(config, workdir, progress=False,
                                         devices=jax.devices()[:1])
  assert summary.step == 3 and np.isfinite(summary.last_loss)
  # The train step used the multi-scale loss: the head of weight 1/3 moved
  # from its zero initial bias, the one of weight 0 got no gradient.
  _, leaves = helpers.saved_params(workdir, config)
  _, state = train_state.create_train_state(
      config, 3, parallel.make_mesh(jax.devices()[:1]))
  heads = jax.tree.unflatten(jax.tree.structure(state), leaves)[0]["aux_heads"]
  assert np.any(heads[0]["bias"][...] != 0)
  assert not np.any(heads[1]["bias"][...])
  # Prediction rebuilds the network with its auxiliary heads (the checkpoint
  # restores into it) and reads the finest logits.
  predictor = predict.load_predictor(workdir, "latest", window=(16, 16, 16))
  case = sorted(os.listdir(os.path.join(tiny_dataset, "imagesTr")))[0]
  case_id = case[:-len("_0000.nii.gz")]
  paths = [os.path.join(tiny_dataset, "imagesTr", f"{case_id}_{c:04d}.nii.gz")
           for c in range(3)]
  image, _, _ = nifti.load_image_files(paths)
  prob = predictor.predict_probability(nifti.normalize_image(image))
  assert prob.shape == image.shape[:3] and np.all(np.isfinite(prob))
