"""End-to-end tests of the trainer on tiny synthetic phantoms.

The session fixture ``straight_run`` (tests/conftest.py) trains 6 steps on
all 4 simulated devices once; the tests compare other runs with it.
"""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests import helpers
from tests.helpers import saved_params, tiny_config
from tversky_jax import training_data
from tversky_jax import train_state
from tversky_jax import configuration
from tversky_jax import checkpoint
from tversky_jax import deep_supervision
from tversky_jax import operating_point
from tversky_jax import parallel
from tversky_jax import predict
from tversky_jax import train_lib



def assert_same_params(got, expected, rtol, atol):
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def _loss_and_grads(config, devices, batch):
  """The train step's loss and gradient of the initial state on one global
  ``batch``, sharded over ``devices`` as the step shards it."""
  mesh = parallel.make_mesh(devices)
  graphdef, state = train_state.create_train_state(config, 3, mesh)
  loss_fn = train_state.make_loss_fn(config)

  def loss_and_grads(state, batch):
    model, _ = nnx.merge(graphdef, state)
    return nnx.value_and_grad(lambda m: deep_supervision.training_loss(
        m, batch["image"], batch["label"], loss_fn))(model)

  loss, grads = jax.jit(loss_and_grads, in_shardings=(
      parallel.replicated(mesh), parallel.batch_sharding(mesh)))(state, batch)
  return float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]


def test_data_parallel_gradient_equals_single_device(tiny_dataset):
  """Four devices compute the loss and gradient of the whole global batch.

  Tolerance: both programs sum the same float32 terms in other orders
  (per-device partial sums, then a reduction over devices), which moves a
  sum by a few ulp times log2 of its length (~2e-6 relative for 16^3 x 4
  voxels), compounded over the network's few layers. 1e-4 of each
  gradient's norm leaves room for any CPU's vector code; a per-device loss
  (each device pooling only its own examples) misses by percents."""
  config = tiny_config(tiny_dataset)
  image = helpers.normal(7, (4, 16, 16, 16, 3))
  label = (helpers.normal(8, (4, 16, 16, 16)) > 1.0).astype(jnp.int32)
  batch = {"image": image, "label": label}
  loss_one, grads_one = _loss_and_grads(config, jax.devices()[:1], batch)
  loss_four, grads_four = _loss_and_grads(config, jax.devices()[:4], batch)
  np.testing.assert_allclose(loss_four, loss_one, rtol=1e-5)
  for g4, g1 in zip(grads_four, grads_one):
    assert np.linalg.norm(g4 - g1) <= 1e-4 * np.linalg.norm(g1) + 1e-9
  assert any(np.linalg.norm(g) > 0 for g in grads_one)


def test_data_parallel_run_follows_the_single_device_losses(
    tiny_dataset, straight_run, tmp_path):
  """The whole run (sharded input pipeline, step, logging) on one device
  logs the losses of the four-device run.

  Parameters are not compared: Adam divides each gradient by the root of
  its second moment, so a gradient near zero whose float rounding differs
  between the two programs moves its parameter by up to the learning rate
  either way, and which parameters do depends on the CPU's vector code.
  The loss averages over every parameter's effect; 1e-3 is ~100x the
  differences seen (AVX2 and AVX-512 machines)."""
  config = tiny_config(tiny_dataset)
  one = train_lib.train_and_evaluate(config, str(tmp_path),
                                     devices=jax.devices()[:1], progress=False)
  assert one.step == 6
  with open(tmp_path / "metrics.jsonl") as f:
    losses = [json.loads(line)["train/loss"] for line in f]
  assert len(losses) == len(straight_run.losses) == 3
  np.testing.assert_allclose(losses, straight_run.losses, rtol=1e-3)
  # Training moved the parameters away from their initial values.
  _, params = saved_params(str(tmp_path), config)
  _, init = train_state.create_train_state(
      config, 3, parallel.make_mesh(jax.devices()[:1]))
  assert any(not np.allclose(a, np.asarray(b))
             for a, b in zip(params, jax.tree.leaves(init)))


