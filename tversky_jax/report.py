"""A self-contained HTML report of an evaluation, with overlay montages.

Command line: ``tversky-evaluate ... --report report.html [--images DIR]``
(see :mod:`tversky_jax.evaluate`). The page opens offline (no JavaScript,
no external CSS; images are embedded base64 PNGs) and holds:

* the metrics table: one row per case, worst DSC first, then the ``pooled``
  and ``mean`` rows of :mod:`tversky_jax.evaluate`; with several classes a
  table per class, then the mean over the classes;
* the voxel-wise precision-recall curves (when probability maps exist);
* per case, worst DSC first, an overlay montage. With several classes it
  shows one class k (prediction == k against reference == k, whose DSC
  orders the cases): ``--report-class NAME``, by default the class with the
  fewest reference voxels (usually the lesions). Its top row cuts through
  the largest reference lesion, its bottom row through the largest
  false-positive component (26-connected components, as the lesion counts);
  a row whose component does not exist cuts through the volume centre. The
  columns are axial, coronal and sagittal slices with true positives,
  false positives and false negatives in Okabe-Ito colours (colour-blind
  safe) over the scan, then the axial scan alone. White ticks on the top and
  left panel edges point at the component.

Display geometry: volumes are reoriented to the closest RAS+ axes for
display only (``nibabel.orientations``), drawn with superior/anterior up and
the patient's left on the left (neurological convention), and scaled with
their voxel spacing, nearest neighbour (so the overlay colours stay exact).
The scan is the first channel (``CASE_0000``) of ``--images``, windowed at
its 1st-99th percentiles inside the head (non-zero voxels); without
``--images`` the overlay is drawn on grey.

Function API (the sweep's results.html and the TensorBoard images of
validation use it)::

  rgb = overlay_montage(image, reference, prediction)  # uint8 [h, w, 3]
  png = encode_png(rgb)
  page = html_page(title, markdown_html(text) + montage_figure(...))
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from tversky_jax import evaluate

# The report reads and checks files exactly as the evaluator does.
# pylint: disable=protected-access

# Okabe-Ito colours, uint8 RGB.
TP_COLOUR = (0x00, 0x9E, 0x73)  # bluish green
FP_COLOUR = (0xD5, 0x5E, 0x00)  # vermillion
FN_COLOUR = (0x56, 0xB4, 0xE9)  # sky blue
TICK_COLOUR = (0xFF, 0xFF, 0xFF)
PAD_COLOUR = (0x00, 0x00, 0x00)
GAP_COLOUR = (0xFA, 0xFA, 0xFA)  # the lines between panels (page colour)
NO_IMAGE_GREY = 0.45  # background intensity without a scan
PANEL_PX = 128
GREY_LEVELS = 64  # of the scan: small palette PNGs, invisible in thumbnails
GAP_PX = 2
TICK_PX = 5
WINDOW_PERCENTILES = (1.0, 99.0)
VIEWS = ("axial", "coronal", "sagittal")
_VIEW_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
# Outcome codes of :func:`outcome_map`.
TN, TP, FP, FN = range(4)
_OUTCOME_COLOURS = {TP: TP_COLOUR, FP: FP_COLOUR, FN: FN_COLOUR}
IMAGE_CHANNEL_SUFFIX = "_0000"


# --------------------------------------------------------------------------
# Overlay montage of one case
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Focus:
  """Where one montage row cuts the volume.

  Attributes:
    voxel: ``(x, y, z)``: for each axis, the slice holding the most voxels of
      the component (the volume centre when there is no component).
    size: voxels of the component; 0 when there is none.
  """

  voxel: tuple[int, int, int]
  size: int


def largest_component(mask: np.ndarray) -> Focus:
  """The largest 26-connected component of ``mask`` ``[x, y, z]``."""
  labels, count = evaluate.connected_components(mask)
  if count == 0:
    return Focus(tuple(n // 2 for n in labels.shape), 0)
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  component = labels == int(np.argmax(sizes))
  voxel = tuple(
      int(np.argmax(component.sum(axis=tuple(a for a in range(3) if a != i))))
      for i in range(3))
  return Focus(voxel, int(sizes.max()))


def focus_points(reference: np.ndarray,
                 prediction: np.ndarray) -> tuple[Focus, Focus]:
  """The rows of a montage: the largest reference lesion, the largest FP.

  Args:
    reference: ``[x, y, z]``, lesion where non-zero.
    prediction: ``[x, y, z]``, lesion where non-zero.

  Returns:
    ``(lesion, false_positive)``; a false-positive component is a predicted
    component without any reference voxel (as in the lesion counts).
  """
  ref = np.asarray(reference) != 0
  pred = np.asarray(prediction) != 0
  labels, _ = evaluate.connected_components(pred)
  true_components = np.unique(labels[pred & ref])
  false_positive = (labels != 0) & ~np.isin(labels, true_components)
  return largest_component(ref), largest_component(false_positive)


def outcome_map(reference: np.ndarray, prediction: np.ndarray) -> np.ndarray:
  """``uint8 [x, y, z]``: ``TN``, ``TP``, ``FP`` or ``FN`` per voxel."""
  ref = np.asarray(reference) != 0
  pred = np.asarray(prediction) != 0
  out = np.full(ref.shape, TN, np.uint8)
  out[pred & ref] = TP
  out[pred & ~ref] = FP
  out[~pred & ref] = FN
  return out


def window_intensities(image: np.ndarray,
                       percentiles: Sequence[float] = WINDOW_PERCENTILES
                       ) -> np.ndarray:
  """Scales a scan to ``[0, 1]`` between two percentiles of the head.

  Args:
    image: ``[x, y, z]`` scan; the head is its non-zero voxels (all voxels
      when none is non-zero).
    percentiles: ``(low, high)`` percentiles mapped to 0 and 1.

  Returns:
    ``float32 [x, y, z]`` in ``[0, 1]``.
  """
  image = np.nan_to_num(np.asarray(image, np.float32))
  values = image[image != 0] if np.any(image != 0) else image.ravel()
  values = values[::max(1, values.size // 1_000_000)]  # a sample is enough
  low, high = np.percentile(values, percentiles)
  scale = np.float32(1.0 / (high - low) if high > low else 0.0)
  return np.clip((image - np.float32(low)) * scale, 0.0, 1.0)


def _resample_indices(length: int, spacing: float, other: float,
                      panel_px: int) -> np.ndarray:
  """Source index of each output pixel along one axis (nearest neighbour)."""
  scale = panel_px / max(length * spacing, other)  # pixels per mm
  size = max(1, round(length * spacing * scale))
  return np.minimum(((np.arange(size) + 0.5) * length / size).astype(int),
                    length - 1)


def _panel(grey: np.ndarray, outcome: np.ndarray | None,
           spacing: tuple[float, float], mark: tuple[int, int] | None,
           panel_px: int) -> np.ndarray:
  """One ``uint8 [panel_px, panel_px, 3]`` panel of a plane ``[a, b]``.

  The plane's first axis runs left to right, its second bottom to top;
  ``mark`` ``(i, j)`` gets ticks on the top and left edges.
  """
  (a, b), (sa, sb) = grey.shape, spacing
  cols = _resample_indices(a, sa, b * sb, panel_px)
  rows = _resample_indices(b, sb, a * sa, panel_px)[::-1]
  index = np.ix_(cols, rows)
  levels = np.rint(grey[index].T * (GREY_LEVELS - 1))
  rgb = np.repeat((levels * (255 / (GREY_LEVELS - 1)) + 0.5).astype(
      np.uint8)[..., None], 3, axis=-1)
  if outcome is not None:
    codes = outcome[index].T
    for code, colour in _OUTCOME_COLOURS.items():
      rgb[codes == code] = colour
  panel = np.empty((panel_px, panel_px, 3), np.uint8)
  panel[:] = PAD_COLOUR
  top, left = (panel_px - rgb.shape[0]) // 2, (panel_px - rgb.shape[1]) // 2
  panel[top:top + rgb.shape[0], left:left + rgb.shape[1]] = rgb
  if mark is not None:
    col, row = left + _pixel_of(cols, mark[0]), top + _pixel_of(rows, mark[1])
    panel[:TICK_PX, col] = panel[row, :TICK_PX] = TICK_COLOUR
  return panel


def _pixel_of(indices: np.ndarray, index: int) -> int:
  """The output pixel at the centre of source ``index`` (or the nearest)."""
  hits = np.flatnonzero(indices == index)
  if hits.size:
    return int(hits.mean())
  return int(np.argmin(np.abs(indices - index)))


def _view_panel(grey: np.ndarray, outcome: np.ndarray | None,
                spacing: Sequence[float], focus: Focus, view: str,
                panel_px: int) -> np.ndarray:
  """The panel of one view (axial/coronal/sagittal) through ``focus``."""
  axis = _VIEW_AXIS[view]
  keep = [i for i in range(3) if i != axis]
  cut = focus.voxel[axis]
  mark = tuple(focus.voxel[i] for i in keep) if focus.size else None
  return _panel(np.take(grey, cut, axis),
                None if outcome is None else np.take(outcome, cut, axis),
                (spacing[keep[0]], spacing[keep[1]]), mark, panel_px)


def overlay_montage(image: np.ndarray | None, reference: np.ndarray,
                    prediction: np.ndarray, *,
                    spacing: Sequence[float] = (1.0, 1.0, 1.0),
                    focuses: Sequence[Focus] | None = None,
                    panel_px: int = PANEL_PX) -> np.ndarray:
  """The overlay montage of one case as an RGB array.

  Args:
    image: ``[x, y, z]`` scan (e.g. the first channel), or None for a grey
      background. Arrays are taken in display axes: x to the viewer's right,
      y anterior (up in axial views), z superior.
    reference: ``[x, y, z]``, lesion where non-zero.
    prediction: ``[x, y, z]``, lesion where non-zero.
    spacing: voxel size in mm along ``x, y, z``.
    focuses: the rows; default :func:`focus_points`.
    panel_px: size of each square panel.

  Returns:
    ``uint8 [h, w, 3]``: a row of square panels per focus; columns axial,
    coronal, sagittal overlays (TP/FP/FN in ``TP_COLOUR``, ``FP_COLOUR``,
    ``FN_COLOUR``) and, with an image, the axial scan alone. Panel ``(r, c)``
    starts at pixel ``(r, c) * (panel_px + GAP_PX)``; the gaps are
    ``GAP_COLOUR``. White ticks on a panel's top and left edges point at
    the focus component.
  """
  outcome = outcome_map(reference, prediction)
  if focuses is None:
    focuses = focus_points(reference, prediction)
  if image is None:
    grey = np.full(outcome.shape, NO_IMAGE_GREY, np.float32)
  else:
    grey = window_intensities(image)
  if grey.shape != outcome.shape:
    raise ValueError(f"image shape {grey.shape} differs from the reference's "
                     f"{outcome.shape}")
  rows = []
  for focus in focuses:
    panels = [_view_panel(grey, outcome, spacing, focus, view, panel_px)
              for view in VIEWS]
    if image is not None:
      panels.append(_view_panel(grey, None, spacing, focus, "axial", panel_px))
    rows.append(_join(panels, axis=1))
  return _join(rows, axis=0)


def _join(arrays: Sequence[np.ndarray], axis: int) -> np.ndarray:
  """Concatenates ``[h, w, 3]`` arrays with ``GAP_PX`` lines in between."""
  gap_shape = list(arrays[0].shape)
  gap_shape[axis] = GAP_PX
  gap = np.empty(gap_shape, np.uint8)
  gap[:] = GAP_COLOUR
  parts = [arrays[0]]
  for array in arrays[1:]:
    parts += [gap, array]
  return np.concatenate(parts, axis=axis)


def encode_png(rgb: np.ndarray) -> bytes:
  """Lossless PNG bytes of a ``uint8 [h, w, 3]`` (or ``[h, w]``) array.

  An RGB array with at most 256 colours (as the montages) is stored with a
  palette, about half the size.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgb = np.ascontiguousarray(rgb, np.uint8)
  image = Image.fromarray(rgb)
  if rgb.ndim == 3 and rgb.shape[-1] == 3:
    packed = rgb.astype(np.uint32) @ np.array([1 << 16, 1 << 8, 1], np.uint32)
    colours, index = np.unique(packed, return_inverse=True)
    if colours.size <= 256:
      image = Image.fromarray(index.reshape(packed.shape).astype(np.uint8),
                              mode="P")
      image.putpalette(((colours[:, None] >> np.array([16, 8, 0])) & 255)
                       .astype(np.uint8).ravel().tolist())
  buffer = io.BytesIO()
  image.save(buffer, format="PNG", optimize=True)
  return buffer.getvalue()


