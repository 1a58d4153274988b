"""Tests for tversky_jax.data.pipeline: the grain training input pipeline."""

import hashlib
import itertools
import json
import pickle

import grain
import numpy as np
import pytest

from tversky_jax.data import nifti, pipeline, planning, preprocessing, sampling, synthetic

PATCH_KW = dict(patch_shape=(16, 16, 16), divisor=8, foreground_fraction=0.5,
                random_flip=True, seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline") / "Dataset900_Phantoms"
  synthetic.make_synthetic_dataset(root, num_cases=4, shape=(24, 24, 24))
  return nifti.read_dataset(root)


@pytest.fixture(scope="module")
def cases(dataset):
  return pipeline.load_training_cases(dataset, dataset.training_cases, progress=False)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    assert a.keys() == e.keys() == {"image", "label"}
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(e[key]))


def coded_case(case_id, shape, value):
  """A case whose image is the constant `value` (channel 0) and 0 elsewhere."""
  image = np.zeros((*shape, 2), np.float32)
  image[..., 0] = value
  return pipeline.TrainingCase.from_arrays(case_id, image, np.ones(shape, np.uint8))


# ----------------------------------------------------------------- loading


def test_load_training_cases(dataset, cases, capsys):
  assert [c.case_id for c in cases] == list(dataset.training_cases)
  for case in cases:
    raw = nifti.load_case(dataset, case.case_id)
    assert case.image.dtype == np.float32 and case.image.shape == (24, 24, 24, 3)
    assert case.label.dtype == np.uint8 and case.label.shape == (24, 24, 24)
    np.testing.assert_array_equal(case.image, nifti.normalize_image(raw.image))
    np.testing.assert_array_equal(case.label, raw.label)
    np.testing.assert_array_equal(case.foreground, np.argwhere(raw.label > 0))
    assert len(case.foreground) > 0
  # Order of case_ids is kept; the progress bar goes to stderr.
  reversed_ids = list(reversed(dataset.training_cases[:2]))
  loaded = pipeline.load_training_cases(dataset, reversed_ids, progress=True)
  assert [c.case_id for c in loaded] == reversed_ids
  assert "loading train cases" in capsys.readouterr().err


def test_load_training_cases_errors(dataset, tmp_path):
  with pytest.raises(ValueError, match="case_ids is empty"):
    pipeline.load_training_cases(dataset, [], progress=False)
  with pytest.raises(nifti.DatasetError, match="not found"):
    pipeline.load_training_cases(dataset, ["nope"], progress=False)
  root = synthetic.make_synthetic_dataset(tmp_path / "ds", num_cases=1, shape=(16, 16, 16),
                                          num_test_cases=1)
  for f in (root / "labelsTs").iterdir():
    f.unlink()
  (root / "labelsTs").rmdir()
  with pytest.raises(ValueError, match="has no label"):
    pipeline.load_training_cases(nifti.read_dataset(root), ["test_000"], "test", progress=False)


def test_training_case_from_arrays_checks_shapes():
  with pytest.raises(ValueError, match="label shape"):
    pipeline.TrainingCase.from_arrays("a", np.zeros((4, 4, 4, 1)), np.zeros((4, 4, 3)))
  with pytest.raises(ValueError, match=r"\[x, y, z, c\]"):
    pipeline.TrainingCase.from_arrays("a", np.zeros((4, 4, 4)), np.zeros((4, 4, 4)))


# ------------------------------------------------------------ shapes, modes


def test_patch_mode_shapes_and_dtypes(cases):
  it = pipeline.make_train_iterator(cases, global_batch_size=4, **PATCH_KW)
  assert isinstance(it, grain.DatasetIterator)
  for batch in take(it, 3):
    assert batch["image"].shape == (4, 16, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4, 16, 16, 16) and batch["label"].dtype == np.int32
    assert set(np.unique(batch["label"])) <= {0, 1}


def test_patch_larger_than_volume_is_padded(cases):
  kw = {**PATCH_KW, "patch_shape": (32, 32, 24)}
  batch = next(pipeline.make_train_iterator(cases, global_batch_size=2, **kw))
  assert batch["image"].shape == (2, 32, 32, 24, 3) and batch["label"].shape == (2, 32, 32, 24)
  # 24 -> 32 adds 4 zero slices on each side of x and y.
  assert not batch["image"][:, :4].any() and not batch["image"][:, -4:].any()
  assert batch["image"][:, 4:28, 4:28].any()