def test_interrupted_and_resumed_run_equals_uninterrupted(
    tiny_dataset, straight_run, tmp_path):
  config = tiny_config(tiny_dataset)
  first = train_lib.train_and_evaluate(config, str(tmp_path), stop_after=3,
                                       progress=False)
  assert first.interrupted and first.step == 3
  second = train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  assert not second.interrupted and second.step == 6
  step, params = saved_params(str(tmp_path), config)
  assert step == 6
  assert_same_params(params, straight_run.params, rtol=0, atol=0)


def test_resumed_run_draws_the_same_augmentations(tiny_dataset, straight_run,
                                                  tmp_path):
  """The on-device augmentation is keyed by the step: a resumed run applies
  exactly the augmentations of an uninterrupted one. (One device: the
  augmented step on four is compiled by the three-class test.)"""
  config = tiny_config(tiny_dataset, **{"augment.enabled": True})
  one = jax.devices()[:1]
  straight = train_lib.train_and_evaluate(config, str(tmp_path / "straight"),
                                          devices=one, progress=False)
  first = train_lib.train_and_evaluate(config, str(tmp_path / "resumed"),
                                       stop_after=3, devices=one,
                                       progress=False)
  second = train_lib.train_and_evaluate(config, str(tmp_path / "resumed"),
                                        devices=one, progress=False)
  assert (straight.step, first.step, second.step) == (6, 3, 6)
  _, expected = saved_params(str(tmp_path / "straight"), config)
  _, params = saved_params(str(tmp_path / "resumed"), config)
  assert_same_params(params, expected, rtol=0, atol=0)
  # The augmentation changed what the network saw: far more than the 1e-4
  # by which one device and four differ without it.
  assert any(not np.allclose(a, b, rtol=1e-2, atol=1e-4)
             for a, b in zip(expected, straight_run.params))


def test_sigterm_saves_and_the_rerun_equals_uninterrupted(
    tiny_dataset, straight_run, tmp_path, monkeypatch, capsys):
  config = tiny_config(tiny_dataset, **{"train.checkpoint_every": 0})
  calls = {"n": 0}
  original = parallel.global_batch

  def global_batch_then_signal(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(batch, mesh)

  monkeypatch.setattr(parallel, "global_batch", global_batch_then_signal)
  summary = train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  assert summary.interrupted and summary.step == 3
  assert "Received SIGTERM" in capsys.readouterr().err
  assert saved_params(str(tmp_path), config)[0] == 3
  monkeypatch.undo()
  summary = train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  assert summary.step == 6 and not summary.interrupted
  assert_same_params(saved_params(str(tmp_path), config)[1],
                     straight_run.params, rtol=0, atol=0)


def test_validation_metrics_checkpoints_and_log(tiny_dataset, tmp_path,
                                                capsys):
  config = tiny_config(tiny_dataset, **{"train.num_steps": 4,
                                        "train.eval_every": 2,
                                        "train.checkpoint_every": 0,
                                        "data.num_val_cases": 2})
  summary = train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert summary.best_step in (2, 4)
  # The best checkpoint is the one whose metric is the highest.
  val = {r["step"]: r["val/f2"] for r in records if "val/f2" in r}
  for name in configuration.METRICS:
    assert name in summary.final_metrics
    assert f"pooled_{name}" in summary.final_metrics
  assert 0.0 <= summary.final_metrics["specificity"] <= 1.0
  assert {r["step"] for r in records} == {2, 4}
  assert any("train/loss" in r and "train/voxels_per_s" in r for r in records)
  assert set(val) == {2, 4}
  assert val[summary.best_step] == max(val.values())
  assert summary.best_metrics["f2"] == max(val.values())
  # The last checkpoint keeps its validation metrics (it is not re-saved).
  manager = checkpoint.CheckpointManager(tmp_path / "checkpoints")
  assert manager.restore_meta(4)["metrics"]["f2"] == val[4]
  # Each validated checkpoint stores the threshold chosen on the validation
  # cases for its parameters, also logged; F2 at 0.5 is the logged val/f2.
  points = {step: operating_point.OperatingPoint.from_dict(
      manager.restore_meta(step)["operating_point"]) for step in (2, 4)}
  manager.close()
  logged = {r["step"]: r for r in records if "val/threshold" in r}
  for step, point in points.items():
    assert point.metric == "f2" and point.cases == 2
    assert point.threshold in operating_point.GRID
    assert point.at_default == pytest.approx(val[step], abs=1e-12)
    assert point.at_threshold >= point.at_default
    assert logged[step]["val/threshold"] == point.threshold
    assert logged[step]["val/f2_at_threshold"] == pytest.approx(
        point.at_threshold)
  # The best checkpoint's is returned and printed at the end.
  assert summary.operating_point == points[summary.best_step]
  assert (f"Operating point of step {summary.best_step}: "
          f"{summary.operating_point.describe()}"
          in capsys.readouterr().err.splitlines())
  assert json.load(open(tmp_path / "config.json"))["loss"]["beta"] == 0.7
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dataset, tmp_path,
                                                       monkeypatch):
  config = tiny_config(tiny_dataset, **{"train.num_steps": 2})
  train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  config.train.num_steps = 6
  # NaN images from step 3 on: the very step the other tests compile.
  original = parallel.global_batch
  monkeypatch.setattr(parallel, "global_batch", lambda batch, mesh: original(
      {**batch, "image": np.full_like(batch["image"], np.nan)}, mesh))
  closed, close = [], train_lib.MetricWriter.close
  monkeypatch.setattr(train_lib.MetricWriter, "close",
                      lambda self: (closed.append(self), close(self)))
  with pytest.raises(train_lib.TrainingDiverged,
                     match=r"became nan at step 3.*checkpoint \(step 2\)"):
    train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  # The failed run closed its metric writer (an open tensorboardX writer
  # prints a traceback at the interpreter's exit on Python 3.12).
  assert len(closed) == 1
  step, params = saved_params(str(tmp_path), config)
  assert step == 2
  assert all(np.all(np.isfinite(p)) for p in params)