def to_display_axes(volume: np.ndarray, affine: np.ndarray
                    ) -> tuple[np.ndarray, tuple[float, float, float]]:
  """Reorients ``[x, y, z]`` to the closest RAS+ axes, for display only.

  Returns:
    ``(volume, spacing)``: the reoriented view and its voxel sizes in mm.
  """
  ornt = nib.orientations.io_orientation(affine)
  sizes = nib.affines.voxel_sizes(affine)
  spacing = [0.0, 0.0, 0.0]
  for old_axis, (new_axis, _) in enumerate(ornt):
    spacing[int(new_axis)] = float(sizes[old_axis])
  return (nib.orientations.apply_orientation(volume, ornt),
          tuple(spacing))


# --------------------------------------------------------------------------
# The HTML page
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaseFiles:
  """The files of one case: mask, reference, and scan (or None)."""

  mask: Path
  reference: Path
  image: Path | None


def collect_inputs(pred_dir: str | os.PathLike[str],
                   label_dir: str | os.PathLike[str],
                   images_dir: str | os.PathLike[str] | None = None, *,
                   allow_missing: bool = False) -> dict[str, CaseFiles]:
  """The files of every evaluated case, checked before any work is done.

  Cases are matched as :func:`tversky_jax.evaluate.match_cases` does; the
  scan of ``CASE`` is ``images_dir/CASE_0000.nii.gz`` (or ``.nii``).

  Raises:
    tversky_jax.evaluate.EvaluationError: see ``match_cases``; ``images_dir``
      is not a directory or lacks a case's scan.
  """
  matched, _ = evaluate.match_cases(pred_dir, label_dir,
                                    allow_missing=allow_missing)
  scans = {}
  if images_dir is not None:
    scans = evaluate._list_volumes(Path(images_dir), "images")
    missing = [case for case, *_ in matched
               if case + IMAGE_CHANNEL_SUFFIX not in scans]
    if missing:
      raise evaluate.EvaluationError(
          f"--images {images_dir}: no {IMAGE_CHANNEL_SUFFIX}.nii.gz scan for "
          f"{len(missing)} case(s): {evaluate._names(missing)}")
  return {case: CaseFiles(mask, ref, scans.get(case + IMAGE_CHANNEL_SUFFIX))
          for case, mask, _, ref in matched}


