"""Grain input pipelines over the TFDS ArrayRecord data source.

`make_dataset` returns a `grain.MapDataset` whose element `i` is this host's part of
the batch of global step `i`: resuming at step `s` is `ds[s:]` (or
`iterate(ds, start_step=s)`), with exactly the data order of an uninterrupted run.

Order: examples are shuffled per epoch with `seed` (grain's index shuffle, a new
permutation every epoch), cut into global batches within each epoch, and each host
takes its contiguous slice `[process_index * L, (process_index + 1) * L)` of every
global batch (L = global_batch_size / process_count), so only the examples a host
uses are read by that host.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np

Batch = dict[str, np.ndarray]

_ARRAY_DTYPES = {"image": np.float32, "mask": np.uint8, "spacing": np.float32,
                 "voxel_spacing": np.float32, "orig_shape": np.int32, "targets": np.float32}
_INT_KEYS = ("label", "grade")
_TEXT_KEYS = ("study_id", "patient_id")
# Batch dtypes of the scalar keys (stacked by `collate`).
_BATCH_INT = np.int32


def steps_per_epoch(num_examples: int, global_batch_size: int, drop_remainder: bool = True) -> int:
  """Global steps in one epoch of `num_examples`."""
  if drop_remainder:
    return num_examples // global_batch_size
  return -(-num_examples // global_batch_size)


def to_str(x: Any) -> str:
  """A stored id (bytes from TFDS, numpy str, str) -> str."""
  if isinstance(x, (bytes, np.bytes_)):
    return bytes(x).decode("utf-8")
  if isinstance(x, np.ndarray) and x.ndim == 0:
    return to_str(x.item())
  return str(x)


def _typed(key: str, value: Any, cast: bool = True) -> Any:
  """One key's stored value (or a stack of them, for an array key) as its documented type (`decode`)."""
  if key in _ARRAY_DTYPES:
    value = np.asarray(value)
    return value.astype(_ARRAY_DTYPES[key], copy=False) if cast else value
  if key in _INT_KEYS:
    return int(np.asarray(value))
  if key in _TEXT_KEYS:
    return to_str(value)
  return value


def decode(example: Mapping[str, Any]) -> dict[str, Any]:
  """One stored example -> typed numpy: THE way to read an example of the dataset.

  image float32 (D, H, W, 1) (exactly `preprocess.model_input` of the scan), mask uint8
  (D, H, W, 1), label and grade int, study_id and patient_id str, spacing (original
  (z, y, x) mm), voxel_spacing (mm of one image voxel, (z, y, x)) float32 (3,),
  orig_shape int32 (3,), targets float32 (len(data.targets),) (NaN = missing; only when data.targets
  is set). Other keys pass through unchanged.
  """
  return {key: _typed(key, value) for key, value in example.items()}


def collate(examples: Sequence[Mapping[str, Any]], *, cast: bool = True) -> Batch:
  """List of stored examples -> dict of stacked numpy arrays, typed as `decode` says: image float32,
  label/grade int32, study_id/patient_id object arrays of str, ...

  Array keys are stacked as stored and then cast once. cast=False keeps them as stored (image float16, the
  dataset's storage type: half the bytes to copy to the device, and no host-side cast; the training loop's
  batches, which `train.train_step` casts on the device: float16 -> float32 is exact, so the values are the same).
  """
  batch = {}
  for key in examples[0]:
    values = [ex[key] for ex in examples]
    if key in _TEXT_KEYS:
      arr = np.empty(len(values), dtype=object)
      arr[:] = [_typed(key, v) for v in values]
      batch[key] = arr
    elif key in _INT_KEYS:
      batch[key] = np.asarray([_typed(key, v) for v in values], dtype=_BATCH_INT)
    else:
      batch[key] = _typed(key, np.stack([np.asarray(v) for v in values]), cast)
  return batch


