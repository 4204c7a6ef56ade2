"""Building the lung_ct dataset on Apache Beam (optional: `pip install 'lungct[beam]'`).

Set `data.beam_options` to Beam pipeline arguments, e.g. "--runner=DirectRunner
--direct_num_workers=2 --direct_running_mode=multi_processing" on one machine, or
"--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp" on a cluster
(with data.data_dir on storage every worker reaches, e.g. gs://B/tfds). Empty (default):
the build runs on this machine's threads and Beam is not imported.

A Beam build has the two stages of the thread-pool build, each on the workers:
1. `map_items`: read and preprocess every study (the costly part) into a scratch file
   per study: `<index>.npz`, or `<index>.skip.json` (file, reason) for a bad scan. The
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


def _outcome_paths(scratch: epath.Path, index: int) -> tuple[epath.Path, epath.Path]:
  return scratch / f"{index:06d}.npz", scratch / f"{index:06d}.skip.json"


def _spill_one(indexed: tuple[int, Any], spill: Callable[[Any, epath.Path], None], scratch: str) -> None:
  index, item = indexed
  ok, skip = _outcome_paths(epath.Path(scratch), index)
  try:
    spill(item, ok)
  except ScanError as e:
    skip.write_text(json.dumps({"file": e.path, "reason": e.reason}))


def map_items(spill: Callable[[Any, epath.Path], None], items: Sequence[Any], scratch: epath.Path,
              args: str) -> Iterator[tuple[Any, epath.Path | None, ScanError | None]]:
  """Runs `spill(item, path)` for every item on Beam; yields (item, path, None) for a kept
  study and (item, None, ScanError) for a skipped one, in the order of `items`.

  `spill` writes the preprocessed example to `path` or raises ScanError; any other
  error fails the pipeline (and the build). Runs to completion before the first yield.
  """
  beam = _beam()
  with beam.Pipeline(options=pipeline_options(args)) as p:
    _ = (p
         | "Studies" >> beam.Create(list(enumerate(items)))
         | "Reshuffle" >> beam.Reshuffle()  # Spread the studies over workers.
         | "Preprocess" >> beam.Map(_spill_one, spill=spill, scratch=str(scratch)))
  for index, item in enumerate(items):
    ok, skip = _outcome_paths(scratch, index)
    if ok.exists():
      yield item, ok, None
    elif skip.exists():
      note = json.loads(skip.read_text())
      yield item, None, ScanError(note["file"], note["reason"])
    else:  # A runner that lost an output without failing: never drop a study silently.
      raise DataError(f"lung_ct: the Beam build left no outcome for study {item.study_id} in {scratch}")


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
