"""A catalogue of bad inputs a user can give, walked through the real CLIs.

Each one must end with a non-zero exit status, no traceback, and a message
that names the file, case, flag or config key at fault. train.py runs as a
subprocess (several at once: starting JAX dominates) for the errors of its
flags and config, one dataset error and one sweep error; what the trainer
finds in the data and the workdir is checked in-process (it raises one of
``train_lib.USER_ERRORS``, which train.py prints as one line); the other
commands are called through their ``main(argv)``, which is what their
console scripts run.
"""

import os
import shutil
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from tests.helpers import ROOT, subprocess_env, tiny_config, tiny_train_flags
from tversky_jax import evaluate
from tversky_jax import plot_run
from tversky_jax import predict
from tversky_jax import train_lib



def _copy(dataset, tmp_path, name):
  target = tmp_path / name
  shutil.copytree(dataset, target)
  return target


def _rewrite(path, change):
  image = nib.load(path)
  data = change(np.asarray(image.dataobj).copy())
  nib.save(nib.Nifti1Image(data, image.affine, image.header), path)


def _broken_dataset(tiny_dataset, tmp_path):
  """A copy of the tiny dataset with a blank scan, a label value of 7 and a
  missing label: every problem must be named at once."""
  broken = _copy(tiny_dataset, tmp_path, "broken")
  _rewrite(broken / "imagesTr" / "case_001_0001.nii.gz", np.zeros_like)
  _rewrite(broken / "labelsTr" / "case_002.nii.gz",
           lambda x: np.where(x > 0, 7, x).astype(x.dtype))
  (broken / "labelsTr" / "case_000.nii.gz").unlink()
  return broken


def _command_cases(tiny_dataset, tmp_path):
  """(name, python arguments, text the message must contain): what fails
  while the flags and the config are read, before the trainer is imported,
  and one dataset error and one sweep error, through the real commands."""
  broken = _broken_dataset(tiny_dataset, tmp_path)
  no_get_config = tmp_path / "no_get_config.py"
  no_get_config.write_text("x = 1\n")
  run = str(tmp_path / "run")

  def flags(root=tiny_dataset, **overrides):
    return ["train.py"] + tiny_train_flags(root, run, **overrides)

  sweep = ["-m", "tversky_jax.experiments.sweep", f"--workdir={tmp_path}"]
  # The sweep's command with a run that gets stuck (a stand-in for
  # run_sweep): it must print the one line, not a traceback.
  stuck_sweep = ["-c", (
      "import sys\n"
      "from tversky_jax import train_lib\n"
      "from tversky_jax.experiments import sweep\n"
      "def stuck(*args, **kwargs):\n"
      "  raise train_lib.TrainingStuck('training is stuck at step 3')\n"
      "sweep.run_sweep = stuck\n"
      "sweep.cli(['sweep'] + sys.argv[1:])\n"), f"--workdir={tmp_path}"]
  return [
      ("unknown key", flags(**{"loss.betta": 0.7}), "--config.loss.betta"),
      ("unknown key, default config", ["train.py", "--config.loss.betta=1"],
       "--config.loss.betta"),
      ("bad value type", flags(**{"loss.beta": "abc"}), "--config.loss.beta"),
      ("negative beta", flags(**{"loss.beta": -1}),
       "error: config.loss.beta=-1.0: beta (false-negative weight) must be "
       ">= 0."),
      ("missing config file", ["train.py", "--config", "configs/nothere.py"],
       "configs/nothere.py"),
      ("config without get_config", ["train.py", "--config",
                                     str(no_get_config)], "get_config"),
      ("unknown flag", flags() + ["--bogus"], "bogus"),
      ("blank scan", flags(root=broken), "imagesTr/case_001_0001.nii.gz"),
      ("label value", flags(root=broken), "labelsTr/case_002.nii.gz"),
      ("missing label", flags(root=broken), "labelsTr/case_000.nii.gz"),
      ("sweep: one fold", sweep + ["--config.sweep.num_folds=1"],
       "config.sweep.num_folds=1"),
      ("sweep: a stuck run", stuck_sweep, "training is stuck at step 3"),
  ]


