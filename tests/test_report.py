"""Tests of tversky_jax.report: overlay colours, page structure, errors."""

import base64
import html.parser
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tversky_jax import evaluate
from tversky_jax import report
from tversky_jax.data import nifti

SHAPE = (24, 24, 24)
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def hand_made_case():
  """A lesion half found, with a separate false-positive component.

  Reference: the block x 8:12, y 8:12, z 8:12 (64 voxels).
  Prediction: x 10:14 over the same y, z (TP at x 10:12, FP attached at
  x 12:14, FN at x 8:10), plus a separate false-positive component
  x 16:18, y 4:6, z 14:15 (4 voxels).
  """
  ref = np.zeros(SHAPE, np.uint8)
  ref[8:12, 8:12, 8:12] = 1
  pred = np.zeros(SHAPE, np.uint8)
  pred[10:14, 8:12, 8:12] = 1
  pred[16:18, 4:6, 14] = 1
  return ref, pred


def pixel(montage, panel_row, panel_col, u, v, panel_px=48):
  """Montage pixel at the centre of plane cell (u: right, v: up), 2 px/cell.

  With 24 voxels on 48 pixels every voxel is a 2x2 block; plane cell
  ``(u, v)`` starts at column ``2u`` and row ``47 - 2v - 1`` of its panel.
  """
  step = panel_px + report.GAP_PX
  row = panel_row * step + panel_px - 1 - 2 * v
  col = panel_col * step + 2 * u
  return tuple(int(c) for c in montage[row, col])


def panel(montage, panel_row, panel_col, panel_px=48):
  step = panel_px + report.GAP_PX
  return montage[panel_row * step:panel_row * step + panel_px,
                 panel_col * step:panel_col * step + panel_px]


def count_colour(array, colour):
  return int(np.all(array == np.array(colour, np.uint8), axis=-1).sum())


def test_focus_points_are_the_largest_lesion_and_false_positive():
  ref, pred = hand_made_case()
  lesion, false_positive = report.focus_points(ref, pred)
  assert lesion.size == 64 and lesion.voxel == (8, 8, 8)
  assert false_positive.size == 4 and false_positive.voxel == (16, 4, 14)
  none_lesion, none_fp = report.focus_points(np.zeros(SHAPE), ref)
  assert none_lesion.size == 0 and none_lesion.voxel == (12, 12, 12)
  assert none_fp.size == 64  # every predicted component is a false positive


def test_overlay_colours_on_hand_made_case():
  ref, pred = hand_made_case()
  image = np.random.default_rng(0).uniform(1, 2, SHAPE).astype(np.float32)
  montage = report.overlay_montage(image, ref, pred, panel_px=48)
  step = 48 + report.GAP_PX
  assert montage.shape == (2 * step - report.GAP_PX, 4 * step - report.GAP_PX,
                           3)
  tp, fp, fn = report.TP_COLOUR, report.FP_COLOUR, report.FN_COLOUR
  # Row 0 cuts the lesion at (8, 8, 8). Axial z=8: plane (x, y).
  assert pixel(montage, 0, 0, 10, 9) == tp
  assert pixel(montage, 0, 0, 13, 9) == fp
  assert pixel(montage, 0, 0, 8, 11) == fn
  # Coronal y=8: plane (x, z); sagittal x=8: plane (y, z), all missed.
  assert pixel(montage, 0, 1, 11, 10) == tp
  assert pixel(montage, 0, 1, 12, 8) == fp
  assert pixel(montage, 0, 1, 9, 11) == fn
  assert pixel(montage, 0, 2, 9, 10) == fn
  # Row 1 cuts the false-positive component at (16, 4, 14).
  assert pixel(montage, 1, 0, 16, 4) == fp
  assert pixel(montage, 1, 0, 17, 5) == fp
  assert pixel(montage, 1, 1, 17, 14) == fp
  # Exact areas: every voxel is 2x2 pixels; ticks and gaps use no overlay
  # colour. Axial z=8 has 8 TP, 8 FP and 8 FN voxels.
  axial = panel(montage, 0, 0)
  assert [count_colour(axial, c) for c in (tp, fp, fn)] == [32, 32, 32]
  # The scan column has no overlay; a true negative pixel is grey.
  for panel_row in (0, 1):
    scan = panel(montage, panel_row, 3)
    assert [count_colour(scan, c) for c in (tp, fp, fn)] == [0, 0, 0]
  r, g, b = pixel(montage, 0, 0, 4, 4)
  assert r == g == b


