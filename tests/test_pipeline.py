"""Grain loaders: per-epoch shuffle, resumable step indexing, per-host sharding, padded eval."""
from __future__ import annotations

import numpy as np
import pytest

from tests import helpers  # noqa: F401  (puts the repo root on sys.path)
from configs import default
from lungct.data import lung_ct
from lungct.data import pipeline

SHAPE = (8, 16, 16)


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  d = default.get_data_config()
  d.data_dir = str(tmp_path_factory.mktemp("tfds"))
  d.num_scans = 16
  d.shape = SHAPE
  d.phantom_shape = (32, 32, 16)
  return lung_ct.prepare(d)


class FakeSource:
  """Example i has label i % 2 and study_id 's<i>'; image filled with i / 100."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((2, 2, 2, 1), i / 100, np.float16), "label": np.int64(i % 2),
            "grade": np.int64(i % 5), "mask": np.zeros((2, 2, 2, 1), np.uint8),
            "study_id": f"s{i}".encode(), "patient_id": f"p{i}".encode()}


def ids(batch):
  return [int(s[1:]) for s in batch["study_id"]]


def test_batches_from_tfds(builder):
  src = builder.as_data_source("train")
  ds = pipeline.make_dataset(src, global_batch_size=4, seed=0, num_epochs=1,
                             process_index=0, process_count=1)
  assert len(ds) == pipeline.steps_per_epoch(len(src), 4) == 3
  batch = ds[0]
  assert batch["image"].shape == (4,) + SHAPE + (1,) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (4,) + SHAPE + (1,) and batch["mask"].dtype == np.uint8
  assert batch["label"].dtype == np.int32 and batch["grade"].dtype == np.int32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  by_id = {src[i]["study_id"].decode(): src[i] for i in range(len(src))}
  seen = []
  for b in pipeline.iterate(ds, num_threads=2, prefetch=2):
    for sid, label, grade in zip(b["study_id"], b["label"], b["grade"]):
      assert label == by_id[sid]["label"] and grade == by_id[sid]["grade"]
      seen.append(sid)
  assert sorted(seen) == sorted(by_id)  # 12 examples, batch 4: one epoch sees each once.


def test_epochs_are_permutations_and_seeded():
  src = FakeSource(10)
  ds = pipeline.make_dataset(src, global_batch_size=5, seed=1, num_epochs=3, process_count=1,
                             process_index=0)
  assert len(ds) == 6
  epochs = [sum((ids(ds[2 * e + k]) for k in range(2)), []) for e in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(10))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  same = pipeline.make_dataset(src, global_batch_size=5, seed=1, num_epochs=3, process_count=1,
                               process_index=0)
  other = pipeline.make_dataset(src, global_batch_size=5, seed=2, num_epochs=3, process_count=1,
                                process_index=0)
  assert [ids(same[i]) for i in range(6)] == [ids(ds[i]) for i in range(6)]
  assert [ids(other[i]) for i in range(6)] != [ids(ds[i]) for i in range(6)]
  unshuffled = pipeline.make_dataset(src, global_batch_size=5, seed=1, shuffle=False,
                                     num_epochs=1, process_count=1, process_index=0)
  assert ids(unshuffled[1]) == [5, 6, 7, 8, 9]


def test_drop_remainder_and_infinite():
  src = FakeSource(7)
  ds = pipeline.make_dataset(src, global_batch_size=3, seed=0, num_epochs=2, process_count=1,
                             process_index=0)
  assert len(ds) == 4  # 2 full batches per epoch, the 7th example of each epoch dropped.
  keep = pipeline.make_dataset(src, global_batch_size=3, seed=0, num_epochs=1,
                               drop_remainder=False, process_count=1, process_index=0)
  assert [len(keep[i]["label"]) for i in range(len(keep))] == [3, 3, 1]
  forever = pipeline.make_dataset(src, global_batch_size=3, seed=0, num_epochs=None,
                                  process_count=1, process_index=0)
  assert len(forever) > 10**12
  assert [ids(forever[i]) for i in range(4)] == [ids(ds[i]) for i in range(4)]


def test_resume_equals_continuing():
  src = FakeSource(10)
  ds = pipeline.make_dataset(src, global_batch_size=4, seed=5, process_count=1, process_index=0)
  it = pipeline.iterate(ds, num_threads=2, prefetch=2)
  straight = [ids(next(it)) for _ in range(9)]
  resumed = pipeline.iterate(ds, start_step=4, num_threads=2, prefetch=2)
  assert [ids(next(resumed)) for _ in range(5)] == straight[4:]
  assert [ids(b) for b in ds[4:][:5]] == straight[4:]


def test_host_sharding_splits_each_global_batch():
  src = FakeSource(12)
  kw = dict(global_batch_size=4, seed=3, num_epochs=2)
  full = pipeline.make_dataset(src, process_index=0, process_count=1, **kw)
  h0 = pipeline.make_dataset(src, process_index=0, process_count=2, **kw)
  h1 = pipeline.make_dataset(src, process_index=1, process_count=2, **kw)
  assert len(full) == len(h0) == len(h1) == 6
  for i in range(6):
    a, b, g = ids(h0[i]), ids(h1[i]), ids(full[i])
    assert len(a) == len(b) == 2
    assert not set(a) & set(b)
    assert a + b == g
    np.testing.assert_array_equal(np.concatenate([h0[i]["image"], h1[i]["image"]]), full[i]["image"])
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_dataset(src, global_batch_size=3, seed=0, process_index=0, process_count=2)


def test_eval_batches_cover_each_example_once():
  src = FakeSource(7)
  batches = list(pipeline.eval_batches(src, 3))
  assert [b["image"].shape for b in batches] == [(3, 2, 2, 2, 1)] * 3
  assert [b["valid"].tolist() for b in batches] == [[True] * 3, [True] * 3, [True, False, False]]
  valid_ids = [i for b in batches for i, v in zip(ids(b), b["valid"]) if v]
  assert valid_ids == list(range(7))
  np.testing.assert_allclose(batches[1]["image"][:, 0, 0, 0, 0], [0.03, 0.04, 0.05], atol=1e-3)
  # Two hosts: each takes its half of every global batch of 4; together they cover all once.
  h = [list(pipeline.eval_batches(src, 4, process_index=p, process_count=2)) for p in (0, 1)]
  assert len(h[0]) == len(h[1]) == 2
  assert [b["valid"].tolist() for b in h[0]] == [[True, True], [True, True]]  # 0,1 | 4,5
  assert [b["valid"].tolist() for b in h[1]] == [[True, True], [True, False]]  # 2,3 | 6,pad
  covered = sorted(i for hb in h for b in hb for i, v in zip(ids(b), b["valid"]) if v)
  assert covered == list(range(7))


def test_steps_per_epoch():
  assert pipeline.steps_per_epoch(10, 4) == 2
  assert pipeline.steps_per_epoch(10, 4, drop_remainder=False) == 3
  assert pipeline.steps_per_epoch(8, 4) == 2


def test_decode_types_every_field_and_passes_others():
  ex = {"image": np.full((2, 2, 2, 1), 0.25, np.float16), "mask": np.ones((2, 2, 2, 1), np.uint8),
        "label": np.int64(1), "grade": np.int64(3), "study_id": b"s\xc3\xa9", "patient_id": np.bytes_(b"p1"),
        "spacing": np.array([2.5, 0.7, 0.7]), "voxel_spacing": np.array([1.0, 1.0, 1.0]),
        "orig_shape": np.array([6, 44, 44]), "extra": "kept"}
  d = pipeline.decode(ex)
  assert d["image"].dtype == np.float32 and d["image"][0, 0, 0, 0] == 0.25
  assert d["label"] == 1 and type(d["label"]) is int and d["grade"] == 3 and type(d["grade"]) is int
  assert d["study_id"] == "sé" and d["patient_id"] == "p1"
  assert d["spacing"].dtype == np.float32 and d["voxel_spacing"].dtype == np.float32
  assert d["orig_shape"].dtype == np.int32 and d["extra"] == "kept"
  b = pipeline.collate([ex, ex])
  assert b["label"].dtype == np.int32 and b["study_id"].tolist() == ["sé", "sé"]
  assert b["voxel_spacing"].shape == (2, 3) and b["image"].dtype == np.float32


def test_collate_without_cast_keeps_the_stored_image_and_the_same_values():
  rng = np.random.default_rng(3)  # CT-like: air (exact zeros), subnormal float16s, values up to 1
  images = [np.where(rng.random((4, 5, 6, 1)) < 0.3, 0, rng.random((4, 5, 6, 1)) ** 8).astype(np.float16)
            for _ in range(3)]
  assert any((0 < np.abs(im)).any() and (np.abs(im) < np.finfo(np.float16).tiny).any() for im in images)
  exs = [{"image": im, "mask": (im > 0.5).astype(np.uint8), "label": np.int64(i % 2), "study_id": b"s%d" % i}
         for i, im in enumerate(images)]
  cast, stored = pipeline.collate(exs), pipeline.collate(exs, cast=False)
  assert stored["image"].dtype == np.float16 and cast["image"].dtype == np.float32
  np.testing.assert_array_equal(stored["image"].astype(np.float32), cast["image"])  # what train_step does
  np.testing.assert_array_equal(cast["image"], np.stack([pipeline.decode(e)["image"] for e in exs]))
  assert stored["label"].tolist() == [0, 1, 0] and stored["study_id"].tolist() == ["s0", "s1", "s2"]
  ds = pipeline.make_dataset(exs, global_batch_size=3, seed=0, num_epochs=1, process_index=0, process_count=1,
                             cast=False)
  assert ds[0]["image"].dtype == np.float16


def test_iterate_reads_loader_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import default as d  # pylint: disable=g-import-not-at-top
  loader = d.get_loader_config()
  assert set(loader) == {"num_threads", "prefetch"}
  assert "num_threads" not in d.get_data_config() and "augment" not in d.get_data_config()
  ds = pipeline.make_dataset(FakeSource(6), global_batch_size=3, seed=0, num_epochs=1,
                             process_index=0, process_count=1)
  got = [ids(b) for b in pipeline.iterate(ds, loader=ml_collections.ConfigDict(dict(num_threads=1, prefetch=1)))]
  assert got == [ids(ds[0]), ids(ds[1])]