def render_case(case_id: str, files: CaseFiles, panel_px: int = PANEL_PX,
                label: int | None = None
                ) -> tuple[bytes, tuple[Focus, Focus]]:
  """Reads one case and renders its montage; returns ``(png, focuses)``.

  ``label``: the class shown (voxels == label); None: lesion where non-zero.
  """
  read = evaluate._read_volume
  reference, affine = read(files.reference)
  prediction, _ = read(files.mask)
  if label is not None:
    reference, prediction = reference == label, prediction == label
  image = None
  if files.image is not None:
    image, image_affine = read(files.image)
    evaluate._check_grid(case_id, "image", image, image_affine, reference,
                         affine)
    image, _ = to_display_axes(image, affine)
  reference, spacing = to_display_axes(reference, affine)
  prediction, _ = to_display_axes(prediction, affine)
  focuses = focus_points(reference, prediction)
  rgb = overlay_montage(image, reference, prediction, spacing=spacing,
                        focuses=focuses, panel_px=panel_px)
  return encode_png(rgb), focuses


def worst_first(cases: Sequence[evaluate.CaseResult]
                ) -> list[evaluate.CaseResult]:
  """Cases by increasing DSC (ties by name)."""
  return sorted(cases, key=lambda c: (c.metrics()["dsc"], c.case_id))