@pytest.mark.parametrize("key,value,message", [
    ("loss.alpha", -0.1, "config.loss.alpha=-0.1: alpha"),
    ("loss.name", "hinge", "config.loss.name='hinge': expected one of"),
    ("train.batch_size", 3, "config.train.batch_size=3: the global batch "
     "must be divisible by the 4 devices"),
    ("data.patch_shape", (18, 16, 16), "multiple of 2\\*\\*model.depth = 4"),
    ("model.dtype", "float16", "config.model.dtype='float16'"),
    ("inference.overlap", 1.0, "config.inference.overlap=1.0"),
    ("seed", -1, "config.seed=-1: must be >= 0"),
    ("data.synthetic_shape", (8, 8, 8), "each >= 16"),
    ("data.num_val_cases", -1, "config.data.num_val_cases=-1"),
])
def test_bad_config_fails_before_compiling(tiny_dataset, tmp_path, key, value,
                                           message):
  # The phantom settings are checked only when phantoms are to be written.
  config = tiny_config(tiny_dataset, **{key: value,
                                        "data.synthesize_if_missing": True})
  with pytest.raises(train_lib.ConfigError, match=message):
    train_lib.train_and_evaluate(config, str(tmp_path), progress=False)


def test_jitted_initialisation_equals_eager_and_is_shared_across_seeds(
    monkeypatch):
  monkeypatch.setattr(train_state, "_INITS", {})
  mesh = parallel.make_mesh(jax.devices()[:2])
  for seed in (5, 0):
    config = tiny_config("/unused", seed=seed, **{"model.depth": 1,
                                                  "model.base_features": 2})
    _, state = train_state.create_train_state(config, 3, mesh)
    model = train_state.build_model(config, train_state.ModelSpec(3), seed, 2)
    optimizer = nnx.Optimizer(model, train_state.make_optimizer(config),
                              wrt=nnx.Param)
    _, eager = nnx.split((model, optimizer))
    assert jax.tree.structure(state) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(eager)):
      assert a.sharding == parallel.replicated(mesh)
      if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      np.testing.assert_array_equal(a, b)
  assert len(train_state._INITS) == 1  # pylint: disable=protected-access