@pytest.mark.parametrize("patch_shape", [None, ()])
def test_whole_volume_mode_pads_to_common_multiple(patch_shape):
  shapes = [(20, 18, 17), (24, 9, 20), (12, 16, 16)]
  cases = [coded_case(f"c{i}", s, i + 1) for i, s in enumerate(shapes)]
  padded = [sampling.pad_to_shape(c.image, c.label, (24, 24, 24)) for c in cases]
  it = pipeline.make_train_iterator(
      cases, global_batch_size=3, patch_shape=patch_shape, divisor=8,
      foreground_fraction=0.5, random_flip=False, seed=3)
  orders = []
  for batch in take(it, 4):  # one batch = one epoch of the 3 cases
    assert batch["image"].shape == (3, 24, 24, 24, 2) and batch["label"].shape == (3, 24, 24, 24)
    order = [int(batch["image"][k, 12, 12, 8, 0]) - 1 for k in range(3)]
    assert sorted(order) == [0, 1, 2]  # every epoch visits each case once
    for k, c in enumerate(order):
      np.testing.assert_array_equal(batch["image"][k], padded[c][0])
      np.testing.assert_array_equal(batch["label"][k], padded[c][1])
    orders.append(order)
  assert len({tuple(o) for o in orders}) > 1  # reshuffled between epochs


# --------------------------------------------------------------- determinism


def test_same_seed_same_batches_different_seed_different(cases):
  kw = {**PATCH_KW, "global_batch_size": 4}
  a = take(pipeline.make_train_iterator(cases, **kw), 5)
  b = take(pipeline.make_train_iterator(cases, **kw, prefetch_batches=0), 5)
  assert_batches_equal(a, b)
  c = take(pipeline.make_train_iterator(cases, **{**kw, "seed": 1}), 5)
  assert not any(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_concatenate_to_the_global_batch(cases, process_count):
  kw = {**PATCH_KW, "global_batch_size": 8}
  steps = 3
  whole = take(pipeline.make_train_iterator(cases, **kw), steps)
  shards = [
      take(pipeline.make_train_iterator(cases, **kw, process_index=p,
                                        process_count=process_count), steps)
      for p in range(process_count)
  ]
  for t in range(steps):
    for key in ("image", "label"):
      parts = [shards[p][t][key] for p in range(process_count)]
      assert parts[0].shape[0] == 8 // process_count
      np.testing.assert_array_equal(np.concatenate(parts), whole[t][key])


@pytest.mark.parametrize("prefetch_batches", [0, 2])
def test_resume_from_json_state(cases, prefetch_batches):
  kw = {**PATCH_KW, "global_batch_size": 2, "prefetch_batches": prefetch_batches}
  it = pipeline.make_train_iterator(cases, **kw)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 4)
  resumed = pipeline.make_train_iterator(cases, **kw)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), expected)


def test_workers_match_in_process_and_resume(cases):
  kw = {**PATCH_KW, "global_batch_size": 4, "process_index": 1, "process_count": 2}
  expected = take(pipeline.make_train_iterator(cases, **kw, worker_count=0), 6)
  it = pipeline.make_train_iterator(cases, **kw, worker_count=2)
  try:
    assert_batches_equal(take(it, 3), expected[:3])
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  resumed = pipeline.make_train_iterator(cases, **kw, worker_count=2)
  try:
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), expected[3:])
  finally:
    resumed.close()


def test_single_worker_matches_in_process(cases):
  kw = {**PATCH_KW, "global_batch_size": 2}
  expected = take(pipeline.make_train_iterator(cases, **kw), 3)
  it = pipeline.make_train_iterator(cases, **kw, worker_count=1, prefetch_batches=1)
  try:
    assert_batches_equal(take(it, 3), expected)
  finally:
    it.close()


# ------------------------------------------------------------- augmentation


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_foreground_fraction(fraction):
  # One foreground voxel in a corner: a uniformly placed 8^3 patch of the 40^3
  # volume holds it with probability (1/33)^3, a foreground-centred one always.
  label = np.zeros((40, 40, 40), np.uint8)
  label[0, 0, 0] = 1
  case = pipeline.TrainingCase.from_arrays("corner", np.ones((40, 40, 40, 1)), label)
  it = pipeline.make_train_iterator(
      [case], global_batch_size=50, patch_shape=(8, 8, 8), divisor=8,
      foreground_fraction=fraction, random_flip=False, seed=0)
  hits = np.concatenate([b["label"].reshape(50, -1).any(axis=1) for b in take(it, 8)])
  assert abs(hits.mean() - fraction) <= 0.08, hits.mean()