def check_class_name(names: Sequence[str], name: str) -> None:
  """Raises EvaluationError unless ``name`` (``--report-class``) is in
  ``names``."""
  if name not in names:
    raise evaluate.EvaluationError(
        f"--report-class {name}: not an evaluated class ({', '.join(names)})")


def choose_report_class(result: evaluate.EvaluationResult,
                        name: str | None = None) -> evaluate.ClassEvaluation:
  """The class the montages show: ``name``, or by default the class with the
  fewest reference voxels (ignoring absent classes; ties: lowest label)."""
  if name is not None:
    check_class_name(list(result.classes), name)
    return result.classes[name]
  present = [c for c in result.classes.values() if c.reference_voxels]
  return min(present or result.classes.values(),
             key=lambda c: (c.reference_voxels, c.label))


def write_report(result: evaluate.EvaluationResult,
                 files: dict[str, CaseFiles], path: str | os.PathLike[str],
                 *, title: str = "Evaluation report",
                 panel_px: int = PANEL_PX, progress: bool = False,
                 report_class: str | None = None) -> Path:
  """Writes the HTML page of an evaluation.

  Args:
    result: from :func:`tversky_jax.evaluate.evaluate_folders`.
    files: from :func:`collect_inputs`, for every case of ``result``.
    path: the ``.html`` file to write (parent folders are created).
    title: the page title.
    panel_px: size of each montage panel.
    progress: a tqdm bar over the cases.
    report_class: the class of the montages and of the case order (see
      :func:`choose_report_class`).

  Returns:
    The written path.
  """
  shown = choose_report_class(result, report_class)
  label = None if result.binary else shown.label
  figures = []
  for case in tqdm(worst_first(shown.cases), desc="report", unit="case",
                   disable=not progress):
    png, focuses = render_case(case.case_id, files[case.case_id], panel_px,
                               label)
    figures.append(_case_figure(case, png, focuses,
                                files[case.case_id].image is not None,
                                panel_px))
  has_image = any(f.image is not None for f in files.values())
  order = "" if result.binary else f" of class {html.escape(shown.name)}"
  body = [f"<h1>{html.escape(title)}</h1>",
          _summary(result, has_image, shown), '<div class="top"><div>',
          "<h2>Metrics</h2>", _metrics_tables(result), "</div><div>",
          _pr_curve_section(result), "</div></div>",
          f"<h2>Cases, worst DSC{order} first</h2>", legend(has_image),
          '<div class="cases">', *figures, "</div>"]
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(html_page(title, "\n".join(body)), encoding="utf-8")
  return path