def test_runs_with_the_same_settings_share_the_jitted_steps(tiny_dataset,
                                                           monkeypatch):
  """A second run in the process reuses the traced step (no retracing) only
  when nothing the step depends on changed."""
  # A cache of its own: its steps close over no graph and must not reach
  # the runs of other tests.
  monkeypatch.setattr(train_state, "_STEPS", {})
  mesh = parallel.make_mesh(jax.devices()[:1])
  spec = train_state.ModelSpec(3)

  def steps(mesh=mesh, **overrides):
    # Nothing is traced before the first call, so no graph definition (and
    # no initialisation) is needed to compare what the cache returns.
    config = tiny_config(tiny_dataset, **overrides)
    return train_state.jitted_steps(config, spec, None, 2, mesh)

  first = steps()
  assert steps() == first
  assert steps(seed=5) == first  # the seed only keys the augmentation
  assert steps(**{"train.num_steps": 9, "data.num_val_cases": 2}) == first
  # alpha and beta are arguments of the step: a sweep compiles it once.
  assert steps(**{"loss.alpha": 0.2, "loss.beta": 0.8}) == first
  for changed in ({"loss.name": "focal_tversky"}, {"loss.smooth": 0.5},
                  {"optimizer.learning_rate": 0.1},
                  {"model.base_features": 2}, {"augment.enabled": True}):
    assert steps(**changed)[0] is not first[0], changed
  augmented = steps(**{"augment.enabled": True})
  assert steps(**{"augment.enabled": True, "seed": 5})[0] is not augmented[0]
  assert steps(mesh=parallel.make_mesh(jax.devices()[:2]))[0] is not first[0]


def test_alpha_and_beta_are_arguments_of_one_compiled_step():
  """A sweep's (alpha, beta) settings share one compiled train step, and
  each computes its own loss: the loss the step reports equals the loss
  with alpha and beta as constants (``make_loss_fn``)."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  config = tiny_config("/unused", **{"model.depth": 1,
                                     "model.base_features": 2})
  graphdef, state = train_state.create_train_state(config, 3, mesh)
  step = train_state.make_train_step(
      graphdef, train_state.weighted_loss_fn(config), mesh)
  image = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 8, 3)),
                      jnp.float32)
  label = (image[..., 0] > 1.0).astype(jnp.int32)
  batch = parallel.global_batch({"image": image, "label": label}, mesh)
  logits = train_state.make_logits_fn(graphdef)(state, image)
  reported = {}
  for alpha, beta in ((0.5, 0.5), (0.1, 0.9)):
    config.loss.alpha, config.loss.beta = alpha, beta
    _, metrics = step(jax.tree.map(jnp.copy, state), batch,
                      train_state.loss_args(config))
    reported[alpha] = float(metrics["loss"])
    expected = jax.jit(train_state.make_loss_fn(config))(logits, label)
    # Two programs compute the logits; their rounding may differ elsewhere.
    np.testing.assert_allclose(reported[alpha], expected, rtol=1e-5)
  assert step._cache_size() == 1  # pylint: disable=protected-access
  assert abs(reported[0.5] - reported[0.1]) > 1e-2  # 0.14 here


def test_every_loss_gives_finite_values_and_gradients_on_bfloat16_logits():
  """Every ``loss.name`` the trainer accepts, as ``make_loss_fn`` builds it
  for the train step (which the other tests run with the default loss)."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 8, 8, 8, 2)), jnp.bfloat16)
  labels = jnp.asarray(rng.random((4, 8, 8, 8)) < 0.05, jnp.int32)
  for name in configuration.LOSSES:
    config = tiny_config("unused", **{"loss.name": name})
    configuration.validate_config(config, num_devices=1)
    loss, grad = jax.jit(jax.value_and_grad(
        train_state.make_loss_fn(config)))(logits, labels)
    assert np.isfinite(float(loss)) and 0.0 < float(loss), name
    assert np.all(np.isfinite(np.asarray(grad, np.float32))), name
    assert np.any(np.asarray(grad, np.float32) != 0), name


