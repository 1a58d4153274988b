"""A catalogue of bad inputs a user can give, walked through the real CLIs.

Each one must end with a non-zero exit status, no traceback, and a message
that names the file, case, flag or config key at fault. train.py runs as a
subprocess (several at once: starting JAX dominates); the other commands are
called through their ``main(argv)``, which is what their console scripts run.
"""

import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import ROOT, subprocess_env, tiny_train_flags
from tversky_jax import evaluate
from tversky_jax import plot_run
from tversky_jax import predict



def _copy(dataset, tmp_path, name):
  target = tmp_path / name
  shutil.copytree(dataset, target)
  return target


def _rewrite(path, change):
  image = nib.load(path)
  data = change(np.asarray(image.dataobj).copy())
  nib.save(nib.Nifti1Image(data, image.affine, image.header), path)


def _train_cases(tiny_dataset, tmp_path):
  """(name, python arguments, text the message must contain)."""
  broken = _copy(tiny_dataset, tmp_path, "broken")  # every problem at once
  _rewrite(broken / "imagesTr" / "case_001_0001.nii.gz", np.zeros_like)
  _rewrite(broken / "labelsTr" / "case_002.nii.gz",
           lambda x: np.where(x > 0, 7, x).astype(x.dtype))
  (broken / "labelsTr" / "case_000.nii.gz").unlink()
  bad_json = _copy(tiny_dataset, tmp_path, "bad_json")
  (bad_json / "dataset.json").write_text("{not json")
  junk = tmp_path / "junk_run"
  (junk / "checkpoints" / "2").mkdir(parents=True)
  (junk / "checkpoints" / "2" / "state").write_text("junk")
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  run = str(tmp_path / "run")

  def flags(root=tiny_dataset, workdir=run, **overrides):
    return ["train.py"] + tiny_train_flags(root, workdir, **overrides)

  sweep_config = tmp_path / "sweep_config.py"
  sweep_config.write_text("x = 1\n")
  sweep = ["-m", "tversky_jax.experiments.sweep", f"--workdir={tmp_path}"]

  return [
      ("unknown key", flags(**{"loss.betta": 0.7}), "--config.loss.betta"),
      ("unknown key, default config", ["train.py", "--config.loss.betta=1"],
       "--config.loss.betta"),
      ("bad value type", flags(**{"loss.beta": "abc"}), "--config.loss.beta"),
      ("negative beta", flags(**{"loss.beta": -1}), "config.loss.beta=-1"),
      ("missing config file", ["train.py", "--config", "configs/nothere.py"],
       "configs/nothere.py"),
      ("unknown flag", flags() + ["--bogus"], "bogus"),
      ("missing dataset", flags(root=tmp_path / "nowhere"),
       "config.data.root"),
      ("blank scan", flags(root=broken), "imagesTr/case_001_0001.nii.gz"),
      ("label value", flags(root=broken), "labelsTr/case_002.nii.gz"),
      ("missing label", flags(root=broken), "labelsTr/case_000.nii.gz"),
      ("broken dataset.json", flags(root=bad_json), "dataset.json"),
      ("unreadable checkpoints", flags(workdir=junk),
       os.path.join("junk_run", "checkpoints")),
      ("workdir is a file", flags(workdir=a_file), "a_file"),
      ("sweep: config without get_config",
       sweep + ["--config", str(sweep_config)], "get_config"),
      ("sweep: unknown key", sweep + ["--config.sweep.sedes=2"],
       "--config.sweep.sedes"),
      ("sweep: one fold", sweep + ["--config.sweep.num_folds=1"],
       "config.sweep.num_folds=1"),
  ]


def test_train_py_and_sweep_bad_inputs(tiny_dataset, tmp_path):
  cases = _train_cases(tiny_dataset, tmp_path)
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
  assert len(cases) >= 14
  for name, args, expected in cases:
    code, output = outputs[tuple(args)]
    assert code != 0, (name, output[-2000:])
    assert "Traceback" not in output, (name, output[-3000:])
    error_lines = [l for l in output.splitlines() if l.startswith("error:")]
    assert error_lines, (name, output[-2000:])
    assert expected in output[output.index(error_lines[0]):], (
        name, expected, output[-2000:])


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
