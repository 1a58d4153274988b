"""TensorBoard images of validation: the writer, the overlays drawn from the
validation predictions, and a short training that writes them.

CI installs only ``.[test]``: the tests use a recording stand-in for
``tensorboardX`` (forwarding to the real one when it is installed); the test
that reads the real event files needs the ``tensorboard`` extra.
"""

import glob
import io
import json
import os
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests import helpers
from tversky_jax import metric_writer
from tversky_jax import report
from tversky_jax import train_lib
from tversky_jax import validation
from tversky_jax.data import preprocessing
from tversky_jax.training_data import ValidationCase

# The real SummaryWriter, imported as the writer imports it (without
# loading torch, where installed; importing it took 4-6 s of each worker).
REAL_SUMMARY_WRITER = metric_writer._tensorboardx_summary_writer()  # pylint: disable=protected-access

SHAPE = (16, 16, 16)
CLASS_NAMES = ("background", "lesion")


def recording_tensorboardx():
  """A stand-in ``tensorboardX`` module whose SummaryWriters record their
  calls (and forward them to a real writer when tensorboardX is installed).
  """
  module = types.ModuleType("tensorboardX")
  module.writers = []

  class SummaryWriter:

    def __init__(self, logdir):
      self.logdir, self.scalars, self.images = logdir, [], []
      self.closed = False
      self.real = (REAL_SUMMARY_WRITER(logdir)
                   if REAL_SUMMARY_WRITER is not None else None)
      module.writers.append(self)

    def add_scalar(self, tag, value, step):
      self.scalars.append((tag, value, step))
      if self.real is not None:
        self.real.add_scalar(tag, value, step)

    def add_image(self, tag, img, step, dataformats="CHW"):
      self.images.append((tag, np.array(img), step, dataformats))
      if self.real is not None:
        self.real.add_image(tag, img, step, dataformats=dataformats)

    def close(self):
      self.closed = True
      if self.real is not None:
        self.real.close()

  module.SummaryWriter = SummaryWriter
  return module


class FakeWriter:
  """What :func:`validation.validate` needs of a MetricWriter."""

  def __init__(self, takes_images=True):
    self.takes_images = takes_images
    self.values, self.images = [], []

  def write(self, step, values):
    self.values.append((step, values))

  def write_images(self, step, images):
    self.images.append((step, images))


def _case(case_id, shift, meta=None, image=None):
  """A reference block; the image's first channel is the block shifted by
  ``shift`` voxels along x, which :func:`_logits` segments exactly."""
  label = np.zeros(SHAPE, np.uint8)
  label[4:10, 5:11, 6:12] = 1
  found = np.roll(label, shift, axis=0)
  if image is None:
    image = np.stack([found, np.ones(SHAPE)], -1).astype(np.float32)
  return ValidationCase(case_id, image, label, meta), found


def _logits(calls):
  def fn(x):
    calls.append(x.shape[0])
    lesion = (x[..., :1] - 0.5) * 20.0
    return jnp.concatenate([-lesion, lesion], axis=-1)
  return fn


def _config():
  config = helpers.tiny_config("/unused")
  config.inference.overlap = 0.0
  return config