def test_train_py_and_sweep_bad_inputs(tiny_dataset, tmp_path):
  cases = _command_cases(tiny_dataset, tmp_path)
  env = subprocess_env(4)
  commands = list(dict.fromkeys(tuple(args) for _, args, _ in cases))
  outputs = {}
  for start in range(0, len(commands), 2):  # two at a time: two cores
    running = [(args, subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
               for args in commands[start:start + 2]]
    for args, process in running:
      out, err = process.communicate(timeout=300)
      outputs[args] = (process.returncode, out + err)
  for name, args, expected in cases:
    code, output = outputs[tuple(args)]
    assert code != 0, (name, output[-2000:])
    assert "Traceback" not in output, (name, output[-3000:])
    error_lines = [l for l in output.splitlines() if l.startswith("error:")]
    assert error_lines, (name, output[-2000:])
    assert expected in output[output.index(error_lines[0]):], (
        name, expected, output[-2000:])


def _run_cases(tiny_dataset, tmp_path):
  """(name, config, workdir, text the message must contain): what
  ``train_and_evaluate`` finds in the data and the workdir."""
  bad_json = _copy(tiny_dataset, tmp_path, "bad_json")
  (bad_json / "dataset.json").write_text("{not json")
  junk = tmp_path / "junk_run"
  (junk / "checkpoints" / "2").mkdir(parents=True)
  (junk / "checkpoints" / "2" / "state").write_text("junk")
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  run = tmp_path / "run"
  return [
      ("missing dataset", tiny_config(tmp_path / "nowhere"), run,
       "config.data.root"),
      ("broken dataset.json", tiny_config(bad_json), run, "dataset.json"),
      ("unreadable checkpoints", tiny_config(tiny_dataset), junk,
       os.path.join("junk_run", "checkpoints")),
      ("workdir is a file", tiny_config(tiny_dataset), a_file, "a_file"),
  ]


def test_training_bad_data_and_workdirs(tiny_dataset, tmp_path):
  """Raised as one of ``train_lib.USER_ERRORS``, which train.py and the
  sweep print as one "error:" line (the test above checks one of them
  through train.py) with a message that names what is wrong."""
  for name, config, workdir, expected in _run_cases(tiny_dataset, tmp_path):
    with pytest.raises(train_lib.USER_ERRORS) as raised:
      train_lib.train_and_evaluate(config, str(workdir),
                                   devices=jax.devices()[:1], progress=False)
    message = str(raised.value)
    assert expected in message and "\n" not in message, (name, message)


@pytest.fixture
def folders(tmp_path):
  """A reference folder of two 12^3 cases and matching predictions."""
  labels, preds = tmp_path / "labels", tmp_path / "preds"
  labels.mkdir()
  preds.mkdir()
  for case in ("a", "b"):
    label = np.zeros((12, 12, 12), np.uint8)
    label[3:6, 3:6, 3:6] = 1
    nib.save(nib.Nifti1Image(label, np.eye(4)), labels / f"{case}.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), preds / f"{case}.nii.gz")
  return labels, preds


def _run_main(main, argv, capsys):
  try:
    code = main(argv)
  except SystemExit as stop:
    code = stop.code
  return code, "".join(capsys.readouterr())


def _other_cases(tmp_path, folders):
  labels, preds = folders
  shifted = tmp_path / "shifted"
  shutil.copytree(preds, shifted)
  nib.save(nib.Nifti1Image(np.zeros((12, 12, 12), np.uint8), np.diag(
      [2.0, 1, 1, 1])), shifted / "a.nii.gz")
  corrupt = tmp_path / "corrupt"
  shutil.copytree(preds, corrupt)
  (corrupt / "b.nii.gz").write_bytes(b"this is not gzip")
  missing = tmp_path / "missing"
  shutil.copytree(preds, missing)
  (missing / "b.nii.gz").unlink()
  empty = tmp_path / "empty"
  empty.mkdir()
  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  junk = tmp_path / "junk_run"
  (junk / "checkpoints" / "2").mkdir(parents=True)
  bad_metrics = tmp_path / "bad_metrics"
  bad_metrics.mkdir()
  (bad_metrics / "metrics.jsonl").write_text("")
  out = str(tmp_path / "out")
  ev = lambda p, l=labels: ["--predictions", str(p), "--labels", str(l),
                            "--no-progress", "--output", out]
  pr = lambda w, i=empty: ["--workdir", str(w), "--input", str(i),
                           "--output", out, "--no-progress"]
  return [
      (evaluate.main, ev(tmp_path / "nowhere"), "nowhere"),
      (evaluate.main, ev(preds, tmp_path / "nolabels"), "nolabels"),
      (evaluate.main, ev(shifted), "a"),
      (evaluate.main, ev(corrupt), "b.nii.gz"),
      (evaluate.main, ev(missing), "b"),
      (evaluate.main, ev(empty), "empty"),
      (evaluate.main, ev(preds) + ["--report", str(tmp_path / "r.html"),
                                   "--images", str(tmp_path / "noimages")],
       "noimages"),
      (predict.main, pr(tmp_path / "nowhere"), "nowhere"),
      (predict.main, pr(no_ckpt), "no_ckpt"),
      (predict.main, pr(junk), os.path.join("junk_run", "checkpoints")),
      (plot_run.main, [str(bad_metrics)], "metrics.jsonl"),
      (plot_run.main, [str(tmp_path / "norun")], "norun"),
  ]


def test_predict_evaluate_and_plot_bad_inputs(tmp_path, folders,
                                                    capsys):
  for main, argv, expected in _other_cases(tmp_path, folders):
    code, output = _run_main(main, argv, capsys)
    name = f"{main.__module__} {argv}"
    assert code not in (0, None), (name, output)
    assert "Traceback" not in output, (name, output)
    assert "error" in output, (name, output)
    assert expected in output, (name, expected, output)