def data_uri(png: bytes) -> str:
  """``data:image/png;base64,...`` of PNG bytes."""
  return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _pct(value: float) -> str:
  return f"{100 * value:.1f}" if math.isfinite(value) else "&ndash;"


_TABLE_COLUMNS = (("dsc", "DSC"), ("sensitivity", "Sens"),
                  ("specificity", "Spec"), ("precision", "Prec"),
                  ("f2", "F2"), ("apr", "APR"),
                  ("lesion_precision", "L-Prec"),
                  ("lesion_recall", "L-Rec"), ("lesion_f1", "L-F1"))


def _table_row(name: str, values: dict[str, float], lesions: str,
               fp_lesions: str, link: bool) -> str:
  label = html.escape(name)
  if link:
    label = f'<a href="#case-{label}">{label}</a>'
  cells = "".join(f"<td>{_pct(values[k])}</td>" for k, _ in _TABLE_COLUMNS)
  return (f"<tr><th>{label}</th>{cells}<td>{lesions}</td>"
          f"<td>{fp_lesions}</td></tr>")


def _metrics_tables(result: evaluate.EvaluationResult) -> str:
  """The metrics table; with classes one per class, then their mean."""
  if result.binary:
    return _metrics_table(result.only())
  parts = [f"<h3>Class {html.escape(c.name)} (label {c.label})</h3>"
           + _metrics_table(c) for c in result.classes.values()]
  parts.append(f"<h3>Mean over the {len(result.classes)} classes</h3>"
               + _table([], [_table_row(which, values, "&ndash;", "&ndash;",
                                        link=False)
                             for which, values in result.class_mean.items()]))
  return "\n".join(parts)


