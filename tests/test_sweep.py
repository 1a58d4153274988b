"""The alpha/beta replication sweep: a miniature sweep end to end, resume,
the report's arithmetic and the command line."""

import base64
import csv
import html.parser
import io
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import sweep as sweep_config
from tests.tiny_config import override
from tversky_jax import configuration
from tversky_jax import predict
from tversky_jax import report as report_lib
from tversky_jax import train_lib
from tversky_jax.experiments import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A miniature sweep: 2 settings x 1 seed x 2 folds of 2 steps on four 24^3
# phantoms written by the sweep itself (data.root = "").
TINY = {
    "data.synthetic_cases": 4,
    "data.synthetic_shape": (24, 24, 24),
    "data.patch_shape": (16, 16, 16),
    "model.base_features": 4,
    "model.depth": 2,
    # XLA compiles the native 3D convolution faster than the CPU default
    # (2d_sum); at 2 steps a run is mostly compilation.
    "model.conv_impl": "native",
    "train.batch_size": 4,
    "train.num_steps": 2,
    "train.log_every": 1,
    "inference.window": (16, 16, 16),
    "inference.batch_size": 4,
    "sweep.settings": ((0.5, 0.5), (0.2, 0.8)),
    "sweep.seeds": 1,
    "sweep.num_folds": 2,
    "sweep.compilation_cache": "",
}


def tiny_config(**changes):
  return override(sweep_config.get_config(), **{**TINY, **changes})


def cli_flags(workdir, **changes):
  return (["--config", "configs/sweep.py", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in {**TINY, **changes}.items()])


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  lines = []
  # One device: compiling for the four simulated ones costs more than the
  # whole miniature training (the multi-device step has its own tests).
  report = sweep.run_sweep(tiny_config(), workdir, devices=jax.devices()[:1],
                           log=lines.append)
  return workdir, report, lines


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_run_config_changes_only_the_run_keys():
  config = sweep_config.get_config()
  run = sweep.Run(alpha=0.2, beta=0.8, seed=7, fold=1)
  cfg = sweep.run_config(config, run, "/data/x")
  assert "sweep" not in cfg
  # The seed of a run sets model init and data order together.
  assert (cfg.seed, cfg.loss.alpha, cfg.loss.beta) == (7, 0.2, 0.8)
  assert (cfg.data.num_folds, cfg.data.fold, cfg.data.root) == (2, 1, "/data/x")
  assert cfg.train.eval_every == 0
  base = json.loads(json.dumps(config.to_dict()))  # as result.json holds it
  del base["sweep"]
  changed = sweep._config_differences(base, cfg)  # pylint: disable=protected-access
  assert changed == ["data.fold", "data.num_folds",
                     "data.synthesize_if_missing", "loss.alpha", "loss.beta",
                     "seed"]
  configuration.validate_config(cfg, num_devices=1)


def test_runs_of_the_default_config():
  runs = sweep.runs_of(sweep_config.get_config())
  assert len(runs) == 5 * 2 * 2
  assert runs[0] == sweep.Run(0.5, 0.5, 0, 0)
  assert runs[-1] == sweep.Run(0.1, 0.9, 1, 1)
  assert runs[0].relpath() == os.path.join("a0.5_b0.5", "seed0", "fold0")
  with pytest.raises(sweep.SweepError, match="num_folds"):
    sweep.runs_of(tiny_config(**{"sweep.num_folds": 1}))
  with pytest.raises(sweep.SweepError, match="repeated"):
    sweep.runs_of(tiny_config(**{"sweep.settings": ((0.3, 0.7), (0.3, 0.7))}))