def test_validate_draws_the_first_cases_from_the_scored_predictions():
  cases = [_case(f"case_{i}", shift)[0] for i, shift in enumerate((2, 0, 1))]
  with_images, without = [], []
  writer = FakeWriter()
  values = validation.validate(cases, _logits(with_images), _config(),
                               (16, 16, 16), CLASS_NAMES, jax.devices()[:1],
                               writer, step=7)
  plain = validation.validate(cases, _logits(without), _config(),
                              (16, 16, 16), CLASS_NAMES, jax.devices()[:1],
                              FakeWriter(takes_images=False), step=7)
  # The images come from the predictions being scored: no second inference.
  assert len(with_images) == len(without) == len(cases)
  assert values == plain
  assert writer.values == [(7, {f"val/{k}": v for k, v in values.items()})]
  ((step, images),) = writer.images
  assert step == 7 and list(images) == ["val_overlay/case_0",
                                        "val_overlay/case_1"]
  # Exactly the report's montage of (scan, reference, segmentation).
  for case, rgb in zip(cases, images.values()):
    found = np.roll(case.label, 2 if case.case_id == "case_0" else 0, axis=0)
    expected = report.overlay_montage(case.image[..., 0], case.label, found)
    np.testing.assert_array_equal(rgb, expected)
  colours = [int(np.all(images["val_overlay/case_0"] == c, -1).sum())
             for c in (report.TP_COLOUR, report.FP_COLOUR, report.FN_COLOUR)]
  assert all(colours)  # shifted: all three outcomes
  colours = [int(np.all(images["val_overlay/case_1"] == c, -1).sum())
             for c in (report.TP_COLOUR, report.FP_COLOUR, report.FN_COLOUR)]
  assert colours[0] and not colours[1] and not colours[2]  # exact


def test_case_overlay_puts_a_preprocessed_scan_back_on_the_label_grid():
  # The network saw the crop x 2:14 of a scan flipped along x (affine -1).
  affine = np.diag([-1.0, 1.0, 1.0, 1.0])
  bbox = ((2, 14), (0, 16), (0, 16))
  meta = preprocessing.CaseMeta(
      case_id="c", original_shape=SHAPE, original_spacing=(1.0, 1.0, 1.0),
      affine=tuple(map(tuple, affine)), bbox=bbox,
      shape_after_crop=(12, 16, 16), preprocessed_shape=(12, 16, 16),
      preprocessed_affine=tuple(map(tuple, affine)))
  scan = np.random.default_rng(0).uniform(1, 2, SHAPE).astype(np.float32)
  image = scan[2:14, :, :, None]
  case, found = _case("c", 1, meta=meta, image=image)
  tag, rgb = validation.case_overlay(case, found, CLASS_NAMES)
  assert tag == "val_overlay/c"
  padded = np.zeros(SHAPE, np.float32)
  padded[2:14] = scan[2:14]
  flip = lambda v: report.to_display_axes(v, affine)[0]  # noqa: E731
  np.testing.assert_array_equal(rgb, report.overlay_montage(
      flip(padded), flip(case.label), flip(found)))


def test_case_overlay_of_several_classes_shows_the_smallest():
  case, found = _case("c", 1)
  label = case.label.copy()
  label[12:] = 2  # a large class 2: the lesion (1) is the smaller
  case = ValidationCase("c", case.image, label)
  tag, _ = validation.case_overlay(case, found, ("bg", "lesion", "tissue"))
  assert tag == "val_overlay/c/lesion"


def test_metric_writer_sends_images_to_tensorboard(tmp_path, monkeypatch):
  fake = recording_tensorboardx()
  monkeypatch.setitem(sys.modules, "tensorboardX", fake)
  writer = metric_writer.MetricWriter(str(tmp_path))
  assert writer.takes_images
  rgb = np.zeros((4, 6, 3), np.uint8)
  writer.write(3, {"val/dsc": 0.5})
  writer.write_images(3, {"val_overlay/a": rgb})
  writer.close()
  (tb,) = fake.writers
  assert tb.logdir == str(tmp_path / "tensorboard") and tb.closed
  assert tb.scalars == [("val/dsc", 0.5, 3)]
  ((tag, image, step, dataformats),) = tb.images
  assert (tag, step, dataformats, image.shape) == ("val_overlay/a", 3, "HWC",
                                                   (4, 6, 3))