class _HostBatch:
  """Global step -> this host's slice of that step's global batch (picklable)."""

  def __init__(self, examples: grain.MapDataset, num_examples: int, global_batch_size: int,
               local_batch_size: int, offset: int, steps_per_epoch: int, cast: bool = True):
    self.examples = examples
    self.cast = cast
    self.n = num_examples
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size
    self.offset = offset
    self.steps_per_epoch = steps_per_epoch

  def indices(self, step: int) -> list[int]:
    """Positions in the per-epoch shuffled, repeated example stream."""
    epoch, b = divmod(step, self.steps_per_epoch)
    start = epoch * self.n + b * self.global_batch_size + self.offset
    stop = min(start + self.local_batch_size, (epoch + 1) * self.n)
    return list(range(start, stop))

  def __call__(self, step: int) -> Batch:
    return collate([self.examples[i] for i in self.indices(int(step))], cast=self.cast)


def make_dataset(source: Sequence[Mapping[str, Any]], *, global_batch_size: int, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None, drop_remainder: bool = True,
                 process_index: int | None = None,
                 process_count: int | None = None, cast: bool = True) -> grain.MapDataset:
  """Batches for every global step, this host's share.

  Args:
    source: random-access examples, e.g. `builder.as_data_source("train")`.
    global_batch_size: examples per step over all hosts; divisible by process_count.
    seed: shuffle seed (a new permutation each epoch, reproducible).
    shuffle: shuffle examples each epoch.
    num_epochs: epochs to cover; None = repeat forever.
    drop_remainder: drop each epoch's last incomplete global batch (needed when
      process_count > 1, so every host gets the same batch shape).
    process_index: this host (default jax.process_index()).
    process_count: hosts (default jax.process_count()).
    cast: False keeps array keys as stored (image float16; see `collate`).

  Returns:
    MapDataset: element i = dict of numpy arrays for global step i (image float32, float16 as stored with
    cast=False, (L, D, H, W, 1), label/grade int32 (L,), mask uint8, study_id/patient_id object),
    L = global_batch_size // process_count.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                     f"process_count {process_count}")
  if not drop_remainder and process_count > 1:
    raise ValueError("drop_remainder=False with several hosts would give hosts unequal "
                     "batches; use eval_batches for exact evaluation")
  n = len(source)
  spe = steps_per_epoch(n, global_batch_size, drop_remainder)
  if spe == 0:
    raise ValueError(f"{n} examples give no full batch of {global_batch_size}")
  examples = grain.MapDataset.source(source)
  if shuffle:
    examples = examples.shuffle(seed=seed)
  examples = examples.repeat(num_epochs)
  # Infinite: as many steps as the (sys.maxsize long) repeated stream holds.
  epochs = num_epochs if num_epochs is not None else sys.maxsize // max(n, 1)
  local = global_batch_size // process_count
  fetch = _HostBatch(examples, n, global_batch_size, local, process_index * local, spe, cast)
  return grain.MapDataset.range(epochs * spe).map(fetch)


def iterate(ds: grain.MapDataset, start_step: int = 0, num_threads: int = 2,
            prefetch: int = 4, *, loader: Any = None) -> Iterator[Batch]:
  """Iterates `ds` from `start_step` with `num_threads` reader threads, `prefetch` batches ahead.

  loader: optionally config.loader (num_threads, prefetch), overriding the two arguments.
  """
  if loader is not None:
    num_threads = int(loader.get("num_threads", num_threads))
    prefetch = int(loader.get("prefetch", prefetch))
  if start_step:
    ds = ds[start_step:]
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(ds.to_iter_dataset(options))


def eval_batches(source: Sequence[Mapping[str, Any]], batch_size: int, *,
                 process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """Every example exactly once, in order, in batches of static shape.

  The last batch is padded by repeating the final example; `batch["valid"]` (bool
  (B,)) is False on padding. With several hosts, each host yields its slice of every
  global batch of `batch_size` (B = batch_size // process_count).
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
  n = len(source)
  local = batch_size // process_count
  for start in range(0, n, batch_size):
    idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
    valid = idx < n
    idx = np.minimum(idx, n - 1)
    batch = collate([source[int(i)] for i in idx])
    batch["valid"] = valid
    yield batch