def _metrics_table(evaluation: evaluate.ClassEvaluation) -> str:
  """One row per case (worst DSC first), then pooled and mean, and a note
  on the empty-reference cases when there are any."""
  rows = []
  for case in worst_first(evaluation.cases):
    les = case.lesions
    rows.append(_table_row(case.case_id, case.metrics(),
                           f"{les.detected}/{les.reference}",
                           str(les.false_positive), link=True))
  pooled, mean = evaluation.pooled, evaluation.mean
  table = _table(rows, [
      _table_row("pooled", pooled,
                 f"{pooled['detected_lesions']}/{pooled['ref_lesions']}",
                 str(pooled["fp_lesions"]), link=False),
      _table_row("mean", mean,
                 f"{mean['detected_lesions']:.1f}/{mean['ref_lesions']:.1f}",
                 f"{mean['fp_lesions']:.1f}", link=False)])
  note = evaluate.empty_reference_note(mean)
  return table + (f"\n<p>{html.escape(note[:1].upper() + note[1:])}.</p>"
                  if note else "")


def _table(rows: Sequence[str], summary_rows: Sequence[str]) -> str:
  """The table of :func:`_table_row` rows, the summary rows in bold."""
  head = "".join(f"<th>{label}</th>" for _, label in _TABLE_COLUMNS)
  return "\n".join(
      [f'<table class="metrics"><thead><tr><th>case</th>{head}'
       "<th>detected</th><th>FP les.</th></tr></thead><tbody>", *rows,
       '</tbody><tbody class="summary">', *summary_rows, "</tbody></table>"])


def _summary(result: evaluate.EvaluationResult, has_image: bool,
             shown: evaluate.ClassEvaluation) -> str:
  if result.binary:
    pooled, text = shown.pooled, f"{len(shown.cases)} case(s); pooled"
  else:
    pooled = result.class_mean["pooled"]
    text = (f"{len(shown.cases)} case(s), {len(result.classes)} classes; "
            "mean over the classes of the pooled")
  text += (f" DSC {_pct(pooled['dsc'])} %, sensitivity "
           f"{_pct(pooled['sensitivity'])} %, precision "
           f"{_pct(pooled['precision'])} %. Metrics in %; lesions are "
           "26-connected components.")
  if not result.binary:
    text += (f" The overlays show class {html.escape(shown.name)} (label "
             f"{shown.label}; choose with --report-class).")
  if not has_image:
    text += " No scans were given (--images), so overlays are on grey."
  return f"<p>{text}</p>"


def _pr_curve_section(result: evaluate.EvaluationResult) -> str:
  """The PR-curve figure: the evaluator's pr_curve.png, or a fresh one."""
  if not result.has_pr_curves:
    return "<p>No probability maps, so no precision-recall curve.</p>"
  if result.plot_path is not None and result.plot_path.is_file():
    png = result.plot_path.read_bytes()
  else:
    with tempfile.TemporaryDirectory() as tmp:
      png = evaluate.write_pr_plot(result, Path(tmp) / "pr.png").read_bytes()
  return ('<h2>Precision-recall</h2><img class="pr" alt="precision-recall '
          f'curves" src="{data_uri(png)}">')


def legend(has_image: bool) -> str:
  """The colour key and the montage layout, HTML."""
  items = "".join(
      f'<span class="sw" style="background:#{r:02X}{g:02X}{b:02X}"></span>'
      f"{name} " for name, (r, g, b) in (("true positive", TP_COLOUR),
                                         ("false positive", FP_COLOUR),
                                         ("false negative", FN_COLOUR)))
  columns = ", ".join(VIEWS) + (", axial scan alone" if has_image else "")
  return (f'<p class="legend">{items}<br>Columns: {columns}. Top row: '
          "through the largest reference lesion; bottom row: through the "
          "largest false-positive component (volume centre when there is "
          "none). White ticks on the top and left edges point at the "
          "component. Patient left on the left, anterior/superior up.</p>")


def _row_label(name: str, focus: Focus) -> str:
  return (f"{name}<br>{focus.size} vox" if focus.size
          else f"no {name}<br>(centre)")


def _case_figure(case: evaluate.CaseResult, png: bytes,
                 focuses: tuple[Focus, Focus], has_image: bool,
                 panel_px: int) -> str:
  values, les = case.metrics(), case.lesions
  caption = (f"<b>{html.escape(case.case_id)}</b>: DSC "
             f"{_pct(values['dsc'])} %, sensitivity "
             f"{_pct(values['sensitivity'])} %, precision "
             f"{_pct(values['precision'])} %; lesions detected "
             f"{les.detected}/{les.reference}, FP components "
             f"{les.false_positive}")
  return montage_figure(f"case-{case.case_id}", case.case_id, png, focuses,
                        has_image, panel_px, caption)


