"""Tests of tversky_jax.predict: train a tiny run once, predict, evaluate.

conftest.py gives four simulated CPU devices.
"""

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import nibabel as nib
import numpy as np
import pytest

from tests import helpers
from tversky_jax import train_state
from tversky_jax import checkpoint
from tversky_jax import evaluate
from tversky_jax import operating_point
from tversky_jax import parallel
from tversky_jax import predict
from tversky_jax import train_lib
from tversky_jax.data import nifti
from tversky_jax.data import synthetic

SHAPE = (24, 24, 24)
TEST_CASES = ("test_000", "test_001")
CHANNELS = ("T1", "T2", "FLAIR")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step run with checkpoints at steps 1 and 2, not validated."""
  base = tmp_path_factory.mktemp("predict")
  root = base / "Dataset902_Predict"
  synthetic.make_synthetic_dataset(root, num_cases=4, shape=SHAPE, seed=5,
                                   num_test_cases=2)
  config = helpers.tiny_config(root, **{"train.num_steps": 2,
                                        "train.log_every": 1,
                                        "train.checkpoint_every": 1})
  workdir = base / "run"
  summary = train_lib.train_and_evaluate(config, str(workdir), progress=False)
  assert summary.step == 2
  return types.SimpleNamespace(root=root, workdir=workdir, config=config,
                               base=base)


@pytest.fixture(scope="module")
def validated_run(run):
  """The run's data trained 2 steps with validation at each (one
  validation case), and what the trainer printed."""
  config = helpers.tiny_config(run.root, **{"train.num_steps": 2,
                                            "train.eval_every": 1})
  workdir = run.base / "validated"
  with contextlib.redirect_stderr(io.StringIO()) as err:
    summary = train_lib.train_and_evaluate(config, str(workdir),
                                           progress=False)
  assert summary.operating_point is not None
  return types.SimpleNamespace(workdir=workdir, summary=summary,
                               err=err.getvalue())


@pytest.fixture(scope="module")
def cli_output(run):
  """Masks and probabilities of imagesTs/ written by the CLI in-process."""
  out = run.base / "cli_out"
  status = predict.main(["--workdir", str(run.workdir), "--input",
                         str(run.root), "--output", str(out),
                         "--save-probabilities"])
  assert status == 0
  return out


def _image_paths(root, case_id, split="imagesTs"):
  return [root / split / f"{case_id}_{c:04d}.nii.gz" for c in range(3)]


def _mask(path):
  return np.asarray(nib.load(path).dataobj)


def test_cli_writes_masks_on_the_input_grid(run, cli_output):
  for case_id in TEST_CASES:
    source = nib.load(_image_paths(run.root, case_id)[0])
    mask_img = nib.load(cli_output / f"{case_id}.nii.gz")
    prob_img = nib.load(cli_output / f"{case_id}_prob.nii.gz")
    for img in (mask_img, prob_img):
      assert img.shape == source.shape == SHAPE
      np.testing.assert_array_equal(img.affine, source.affine)
      np.testing.assert_array_equal(img.get_qform(), source.get_qform())
      np.testing.assert_array_equal(img.get_sform(), source.get_sform())
      assert int(img.header["qform_code"]) == int(source.header["qform_code"])
      assert int(img.header["sform_code"]) == int(source.header["sform_code"])
    assert mask_img.get_data_dtype() == np.uint8
    assert prob_img.get_data_dtype() == np.float32
    mask = np.asarray(mask_img.dataobj)
    prob = np.asarray(prob_img.dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    np.testing.assert_array_equal(mask, (prob >= 0.5).astype(np.uint8))


def test_best_latest_and_step_checkpoints(run, capsys):
  # Not validated: "best" is the latest, and says so.
  assert predict.load_predictor(run.workdir).step == 2
  assert "latest (no checkpoint has validation metrics)" in (
      capsys.readouterr().err)
  assert predict.load_predictor(run.workdir, "latest").step == 2
  assert predict.load_predictor(run.workdir, "1").step == 1
  with pytest.raises(predict.PredictError, match=r"available: \[1, 2\]"):
    predict.load_predictor(run.workdir, 7)


class _FakeManager:
  """restore_meta() of checkpoints with the given validation metrics."""

  def __init__(self, metrics):
    self.metrics = metrics

  def restore_meta(self, step):
    return {"step": step, "metrics": self.metrics[step]}


def test_best_is_the_highest_validation_metric_latest_on_ties():
  manager = _FakeManager({1: {"f2": 0.3, "dsc": 0.9}, 2: {"f2": 0.5},
                          3: {"f2": 0.5, "dsc": 0.1}, 4: {},
                          5: {"f2": float("nan")}})
  steps = [1, 2, 3, 4, 5]
  assert predict._best_step(manager, steps, "f2") == 3
  assert predict._best_step(manager, steps, "dsc") == 1
  assert predict._best_step(manager, steps, "apr") is None


def test_one_window_equals_the_direct_forward_pass(run):
  predictor = predict.load_predictor(run.workdir, "latest", window=SHAPE)
  assert predictor.channel_names == CHANNELS
  image, _, _ = nifti.load_image_files(_image_paths(run.root, "test_000"))
  image = nifti.normalize_image(image)
  prob = predictor.predict_probability(image)
  logits = np.asarray(predictor.logits(image[None]))[0]
  direct = 1.0 - np.asarray(jax.nn.softmax(logits, axis=-1))[..., 0]
  assert prob.shape == SHAPE and prob.dtype == np.float32
  np.testing.assert_allclose(prob, direct, rtol=1e-5, atol=1e-6)


def test_predictor_reads_the_model_without_the_optimizer(run, tmp_path):
  predictor = predict.load_predictor(run.workdir, "latest", window=SHAPE)
  image, _, _ = nifti.load_image_files(_image_paths(run.root, "test_000"))
  image = nifti.normalize_image(image)
  # The full train state {0: model, 1: optimizer}, restored as train_lib
  # does (onto a concretely initialised state).
  mesh = parallel.make_mesh(jax.devices())
  graphdef, state = train_state.create_train_state(run.config, 3, mesh)
  manager = checkpoint.CheckpointManager(run.workdir / "checkpoints",
                                         async_save=False, best_metric=None)
  full_target = train_state.abstract_state(state)
  full = manager.restore(full_target, step=2).state
  meta = manager.restore_meta(2)
  manager.close()
  assert jax.tree.leaves(full[1])  # the checkpoint has optimizer moments
  # The predictor holds the model's variables only: no optimizer leaf.
  assert list(predictor._state.keys()) == [0]
  restored = jax.tree.leaves(predictor._state)
  expected = jax.tree.leaves(full[0])
  assert len(restored) == len(expected)
  for a, b in zip(restored, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # It predicts exactly what the full train state predicts.
  reference = predict.Predictor(
      predictor.config, graphdef, full, channel_names=CHANNELS,
      spec=predictor.spec, window=SHAPE)
  prob = predictor.predict_probability(image)
  np.testing.assert_array_equal(prob, reference.predict_probability(image))
  # A checkpoint without any optimizer state loads as well.
  model_only = tmp_path / "model_only"
  manager = checkpoint.CheckpointManager(model_only / "checkpoints",
                                         async_save=False, best_metric=None)
  manager.save(2, predictor._state, data_state=None, meta=meta)
  manager.wait()
  with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
    manager.restore(full_target, step=2)  # the full path cannot read it
  manager.close()
  again = predict.load_predictor(model_only, "latest", window=SHAPE)
  np.testing.assert_array_equal(again.predict_probability(image), prob)
  # A model that does not fit the checkpoint (3 classes, 2 saved) is named.
  other = tmp_path / "three_classes"
  manager = checkpoint.CheckpointManager(other / "checkpoints",
                                         async_save=False, best_metric=None)
  manager.save(2, predictor._state, data_state=None,
               meta=dict(meta, model=dict(meta["model"], num_classes=3)))
  manager.close()
  # orbax restores leaves concurrently: the message names whichever leaf
  # failed first, the head's bias (2,) or its kernel (1, 1, 1, 4, 2).
  with pytest.raises(predict.PredictError,
                     match=r"step 2 .* is unreadable .*shape.*[(, ]2,?\).*"
                     r"match it\?"):
    predict.load_predictor(other)


def test_restore_subtree_reads_a_branch_and_fails_in_one_line(tmp_path):
  state = {"model": {"w": np.arange(6, dtype=np.float32)},
           "optimizer": {"mu": np.full(50_000, 7.0, np.float32)}}
  manager = checkpoint.CheckpointManager(tmp_path, async_save=False,
                                         best_metric=None)
  manager.save(1, state, data_state=None, meta={})
  manager.wait()
  target = {"model": {"w": jax.ShapeDtypeStruct((6,), np.float32)}}
  restored = manager.restore_subtree(target, 1)
  assert list(restored) == ["model"]
  np.testing.assert_array_equal(restored["model"]["w"], state["model"]["w"])
  # A leaf the checkpoint lacks or holds with another shape, a missing step.
  for bad_target, bad_step, reason in (
      ({"model": {"v": jax.ShapeDtypeStruct((6,), np.float32)}}, 1,
       r"model\.v is not in the checkpoint"),
      ({"model": {"w": jax.ShapeDtypeStruct((5,), np.float32)}}, 1,
       r"model\.w has the shape \(6,\) in the checkpoint, expected \(5,\)"),
      (target, 2, "")):
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf"^checkpoint of step \d in .* is unreadable "
                       rf"\(.*{reason}") as error:
      manager.restore_subtree(bad_target, bad_step)
    assert "\n" not in str(error.value)
  files = sorted((p for p in (tmp_path / "1" / "state").rglob("*")
                  if p.is_file()), key=lambda p: p.stat().st_size,
                 reverse=True)
  with open(files[0], "r+b") as f:  # the largest file holds the arrays
    f.truncate(files[0].stat().st_size // 3)
  with pytest.raises(checkpoint.CheckpointError,
                     match="checkpoint of step 1 .* is unreadable") as error:
    manager.restore_subtree(
        {"optimizer": {"mu": jax.ShapeDtypeStruct((50_000,), np.float32)}}, 1)
  assert "\n" not in str(error.value)
  manager.close()


def test_function_api_on_a_plain_folder(run, cli_output, tmp_path):
  predictor = predict.load_predictor(run.workdir)
  inputs = predict.find_cases(run.root / "imagesTs", predictor.channel_names)
  assert sorted(inputs.cases) == list(TEST_CASES) and not inputs.problems
  report = predict.predict_cases(predictor, inputs.cases, tmp_path,
                                 progress=False)
  assert report.ok and sorted(report.masks) == list(TEST_CASES)
  assert not report.probabilities
  for case_id in TEST_CASES:
    np.testing.assert_array_equal(_mask(report.masks[case_id]),
                                  _mask(cli_output / f"{case_id}.nii.gz"))


def test_subprocess_single_case_with_explicit_channels(run, cli_output,
                                                       tmp_path):
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "tversky_jax.predict", "--workdir",
       str(run.workdir), "--channels",
       *map(str, _image_paths(run.root, "test_001")),
       "--output", str(out), "--no-progress"],
      cwd=tmp_path, capture_output=True, text=True, timeout=120,
      env=dict(os.environ))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Wrote 1 of 1 mask(s)" in result.stdout
  assert sorted(os.listdir(out)) == ["test_001.nii.gz"]
  np.testing.assert_array_equal(_mask(out / "test_001.nii.gz"),
                                _mask(cli_output / "test_001.nii.gz"))


def test_round_trip_evaluation(run, cli_output, tmp_path, capsys):
  result = evaluate.evaluate_folders(cli_output, run.root / "labelsTs",
                                     tmp_path)
  assert [c.case_id for c in result.cases] == list(TEST_CASES)
  for case in result.cases:
    mask = _mask(cli_output / f"{case.case_id}.nii.gz") != 0
    label = _mask(run.root / "labelsTs" / f"{case.case_id}.nii.gz") != 0
    assert case.tp == np.sum(mask & label)
    assert case.fp == np.sum(mask & ~label)
    assert case.fn == np.sum(~mask & label)
    assert case.tp + case.fp + case.fn + case.tn == np.prod(SHAPE)
    assert case.lesions.reference >= 1 and np.isfinite(case.apr)
  assert result.pooled["tp"] + result.pooled["fn"] == sum(
      np.sum(_mask(run.root / "labelsTs" / f"{c}.nii.gz") != 0)
      for c in TEST_CASES)
  rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
  assert [r["case"] for r in rows] == [*TEST_CASES, "pooled", "mean"]
  for row in rows:
    for name in evaluate.VOXEL_METRICS + evaluate.LESION_METRICS:
      assert 0.0 <= float(row[name]) <= 1.0
  assert (tmp_path / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The CLI on the same folders.
  assert evaluate.main(["--predictions", str(cli_output), "--labels",
                        str(run.root / "labelsTs"), "--output",
                        str(tmp_path / "cli")]) == 0
  assert "pooled" in capsys.readouterr().out
  assert (tmp_path / "cli" / "metrics.csv").read_text() == (
      tmp_path / "metrics.csv").read_text()


def _one_error_line(capsys):
  """The one ``error:`` line on stderr (besides the 'Restored ...' note)."""
  err = capsys.readouterr().err.strip().splitlines()
  assert "Traceback" not in "\n".join(err)
  errors = [line for line in err if not line.startswith("Restored the ")]
  assert len(errors) == 1, err
  assert errors[0].startswith("error: ")
  return errors[0]


def test_wrong_channel_count_names_the_missing_channel(run, tmp_path,
                                                       capsys):
  paths = _image_paths(run.root, "test_000")[:2]
  status = predict.main(["--workdir", str(run.workdir), "--channels",
                         *map(str, paths), "--output", str(tmp_path),
                         "--no-progress"])
  assert status == 1
  line = _one_error_line(capsys)
  assert "expects 3 channel file(s), in this order: T1, T2, FLAIR" in line
  assert "missing: FLAIR" in line
  assert not os.listdir(tmp_path)


def test_case_missing_a_channel_is_skipped(run, tmp_path, capsys):
  folder = tmp_path / "in"
  shutil.copytree(run.root / "imagesTs", folder)
  (folder / "test_001_0002.nii.gz").unlink()
  out = tmp_path / "out"
  status = predict.main(["--workdir", str(run.workdir), "--input",
                         str(folder), "--output", str(out), "--no-progress"])
  assert status == 1
  assert sorted(os.listdir(out)) == ["test_000.nii.gz"]
  err = capsys.readouterr().err
  assert "error: case test_001: missing channel file(s) test_001_0002 " \
         "(FLAIR)" in err
  assert "1 case(s) failed: test_001" in err


def test_unreadable_file_is_reported_and_skipped(run, tmp_path, capsys):
  folder = tmp_path / "in"
  shutil.copytree(run.root / "imagesTs", folder)
  (folder / "test_000_0001.nii.gz").write_bytes(b"not a nifti file")
  out = tmp_path / "out"
  status = predict.main(["--workdir", str(run.workdir), "--input",
                         str(folder), "--output", str(out), "--no-progress"])
  assert status == 1
  assert sorted(os.listdir(out)) == ["test_001.nii.gz"]
  err = capsys.readouterr().err
  assert "error: case test_000: cannot load image files:" in err
  assert "test_000_0001.nii.gz: cannot read" in err


def test_a_failing_case_is_skipped_and_the_others_written(run, tmp_path,
                                                          monkeypatch, capsys):
  """Device out of memory (or any failure) in one case loses no other."""
  original = predict.Predictor.predict_files

  def predict_files(self, paths, progress=False):
    if "test_000" in str(paths[0]):
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                         "allocate 17179869184 bytes.\nBufferAssignment ...")
    return original(self, paths, progress)

  monkeypatch.setattr(predict.Predictor, "predict_files", predict_files)
  out = tmp_path / "out"
  status = predict.main(["--workdir", str(run.workdir), "--input",
                         str(run.root), "--output", str(out), "--no-progress",
                         "--save-probabilities"])
  assert status == 1
  assert sorted(os.listdir(out)) == ["test_001.nii.gz",
                                     "test_001_prob.nii.gz"]
  err = capsys.readouterr().err
  assert "error: case test_000: RESOURCE_EXHAUSTED: Out of memory" in err
  assert "Traceback" not in err
  assert "1 case(s) failed: test_000" in err


def test_no_checkpoint_is_a_one_line_error(run, tmp_path, capsys):
  common = ["--input", str(run.root), "--output", str(tmp_path / "out")]
  assert predict.main(["--workdir", str(tmp_path / "nowhere"), *common]) == 1
  assert "no such directory" in _one_error_line(capsys)
  assert predict.main(["--workdir", str(tmp_path), *common]) == 1
  assert "no checkpoint in" in _one_error_line(capsys)
  (tmp_path / "checkpoints").mkdir()
  assert predict.main(["--workdir", str(tmp_path), *common]) == 1
  assert "no checkpoint in" in _one_error_line(capsys)
  assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_line_errors(run, tmp_path, capsys):
  common = ["--workdir", str(run.workdir), "--output", str(tmp_path / "out"),
            "--no-progress"]
  assert predict.main([*common, "--input", str(run.root),
                       "--window", "18", "16", "16"]) == 1
  assert "multiple of the network's divisors (4, 4, 4)" in _one_error_line(capsys)
  assert predict.main([*common, "--input", str(tmp_path / "nowhere")]) == 1
  assert "no such directory" in _one_error_line(capsys)
  assert predict.main([*common, "--input", str(run.root),
                       "--checkpoint", "newest"]) == 1
  assert "expected best, latest or a step" in _one_error_line(capsys)
  # An input dataset whose dataset.json has the channels in another order.
  other = tmp_path / "Dataset903_Other"
  (other / "imagesTr").mkdir(parents=True)
  meta = json.loads((run.root / "dataset.json").read_text())
  meta["channel_names"] = {"0": "T1", "1": "FLAIR", "2": "T2"}
  (other / "dataset.json").write_text(json.dumps(meta))
  assert predict.main([*common, "--input", str(other)]) == 1
  assert ("lists the channels (T1, FLAIR, T2) but the model was trained on "
          "(T1, T2, FLAIR)") in _one_error_line(capsys)
  # Channel names that do not fit the training dataset.
  assert predict.main([*common, "--input", str(run.root / "imagesTs"),
                       "--channel-names", "T1", "FLAIR"]) == 1
  assert ("2 channel name(s) given (T1, FLAIR) but the model was trained on 3 "
          "channel(s) (T1, T2, FLAIR)") in _one_error_line(capsys)
  assert not (tmp_path / "out").exists()
  with pytest.raises(SystemExit) as exit_info:
    predict.main(["--workdir", str(run.workdir), "--output", "x"])
  assert exit_info.value.code == 2  # --input or --channels is required


def test_channel_names_come_from_the_checkpoint(run, monkeypatch):
  # The training dataset is not needed: the checkpoint names the channels.
  monkeypatch.setattr(predict, "_training_channel_names", lambda *a: None)
  predictor = predict.load_predictor(run.workdir)
  assert predictor.channel_names == ("T1", "T2", "FLAIR")


def test_training_dataset_not_found(run, monkeypatch):
  # A checkpoint without channel names whose training dataset is gone.
  monkeypatch.setattr(predict, "_training_channel_names", lambda *a: None)
  restore_meta = checkpoint.CheckpointManager.restore_meta
  monkeypatch.setattr(
      checkpoint.CheckpointManager, "restore_meta",
      lambda self, step: {k: v for k, v in restore_meta(self, step).items()
                          if k != "channel_names"})
  with pytest.raises(predict.PredictError,
                     match="cannot find the training dataset.*--channel-names"):
    predict.load_predictor(run.workdir)
  predictor = predict.load_predictor(run.workdir,
                                     channel_names=("t1", "t2", "flair"))
  assert predictor.num_channels == 3


def test_help_lists_the_options(capsys):
  with pytest.raises(SystemExit) as exit_info:
    predict.main(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for option in ("--workdir", "--checkpoint", "--input", "--channels",
                 "--case-id", "--output", "--threshold",
                 "--save-probabilities", "--window", "--overlap",
                 "--batch-size", "--mirror"):
    assert option in out


def _predict_cli(workdir, root, out, *extra):
  """Runs the CLI on imagesTs/ with probabilities; returns its stdout."""
  out_stream = io.StringIO()
  with contextlib.redirect_stdout(out_stream):
    status = predict.main(["--workdir", str(workdir), "--input", str(root),
                           "--output", str(out), "--save-probabilities",
                           "--no-progress", *extra])
  assert status == 0
  return out_stream.getvalue()


def test_threshold_chosen_uses_the_stored_one_and_a_number_overrides(
    run, validated_run, tmp_path, monkeypatch):
  summary = validated_run.summary
  point = summary.operating_point
  assert (f"Operating point of step {summary.best_step}: {point.describe()}"
          in validated_run.err)
  for checkpoint_name in ("best", "latest"):
    manager = checkpoint.CheckpointManager(
        validated_run.workdir / "checkpoints", async_save=False,
        best_metric=None)
    predictor = predict.load_predictor(validated_run.workdir,
                                       checkpoint_name, threshold="chosen")
    stored = manager.restore_meta(predictor.step)["operating_point"]
    manager.close()
    assert predictor.threshold == stored["threshold"]
  # The CLI (best checkpoint) writes masks at the stored threshold ...
  stored_out = tmp_path / "stored"
  line = _predict_cli(validated_run.workdir, run.root, stored_out,
                      "--threshold", "chosen")
  assert (f"at threshold {point.threshold:g} (chosen on 1 validation case "
          f"at step {summary.best_step}, f2 ") in line
  probs = {c: _mask(stored_out / f"{c}_prob.nii.gz") for c in TEST_CASES}
  for case_id in TEST_CASES:
    np.testing.assert_array_equal(
        _mask(stored_out / f"{case_id}.nii.gz"),
        (probs[case_id] >= np.float32(point.threshold)).astype(np.uint8))
  # ... and --threshold overrides it: a grid threshold whose masks differ.
  every = np.concatenate([p.ravel() for p in probs.values()])
  other = next(t for t in operating_point.GRID
               if np.any((every >= np.float32(t))
                         != (every >= np.float32(point.threshold))))
  given_out = tmp_path / "given"
  line = _predict_cli(validated_run.workdir, run.root, given_out,
                      "--threshold", str(other))
  assert f"at threshold {other:g} (given)" in line
  masks = [_mask(given_out / f"{c}.nii.gz") for c in TEST_CASES]
  for case_id, mask in zip(TEST_CASES, masks):
    np.testing.assert_array_equal(
        mask, (probs[case_id] >= np.float32(other)).astype(np.uint8))
  assert any(np.any(mask != _mask(stored_out / f"{c}.nii.gz"))
             for c, mask in zip(TEST_CASES, masks))
  # Whatever threshold the tiny run chose, the stored one is used.
  restore_meta = checkpoint.CheckpointManager.restore_meta
  monkeypatch.setattr(
      checkpoint.CheckpointManager, "restore_meta",
      lambda self, step: dict(restore_meta(self, step), operating_point=dict(
          point.to_dict(), threshold=other)))
  assert predict.load_predictor(validated_run.workdir,
                                threshold="chosen").threshold == other


def test_by_default_predict_uses_the_config_threshold(
    run, validated_run, tmp_path, monkeypatch):
  # The chosen threshold is opt-in: a validated run predicts at 0.5 too.
  assert predict.load_predictor(validated_run.workdir).threshold == 0.5
  line = _predict_cli(run.workdir, run.root, tmp_path / "plain")
  assert "at threshold 0.5 (the config's inference.threshold)" in line
  for case_id in TEST_CASES:
    np.testing.assert_array_equal(
        _mask(tmp_path / "plain" / f"{case_id}.nii.gz"),
        (_mask(tmp_path / "plain" / f"{case_id}_prob.nii.gz") >= 0.5
         ).astype(np.uint8))
  # A validated run whose checkpoints lack it, as before this change.
  restore_meta = checkpoint.CheckpointManager.restore_meta
  monkeypatch.setattr(
      checkpoint.CheckpointManager, "restore_meta",
      lambda self, step: {k: v for k, v in restore_meta(self, step).items()
                          if k != "operating_point"})
  predictor = predict.load_predictor(validated_run.workdir)
  assert predictor.threshold == 0.5
  assert predictor.describe_threshold() == (
      "threshold 0.5 (the config's inference.threshold)")
  with pytest.raises(predict.PredictError,
                     match=r"^--threshold chosen: the checkpoint of step \d+ "
                     "stores no operating point"):
    predict.load_predictor(validated_run.workdir, threshold="chosen")


def test_threshold_flag_takes_a_number_or_chosen():
  assert predict._threshold_arg("0.3") == 0.3
  assert predict._threshold_arg("chosen") == "chosen"
  with pytest.raises(argparse.ArgumentTypeError,
                     match="expected a number or 'chosen', got 'best'"):
    predict._threshold_arg("best")
