"""The alpha/beta sweep of Table 1 of Salehi et al. (2017), with k-fold CV.

  python -m tversky_jax.experiments.sweep --config configs/sweep.py \
      --workdir runs/sweep [--config.sweep.seeds=3] [--report_only]

For every (alpha, beta) of ``config.sweep.settings``, every seed
``config.seed + i`` (``i < config.sweep.seeds``) and every fold
``f < config.sweep.num_folds`` it

1. trains the U-Net of ``config`` with ``loss.alpha, loss.beta = alpha, beta``,
   ``seed`` and ``data.num_folds, data.fold`` set, and nothing else changed,
   in ``<workdir>/a{alpha}_b{beta}/seed{seed}/fold{f}``
   (:func:`tversky_jax.train_lib.train_and_evaluate`; no validation during
   training, so the held-out fold never selects a checkpoint);
2. predicts the fold's held-out cases with the final checkpoint
   (:func:`tversky_jax.predict.load_predictor`, ``checkpoint="latest"``) and
   evaluates them per case (:func:`tversky_jax.evaluate.evaluate_case`: DSC,
   sensitivity, specificity, precision, F2 at ``inference.threshold``, APR
   of the probabilities, lesion-wise detection);
3. writes ``result.json`` (the per-case metrics and the run's config) and
   ``heldout.npz`` (the held-out probabilities and labels, for the pooled
   precision-recall curves) in the run's folder.

``result.json`` is written last and marks a finished run: running the same
command again skips finished runs (no training, no prediction) and resumes an
unfinished one from its checkpoint. A finished run whose config differs from
the current one is an error (use a new ``--workdir``).

A run's seed sets both the model initialisation and the training data order;
for a given seed and fold both are identical for every (alpha, beta), so the
settings are compared on paired runs. The dataset is fixed (phantoms from
``sweep.data_seed`` by default).

Finally it writes, in ``workdir``,

* ``results.md``: Table 1's layout (alpha, beta, DSC, sensitivity,
  specificity, F2, APR in %, mean +- std over the held-out cases of all seeds),
  the spread over seeds (std of the per-seed means), paired differences to the
  first setting per seed, and lesion-wise detection;
* ``results.csv``: one row per setting x seed x held-out case;
* ``pr_curves.png``: one precision-recall curve per (alpha, beta), pooled over
  every held-out voxel of every fold and seed, with the operating point at the
  threshold marked;
* ``results.html``: one self-contained page (opens offline, images
  embedded): Table 1, the precision-recall curves, and one held-out case
  (the one with the most lesion voxels, first seed) as predicted under every
  setting, as overlay montages of :mod:`tversky_jax.report` (true positives,
  false positives and false negatives in colour), then the other sections
  of ``results.md``;

and prints the table.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from tversky_jax import training_data
from tversky_jax import cli as cli_lib
from tversky_jax import evaluate
from tversky_jax import predict
from tversky_jax import report
from tversky_jax import train_lib
from tversky_jax.data import nifti
from tversky_jax.data import synthetic

RESULT_FILE = "result.json"
HELDOUT_FILE = "heldout.npz"
DEFAULT_PHANTOMS = "Dataset902_SweepPhantoms"
# Montage panels of results.html: two settings side by side in 1100 px.
OVERLAY_PANEL_PX = 112
TITLE = "Tversky loss: alpha/beta sweep (Table 1 of Salehi et al. 2017)"
# Table 1's metrics, in its order, and their column titles.
TABLE_METRICS = (("dsc", "DSC"), ("sensitivity", "Sensitivity"),
                 ("specificity", "Specificity"), ("f2", "F2"), ("apr", "APR"))
CSV_COLUMNS = ("alpha", "beta", "seed", "fold") + evaluate.COLUMNS


class SweepError(ValueError):
  """The sweep cannot run as configured; the message is one line."""


class SweepInterrupted(RuntimeError):
  """Training was stopped by a signal; the checkpoint is saved."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the sweep."""

  alpha: float
  beta: float
  seed: int
  fold: int

  @property
  def setting(self) -> tuple[float, float]:
    return (self.alpha, self.beta)

  def relpath(self) -> str:
    return os.path.join(setting_name(self.alpha, self.beta),
                        f"seed{self.seed}", f"fold{self.fold}")

  def label(self) -> str:
    return (f"alpha={self.alpha:g} beta={self.beta:g} seed {self.seed} "
            f"fold {self.fold}")