def montage_figure(anchor: str, name: str, png: bytes,
                   focuses: Sequence[Focus], has_image: bool, panel_px: int,
                   caption: str) -> str:
  """A montage of :func:`overlay_montage` as an HTML figure.

  Args:
    anchor: the figure's id (escaped here).
    name: what the montage shows, for the image's alt text (escaped here).
    png: the montage, from :func:`encode_png` (embedded as a data URI).
    focuses: its rows (labelled with the component sizes).
    has_image: whether it has the scan column.
    panel_px: its panel size.
    caption: the caption, HTML.
  """
  heads = "".join(f"<span>{v}</span>" for v in
                  (*VIEWS, *(("scan",) if has_image else ())))
  labels = "".join(f"<div>{_row_label(n, f)}</div>" for n, f in
                   zip(("lesion", "FP"), focuses))
  return (f'<figure id="{html.escape(anchor)}" style="--p:{panel_px}px">'
          f'<div class="m"><div></div><div class="h">{heads}</div>{labels}'
          f'<img alt="overlay of {html.escape(name)}" src="{data_uri(png)}">'
          f"</div><figcaption>{caption}</figcaption></figure>")


def markdown_html(text: str) -> str:
  """HTML of the markdown subset the reports write.

  Headings (``#``, ``##``, ...), pipe tables (a header row, a rule row, body
  rows; as ``table.metrics``), ``- `` bullet lists and paragraphs (blocks
  separated by blank lines). Text is escaped; no inline markup.
  """
  out = []
  for block in text.strip().split("\n\n"):
    lines = block.splitlines()
    if lines[0].startswith("#"):
      level = len(lines[0]) - len(lines[0].lstrip("#"))
      out.append(f"<h{level}>{_text(lines[0][level:].strip())}"
                 f"</h{level}>")
    elif lines[0].startswith("|"):
      cells = [[_text(c.strip()) for c in line.strip().strip("|")
                .split("|")] for line in lines if not line.startswith("|-")]
      head = "".join(f"<th>{c}</th>" for c in cells[0])
      body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                     for row in cells[1:])
      out.append(f'<table class="metrics"><thead><tr>{head}</tr></thead>'
                 f"<tbody>{body}</tbody></table>")
    elif lines[0].startswith("- "):
      out.append("<ul>" + "".join(f"<li>{_text(line[2:])}</li>"
                                  for line in lines) + "</ul>")
    else:
      out.append(f"<p>{_text(' '.join(lines))}</p>")
  return "\n".join(out)


def _text(text: str) -> str:
  return html.escape(text, quote=False)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em;color:#222}
table.metrics{border-collapse:collapse;font-variant-numeric:tabular-nums}
.metrics th,.metrics td{padding:2px 6px;text-align:right;
  border-bottom:1px solid #ddd}
.metrics thead th{border-bottom:2px solid #444}
.metrics tbody th{text-align:left;font-weight:inherit}
.metrics tbody.summary{font-weight:bold}
.metrics tbody.summary tr:first-child>*{border-top:2px solid #444}
.top{display:flex;flex-wrap:wrap;gap:0 2em;align-items:flex-start}
img.pr{width:420px}
img.sweep-pr{width:600px;max-width:100%}
.legend .sw{display:inline-block;width:1em;height:1em;margin:0 .3em 0 .8em;
  vertical-align:-2px}
.cases{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;padding:6px;border:1px solid #ccc;background:#fafafa}
figcaption{font-size:12px;width:0;min-width:100%}
.m{display:grid;grid-template-columns:48px auto;font-size:11px;
  grid-template-rows:auto calc(var(--p) + 1px) calc(var(--p) + 1px)}
.m .h{display:flex;gap:2px}.m .h span{width:var(--p);text-align:center}
.m>div:nth-child(n+3){display:flex;align-items:center}
.m img{grid-column:2;grid-row:2/4;image-rendering:pixelated}
"""


def html_page(title: str, body: str) -> str:
  """A whole self-contained page (the reports' CSS inline) around ``body``."""
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
          f"<body>\n{body}\n</body></html>\n")