def test_miniature_sweep_writes_table_csv_and_plot(finished_sweep):
  workdir, report, lines = finished_sweep
  assert len(report["results"]) == 4 and not report["missing"]
  assert len([l for l in lines if l.startswith("[")]) == 4
  assert os.path.isdir(os.path.join(workdir, sweep.DEFAULT_PHANTOMS))

  rows = read_csv(os.path.join(workdir, "results.csv"))
  assert list(rows[0]) == list(sweep.CSV_COLUMNS)
  assert len(rows) == 2 * 1 * 4  # settings x seeds x cases
  for alpha, beta in ((0.5, 0.5), (0.2, 0.8)):
    mine = [r for r in rows if (float(r["alpha"]), float(r["beta"])) == (alpha, beta)]
    # Every case held out exactly once per seed, by the fold i % 2.
    assert sorted(r["case"] for r in mine) == [f"case_{i:03d}" for i in range(4)]
    for r in mine:
      assert int(r["fold"]) == int(r["case"][-3:]) % 2
      assert int(r["seed"]) == 0
      tp, fp, fn, tn = (int(r[k]) for k in ("tp", "fp", "fn", "tn"))
      assert tp + fp + fn + tn == 24 ** 3
      assert tp + fn > 0  # every phantom has lesions
      assert math.isclose(float(r["dsc"]), 2 * tp / (2 * tp + fp + fn)
                          if 2 * tp + fp + fn else 1.0, rel_tol=1e-5)
      for key in ("dsc", "sensitivity", "specificity", "f2", "apr"):
        assert 0.0 <= float(r[key]) <= 1.0

  # The table's means are the means of the CSV rows.
  markdown = open(os.path.join(workdir, "results.md")).read()
  assert markdown == report["markdown"]
  table = markdown.split("## Held-out cases")[1].split("## Spread")[0]
  for alpha, beta in ((0.5, 0.5), (0.2, 0.8)):
    line = next(l for l in table.splitlines()
                if l.startswith(f"| {alpha:g} | {beta:g} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    mine = [r for r in rows if (float(r["alpha"]), float(r["beta"])) == (alpha, beta)]
    for cell, key in zip(cells[2:], ("dsc", "sensitivity", "specificity",
                                     "f2", "apr")):
      mean = np.mean([float(r[key]) for r in mine])
      digits = 3 if key == "specificity" else 2
      assert cell.split(" ± ")[0] == f"{100 * mean:.{digits}f}"
  assert "## Spread over seeds" in markdown
  assert "## Paired difference to alpha=0.5, beta=0.5" in markdown

  png = os.path.join(workdir, "pr_curves.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  assert matplotlib.image.imread(png).shape[:2] == (660, 840)

  for run in sweep.runs_of(tiny_config()):
    run_dir = os.path.join(workdir, run.relpath())
    result = sweep.load_result(run_dir)
    assert result["step"] == 2
    assert result["config"]["loss"]["beta"] == run.beta
    assert result["config"]["train"]["eval_every"] == 0
    with np.load(os.path.join(run_dir, sweep.HELDOUT_FILE)) as held:
      assert sorted(held["case_ids"]) == sorted(result["held_out"])


class _Page(html.parser.HTMLParser):
  """The figure ids and the (alt, src) of the images of a page."""

  def __init__(self):
    super().__init__()
    self.figures, self.images, self.external = [], [], 0

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "figure":
      self.figures.append(attrs["id"])
    elif tag == "img":
      self.images.append((attrs["alt"], attrs["src"]))
    elif tag in ("script", "link"):
      self.external += 1


def _png(src):
  prefix = "data:image/png;base64,"
  assert src.startswith(prefix)
  return base64.b64decode(src[len(prefix):], validate=True)


def _reference_pixels(montage, panel_px):
  """Pixels of the top (largest reference lesion) row in TP or FN colour."""
  row = montage[:panel_px]
  return (np.all(row == report_lib.TP_COLOUR, -1)
          | np.all(row == report_lib.FN_COLOUR, -1))


def test_html_report_shows_one_case_under_every_setting(finished_sweep):
  workdir, report, _ = finished_sweep
  assert report["paths"]["html"] == os.path.join(workdir, "results.html")
  page = open(report["paths"]["html"], encoding="utf-8").read()
  parser = _Page()
  parser.feed(page)
  assert parser.external == 0 and "://" not in page  # opens offline
  # Table 1 and the other sections of results.md are on the page.
  for heading in ("Held-out cases", "Spread over seeds", "Paired difference",
                  "Lesion-wise detection", "The paper's claims"):
    assert f"<h2>{heading}" in page
  assert "<td>0.2</td><td>0.8</td>" in page
  # The PR curves: pr_curves.png itself.
  alts = [alt for alt, _ in parser.images]
  assert alts[0] == "precision-recall curves"
  with open(os.path.join(workdir, "pr_curves.png"), "rb") as f:
    assert _png(parser.images[0][1]) == f.read()
  # One overlay per setting, in the sweep's order, all of the same case: of
  # seed 0, the held-out case with the most lesion voxels.
  rows = [r for r in read_csv(os.path.join(workdir, "results.csv"))
          if (float(r["alpha"]), float(r["beta"])) == (0.5, 0.5)]
  load = {r["case"]: int(r["tp"]) + int(r["fn"]) for r in rows}
  case = max(sorted(load), key=load.get)
  assert parser.figures == ["overlay-a0.5_b0.5", "overlay-a0.2_b0.8"]
  assert alts[1:] == [f"overlay of {case}, alpha=0.5, beta=0.5",
                      f"overlay of {case}, alpha=0.2, beta=0.8"]
  overlays = report["overlays"]
  assert [(o.alpha, o.beta, o.case) for o in overlays] == [
      (0.5, 0.5, case), (0.2, 0.8, case)]
  assert len({(o.seed, o.fold) for o in overlays}) == 1
  assert all(o.has_image for o in overlays)  # on the phantom's scan
  px = sweep.OVERLAY_PANEL_PX
  grid = px + report_lib.GAP_PX
  montages = []
  for _, src in parser.images[1:]:
    montage = np.asarray(Image.open(io.BytesIO(_png(src))).convert("RGB"))
    assert montage.shape == (2 * grid - report_lib.GAP_PX,
                             4 * grid - report_lib.GAP_PX, 3)
    montages.append(montage)
  # Same case, same cut: the reference (TP or FN) pixels of the top row are
  # the same under every setting; only the prediction differs.
  first = _reference_pixels(montages[0], px)
  assert first.sum() > 0
  for montage in montages[1:]:
    np.testing.assert_array_equal(_reference_pixels(montage, px), first)


def test_resume_skips_finished_runs(finished_sweep, monkeypatch):
  workdir, report, _ = finished_sweep
  before = {name: open(os.path.join(workdir, name), "rb").read()
            for name in ("results.md", "results.csv", "results.html")}

  def must_not_run(*args, **kwargs):
    raise AssertionError("a finished run was trained or predicted again")

  monkeypatch.setattr(train_lib, "train_and_evaluate", must_not_run)
  monkeypatch.setattr(predict, "load_predictor", must_not_run)
  lines = []
  again = sweep.run_sweep(tiny_config(), workdir, devices=jax.devices()[:1],
                          log=lines.append)
  assert len(again["results"]) == 4
  assert sum("finished before, skipped" in l for l in lines) == 4
  for name, content in before.items():
    assert open(os.path.join(workdir, name), "rb").read() == content


def test_resume_redoes_only_an_unfinished_run(finished_sweep, monkeypatch):
  workdir, _, _ = finished_sweep
  run = sweep.runs_of(tiny_config())[3]
  run_dir = os.path.join(workdir, run.relpath())
  old = sweep.load_result(run_dir)
  os.remove(os.path.join(run_dir, sweep.RESULT_FILE))
  calls = []
  original = train_lib.train_and_evaluate

  def counting(config, workdir, **kwargs):
    calls.append((config.loss.alpha, config.seed, config.data.fold))
    return original(config, workdir, **kwargs)

  monkeypatch.setattr(train_lib, "train_and_evaluate", counting)
  sweep.run_sweep(tiny_config(), workdir, devices=jax.devices()[:1],
                  log=lambda _: None)
  assert calls == [(run.alpha, run.seed, run.fold)]
  new = sweep.load_result(run_dir)
  # Its training had finished: it resumed at the last step and the same
  # checkpoint gives the same held-out metrics.
  assert new["step"] == old["step"] == 2
  for a, b in zip(old["cases"], new["cases"]):
    assert a["case"] == b["case"]
    assert (a["tp"], a["fp"], a["fn"]) == (b["tp"], b["fp"], b["fn"])


def test_finished_run_with_another_config_is_an_error(finished_sweep):
  workdir, _, _ = finished_sweep
  with pytest.raises(sweep.SweepError, match="train.num_steps"):
    sweep.run_sweep(tiny_config(**{"train.num_steps": 3}), workdir,
                    log=lambda _: None)


def test_report_arithmetic_on_made_up_results(tmp_path):
  def record(alpha, beta, seed, dscs, tp=1):
    cases = []
    for i, dsc in enumerate(dscs):
      cases.append({"case": f"c{i}", "dsc": dsc, "sensitivity": dsc,
                    "specificity": 1.0, "precision": 1.0, "f2": dsc,
                    "apr": dsc, "lesion_precision": 1.0, "lesion_recall": 1.0,
                    "lesion_f1": 1.0, "tp": tp, "fp": 0, "fn": i, "tn": 9,
                    "ref_lesions": 1, "pred_lesions": 1,
                    "detected_lesions": 1, "missed_lesions": 0,
                    "fp_lesions": 0})
    return {"alpha": alpha, "beta": beta, "seed": seed, "fold": 0,
            "cases": cases}

  results = [record(0.5, 0.5, 0, [0.2, 0.4], tp=0),
             record(0.5, 0.5, 1, [0.4, 0.6]),
             record(0.3, 0.7, 0, [0.5, 0.5]), record(0.3, 0.7, 1, [0.6, 0.8])]
  report = sweep.write_report(results, str(tmp_path),
                              order=[(0.5, 0.5), (0.3, 0.7)])
  md = report["markdown"]
  # (0.5, 0.5): rows 0.2 0.4 0.4 0.6: mean 40, sample std 16.33;
  # per-seed means 30 / 50, std over seeds 14.14.
  assert "| 0.5 | 0.5 | 40.00 ± 16.33 |" in md
  assert "| 0.5 | 0.5 | 30.0 / 50.0 (std 14.1) |" in md
  # (0.3, 0.7): seed means 50 / 70: paired differences +20 / +20.
  assert "| 0.3 | 0.7 | +20.00 / +20.00 |" in md
  assert "Sensitivity rises monotonically with beta: yes" in md
  assert "Best mean DSC: alpha=0.3, beta=0.7 (60.00)" in md
  # Seed 0 of (0.5, 0.5) found no lesion voxel: one failed run of two.
  assert md.count("| 1 of 2 |") == 1 and md.count("| 0 of 2 |") == 1
  assert report["paths"]["plot"] is None  # no held-out probabilities saved
  page = (tmp_path / "results.html").read_text()
  assert "| 0.5 | 0.5 |" not in page and "<td>40.00 ± 16.33</td>" in page
  assert "no overlays" in page and "<img" not in page
  assert len(read_csv(tmp_path / "results.csv")) == 8


def _run_cli(args):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run(
      [sys.executable, "-m", "tversky_jax.experiments.sweep", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_command_line_reports_finished_runs(finished_sweep):
  workdir, _, _ = finished_sweep
  done = _run_cli(cli_flags(workdir) + ["--report_only"])
  assert done.returncode == 0, done.stderr
  assert done.stdout.count("finished before, skipped") == 4
  assert "| 0.2 | 0.8 |" in done.stdout
  assert "Wrote" in done.stdout


def test_command_line_rejects_unknown_keys(tmp_path):
  done = _run_cli(["--config", "configs/sweep.py",
                   f"--workdir={tmp_path}", "--config.sweep.nope=1"])
  assert done.returncode != 0
  assert "nope" in done.stderr
  assert not os.listdir(tmp_path)