def test_cross_validation_folds_partition_the_cases(tiny_dataset):
  cases = [f"case{i:03d}" for i in range(7)]
  held_out = []
  for fold in range(3):
    config = tiny_config(tiny_dataset, **{"data.num_folds": 3,
                                          "data.fold": fold,
                                          "data.num_val_cases": 1})
    test = training_data.held_out_cases(cases, config)
    train, val = training_data.split_cases(cases, config)
    # Validation (which picks the checkpoint) comes from the training fold:
    # the held-out fold is never seen during training.
    assert sorted(train + val + test) == cases
    assert len(val) == 1 and not set(test) & set(train + val)
    held_out += test
  assert sorted(held_out) == cases
  config = tiny_config(tiny_dataset, **{"data.num_folds": 3, "data.fold": 3})
  with pytest.raises(train_lib.ConfigError, match="config.data.fold=3"):
    configuration.validate_config(config)
  config = tiny_config(tiny_dataset, **{"data.num_folds": 9})
  with pytest.raises(train_lib.ConfigError, match="only 7 training cases"):
    training_data.split_cases(cases, config)
  config = tiny_config(tiny_dataset, **{"data.num_folds": 2,
                                        "data.num_val_cases": 3})
  with pytest.raises(train_lib.ConfigError,
                     match="num_val_cases=3: only 3 cases of the training "
                           "fold"):
    training_data.split_cases(cases, config)


def test_training_without_validation(tiny_dataset, tmp_path):
  config = tiny_config(tiny_dataset, **{"data.num_val_cases": 0,
                                        "train.num_steps": 2,
                                        "train.eval_every": 1})
  summary = train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  assert summary.step == 2 and summary.best_step is None
  assert summary.final_metrics == {}


def test_whole_volume_training_as_in_the_paper(tiny_dataset, tmp_path):
  config = tiny_config(tiny_dataset, **{"data.patch_shape": (),
                                        "inference.window": (),
                                        "train.batch_size": 4,
                                        "train.num_steps": 1,
                                        "train.eval_every": 1})
  summary = train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  assert np.isfinite(summary.last_loss)
  assert 0.0 <= summary.final_metrics["sensitivity"] <= 1.0


def test_patch_larger_than_every_volume_message():
  assert configuration.patch_shape_warning(
      (64, 64, 64), (48, 40, 44), (4, 4, 4), planned=True) == (
          "warning: data.patch_shape (64, 64, 64) is larger than every "
          "training volume (largest 48x40x44 on the planned grid); every "
          "patch is partly zero padding; set --config.data.patch_shape to at "
          "most (48, 40, 44)")
  # One axis too long; the fitting size is rounded down to the divisors.
  assert configuration.patch_shape_warning(
      (64, 16, 16), (46, 40, 44), (8, 4, 4)).endswith(
          "(largest 46x40x44); every patch is partly zero padding; set "
          "--config.data.patch_shape to at most (40, 16, 16)")
  assert configuration.patch_shape_warning((48, 40, 44), (48, 40, 44),
                                           (4, 4, 4)) is None
  assert configuration.patch_shape_warning(None, (8, 8, 8), (4, 4, 4)) is None


@pytest.mark.parametrize("patch,warned", [((32, 32, 32), True),
                                          ((16, 16, 16), False)])
def test_a_patch_larger_than_every_training_volume_is_warned(
    tiny_dataset, tmp_path, capsys, patch, warned):
  config = tiny_config(tiny_dataset, **{"data.patch_shape": patch,
                                        "inference.window": patch})
  train_lib.train_and_evaluate(config, str(tmp_path), stop_after=0,
                               progress=False)
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines()
              if line.startswith("warning: data.patch_shape")]
  if not warned:
    assert not warnings, err
    return
  (line,) = warnings
  assert line.startswith("warning: data.patch_shape (32, 32, 32) is larger "
                         "than every training volume (largest ")
  largest = line.split("(largest ")[1].split(" ")[0]
  assert max(map(int, largest.split("x"))) <= 24  # the 24^3 phantoms
  assert "on the planned grid" in line


def test_resuming_with_a_different_network_is_a_clear_error(
    tiny_dataset, tmp_path):
  config = tiny_config(tiny_dataset, **{"train.num_steps": 2})
  train_lib.train_and_evaluate(config, str(tmp_path), progress=False)
  config.model.depth = 3
  config.data.patch_shape = (16, 16, 16)
  with pytest.raises(train_lib.ConfigError,
                     match="config.model.depth=3: the run in .* was trained "
                           "with model.depth=2"):
    train_lib.train_and_evaluate(config, str(tmp_path), progress=False)


