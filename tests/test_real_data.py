"""The real-data path end to end: mixed spacings, three classes, the default
recipe (plan, preprocess, augment), validation and prediction back on each
scan's own grid; a collapsed run stops with a message; the paper's
unnormalised network does not collapse on a tiny case.
"""

import json

import jax
import nibabel as nib
import numpy as np
import pytest

from tests.helpers import tiny_config
from tversky_jax import predict
from tversky_jax import train_lib
from tversky_jax import train_state
from tversky_jax.data import planning

SPACINGS = ((1.0, 1.0, 1.0), (1.0, 1.0, 2.0), (1.0, 1.0, 2.0), (0.8, 0.8, 2.0),
            (1.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def three_class_dataset(tmp_path_factory):
  """The tiny phantoms with a third class and mixed anisotropic spacings."""
  from tversky_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("real") / "Dataset910_ThreeClass"
  synthetic.make_synthetic_dataset(root, num_cases=5, shape=(24, 24, 24),
                                   seed=7)
  meta = json.loads((root / "dataset.json").read_text())
  meta["labels"] = {"background": 0, "lesion": 1, "bright": 2}
  (root / "dataset.json").write_text(json.dumps(meta))
  for i, spacing in enumerate(SPACINGS):
    case = sorted({p.name.rsplit("_", 1)[0]
                   for p in (root / "imagesTr").iterdir()})[i]
    label_path = root / "labelsTr" / f"{case}.nii.gz"
    t1 = nib.load(root / "imagesTr" / f"{case}_0000.nii.gz")
    label = np.asarray(nib.load(label_path).dataobj).astype(np.uint8)
    t1_data = np.asarray(t1.dataobj)
    bright = (t1_data > np.percentile(t1_data[t1_data > 0], 80)) & (label == 0)
    label[bright] = 2
    for path in [*sorted((root / "imagesTr").glob(f"{case}_*.nii.gz")),
                 label_path]:
      data = label if path == label_path else np.asarray(nib.load(path).dataobj)
      affine = np.diag([*spacing, 1.0])
      image = nib.Nifti1Image(data, affine)
      image.header.set_qform(affine, code=1)
      image.header.set_sform(affine, code=1)
      nib.save(image, path)
  return root


def test_three_classes_and_mixed_spacings_train_and_predict_on_each_grid(
    three_class_dataset, tmp_path):
  config = tiny_config(three_class_dataset, **{"train.num_steps": 2,
                                               "train.eval_every": 2,
                                               "augment.enabled": True})
  summary = train_lib.train_and_evaluate(config, str(tmp_path / "run"),
                                         progress=False)
  assert summary.step == 2
  for name in ("dsc/lesion", "dsc/bright", "pooled_f2/lesion", "dsc", "f2"):
    assert name in summary.final_metrics, summary.final_metrics
  plan = planning.load_plan(tmp_path / "run" / "preprocessed")
  assert plan.num_classes == 3
  assert plan.target_spacing == (1.0, 1.0, 2.0)  # the median per axis

  predictor = predict.load_predictor(tmp_path / "run", checkpoint="latest")
  assert predictor.num_classes == 3 and predictor.plan is not None
  out = tmp_path / "out"
  status = predict.main(["--workdir", str(tmp_path / "run"), "--input",
                         str(three_class_dataset / "imagesTr"), "--output",
                         str(out), "--save-probabilities", "--no-progress",
                         "--checkpoint", "latest"])
  assert status == 0
  for scan in sorted((three_class_dataset / "labelsTr").iterdir()):
    reference = nib.load(scan)
    mask = nib.load(out / scan.name)
    prob = nib.load(out / scan.name.replace(".nii.gz", "_prob.nii.gz"))
    assert mask.shape == reference.shape
    np.testing.assert_allclose(mask.affine, reference.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
    probabilities = np.asarray(prob.dataobj)
    assert probabilities.shape == (*reference.shape, 3)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-4)


def test_a_collapsed_run_stops_with_what_to_change(tiny_dataset, tmp_path,
                                                   monkeypatch):
  # A loss that ignores the network: its gradient is exactly zero.
  monkeypatch.setattr(
      train_state, "weighted_loss_fn",
      lambda cfg: lambda logits, labels, **weights: 0.0 * logits.sum() + 1.0)
  config = tiny_config(tiny_dataset, **{"train.stuck_patience": 3,
                                        "train.num_steps": 20})
  with pytest.raises(train_lib.TrainingStuck,
                     match="training is stuck at step 3.*"
                           "model.normalization=instance"):
    train_lib.train_and_evaluate(config, str(tmp_path),
                                 devices=jax.devices()[:1], progress=False)


def test_paper_network_without_normalisation_learns_on_a_tiny_case(
    tiny_dataset, tmp_path):
  """No normalisation, Tversky loss, whole volumes: with He initialisation,
  warm-up and clipping it does not collapse (the loss falls, the gradient
  stays), for several seeds."""
  # The learning rate is well inside the stable range: at 3e-3 seed 1 went
  # to the all-background state at step ~13 or learnt depending only on the
  # float rounding of the gradient's global norm (summation order); at 2e-3
  # seeds 0-3 learn with either rounding, the loss down by 0.19-0.51.
  for seed in (0, 1, 2):
    config = tiny_config(tiny_dataset, **{
        "seed": seed, "model.normalization": "none",
        "loss.name": "tversky", "augment.enabled": False,
        "data.preprocess": False, "data.patch_shape": (),
        "inference.window": (), "optimizer.learning_rate": 2e-3,
        "optimizer.warmup_steps": 5, "train.num_steps": 40,
        "train.log_every": 1, "train.checkpoint_every": 0,
        "train.stuck_patience": 0})
    workdir = tmp_path / f"seed{seed}"
    summary = train_lib.train_and_evaluate(config, str(workdir),
                                           devices=jax.devices()[:1],
                                           progress=False)
    records = [json.loads(line) for line in
               (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records]
    norms = [r["train/grad_norm"] for r in records]
    assert summary.step == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, (seed, losses)
    assert min(norms[-5:]) > 1e-3 * max(norms[:5]), (seed, norms)