def test_flips_keep_labels_aligned_with_images():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(20, 24, 28, 2)).astype(np.float32)
  image[..., 1] = np.arange(20)[:, None, None]  # asymmetric in x
  cases = [pipeline.TrainingCase.from_arrays("a", image, image[..., 0] > 0)]
  kw = dict(global_batch_size=8, patch_shape=(16, 16, 16), divisor=8,
            foreground_fraction=0.5, seed=5)
  flipped = take(pipeline.make_train_iterator(cases, **kw, random_flip=True), 4)
  plain = take(pipeline.make_train_iterator(cases, **kw, random_flip=False), 4)
  subsets = set()
  for fb, pb in zip(flipped, plain):
    # Labels match their images voxel by voxel (padding is 0 in both).
    np.testing.assert_array_equal(fb["label"], fb["image"][..., 0] > 0)
    # Flips come on top of the same crop: each flipped sample is the plain one
    # flipped along some subset of the axes.
    for f_image, f_label, p_image, p_label in zip(fb["image"], fb["label"], pb["image"], pb["label"]):
      axes = [ax for n in range(4) for ax in itertools.combinations(range(3), n)
              if np.array_equal(f_image, np.flip(p_image, ax))]
      assert len(axes) == 1
      np.testing.assert_array_equal(f_label, np.flip(p_label, axes[0]))
      subsets.add(axes[0])
  assert len(subsets) >= 4  # flips really happen, along different axes


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("overrides, match", [
    ({"global_batch_size": 6, "process_count": 4}, "divisible by process_count"),
    ({"global_batch_size": 0}, "global_batch_size"),
    ({"process_index": 2, "process_count": 2}, "process_index"),
    ({"patch_shape": (16, 16)}, "patch_shape"),
    ({"patch_shape": (16, 0, 16)}, "patch_shape"),
    ({"patch_shape": (16, 16.0, 16)}, "patch_shape"),
    ({"patch_shape": (16, 12, 16)}, "multiple of divisor"),
    ({"divisor": 0}, "divisor"),
    ({"foreground_fraction": 1.5}, "foreground_fraction"),
    ({"seed": -1}, "seed"),
    ({"worker_count": -1}, "worker_count"),
    ({"prefetch_batches": -1}, "prefetch_batches"),
])
def test_bad_arguments(cases, overrides, match):
  kw = {**PATCH_KW, "global_batch_size": 4, **overrides}
  with pytest.raises(ValueError, match=match):
    pipeline.make_train_iterator(cases, **kw)


def test_bad_cases():
  with pytest.raises(ValueError, match="cases is empty"):
    pipeline.make_train_iterator([], global_batch_size=4, **PATCH_KW)
  mixed = [coded_case("a", (16, 16, 16), 1),
           pipeline.TrainingCase.from_arrays("b", np.zeros((16, 16, 16, 3)), np.zeros((16, 16, 16)))]
  with pytest.raises(ValueError, match="same number of channels"):
    pipeline.make_train_iterator(mixed, global_batch_size=4, **PATCH_KW)


def test_batch_of_one_per_process_works():
  # The paper trains with batches of one volume.
  rng = np.random.default_rng(0)
  cases = [pipeline.TrainingCase.from_arrays(
      f"c{i}", rng.normal(size=(16, 16, 16, 2)).astype(np.float32),
      (rng.random((16, 16, 16)) < 0.05).astype(np.uint8)) for i in range(3)]
  kwargs = dict(patch_shape=None, divisor=4, foreground_fraction=0.5,
                random_flip=True, seed=0, prefetch_batches=0)
  single = pipeline.make_train_iterator(cases, global_batch_size=1, **kwargs)
  first = [next(single)["image"] for _ in range(4)]
  assert first[0].shape == (1, 16, 16, 16, 2)
  shards = [pipeline.make_train_iterator(cases, global_batch_size=2,
                                         process_index=p, process_count=2,
                                         **kwargs) for p in range(2)]
  pair = [next(it)["image"] for it in shards]
  np.testing.assert_array_equal(np.concatenate(pair), np.concatenate(first[:2]))