def test_resuming_with_other_input_channels_is_a_clear_error(
    tiny_dataset, tmp_path):
  config = tiny_config(tiny_dataset, **{"train.num_steps": 1})
  train_lib.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  two = tmp_path / "two_channels"
  shutil.copytree(tiny_dataset, two)
  for path in (two / "imagesTr").glob("*_0002.nii.gz"):
    path.unlink()
  meta = json.loads((two / "dataset.json").read_text())
  meta["channel_names"] = {"0": "T1", "1": "T2"}
  (two / "dataset.json").write_text(json.dumps(meta))
  config.data.root = str(two)
  with pytest.raises(train_lib.ConfigError,
                     match=r"its channels \['T1', 'T2'\] differ from the "
                           r"channels \['T1', 'T2', 'FLAIR'\]"):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"),
                                 progress=False)


def test_the_optimizer_state_is_one_vector_and_updates_like_per_parameter():
  config = tiny_config("unused", **{"optimizer.grad_clip_norm": 0.5})
  params = {"kernel": jnp.ones((3, 3, 3, 2, 4)), "bias": jnp.zeros(4),
            "head": {"kernel": jnp.ones((1, 1, 1, 4, 2))}}
  flat = train_state.make_optimizer(config)
  # The same chain per parameter: what make_optimizer built before it
  # flattened the parameters (optax's own clip and adam).
  per_parameter = optax.chain(optax.clip_by_global_norm(0.5),
                              optax.adam(train_state.make_schedule(config)))

  @jax.jit
  def three_updates(params):
    flat_state, state = flat.init(params), per_parameter.init(params)
    updates = []
    for i in range(3):
      grads = jax.tree.map(lambda p, i=i: jnp.cos(
          jnp.arange(p.size, dtype=p.dtype) + i).reshape(p.shape), params)
      flat_update, flat_state = flat.update(grads, flat_state, params)
      update, state = per_parameter.update(grads, state, params)
      updates.append((flat_update, update))
    return flat_state, updates

  flat_state, updates = three_updates(params)
  assert {x.shape for x in jax.tree.leaves(flat_state)} == {(), (228,)}
  for flat_update, update in updates:
    for a, b in zip(jax.tree.leaves(flat_update), jax.tree.leaves(update)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


def test_resuming_a_checkpoint_of_an_earlier_state_format_is_a_clear_error(
    tiny_dataset, tmp_path, monkeypatch):
  """A run saved with the optimizer's state per parameter (tversky_jax
  before STATE_FORMAT 2) cannot continue training; its model still predicts."""
  config = tiny_config(tiny_dataset, **{"train.num_steps": 1})
  with monkeypatch.context() as old_version:
    old_version.setattr(train_state.optax, "flatten", lambda tx: tx)
    old_version.setattr(train_state, "STATE_FORMAT", 1)
    old_version.setattr(train_state, "_INITS", {})  # of another state
    # What is saved is the state as created; a step that leaves it as it is
    # spares compiling a train step for the old state.
    old_version.setattr(train_state, "jitted_steps", lambda *args: (
        lambda state, batch, loss_args: (state, {"loss": 1.0, "grad_norm": 1.0}),
        None))
    train_lib.train_and_evaluate(config, str(tmp_path), progress=False,
                                 devices=jax.devices()[:1])
  manager = checkpoint.CheckpointManager(tmp_path / "checkpoints")
  assert manager.restore_meta(1)["state_format"] == 1
  manager.close()
  config.train.num_steps = 2
  with pytest.raises(train_lib.ConfigError,
                     match="written by an earlier tversky_jax .*format 1.* "
                           "reads 2.* predict.py still reads their model"):
    train_lib.train_and_evaluate(config, str(tmp_path), progress=False,
                                 devices=jax.devices()[:1])
  predictor = predict.load_predictor(tmp_path, checkpoint="latest")
  assert predictor.num_classes == 2


def test_best_checkpoint_ignores_missing_and_nan_metrics(tmp_path):
  manager = checkpoint.CheckpointManager(tmp_path, best_metric="apr",
                                         async_save=False)
  state = {"w": np.zeros(3, np.float32)}
  manager.save(1, state, data_state=None, meta={}, metrics={"apr": 0.4})
  manager.save(2, state, data_state=None, meta={}, metrics={"apr": float("nan")})
  manager.save(3, state, data_state=None, meta={}, metrics={"f2": 0.9})
  manager.save(4, state, data_state=None, meta={}, metrics={"apr": 0.2})
  assert manager.best_step() == 1
  manager.close()
