"""Per-target orchestration: affine → select → non-rigid → propagate → fuse → evaluate → write.

Only this package does file I/O and parallelism. Work units carry file paths, so parallel workers read their
own images and build their own filters. Its modules:

- :mod:`~atlasseg.pipeline.checks`: input checks before any work (files, label maps, memory and disk
  estimates, the output folder, changed inputs);
- :mod:`~atlasseg.pipeline.jobs`: the worker jobs (one registration stage of one pair), their cache keys,
  and the fan-out that ranks the atlases and registers the selected ones;
- :mod:`~atlasseg.pipeline.sources`: where the checks and the per-target flow take an entry's images (its
  files, or images held in memory by :func:`atlasseg.segment`, whose worker jobs alone read files);
- :mod:`~atlasseg.pipeline.target`: the single per-target flow (:func:`register_target`,
  :func:`prepare_case`, :func:`~atlasseg.pipeline.target.segment_registered` in memory, :func:`segment_target`
  from files to files);
- :mod:`~atlasseg.pipeline.resume`: finished targets, the key and digests of their inputs;
- :mod:`~atlasseg.pipeline.outputs`: the writers (a segmented target's images and transforms, JSON, metrics.csv,
  tables);
- :mod:`~atlasseg.pipeline.run`: a whole run (:func:`run`);
- :mod:`~atlasseg.pipeline.pair`: one image pair, read (:func:`~atlasseg.pipeline.pair.read_pair`), registered in memory (:func:`~atlasseg.pipeline.pair.register_pair`) and written (:func:`register_files`).
"""

from .checks import check_inputs
from .jobs import Ranking, rank_atlases
from .pair import register_files
from .run import run
from .target import Case, Registered, TargetResult, prepare_case, register_target, segment_target

__all__ = [
    "Case",
    "Ranking",
    "Registered",
    "TargetResult",
    "check_inputs",
    "prepare_case",
    "rank_atlases",
    "register_files",
    "register_target",
    "run",
    "segment_target",
]
