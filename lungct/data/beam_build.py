"""Building the lung_ct dataset on Apache Beam (optional: `pip install 'lungct[beam]'`).

Set `data.beam_options` to Beam pipeline arguments, e.g. "--runner=DirectRunner
--direct_num_workers=2 --direct_running_mode=multi_processing" on one machine, or
"--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp" on a cluster
(scans and data.data_dir on a filesystem every worker mounts). Empty (default):
the build runs on this machine's threads and Beam is not imported.

A Beam build has the two stages of the thread-pool build, each on the workers:
1. `map_items`: read and preprocess every study (the costly part) into its scratch file
   (`<i>.npz`, named by the builder), or `<i>.skip.json` (file, reason) for a bad scan. The
   launching machine then reads only the small outcomes, skips, splits by patient and
   counts, exactly as the thread-pool build does.
2. `read_examples`: a PTransform reading the kept examples back, handed to TFDS, whose
   BeamWriter shuffles, serializes and writes the ArrayRecord shards (no TensorFlow).
The examples, their keys and the shuffle are the same, so both builds write the same
records in the same order (tests/test_beam_build.py).
"""
from __future__ import annotations

import json
import shlex
from typing import Any, Callable, Iterator, Sequence

from etils import epath

from lungct.data.errors import DataError, ScanError

INSTALL_HINT = "pip install 'lungct[beam]'"


def _beam():
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise DataError(f"data.beam_options is set but Apache Beam is not installed: {INSTALL_HINT}") from None
  return apache_beam


def pipeline_options(args: str):
  """`beam.options.pipeline_options.PipelineOptions` from a command-line string."""
  beam = _beam()
  options = beam.options.pipeline_options.PipelineOptions(shlex.split(args))
  runner = options.view_as(beam.options.pipeline_options.StandardOptions).runner
  try:
    beam.runners.create_runner(runner or "DirectRunner")  # A misspelt runner fails here, before any file.
  except (ValueError, ImportError) as e:
    raise DataError(f"data.beam_options={args!r}: {' '.join(str(e).split())}") from None
  # TFDS's rule too: our stages map to dicts and tuples Beam's type checker misreads.
  options.view_as(beam.options.pipeline_options.TypeOptions).pipeline_type_check = False
  return options


def _skip_path(path: epath.Path) -> epath.Path:
  return path.with_suffix(".skip.json")


def _spill_one(item_and_path: tuple[Any, str], spill: Callable[[Any, epath.Path], None]) -> None:
  item, path = item_and_path[0], epath.Path(item_and_path[1])
  try:
    spill(item, path)
  except ScanError as e:
    _skip_path(path).write_text(json.dumps({"file": e.path, "reason": e.reason}))


def map_items(spill: Callable[[Any, epath.Path], None], items: Sequence[Any], paths: Sequence[epath.Path],
              args: str) -> Iterator[tuple[Any, epath.Path | None, ScanError | None]]:
  """Runs `spill(item, path)` for every (item, path) on Beam; yields (item, path, None) for
  a kept study and (item, None, ScanError) for a skipped one, in the order of `items`.

  `spill` writes the preprocessed example to `path` or raises ScanError; any other
  error fails the pipeline (and the build). Runs to completion before the first yield.
  """
  beam = _beam()
  with beam.Pipeline(options=pipeline_options(args)) as p:
    _ = (p
         | "Studies" >> beam.Create([(item, str(path)) for item, path in zip(items, paths)])
         | "Reshuffle" >> beam.Reshuffle()  # Spread the studies over workers.
         | "Preprocess" >> beam.Map(_spill_one, spill=spill))
  for item, path in zip(items, paths):
    if path.exists():
      yield item, path, None
    elif _skip_path(path).exists():
      note = json.loads(_skip_path(path).read_text())
      yield item, None, ScanError(note["file"], note["reason"])
    else:  # A runner that lost an output without failing: never drop a study silently.
      raise DataError(f"lung_ct: the Beam build left no outcome for study {item.study_id} ({path})")


def read_examples(entries: Sequence[tuple[str, epath.Path]], load: Callable[[epath.Path], dict]):
  """A PTransform yielding (study_id, example) for each (study_id, scratch path): TFDS's
  Beam split generator."""
  beam = _beam()

  @beam.ptransform_fn
  def _read(pipeline):
    return (pipeline
            | "Kept" >> beam.Create([(key, str(path)) for key, path in entries])
            | "Reshuffle" >> beam.Reshuffle()
            | "Load" >> beam.Map(lambda kp: (kp[0], load(epath.Path(kp[1])))))
  return _read()  # pylint: disable=no-value-for-parameter