@pytest.mark.parametrize("random_flip", [False, True])
@pytest.mark.parametrize("patch_shape", [(16, 16, 8), (24, 24, 8), None])
def test_batches_are_the_documented_samples_stacked(random_flip, patch_shape):
  """Sample i of the global stream: case perm[i % n] of its epoch, cut and
  flipped by sampling.sample_patch / pad_to_shape and sampling.random_flip
  with rng [seed, i]; a batch is its samples stacked (written in place by
  the pipeline). Patches of 24 reach into the padding of the smaller cases."""
  cases = binary_cases(num_classes=2)
  seed, batch_size = 5, 2
  it = pipeline.make_train_iterator(
      cases, global_batch_size=batch_size, patch_shape=patch_shape, divisor=4,
      foreground_fraction=0.5, random_flip=random_flip, seed=seed, prefetch_batches=0)
  volume = pipeline.whole_volume_shape(cases, (4, 4, 4))
  for step in range(4):
    batch = next(it)
    for k in range(batch_size):
      i = step * batch_size + k
      order = np.random.default_rng([seed, i // len(cases), 1]).permutation(len(cases))
      case = cases[order[i % len(cases)]]
      rng = np.random.default_rng([seed, i])
      if patch_shape is None:
        image, label = sampling.pad_to_shape(case.image, case.label, volume)
      else:
        image, label = sampling.sample_patch(case.image, case.label, patch_shape, rng, 0.5,
                                             case.foreground)
      if random_flip:
        image, label = sampling.random_flip(image, label, rng)
      np.testing.assert_array_equal(batch["image"][k], image)
      np.testing.assert_array_equal(batch["label"][k], label)


# ---------------------------------------------------- binary stream pinned


def digest(batches):
  """Short sha256 of a list of batches (dtype, shape and bytes of each array)."""
  h = hashlib.sha256()
  for batch in batches:
    for key in ("image", "label"):
      a = np.ascontiguousarray(batch[key])
      h.update(str(a.dtype).encode())
      h.update(str(a.shape).encode())
      h.update(a.tobytes())
  return h.hexdigest()[:16]


def binary_cases(**kwargs):
  rng = np.random.default_rng(1234)
  cases = []
  for i, shape in enumerate([(20, 18, 22), (14, 24, 16), (24, 20, 12)]):
    image = rng.normal(size=(*shape, 2)).astype(np.float32)
    label = (rng.random(shape) < 0.01).astype(np.uint8)
    label[2 + i, 3, 4] = 1
    cases.append(pipeline.TrainingCase.from_arrays(f"c{i}", image, label, **kwargs))
  return cases


@pytest.mark.parametrize("kwargs", [{}, {"num_classes": 2}, {"num_classes": 4}])
def test_binary_batches_are_unchanged(kwargs):
  # Digests of the batches before per-class sampling and per-axis divisors
  # existed (numpy 2.4 Generator streams): binary data keeps its stream.
  cases = binary_cases(**kwargs)
  kw = dict(patch_shape=(16, 16, 8), divisor=8, foreground_fraction=0.33, random_flip=True,
            seed=7, prefetch_batches=0)
  assert digest(take(pipeline.make_train_iterator(cases, global_batch_size=4, **kw), 6)) == (
      "a5432498edc7dcff")
  kw = {**kw, "divisor": (8, 8, 8)}
  assert digest(take(pipeline.make_train_iterator(cases, global_batch_size=4, **kw), 6)) == (
      "a5432498edc7dcff")
  kw = dict(patch_shape=None, divisor=8, foreground_fraction=0.33, random_flip=True, seed=3,
            prefetch_batches=0)
  assert digest(take(pipeline.make_train_iterator(cases, global_batch_size=3, **kw), 2)) == (
      "6028527226ab3bdd")


# --------------------------------------------------------- classes, labels


def test_per_class_foreground_sampling():
  # Class 1: the box [6, 26)^3; class 2: one voxel. Patches centred on a
  # foreground voxel of a class drawn uniformly: the rare voxel is the centre
  # of half of them (pooled: 1 in 8001).
  label = np.zeros((32, 32, 32), np.uint8)
  label[6:26, 6:26, 6:26] = 1
  label[16, 17, 18] = 2
  image = np.zeros((32, 32, 32, 1), np.float32)
  kw = dict(global_batch_size=50, patch_shape=(8, 8, 8), divisor=8, foreground_fraction=1.0,
            random_flip=False, seed=0, prefetch_batches=0)
  case = pipeline.TrainingCase.from_arrays("a", image, label, num_classes=3)
  assert case.num_classes == 3 and list(case.foreground) == [1, 2]
  centres = np.concatenate([b["label"][:, 4, 4, 4] for b in
                            take(pipeline.make_train_iterator([case], **kw), 12)])
  assert abs(np.mean(centres == 2) - 0.5) < 0.06, np.mean(centres == 2)
  assert np.all(centres > 0)
  pooled = pipeline.TrainingCase.from_arrays("a", image, label)
  centres = np.concatenate([b["label"][:, 4, 4, 4] for b in
                            take(pipeline.make_train_iterator([pooled], **kw), 4)])
  assert np.mean(centres == 2) < 0.02


def test_label_values_are_checked():
  image = np.zeros((6, 6, 6, 1), np.float32)
  label = np.zeros((6, 6, 6), np.int16)
  label[0, 0, 0], label[1, 1, 1] = 2, 5
  with pytest.raises(ValueError, match=r"case 'x': label value\(s\) 2, 5 .*num_classes=2"):
    pipeline.TrainingCase.from_arrays("x", image, label, num_classes=2)
  assert pipeline.TrainingCase.from_arrays("x", image, label, num_classes=6).num_classes == 6
  label[1, 1, 1] = -1  # would wrap to 255 as uint8
  with pytest.raises(ValueError, match=r"value\(s\) -1 outside .*num_classes=3"):
    pipeline.TrainingCase.from_arrays("x", image, label, num_classes=3)
  with pytest.raises(ValueError, match=r"case 'x': label value\(s\) \[-1\] do not fit uint8"):
    pipeline.TrainingCase.from_arrays("x", image, label)


def test_load_training_cases_with_num_classes(dataset, cases):
  per_class = pipeline.load_training_cases(dataset, dataset.training_cases[:2], progress=False,
                                           num_classes=2)
  for case, pooled in zip(per_class, cases):
    assert case.num_classes == 2 and pooled.num_classes is None
    np.testing.assert_array_equal(case.foreground[1], pooled.foreground)
  with pytest.raises(ValueError, match="num_classes"):
    pipeline.load_training_cases(dataset, dataset.training_cases[:1], progress=False,
                                 num_classes=1)


def test_cases_must_agree_on_num_classes():
  image, label = np.zeros((16, 16, 16, 1), np.float32), np.ones((16, 16, 16), np.uint8)
  mixed = [pipeline.TrainingCase.from_arrays("a", image, label),
           pipeline.TrainingCase.from_arrays("b", image, label, num_classes=2)]
  with pytest.raises(ValueError, match="same num_classes"):
    pipeline.make_train_iterator(mixed, global_batch_size=2, **PATCH_KW)


# ------------------------------------------------------- per-axis divisor


def test_per_axis_divisor():
  shapes = [(20, 18, 17), (24, 9, 20), (12, 16, 16)]
  cases = [coded_case(f"c{i}", s, i + 1) for i, s in enumerate(shapes)]
  assert pipeline.whole_volume_shape(cases, (8, 4, 2)) == (24, 20, 20)
  assert pipeline.whole_volume_shape(cases, 8) == (24, 24, 24)
  kw = dict(global_batch_size=3, foreground_fraction=0.5, random_flip=True, seed=3,
            prefetch_batches=0)
  batch = next(pipeline.make_train_iterator(cases, patch_shape=None, divisor=(8, 4, 2), **kw))
  assert batch["image"].shape == (3, 24, 20, 20, 2) and batch["label"].shape == (3, 24, 20, 20)
  batch = next(pipeline.make_train_iterator(cases, patch_shape=(16, 12, 6), divisor=(8, 4, 2),
                                            **kw))
  assert batch["image"].shape == (3, 16, 12, 6, 2)
  for divisor, match in [((8, 4, 4), "multiple of divisor"), ((8, 4), "divisor"),
                         ((8, 0, 2), "divisor"), ((8, 4.0, 2), "divisor")]:
    with pytest.raises(ValueError, match=match):
      pipeline.make_train_iterator(cases, patch_shape=(16, 12, 6), divisor=divisor, **kw)


# ------------------------------------------------------ preprocessed cache


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
  """A 2-case cache (labels 0, 1, 2) of tversky_jax.data.preprocessing: (folder, ids)."""
  from tests.test_planning import make_dataset  # pylint: disable=import-outside-toplevel

  tmp = tmp_path_factory.mktemp("preprocessed")
  root = make_dataset(tmp / "Dataset992_Pipeline", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.0)],
                      [(14, 14, 14), (14, 14, 10)])
  plan, _ = planning.plan_dataset(root, tmp / "out", planning.PlanOptions(memory_bytes=2**30),
                                  progress=False)
  summary = preprocessing.preprocess_dataset(root, plan, tmp / "out", progress=False)
  return summary.folder, ("case00", "case01"), plan.num_classes