def test_overlay_without_image_is_on_grey_and_ticks_mark_the_focus():
  ref, pred = hand_made_case()
  montage = report.overlay_montage(None, ref, pred, panel_px=48)
  assert montage.shape[1] == 3 * 48 + 2 * report.GAP_PX  # no scan column
  r, g, b = pixel(montage, 0, 0, 4, 4)
  assert r == g == b
  assert abs(r - report.NO_IMAGE_GREY * 255) <= 255 / report.GREY_LEVELS
  # Grey, the 3 outcome colours, ticks and gaps (a cube needs no padding).
  assert len(np.unique(montage.reshape(-1, 3), axis=0)) == 6
  assert pixel(montage, 0, 0, 10, 9) == report.TP_COLOUR
  # The lesion focus is x=8, y=8: ticks in column 2*8 (top edge) and in the
  # row of y=8 (left edge).
  axial = panel(montage, 0, 0)
  white = np.array(report.TICK_COLOUR)
  assert any(np.all(axial[:report.TICK_PX, c] == white) for c in (16, 17))
  assert any(np.all(axial[r, :report.TICK_PX] == white) for r in (30, 31))
  assert not np.all(axial[:report.TICK_PX, 20] == white)


def test_window_intensities_clips_at_percentiles():
  image = np.zeros((10, 10, 10), np.float32)
  image[1:9, 1:9, 1:9] = np.linspace(1, 100, 512).reshape(8, 8, 8)
  out = report.window_intensities(image)
  assert out.min() == 0.0 and out.max() == 1.0
  assert out.dtype == np.float32
  assert np.all(out[0] == 0.0)  # the background is below the window
  head = out[1:9, 1:9, 1:9]
  assert 0 < np.count_nonzero(head == 0.0) <= 8  # about 1 % of 512
  assert np.mean(head) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("num_colours", [3, 256, 300])
def test_encode_png_is_lossless(num_colours):
  rng = np.random.default_rng(1)
  palette = rng.integers(0, 256, (num_colours, 3), dtype=np.uint8)
  rgb = palette[np.arange(20 * 16).reshape(20, 16) % num_colours]
  png = report.encode_png(rgb)
  assert png.startswith(PNG_SIGNATURE)
  decoded = Image.open(io.BytesIO(png))
  assert decoded.mode == ("P" if num_colours <= 256 else "RGB")
  np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), rgb)


# --------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------


class _PageParser(html.parser.HTMLParser):
  """Collects the metrics table's row names, figures and image sources."""

  def __init__(self):
    super().__init__()
    self.row_names, self.figures, self.images, self.scripts = [], [], [], 0
    self.links = []
    self._in_row_head = False

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "tr":
      self._in_row_head = True
      self.row_names.append("")
    elif tag == "figure":
      self.figures.append(attrs["id"])
    elif tag == "img":
      self.images.append(attrs["src"])
    elif tag in ("script", "link"):
      self.scripts += 1
    elif tag == "a":
      self.links.append(attrs.get("href", ""))

  def handle_endtag(self, tag):
    if tag in ("th", "td"):
      self._in_row_head = False

  def handle_data(self, data):
    if self._in_row_head and self.row_names:
      self.row_names[-1] += data.strip()


def _write_folders(tmp_path, with_images=True, classes=False):
  """Three cases with DSC a: 1, b: worst, c: middle, as nnU-Net folders.

  With ``classes``, label maps of white matter (1: the slab x 20:24 of the
  reference; predicted x 19:24 in case c, so only c has false positives) and
  lesion (2: the binary case's masks), ``[x, y, z, 3]`` probabilities and a
  ``dataset.json`` naming them.
  """
  ref, pred = hand_made_case()
  worse = np.zeros(SHAPE, np.uint8)
  worse[3:5, 18:20, 3:5] = 1  # all false positive
  cases = {"a": (ref, ref), "b": (ref, worse), "c": (ref, pred)}
  folders = {n: tmp_path / n for n in ("pred", "labels", "images")}
  for folder in folders.values():
    folder.mkdir()
  rng = np.random.default_rng(2)
  for name, (label, mask) in cases.items():
    if classes:
      label, mask = label * 2, mask * 2
      label[20:], mask[19 if name == "c" else 20:] = 1, 1
    nifti.write_nifti(folders["labels"] / f"{name}.nii.gz", label, AFFINE,
                      dtype=np.uint8)
    nifti.write_nifti(folders["pred"] / f"{name}.nii.gz", mask, AFFINE,
                      dtype=np.uint8)
    prob = np.clip(mask * 0.8 + rng.uniform(0, 0.3, SHAPE), 0, 1)
    if classes:
      prob = np.stack([mask == k for k in range(3)], -1) * 0.8 + 0.1
    nifti.write_nifti(folders["pred"] / f"{name}_prob.nii.gz", prob, AFFINE)
    if with_images:
      nifti.write_nifti(folders["images"] / f"{name}_0000.nii.gz",
                        rng.uniform(0, 1, SHAPE), AFFINE)
  if classes:
    folders["dataset_json"] = tmp_path / "dataset.json"
    folders["dataset_json"].write_text(json.dumps({"labels": {
        "background": 0, "white_matter": 1, "lesion": 2}}))
  return folders


