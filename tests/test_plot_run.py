"""Tests of tversky_jax.plot_run on hand-written metrics.jsonl files."""

import json

import numpy as np
import pytest
from PIL import Image

from tversky_jax import plot_run


def _write_run(workdir, records, tail=""):
  workdir.mkdir(parents=True)
  lines = [json.dumps(r) for r in records]
  (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
  return workdir


def _train(steps, loss0):
  return [{"step": s, "train/loss": loss0 / s, "train/grad_norm": 1.0,
           "train/learning_rate": 1e-3 * min(1.0, s / 20)} for s in steps]


def _val(steps):
  return [{"step": s, "val/dsc": s / 200, "val/apr": s / 250,
           "val/pooled_dsc": s / 180} for s in steps]


def test_two_runs_write_a_png(tmp_path):
  with_val = _write_run(tmp_path / "alpha03",
                        _train(range(10, 101, 10), 2.0) + _val([50, 100]))
  # No validation lines; a half-written last line (a run still writing).
  without_val = _write_run(tmp_path / "alpha07", _train(range(5, 81, 5), 3.0),
                           tail='{"step": 85, "train/lo')
  out = plot_run.plot_curves([with_val, without_val], tmp_path / "c" / "x.png")
  assert out == tmp_path / "c" / "x.png"
  image = np.asarray(Image.open(out))
  assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 800
  assert image[..., :3].std() > 10  # not blank


def test_a_run_without_validation_alone(tmp_path):
  run = _write_run(tmp_path / "run", _train(range(1, 4), 1.0))
  assert plot_run.main([str(run)]) == 0
  assert Image.open(run / "curves.png").format == "PNG"


def test_read_metrics_sorts_and_keeps_the_last_of_a_repeated_step(tmp_path):
  run = _write_run(tmp_path / "run", [
      {"step": 20, "train/loss": 0.5}, {"step": 10, "train/loss": 0.9},
      {"step": 20, "train/loss": 0.4, "val/dsc": 0.3},  # resumed run
      {"step": 30, "train/loss": float("nan")}])
  curves = plot_run.read_metrics(run)
  np.testing.assert_array_equal(curves["train/loss"][0], [10, 20])
  np.testing.assert_array_equal(curves["train/loss"][1], [0.9, 0.4])
  np.testing.assert_array_equal(curves["val/dsc"][0], [20])


def test_running_mean():
  np.testing.assert_allclose(plot_run.running_mean([1, 3, 5, 7], window=2),
                             [1, 2, 4, 6])


def test_run_labels_are_workdir_names_unless_equal():
  assert plot_run.run_labels(["runs/a/", "runs/b"]) == ["a", "b"]
  assert plot_run.run_labels(["x/run", "y/run"]) == ["x/run", "y/run"]


@pytest.mark.parametrize("content", [None, "", "\n\n", "not json\n{}\n"])
def test_missing_empty_or_broken_metrics_are_one_line_errors(
    tmp_path, capsys, content):
  run = tmp_path / "run"
  run.mkdir()
  if content is not None:
    (run / "metrics.jsonl").write_text(content)
  with pytest.raises(plot_run.RunError, match="metrics.jsonl"):
    plot_run.plot_curves([run], tmp_path / "c.png")
  good = _write_run(tmp_path / "good", _train([1, 2], 1.0))
  assert plot_run.main([str(good), str(run), "--out",
                        str(tmp_path / "c.png")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert str(run / "metrics.jsonl") in err
  assert not (tmp_path / "c.png").exists()