def test_load_preprocessed_cases(preprocessed, capsys):
  folder, ids, num_classes = preprocessed
  assert num_classes == 3
  cases = pipeline.load_preprocessed_cases(folder, ids[::-1], num_classes=num_classes)
  assert "loading preprocessed cases" in capsys.readouterr().err
  assert [c.case_id for c in cases] == list(ids[::-1])
  for case in cases:
    image, label, _ = preprocessing.load_preprocessed(folder, case.case_id)
    assert isinstance(case.image, np.memmap) and isinstance(case.label, np.memmap)
    np.testing.assert_array_equal(case.image, image)
    np.testing.assert_array_equal(case.label, label)
    assert case.num_classes == 3 and list(case.foreground) == [1, 2]
    for k, voxels in case.foreground.items():
      np.testing.assert_array_equal(voxels, np.argwhere(np.asarray(label) == k))
  pooled = pipeline.load_preprocessed_cases(folder, ids[:1], progress=False)
  assert pooled[0].num_classes is None and pooled[0].foreground.shape[1] == 3
  with pytest.raises(ValueError, match=r"label value\(s\) 2 .*num_classes=2"):
    pipeline.load_preprocessed_cases(folder, ids, num_classes=2, progress=False)
  with pytest.raises(ValueError, match="not cached"):
    pipeline.load_preprocessed_cases(folder, ["nope"], progress=False)
  with pytest.raises(ValueError, match="case_ids is empty"):
    pipeline.load_preprocessed_cases(folder, [], progress=False)