def _run(folders, tmp_path, *extra):
  args = ["--predictions", str(folders["pred"]), "--labels",
          str(folders["labels"]), "--output", str(tmp_path / "eval"),
          "--no-progress", "--report", str(tmp_path / "out" / "report.html"),
          *extra]
  return evaluate.main(args)


def _decode(src):
  prefix = "data:image/png;base64,"
  assert src.startswith(prefix)
  png = base64.b64decode(src[len(prefix):], validate=True)
  assert png.startswith(PNG_SIGNATURE)
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_report_page_structure_and_worst_first(tmp_path, capsys):
  folders = _write_folders(tmp_path)
  assert _run(folders, tmp_path, "--images", str(folders["images"])) == 0
  page = (tmp_path / "out" / "report.html").read_text()
  assert "report.html" in capsys.readouterr().out
  parser = _PageParser()
  parser.feed(page)
  # Header row, then one row per case worst DSC first, then pooled and mean.
  assert parser.row_names == ["case", "b", "c", "a", "pooled", "mean"]
  assert parser.figures == ["case-b", "case-c", "case-a"]
  assert parser.links == ["#case-b", "#case-c", "#case-a"]
  assert parser.scripts == 0 and "://" not in page  # nothing external
  # The PR curve plus one montage per case, all embedded PNGs.
  assert len(parser.images) == 1 + 3
  decoded = [_decode(src) for src in parser.images]
  step = report.PANEL_PX + report.GAP_PX
  for montage in decoded[1:]:
    assert montage.shape == (2 * step - report.GAP_PX,
                             4 * step - report.GAP_PX, 3)
  # Case c's montage (second) shows every outcome; a (perfect) has no FP/FN.
  colours = (report.TP_COLOUR, report.FP_COLOUR, report.FN_COLOUR)
  assert all(count_colour(decoded[2], c) > 0 for c in colours)
  assert [count_colour(decoded[3], c) > 0 for c in colours] == [
      True, False, False]


def test_report_without_images_and_without_probabilities(tmp_path):
  folders = _write_folders(tmp_path, with_images=False)
  for path in folders["pred"].glob("*_prob.nii.gz"):
    path.unlink()
  assert _run(folders, tmp_path) == 0
  parser = _PageParser()
  parser.feed((tmp_path / "out" / "report.html").read_text())
  assert len(parser.images) == 3  # no PR curve
  step = report.PANEL_PX + report.GAP_PX
  assert _decode(parser.images[0]).shape[1] == 3 * step - report.GAP_PX


def test_report_notes_the_empty_reference_cases(tmp_path):
  """A fourth case, d, with an empty reference and a 4-voxel false positive:
  out of the mean DSC, its false positives said under the table."""
  folders = _write_folders(tmp_path, with_images=False)
  false_positive = np.zeros(SHAPE, np.uint8)
  false_positive[16:18, 4:6, 14] = 1
  nifti.write_nifti(folders["labels"] / "d.nii.gz", np.zeros(SHAPE),
                    AFFINE, dtype=np.uint8)
  nifti.write_nifti(folders["pred"] / "d.nii.gz", false_positive, AFFINE,
                    dtype=np.uint8)
  assert _run(folders, tmp_path) == 0
  page = (tmp_path / "out" / "report.html").read_text()
  assert ("<p>Empty reference: 1 case(s), 1 with false positives (4 voxels); "
          "not in the mean of DSC, sensitivity, F2, APR, lesion recall and "
          "F1.</p>") in page