def setting_name(alpha: float, beta: float) -> str:
  """Folder name of a setting: ``a0.3_b0.7``."""
  return f"a{alpha:g}_b{beta:g}"


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def settings_of(config: ml_collections.ConfigDict
                ) -> list[tuple[float, float]]:
  """``config.sweep.settings`` as a list of (alpha, beta) floats, checked."""
  raw = config.sweep.settings
  try:
    settings = [(float(a), float(b)) for a, b in raw]
  except (TypeError, ValueError):
    raise SweepError(
        f"config.sweep.settings={raw!r}: expected (alpha, beta) pairs, e.g. "
        "'((0.5, 0.5), (0.3, 0.7))'") from None
  if not settings:
    raise SweepError("config.sweep.settings is empty")
  for a, b in settings:
    if not (a >= 0 and b >= 0 and a + b > 0):
      raise SweepError(f"config.sweep.settings: ({a}, {b}): alpha and beta "
                       "must be >= 0 with alpha + beta > 0")
  names = [setting_name(a, b) for a, b in settings]
  if len(set(names)) != len(names):
    raise SweepError(f"config.sweep.settings={raw!r}: a setting is repeated")
  return settings


def runs_of(config: ml_collections.ConfigDict) -> list[Run]:
  """Every run of the sweep, setting-major (then seed, then fold)."""
  sweep = config.sweep
  if sweep.seeds < 1:
    raise SweepError(f"config.sweep.seeds={sweep.seeds}: must be >= 1")
  if sweep.num_folds < 2:
    raise SweepError(f"config.sweep.num_folds={sweep.num_folds}: must be >= 2 "
                     "(k-fold cross-validation)")
  return [Run(a, b, config.seed + i, f) for a, b in settings_of(config)
          for i in range(sweep.seeds) for f in range(sweep.num_folds)]