def test_memory_mapped_cases_pickle_by_path(preprocessed, tmp_path):
  folder, ids, num_classes = preprocessed
  case = pipeline.load_preprocessed_cases(folder, ids[:1], num_classes, progress=False)[0]
  data = pickle.dumps(case)
  assert np.asarray(case.image).tobytes() not in data  # the image is sent by path
  copy = pickle.loads(data)
  assert isinstance(copy.image, np.memmap) and copy.image.filename == case.image.filename
  np.testing.assert_array_equal(copy.image, case.image)
  np.testing.assert_array_equal(copy.label, case.label)
  assert copy.num_classes == 3 and copy.foreground.keys() == case.foreground.keys()
  # In-memory arrays are pickled by value.
  plain = pipeline.TrainingCase.from_arrays("p", np.asarray(case.image), np.asarray(case.label))
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(plain)).image, case.image)
  # A rewritten file is not silently read.
  path = tmp_path / "image.npy"
  np.save(path, np.zeros((4, 4, 4, 1), np.float32))
  moved = pipeline.TrainingCase.from_arrays("m", np.load(path, mmap_mode="r"),
                                            np.zeros((4, 4, 4), np.uint8))
  data = pickle.dumps(moved)
  np.save(path, np.ones((4, 4, 4, 1), np.float32))
  with pytest.raises(ValueError, match="changed since"):
    pickle.loads(data)


def test_preprocessed_cases_in_a_worker_process(preprocessed):
  folder, ids, num_classes = preprocessed
  cases = pipeline.load_preprocessed_cases(folder, ids, num_classes, progress=False)
  kw = dict(global_batch_size=2, patch_shape=(8, 8, 8), divisor=(4, 4, 2),
            foreground_fraction=0.5, random_flip=True, seed=1)
  expected = take(pipeline.make_train_iterator(cases, **kw), 2)
  it = pipeline.make_train_iterator(cases, **kw, worker_count=1, prefetch_batches=1)
  try:
    assert_batches_equal(take(it, 2), expected)
  finally:
    it.close()