@pytest.mark.parametrize("problem", ["no_dir", "missing_case", "other_grid"])
def test_report_input_errors_are_one_line(tmp_path, capsys, problem):
  folders = _write_folders(tmp_path)
  images = folders["images"]
  if problem == "no_dir":
    images = tmp_path / "nowhere"
  elif problem == "missing_case":
    (images / "c_0000.nii.gz").unlink()
  else:
    nifti.write_nifti(images / "c_0000.nii.gz", np.zeros((24, 24, 20)),
                      AFFINE)
  assert _run(folders, tmp_path, "--images", str(images)) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert "Traceback" not in err
  if problem == "missing_case":
    assert err.endswith(": c\n")
  elif problem == "other_grid":
    assert "case c: image shape" in err
  if problem != "other_grid":  # checked before the evaluation runs
    assert not (tmp_path / "eval" / "metrics.csv").exists()


def test_python_dash_m_prints_report_errors_on_one_line(tmp_path):
  # As ``python -m`` the evaluator is __main__, a module apart from the
  # tversky_jax.evaluate that report raises its errors from.
  folders = _write_folders(tmp_path)
  run = subprocess.run(
      [sys.executable, "-m", "tversky_jax.evaluate", "--predictions",
       str(folders["pred"]), "--labels", str(folders["labels"]), "--report",
       str(tmp_path / "r.html"), "--images", str(tmp_path / "nowhere")],
      capture_output=True, text=True, check=False, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  nowhere = tmp_path / "nowhere"
  assert run.returncode == 1
  assert run.stderr == f"error: --images {nowhere}: no such directory\n"


def test_images_without_report_is_a_usage_error(tmp_path):
  folders = _write_folders(tmp_path)
  with pytest.raises(SystemExit) as exit_info:
    evaluate.main(["--predictions", str(folders["pred"]), "--labels",
                   str(folders["labels"]), "--images", str(folders["images"])])
  assert exit_info.value.code == 2


def _figure_headings(page):
  return [line for line in page.split("<h") if line.startswith(("2>", "3>"))]


@pytest.mark.parametrize("report_class, order", [
    (None, ["b", "c", "a"]),  # lesion: the fewest reference voxels
    ("white_matter", ["c", "a", "b"]),
])
def test_report_per_class_tables_and_montage_class(tmp_path, report_class,
                                                   order):
  folders = _write_folders(tmp_path, classes=True)
  extra = ["--report-class", report_class] if report_class else []
  assert _run(folders, tmp_path, "--images", str(folders["images"]),
              "--dataset-json", str(folders["dataset_json"]), *extra) == 0
  page = (tmp_path / "out" / "report.html").read_text()
  parser = _PageParser()
  parser.feed(page)
  # A table per class, each worst DSC (of its class) first, then the mean
  # over the classes.
  assert parser.row_names == [
      "case", "c", "a", "b", "pooled", "mean",
      "case", "b", "c", "a", "pooled", "mean",
      "case", "pooled", "mean"]
  assert "<h3>Class white_matter (label 1)</h3>" in page
  assert "<h3>Class lesion (label 2)</h3>" in page
  assert "<h3>Mean over the 2 classes</h3>" in page
  shown = report_class or "lesion"
  assert f"<h2>Cases, worst DSC of class {shown} first</h2>" in page
  assert f"The overlays show class {shown}" in page
  assert parser.figures == [f"case-{name}" for name in order]
  montages = dict(zip(order, (_decode(src) for src in parser.images[1:])))
  colours = (report.TP_COLOUR, report.FP_COLOUR, report.FN_COLOUR)
  shows = {n: [count_colour(m, c) > 0 for c in colours]
           for n, m in montages.items()}
  if shown == "lesion":  # the binary case's outcomes
    assert shows == {"a": [True, False, False], "b": [False, True, True],
                     "c": [True, True, True]}
  else:  # white matter: only case c has false positives, nothing is missed
    assert shows == {"a": [True, False, False], "b": [True, False, False],
                     "c": [True, True, False]}


def test_unknown_report_class_is_a_one_line_error(tmp_path, capsys):
  folders = _write_folders(tmp_path, classes=True)
  assert _run(folders, tmp_path, "--report-class", "grey_matter",
              "--dataset-json", str(folders["dataset_json"])) == 1
  err = capsys.readouterr().err
  assert err == ("error: --report-class grey_matter: not an evaluated class "
                 "(white_matter, lesion)\n")
  assert not (tmp_path / "eval" / "metrics.csv").exists()
  with pytest.raises(SystemExit) as exit_info:  # only used with --report
    evaluate.main(["--predictions", str(folders["pred"]), "--labels",
                   str(folders["labels"]), "--report-class", "lesion"])
  assert exit_info.value.code == 2