def dataset_root(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The dataset folder: ``data.root``, or the phantoms under ``workdir``."""
  return config.data.root or os.path.join(workdir, DEFAULT_PHANTOMS)


def run_config(config: ml_collections.ConfigDict, run: Run,
               root: str) -> ml_collections.ConfigDict:
  """The training config of one run: ``config`` without ``sweep``, with the
  run's alpha, beta, seed and fold, no validation during training and the
  dataset at ``root``."""
  values = config.to_dict()
  values.pop("sweep", None)
  cfg = ml_collections.ConfigDict(values)
  cfg.seed = run.seed
  cfg.loss.alpha = run.alpha
  cfg.loss.beta = run.beta
  cfg.data.root = root
  cfg.data.synthesize_if_missing = False  # the sweep writes the phantoms
  cfg.data.num_folds = config.sweep.num_folds
  cfg.data.fold = run.fold
  cfg.data.num_val_cases = 0  # no validation: the whole fold trains
  cfg.train.eval_every = 0
  return cfg


def prepare_dataset(config: ml_collections.ConfigDict, workdir: str,
                    log=print) -> nifti.Dataset:
  """Reads the sweep's dataset, writing the phantoms first when missing.

  Raises:
    SweepError: no dataset and ``data.synthesize_if_missing`` is off, or
      existing phantoms were made with other settings than the config's.
  """
  root = dataset_root(config, workdir)
  data = config.data
  if not os.path.exists(root):
    if not data.synthesize_if_missing:
      raise SweepError(
          f"config.data.root={root!r}: no dataset there; point it at an "
          "nnU-Net-layout folder or set config.data.synthesize_if_missing=True")
    log(f"Writing {data.synthetic_cases} synthetic phantoms of "
        f"{tuple(data.synthetic_shape)} voxels to {root} ...")
    synthetic.make_synthetic_dataset(
        root, num_cases=data.synthetic_cases,
        shape=tuple(data.synthetic_shape), seed=config.sweep.data_seed)
  elif data.synthesize_if_missing and not config.data.root:
    _check_phantoms(root, config)
  dataset = nifti.read_dataset(root)
  nifti.validate_dataset(dataset, split="train")
  if len(dataset.training_cases) < config.sweep.num_folds:
    raise SweepError(
        f"config.sweep.num_folds={config.sweep.num_folds}: the dataset {root} "
        f"has only {len(dataset.training_cases)} training cases")
  return dataset


def _check_phantoms(root: str, config: ml_collections.ConfigDict) -> None:
  """Existing default phantoms must match the config they were made for."""
  try:
    meta = json.loads((Path(root) / "dataset.json").read_text())
  except (OSError, json.JSONDecodeError):
    return  # read_dataset reports it
  made = meta.get("synthetic") or {}
  want = {"seed": config.sweep.data_seed,
          "shape": list(config.data.synthetic_shape),
          "cases": config.data.synthetic_cases}
  have = {"seed": made.get("seed"), "shape": made.get("shape"),
          "cases": meta.get("numTraining")}
  if have != want:
    raise SweepError(
        f"the phantoms in {root} were made with {have}, the config asks for "
        f"{want}; use a new --workdir")


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _config_differences(old: dict[str, Any],
                        new: ml_collections.ConfigDict) -> list[str]:
  """Keys whose values differ (data.root is allowed to move)."""
  a = _flat(old)
  b = _flat(json.loads(json.dumps(new.to_dict())))
  keys = sorted((set(a) | set(b)) - {"data.root"})
  return [k for k in keys if a.get(k) != b.get(k)]


def load_result(run_dir: str) -> dict[str, Any] | None:
  """The finished run's ``result.json``, or None when it is not finished."""
  path = os.path.join(run_dir, RESULT_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json_atomic(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def execute_run(run: Run, cfg: ml_collections.ConfigDict, run_dir: str,
                dataset: nifti.Dataset,
                devices: Sequence[Any] | None = None) -> dict[str, Any]:
  """Trains, predicts the held-out fold, evaluates; writes the run's files.

  ``devices``: the JAX devices to train and predict on (default all).

  Returns:
    The content of ``result.json``.

  Raises:
    SweepInterrupted: training stopped on SIGINT/SIGTERM (checkpoint saved).
  """
  start = time.perf_counter()
  summary = train_lib.train_and_evaluate(cfg, run_dir, devices=devices,
                                         progress=False)
  if summary.interrupted:
    raise SweepInterrupted(
        f"{run.label()} stopped at step {summary.step}; the checkpoint is "
        "saved: run the same command again to resume.")
  trained = time.perf_counter()
  held_out = training_data.held_out_cases(dataset.training_cases, cfg)
  # The paper's rule, inference.threshold, even if a checkpoint had an
  # operating point chosen on validation cases.
  predictor = predict.load_predictor(run_dir, checkpoint="latest",
                                     channel_names=dataset.channel_names,
                                     devices=devices,
                                     threshold=cfg.inference.threshold)
  rows, probs, labels = [], {}, {}
  for case_id in held_out:
    # As tversky-predict does it: preprocessed as in training, the lesion
    # probability back on the scan's own grid.
    prob, _, _ = predictor.predict_files(dataset.image_paths(case_id))
    label = nifti.load_case(dataset, case_id).label
    result = evaluate.evaluate_case(predictor.predict_mask(prob), label,
                                    prob, case_id)
    rows.append(result.row())
    probs[case_id] = prob.astype(np.float32)
    labels[case_id] = (label != 0).astype(np.uint8)
  np.savez_compressed(
      os.path.join(run_dir, HELDOUT_FILE),
      case_ids=np.array(list(probs)),
      **{f"prob/{k}": v for k, v in probs.items()},
      **{f"label/{k}": v for k, v in labels.items()})
  done = time.perf_counter()
  record = {
      "alpha": run.alpha, "beta": run.beta, "seed": run.seed,
      "fold": run.fold, "step": int(predictor.step),
      "last_loss": float(summary.last_loss),
      "threshold": float(predictor.threshold),
      "held_out": list(held_out),
      "train_seconds": round(trained - start, 2),
      "eval_seconds": round(done - trained, 2),
      "cases": rows,
      "config": json.loads(json.dumps(cfg.to_dict())),
  }
  _write_json_atomic(os.path.join(run_dir, RESULT_FILE), record)
  return record


def _mean_of(rows: Sequence[dict[str, Any]], key: str) -> float:
  values = np.array([r[key] for r in rows], np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else math.nan


def run_sweep(config: ml_collections.ConfigDict, workdir: str, *,
              train: bool = True, devices: Sequence[Any] | None = None,
              log=print) -> dict[str, Any]:
  """Runs (or resumes) the sweep of ``config`` and writes the report.

  Args:
    config: ``configs/sweep.py`` keys.
    workdir: the sweep's folder (runs, report, default phantoms).
    train: False only reports the finished runs (``--report_only``).
    devices: the JAX devices every run trains and predicts on (default all).
    log: where progress lines go.

  Returns:
    ``{"results": [result.json of each finished run], "missing": [Run],
    "markdown": str, "paths": {...}, "overlays": [CaseOverlay], ...}``.

  Raises:
    SweepError: bad sweep settings, no dataset, or a finished run made with
      another config.
    SweepInterrupted: a training run was stopped by a signal.
  """
  runs = runs_of(config)
  os.makedirs(workdir, exist_ok=True)
  dataset = prepare_dataset(config, workdir, log) if train else None
  root = dataset_root(config, workdir)
  results, missing = [], []
  sweep_start = time.perf_counter()
  for i, run in enumerate(runs, 1):
    run_dir = os.path.join(workdir, run.relpath())
    cfg = run_config(config, run, root)
    prefix = f"[{i}/{len(runs)}] {run.label()}:"
    record = load_result(run_dir)
    if record is not None:
      changed = _config_differences(record.get("config", {}), cfg)
      if changed:
        raise SweepError(
            f"{run_dir} finished with another config (differs in "
            f"{', '.join(changed[:6])}); use a new --workdir or delete it")
      log(f"{prefix} finished before, skipped")
      results.append(record)
      continue
    if not train:
      missing.append(run)
      continue
    record = execute_run(run, cfg, run_dir, dataset, devices)
    results.append(record)
    rows = record["cases"]
    log(f"{prefix} {record['step']} steps in {record['train_seconds']:.0f} s "
        f"(loss {record['last_loss']:.3f}), {len(rows)} held-out cases in "
        f"{record['eval_seconds']:.0f} s: " + "  ".join(
            f"{title} {100 * _mean_of(rows, key):.1f}"
            for key, title in TABLE_METRICS))
  if missing:
    log(f"{len(missing)} of {len(runs)} runs are not finished; the report "
        "holds the others.")
  written = write_report(results, workdir,
                         order=[(r.alpha, r.beta) for r in runs], root=root)
  written["missing"] = missing
  written["seconds"] = time.perf_counter() - sweep_start
  return written


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def case_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per run x held-out case: CSV_COLUMNS."""
  rows = []
  for record in results:
    for case in record["cases"]:
      rows.append({"alpha": record["alpha"], "beta": record["beta"],
                   "seed": record["seed"], "fold": record["fold"], **case})
  return rows


@dataclasses.dataclass
class SettingSummary:
  """Aggregates of one (alpha, beta) over its case rows."""

  alpha: float
  beta: float
  rows: list[dict[str, Any]]

  def values(self, key: str) -> np.ndarray:
    v = np.array([r[key] for r in self.rows], np.float64)
    return v[np.isfinite(v)]

  def mean_std(self, key: str) -> tuple[float, float]:
    v = self.values(key)
    if not v.size:
      return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan

  def seeds(self) -> list[int]:
    return sorted({r["seed"] for r in self.rows})

  def seed_means(self, key: str) -> dict[int, float]:
    return {s: _mean_of([r for r in self.rows if r["seed"] == s], key)
            for s in self.seeds()}

  def seed_std(self, key: str) -> float:
    means = np.array(list(self.seed_means(key).values()))
    means = means[np.isfinite(means)]
    return float(means.std(ddof=1)) if means.size > 1 else math.nan

  def total(self, key: str) -> int:
    return int(sum(r[key] for r in self.rows))

  def failed_runs(self) -> int:
    """Runs without a single true-positive voxel in any held-out case (e.g.
    a training that collapsed to background)."""
    runs: dict[tuple[int, int], bool] = {}
    for r in self.rows:
      key = (r["seed"], r["fold"])
      runs[key] = runs.get(key, True) and r["tp"] == 0
    return sum(runs.values())

  def num_runs(self) -> int:
    return len({(r["seed"], r["fold"]) for r in self.rows})


def summarize(results: Sequence[dict[str, Any]],
              order: Sequence[tuple[float, float]] | None = None
              ) -> list[SettingSummary]:
  """One :class:`SettingSummary` per setting, in ``order`` (else sorted by
  beta)."""
  rows = case_rows(results)
  settings = list(dict.fromkeys(order or sorted(
      {(r["alpha"], r["beta"]) for r in rows}, key=lambda s: (s[1], s[0]))))
  out = []
  for a, b in settings:
    mine = [r for r in rows if (r["alpha"], r["beta"]) == (a, b)]
    if mine:
      out.append(SettingSummary(a, b, mine))
  return out


def _pct(value: float, digits: int = 2) -> str:
  return f"{100 * value:.{digits}f}" if math.isfinite(value) else "-"


def _signed(value: float) -> str:
  return f"{100 * value:+.2f}" if math.isfinite(value) else "-"


def format_markdown(summaries: Sequence[SettingSummary],
                    num_runs: int | None = None) -> str:
  """The report: Table 1, seed spread, paired differences, lesions, checks."""
  return "\n\n".join(markdown_sections(summaries, num_runs)) + "\n"


def markdown_sections(summaries: Sequence[SettingSummary],
                      num_runs: int | None = None) -> list[str]:
  """The sections of :func:`format_markdown`, each a markdown string
  starting with its ``##`` heading (Table 1 first)."""
  if not summaries:
    return ["No finished run yet."]
  sections = [_table1_section(summaries), _seed_section(summaries)]
  if len(summaries) > 1:
    sections.append(_paired_section(summaries))
  sections += [_lesion_section(summaries),
               "\n".join(["## The paper's claims on these runs", "",
                          *_claims(summaries)])]
  if num_runs is not None:
    sections[-1] += f"\n\n{num_runs} runs."
  return sections


def _table_head(prefix: str = "") -> list[str]:
  return ["| alpha | beta | " + " | ".join(
      f"{prefix}{t}" for _, t in TABLE_METRICS) + " |",
          "|" + "---|" * (2 + len(TABLE_METRICS))]


def _table_line(s: SettingSummary, cells: Sequence[str]) -> str:
  return f"| {s.alpha:g} | {s.beta:g} | " + " | ".join(cells) + " |"


def _table1_section(summaries: Sequence[SettingSummary]) -> str:
  seeds = sorted({s for summary in summaries for s in summary.seeds()})
  folds = sorted({r["fold"] for summary in summaries for r in summary.rows})
  lines = [
      "## Held-out cases (%, mean ± std over cases)", "",
      f"Every case is predicted once per seed by the model of the fold that "
      f"held it out ({len(folds)}-fold cross-validation, seeds "
      f"{', '.join(map(str, seeds))}); mean and sample std over the "
      f"{len(summaries[0].rows)} (seed, case) rows of each setting, "
      "threshold 0.5 for DSC, sensitivity, specificity and F2; APR from the "
      "probabilities.", "", *_table_head()]
  def cell(s, key):
    mean, std = s.mean_std(key)
    digits = 3 if key == "specificity" else 2
    return f"{_pct(mean, digits)} ± {_pct(std, digits)}"
  return "\n".join(lines + _metric_rows(summaries, cell))


def _metric_rows(summaries: Sequence[SettingSummary], cell) -> list[str]:
  """One table line per setting, ``cell(summary, metric_key)`` per metric."""
  return [_table_line(s, [cell(s, key) for key, _ in TABLE_METRICS])
          for s in summaries]


def _seed_section(summaries: Sequence[SettingSummary]) -> str:
  lines = ["## Spread over seeds", "",
           "Per-seed means (%, over that seed's held-out cases) and their "
           "std over seeds (the noise of a whole training run; a difference "
           "between settings smaller than this is not resolved).", "",
           *_table_head()]
  def cell(s, key):
    digits = 3 if key == "specificity" else 1
    means = " / ".join(_pct(v, digits) for v in s.seed_means(key).values())
    return f"{means} (std {_pct(s.seed_std(key), digits)})"
  return "\n".join(lines + _metric_rows(summaries, cell))


def _paired_section(summaries: Sequence[SettingSummary]) -> str:
  base = summaries[0]
  lines = [f"## Paired difference to alpha={base.alpha:g}, "
           f"beta={base.beta:g}", "",
           "Difference of the per-seed means (percentage points), seed by "
           "seed: same seeds, folds, initialisations and data order, only "
           "the loss differs.", "", *_table_head("Δ ")]
  def cell(s, key):
    mine, theirs = s.seed_means(key), base.seed_means(key)
    diffs = [mine[k] - theirs[k] for k in mine if k in theirs]
    return " / ".join(_signed(d) for d in diffs) or "-"
  return "\n".join(lines + _metric_rows(summaries[1:], cell))


def _lesion_section(summaries: Sequence[SettingSummary]) -> str:
  lines = ["## Lesion-wise detection and precision", "",
           "Lesions are 26-connected components; summed over all (seed, "
           "case) rows. A low-load case has the fewest lesion voxels "
           "(lowest third of the cases). Failed runs: runs without a "
           "single true-positive voxel in any of their held-out cases "
           "(a training collapsed to background).", "",
           "| alpha | beta | Precision (%) | detected / lesions | missed | "
           "false-positive components | DSC low-load cases (%) | "
           "failed runs |",
           "|---|---|---|---|---|---|---|---|"]
  loads = sorted({r["case"]: r["tp"] + r["fn"]
                  for r in summaries[0].rows}.items(), key=lambda kv: kv[1])
  low = {c for c, _ in loads[:max(1, len(loads) // 3)]}
  for s in summaries:
    mean, std = s.mean_std("precision")
    low_rows = [r for r in s.rows if r["case"] in low]
    lines.append(_table_line(s, [
        f"{_pct(mean)} ± {_pct(std)}",
        f"{s.total('detected_lesions')} / {s.total('ref_lesions')}",
        str(s.total("missed_lesions")), str(s.total("fp_lesions")),
        _pct(_mean_of(low_rows, "dsc")),
        f"{s.failed_runs()} of {s.num_runs()}"]))
  return "\n".join(lines)


def _claims(summaries: Sequence[SettingSummary]) -> list[str]:
  out = []
  by_beta = sorted(summaries, key=lambda s: s.beta)
  if len(by_beta) > 1:
    for key, title, direction in (("sensitivity", "Sensitivity", 1),
                                  ("specificity", "Specificity", -1)):
      means = [s.mean_std(key)[0] for s in by_beta]
      steps = np.diff(means) * direction
      word = "rises" if direction > 0 else "falls"
      verdict = "yes" if np.all(steps >= 0) else "no"
      out.append(f"- {title} {word} monotonically with beta: {verdict} ("
                 + " → ".join(_pct(m, 3 if key == "specificity" else 2)
                              for m in means) + ").")
  for key, title in (("dsc", "DSC"), ("f2", "F2"), ("apr", "APR")):
    best = max(summaries, key=lambda s: s.mean_std(key)[0])
    out.append(f"- Best mean {title}: alpha={best.alpha:g}, beta={best.beta:g}"
               f" ({_pct(best.mean_std(key)[0])}).")
  return out


def _csv_value(value: Any) -> str:
  if isinstance(value, (bool, np.bool_)):
    return str(int(value))
  if isinstance(value, (int, np.integer, str)):
    return str(value)
  value = float(value)
  return repr(value) if math.isfinite(value) else ""


def write_csv(results: Sequence[dict[str, Any]], path: str) -> str:
  """results.csv: CSV_COLUMNS, one row per run x held-out case."""
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for row in case_rows(results):
      writer.writerow([_csv_value(row[c]) for c in CSV_COLUMNS])
  return path


def _heldout_path(workdir: str, record: dict[str, Any]) -> str:
  return os.path.join(workdir, Run(record["alpha"], record["beta"],
                                   record["seed"], record["fold"]).relpath(),
                      HELDOUT_FILE)


def _pooled_heldout(workdir: str, records: Sequence[dict[str, Any]]
                    ) -> tuple[np.ndarray, np.ndarray] | None:
  probs, labels = [], []
  for record in records:
    path = _heldout_path(workdir, record)
    if not os.path.isfile(path):
      return None
    with np.load(path) as data:
      for case_id in data["case_ids"]:
        probs.append(data[f"prob/{case_id}"].ravel())
        labels.append(data[f"label/{case_id}"].ravel() != 0)
  if not probs:
    return None
  return np.concatenate(probs), np.concatenate(labels)


def plot_pr_curves(workdir: str, results: Sequence[dict[str, Any]],
                   summaries: Sequence[SettingSummary], path: str,
                   max_points: int = 4000) -> str | None:
  """pr_curves.png: one pooled precision-recall curve per (alpha, beta).

  Pooled over every held-out voxel of every fold and seed of the setting;
  the dot is the operating point at the threshold (``result.json``).
  Returns None when no curve could be made.
  """
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  fig = Figure(figsize=(7.0, 5.5), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  drawn = 0
  for summary in summaries:
    records = [r for r in results
               if (r["alpha"], r["beta"]) == (summary.alpha, summary.beta)]
    pooled = _pooled_heldout(workdir, records)
    if pooled is None or not pooled[1].any():
      continue
    scores, labels = pooled
    precision, recall = evaluate.precision_recall_curve(scores, labels)
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    threshold = records[0].get("threshold", 0.5)
    pred = scores >= threshold
    tp = np.count_nonzero(pred & labels)
    op_recall = tp / np.count_nonzero(labels)
    op_precision = tp / max(np.count_nonzero(pred), 1)
    if precision.size > max_points:
      keep = np.unique(np.linspace(0, precision.size - 1,
                                   max_points).astype(int))
      precision, recall = precision[keep], recall[keep]
    (line,) = ax.plot(np.r_[0.0, recall], np.r_[precision[:1], precision],
                      drawstyle="steps-pre", linewidth=1.6,
                      label=f"α={summary.alpha:g}, β={summary.beta:g} "
                      f"(AP {ap:.3f})")
    ax.plot([op_recall], [op_precision], "o", color=line.get_color(),
            markersize=6)
    drawn += 1
  if not drawn:
    return None
  ax.set_xlabel("recall (sensitivity)")
  ax.set_ylabel("precision")
  ax.set_xlim(0.0, 1.0)
  ax.set_ylim(0.0, 1.02)
  ax.set_title("Held-out voxels, pooled over folds and seeds "
               "(dot: threshold 0.5)")
  ax.grid(True, alpha=0.3)
  ax.legend(loc="lower left", fontsize="small")
  fig.tight_layout()
  fig.savefig(path)
  return path


def write_report(results: Sequence[dict[str, Any]], workdir: str,
                 order: Sequence[tuple[float, float]] | None = None,
                 root: str | None = None) -> dict[str, Any]:
  """Writes results.md, results.csv, pr_curves.png and results.html.

  ``root``: the dataset, for the scan under the overlays (default: the
  ``data.root`` the runs were trained on; grey when it cannot be read).
  """
  summaries = summarize(results, order)
  markdown = f"# {TITLE}\n\n" + format_markdown(summaries, len(results))
  paths = {"markdown": os.path.join(workdir, "results.md"),
           "csv": os.path.join(workdir, "results.csv"),
           "plot": os.path.join(workdir, "pr_curves.png"),
           "html": os.path.join(workdir, "results.html")}
  with open(paths["markdown"], "w") as f:
    f.write(markdown)
  write_csv(results, paths["csv"])
  if plot_pr_curves(workdir, results, summaries, paths["plot"]) is None:
    paths["plot"] = None
  if root is None and results:
    root = results[0].get("config", {}).get("data", {}).get("root")
  overlays = case_overlays(workdir, results, summaries, root)
  write_html(paths["html"], summaries, len(results), paths["plot"], overlays)
  return {"results": list(results), "summaries": summaries,
          "markdown": markdown, "paths": paths, "overlays": overlays}


# --------------------------------------------------------------------------
# The HTML page: Table 1, the PR curves, one held-out case under every setting
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaseOverlay:
  """The overlay montage of the shown case under one setting.

  Attributes:
    alpha, beta: the setting.
    case: the case; the same for every setting.
    seed, fold: the run that predicted it (the same for every setting).
    row: the case's metrics in that run (``result.json``).
    png: :func:`tversky_jax.report.overlay_montage`, PNG-encoded.
    focuses: the montage's rows (largest lesion, largest false positive).
    has_image: whether the scan is under the overlay (else grey).
  """

  alpha: float
  beta: float
  case: str
  seed: int
  fold: int
  row: dict[str, Any]
  png: bytes
  focuses: tuple[report.Focus, report.Focus]
  has_image: bool


def shown_case(summaries: Sequence[SettingSummary]
               ) -> tuple[str, int] | None:
  """``(case, seed)`` of the overlays: of the first seed, the held-out case
  with the most reference lesion voxels (ties: the first by name) among the
  cases every setting has; None without results."""
  if not summaries:
    return None
  seed = min(summaries[0].seeds())
  loads = {r["case"]: r["tp"] + r["fn"] for r in summaries[0].rows
           if r["seed"] == seed}
  for s in summaries[1:]:
    have = {r["case"] for r in s.rows if r["seed"] == seed}
    loads = {c: v for c, v in loads.items() if c in have}
  if not loads:
    return None
  return max(sorted(loads), key=loads.get), seed


def _read_scan(root: str | None, case_id: str
               ) -> tuple[np.ndarray | None, np.ndarray]:
  """(first channel, affine) of a case; (None, identity) when unreadable."""
  try:
    case = nifti.load_case(nifti.read_dataset(root), case_id)
  except (nifti.DatasetError, OSError, TypeError):
    return None, np.eye(4)
  return case.image[..., 0], case.affine


def case_overlays(workdir: str, results: Sequence[dict[str, Any]],
                  summaries: Sequence[SettingSummary], root: str | None
                  ) -> list[CaseOverlay]:
  """The montage of the :func:`shown_case` under every setting.

  Drawn from the run's ``heldout.npz`` (probabilities at the run's
  threshold, the reference) over the scan in ``root``, in display axes, as
  ``tversky-evaluate --report`` draws them. Empty when a setting's held-out
  probabilities are missing.
  """
  choice = shown_case(summaries)
  if choice is None:
    return []
  case_id, seed = choice
  image, affine = _read_scan(root, case_id)
  out = []
  for s in summaries:
    row = next(r for r in s.rows if (r["seed"], r["case"]) == (seed, case_id))
    record = next(r for r in results if (r["alpha"], r["beta"], r["seed"],
                                         r["fold"]) == (s.alpha, s.beta, seed,
                                                        row["fold"]))
    path = _heldout_path(workdir, record)
    if not os.path.isfile(path):
      return []
    with np.load(path) as held:
      if f"prob/{case_id}" not in held:
        return []
      prob, label = held[f"prob/{case_id}"], held[f"label/{case_id}"]
    reference, spacing = report.to_display_axes(label != 0, affine)
    prediction, _ = report.to_display_axes(
        prob >= record.get("threshold", 0.5), affine)
    scan = None
    if image is not None and image.shape == label.shape:
      scan = report.to_display_axes(image, affine)[0]
    focuses = report.focus_points(reference, prediction)
    rgb = report.overlay_montage(scan, reference, prediction, spacing=spacing,
                                 focuses=focuses, panel_px=OVERLAY_PANEL_PX)
    out.append(CaseOverlay(s.alpha, s.beta, case_id, seed, row["fold"], row,
                           report.encode_png(rgb), focuses, scan is not None))
  return out


def write_html(path: str, summaries: Sequence[SettingSummary],
               num_runs: int, plot: str | None,
               overlays: Sequence[CaseOverlay]) -> str:
  """results.html: one self-contained page (images embedded): Table 1, the
  precision-recall curves, the overlays, then the other sections."""
  sections = markdown_sections(summaries, num_runs)
  body = [f"<h1>{html.escape(TITLE)}</h1>", report.markdown_html(sections[0])]
  if plot is not None:
    with open(plot, "rb") as f:
      body.append('<h2>Precision-recall</h2><img class="sweep-pr" '
                  'alt="precision-recall curves" '
                  f'src="{report.data_uri(f.read())}">')
  body.append(_overlay_section(overlays))
  body += [report.markdown_html(s) for s in sections[1:]]
  with open(path, "w", encoding="utf-8") as f:
    f.write(report.html_page(TITLE, "\n".join(body)))
  return path


def _overlay_section(overlays: Sequence[CaseOverlay]) -> str:
  if not overlays:
    return ("<p>No held-out probabilities (heldout.npz), so no overlays."
            "</p>")
  first = overlays[0]
  row = first.row
  intro = (f"Case {html.escape(first.case)} (of the held-out cases the one "
           f"with the most lesion voxels: {row['tp'] + row['fn']}), predicted "
           f"by the fold-{first.fold} model of seed {first.seed} of every "
           "setting: same initialisation, data order and case, only alpha "
           "and beta differ.")
  if not first.has_image:
    intro += " The scan could not be read, so the overlays are on grey."
  figures = [report.montage_figure(
      f"overlay-{setting_name(o.alpha, o.beta)}",
      f"{o.case}, alpha={o.alpha:g}, beta={o.beta:g}", o.png, o.focuses,
      o.has_image, OVERLAY_PANEL_PX, _overlay_caption(o)) for o in overlays]
  return "\n".join([
      "<h2>One held-out case under every setting</h2>", f"<p>{intro}</p>",
      report.legend(first.has_image), '<div class="cases">', *figures,
      "</div>"])


def _overlay_caption(o: CaseOverlay) -> str:
  r = o.row
  return (f"<b>α={o.alpha:g}, β={o.beta:g}</b>: DSC {_pct(r['dsc'], 1)} %, "
          f"sensitivity {_pct(r['sensitivity'], 1)} %, precision "
          f"{_pct(r['precision'], 1)} %; lesions detected "
          f"{r['detected_lesions']}/{r['ref_lesions']}, FP components "
          f"{r['fp_lesions']}")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def enable_compilation_cache(setting: str, workdir: str) -> str | None:
  """Turns on JAX's persistent compilation cache (``"auto"``: in workdir).

  The train step of a setting compiles once per sweep instead of once per
  seed and fold (a few seconds each on CPU), and the prediction step once.
  """
  if not setting:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "jax_cache") if setting == "auto" else setting
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def cli(argv: Sequence[str] | None = None) -> None:
  """``python -m tversky_jax.experiments.sweep``: defines the flags, runs."""
  # pylint: disable=g-import-not-at-top
  from absl import app
  from absl import flags
  from absl import logging
  # pylint: enable=g-import-not-at-top
  config_flag = cli_lib.define_config_file("configs/sweep.py",
                                           "Sweep configuration file.")
  workdir_flag = flags.DEFINE_string(
      "workdir", "runs/sweep", "Folder of the sweep's runs and report.")
  report_only_flag = flags.DEFINE_bool(
      "report_only", False,
      "Only write the report of the finished runs (no training).")

  def main(args):
    if len(args) > 1:
      raise app.UsageError(f"Unexpected arguments: {args[1:]}")
    # orbax logs every checkpoint at INFO level.
    logging.set_verbosity(logging.ERROR)
    config = cli_lib.load_config(config_flag,
                                 flags.FLAGS["config"].config_filename)
    workdir = workdir_flag.value
    enable_compilation_cache(config.sweep.compilation_cache, workdir)
    start = time.perf_counter()
    try:
      written = run_sweep(config, workdir, train=not report_only_flag.value,
                          log=lambda m: print(m, flush=True))
    except (SweepError, predict.PredictError,
            *train_lib.USER_ERRORS) as error:
      sys.exit(f"error: {error}")
    except SweepInterrupted as error:
      sys.exit(str(error))
    print()
    print(written["markdown"])
    paths = written["paths"]
    print(f"Wrote {paths['markdown']}, {paths['csv']}, {paths['html']}"
          + (f" and {paths['plot']}" if paths["plot"] else ""))
    print(f"Wall time {time.perf_counter() - start:.0f} s.")
    if written["missing"]:
      sys.exit(1)

  app.run(main, argv=argv, flags_parser=cli_lib.parse_flags)


if __name__ == "__main__":
  cli()