def test_metric_writer_without_tensorboard_writes_no_images(tmp_path,
                                                           monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # ImportError
  writer = metric_writer.MetricWriter(str(tmp_path))
  assert not writer.takes_images
  writer.write(1, {"train/loss": 0.9})
  writer.write_images(1, {"val_overlay/a": np.zeros((4, 6, 3), np.uint8)})
  writer.close()
  assert not (tmp_path / "tensorboard").exists()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == [{"step": 1, "train/loss": 0.9}]
  assert (tmp_path / "curves.png").is_file()
  disabled = metric_writer.MetricWriter(str(tmp_path / "nowhere"),
                                        enabled=False)
  disabled.write_images(1, {"a": np.zeros((2, 2, 3), np.uint8)})
  disabled.close()


def test_tensorboard_does_not_load_torch(tmp_path):
  # tensorboardX imports torch when it can (4 s with PyTorch installed);
  # the writer hides it during that import only. A stand-in torch package
  # records whether it was imported.
  fake_torch = tmp_path / "site" / "torch"
  fake_torch.mkdir(parents=True)
  marker = tmp_path / "torch_imported"
  (fake_torch / "__init__.py").write_text(
      f"open({str(marker)!r}, 'a').write('imported')\n")
  script = (
      "import sys\n"
      "from tversky_jax import metric_writer\n"
      f"writer = metric_writer.MetricWriter({str(tmp_path)!r})\n"
      "writer.write(1, {'train/loss': 0.5})\n"
      "writer.close()\n"
      "print('torch' in sys.modules, flush=True)\n"
      "import torch  # still importable afterwards\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(tmp_path / "site"), helpers.ROOT]))
  out = subprocess.run([sys.executable, "-c", script], env=env, cwd=helpers.ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["False"]
  assert marker.read_text() == "imported"  # once: by the script's own import
  if REAL_SUMMARY_WRITER is not None:
    assert glob.glob(str(tmp_path / "tensorboard" / "events.*"))


@pytest.fixture(scope="module")
def validated_run(tiny_dataset, tmp_path_factory):
  """Two steps with a validation at step 2, TensorBoard recorded."""
  workdir = str(tmp_path_factory.mktemp("tb_run"))
  config = helpers.tiny_config(tiny_dataset, **{
      "train.num_steps": 2, "train.eval_every": 2,
      "model.conv_impl": "native"})
  fake = recording_tensorboardx()
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(sys.modules, "tensorboardX", fake)
    summary = train_lib.train_and_evaluate(config, workdir,
                                           devices=jax.devices()[:1],
                                           progress=False)
  assert summary.step == 2 and summary.final_metrics
  return workdir, fake


def test_training_writes_validation_overlays(validated_run):
  workdir, fake = validated_run
  (tb,) = fake.writers
  assert tb.closed
  assert any(tag == "val/dsc" and step == 2 for tag, _, step in tb.scalars)
  ((tag, image, step, dataformats),) = tb.images  # one validation case
  assert tag.startswith("val_overlay/case_") and step == 2
  assert dataformats == "HWC" and image.dtype == np.uint8
  grid = report.PANEL_PX + report.GAP_PX
  assert image.shape == (2 * grid - report.GAP_PX, 4 * grid - report.GAP_PX, 3)
  assert os.path.isfile(os.path.join(workdir, "curves.png"))


def _event_images(logdir):
  """(step, tag, png bytes) of every image summary in the event files."""
  # pylint: disable-next=import-outside-toplevel
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      out += [(event.step, v.tag, v.image.encoded_image_string)
              for v in event.summary.value if v.HasField("image")]
  return out


@pytest.mark.skipif(REAL_SUMMARY_WRITER is None,
                    reason="tensorboardX is not installed (the optional "
                    "'tensorboard' extra: pip install -e '.[tensorboard]')")
def test_tensorboard_event_file_holds_the_overlay(validated_run):
  workdir, fake = validated_run
  ((step, tag, png),) = _event_images(os.path.join(workdir, "tensorboard"))
  ((recorded_tag, recorded, recorded_step, _),) = fake.writers[0].images
  assert (step, tag) == (recorded_step, recorded_tag) and step == 2
  decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
  np.testing.assert_array_equal(decoded, recorded)
