"""Input checks before any work: files, images, label maps, memory and disk estimates, the output folder."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..config import Config, SelectionConfig
from ..errors import AtlassegError, ImageError, RegistrationError
from ..fusion.registry import FUSERS
from ..imageio import (
    Geometry,
    check_intensities,
    check_label_values,
    check_same_grid,
    check_scalar,
    remove_temporaries,
    same_voxels,
    voxel_fingerprint,
)
from ..layout import LAYOUTS
from ..manifest import Atlas, Manifest, Target
from ..parallel import thread_budget
from ..registration import load_transform
from ..registration.pyramid import level_shrinks
from .outputs import write_json
from .resume import TARGET_RECORD, comparable, input_digests, inputs_key
from .sources import FILES, Sources

log = logging.getLogger("atlasseg")


def check_inputs(
    manifest: Manifest, config: Config | None = None, *, leave_one_out: bool = False, sources: Sources = FILES
) -> None:
    """Every listed file read once, before any work: readable and complete, scalar, 2D/3D, one
    dimensionality across the manifest (the atlases' initial transforms too); intensities finite and
    not constant; label maps whole, non-negative numbers on their image's grid (floating-point noise is
    snapped, with a warning), an atlas's not empty; masks on their image's grid. Warns about declared
    labels an atlas lacks and labels the manifest does not declare. With ``config``: the targets' ids suit
    ``output.layout``, every entry has the landmarks its initialisation needs, ``selection.k`` is compared with
    the atlas count (larger: a warning, all atlases are used), every image is large enough for the registration
    pyramid (:func:`check_pyramid`), the run's memory is estimated (:func:`check_memory`: with the declared
    labels first, again with the labels the atlases hold once read), and joint label fusion's temporary files
    are checked against the free space (:func:`check_disk`).

    An atlas holding the same voxels as a target (the same file, or a copy in any format) would hand the
    target its own labels back: a warning, or with ``leave_one_out`` (cross-validation, where every atlas is a
    target) an error for any two atlases that are the same image.

    ``sources``: the images held in memory (:func:`atlasseg.segment`'s), checked as given and named by the
    argument that held them; every other file is read."""
    entries = (*manifest.atlases, *manifest.targets)
    needs_landmarks = config is not None and config.registration.affine.initialization == "landmarks"
    dims: dict[int, str] = {}
    largest = None
    grids: list[tuple[Path, Geometry]] = []
    for entry in entries:  # headers only: cheap, and they size the run before any voxel is read
        if needs_landmarks and entry.landmarks is None:
            raise ImageError(
                f"{manifest.path}: {entry.id} has no 'landmarks' file, needed by "
                "registration.affine.initialization: landmarks"
            )
        with _naming(manifest, entry, "image", sources):
            geometry = sources.geometry(entry.image)
            check_scalar(geometry, sources.name(entry.image))
        grids.append((sources.name(entry.image), geometry))
        dims.setdefault(geometry.dimension, str(sources.name(entry.image)))
        if largest is None or math.prod(geometry.size) > math.prod(largest.size):
            largest = geometry
        for key in ("labels", "mask"):
            if getattr(entry, key) is not None:
                with _naming(manifest, entry, key, sources):
                    check_same_grid(
                        geometry,
                        sources.geometry(getattr(entry, key)),
                        image_path=sources.name(entry.image),
                        labels_path=sources.name(getattr(entry, key)),
                    )
    if len(dims) > 1:
        raise ImageError(
            f"{manifest.path}: mixes 2D images ({dims[2]}) with 3D images ({dims[3]}); use one dimensionality"
        )
    for file in dict.fromkeys(file for atlas in manifest.atlases for _, file in atlas.transforms):
        dimension = load_transform(file).GetDimension()
        if dimension not in dims:
            raise RegistrationError(f"{file}: a {dimension}D transform, for {min(dims)}D images")
    if config is not None and config.output.format == "mgz" and 2 in dims:
        raise ImageError(f"{manifest.path}: output.format mgz holds 3D images only, these are 2D (use nii.gz)")
    if config is not None:
        LAYOUTS[config.output.layout].check([t.id for t in manifest.targets])
        for path, geometry in grids:
            check_pyramid(geometry, path, config)
        k = config.selection.k
        if k != "all" and k > len(manifest.atlases):  # the default k asks for no warning
            level = logging.INFO if k == SelectionConfig.k else logging.WARNING
            log.log(
                level,
                "selection.k is %d but %s lists %d atlases: all of them are used",
                k,
                manifest.path,
                len(manifest.atlases),
            )
        check_memory(largest, config, n_tasks=len(manifest.atlases), n_labels=len(manifest.label_names) + 1)
        check_disk(largest, config, n_tasks=len(manifest.atlases))
    labels = set(manifest.label_names)
    label_values = {}
    for entry in entries:  # then every voxel, once: the label maps first (an image is compared with them)
        if entry.labels is not None:
            with _naming(manifest, entry, "labels", sources):
                label_values[entry.labels] = present = _check_label_map(entry, manifest, sources)
            if isinstance(entry, Atlas):  # the labels fusion votes on
                labels |= present
    fingerprints: dict[tuple, list[Atlas | Target]] = {}
    for entry in entries:
        with _naming(manifest, entry, "image", sources):
            voxels = sources.voxels(entry.image)
            check_intensities(sources.name(entry.image), voxels)
            _check_not_a_label_map(entry, voxels, label_values, sources)
        # (a held image's name is no NIfTI file: its voxels are in SimpleITK's order, as they are)
        fingerprints.setdefault(voxel_fingerprint(sources.name(entry.image), voxels), []).append(entry)
        del voxels
        if entry.mask is not None:
            with _naming(manifest, entry, "mask", sources):
                check_label_values(sources.name(entry.mask), sources.voxels(entry.mask))
    groups = [group for alike in fingerprints.values() if len(alike) > 1 for group in _equal_images(alike, sources)]
    _check_same_images(manifest, groups, leave_one_out=leave_one_out, sources=sources)
    if config is not None and len(labels) > len(manifest.label_names):
        check_memory(largest, config, n_tasks=len(manifest.atlases), n_labels=len(labels) + 1)


def _equal_images(entries: list[Atlas | Target], sources: Sources) -> list[list[Atlas | Target]]:
    """``entries`` (whose images share a fingerprint) split into groups of equal voxels."""
    groups: list[list[Atlas | Target]] = []

    def same(a: Path, b: Path) -> bool:
        return a == b or same_voxels(sources.intensities(a), sources.intensities(b))

    for entry in entries:
        group = next((g for g in groups if same(g[0].image, entry.image)), None)
        if group is None:
            groups.append([entry])
        else:
            group.append(entry)
    return groups


def _check_same_images(
    manifest: Manifest, groups: list[list[Atlas | Target]], *, leave_one_out: bool, sources: Sources
) -> None:
    """Warn about an atlas that is one of the targets' images; with ``leave_one_out``, refuse two atlases that are
    the same image (each would be segmented by the other: its labels handed back)."""
    for group in groups:
        atlases = [e for e in group if isinstance(e, Atlas)]
        if leave_one_out and len(atlases) > 1:
            raise ImageError(
                f"{manifest.path}: atlases {_listing([a.id for a in atlases])} are the same image "
                f"({sources.name(atlases[0].image)}, {sources.name(atlases[1].image)}): leave-one-out would score each on its own "
                "labels; keep one of them"
            )
        for target in (e for e in group if isinstance(e, Target)):
            # An atlas of the target's own id never segments it (Manifest.atlases_for): a leave-one-out layout.
            others = [a.id for a in atlases if a.id != target.id]
            if others:
                log.warning(
                    "%s: target %r is the same image as atlas %s (%s): that atlas hands the target its "
                    "own labels, which inflates its scores; leave it out of the atlases (or the target out "
                    "of the targets)",
                    manifest.path,
                    target.id,
                    _listing(others),
                    sources.name(target.image),
                )


def _listing(values, limit: int = 10) -> str:
    """Up to ``limit`` values, comma-separated, and how many more (log lines stay readable)."""
    values = list(values)
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return ", ".join(map(str, values[:limit])) + more


@contextlib.contextmanager
def _naming(manifest: Manifest, entry: Atlas | Target, key: str, sources: Sources):
    """An input error about one of ``entry``'s files names the manifest, the entry, the field and the paths as
    the manifest writes them (not as resolved through symlinks); one about an image held in memory names the
    argument that held it, as it is."""
    if sources.is_held(getattr(entry, key)):
        yield
        return
    try:
        yield
    except ImageError as err:
        message = str(err)
        own = str(getattr(entry, key))
        if message.startswith(own + ": "):
            message = message[len(own) + 2 :]
        for name in ("image", "labels", "mask", "landmarks"):  # other files the message names
            if getattr(entry, name) is not None:
                message = message.replace(str(getattr(entry, name)), manifest.as_written(entry, name))
        kind = "atlas" if isinstance(entry, Atlas) else "target"
        raise ImageError(
            f"{manifest.path}: {kind} {entry.id!r}: {key} {manifest.as_written(entry, key)}: {message}"
        ) from None


# An image whose voxels hold at most this many distinct values, all whole numbers, is a label map given as an image.
_LABEL_LIKE_VALUES = 16
_LABEL_MAP_MOST_VALUES = 1024  # beyond: an image (compared with the label maps' values only below it)


def _check_not_a_label_map(entry: Atlas | Target, voxels, label_values: dict[Path, set], sources: Sources) -> None:
    """Refuse an image that is a label map: few distinct whole-number values, the values of one of the manifest's
    label maps, or the same voxels as the entry's own labels."""
    sample = np.unique(voxels.ravel()[:: max(1, voxels.size // 100_000)])  # most images stop here
    if sample.size > _LABEL_MAP_MOST_VALUES or not np.array_equal(sample, np.round(sample)):
        return
    distinct = np.unique(voxels)
    if distinct.size > _LABEL_MAP_MOST_VALUES or not np.array_equal(distinct, np.round(distinct)):
        return
    present = set(distinct.tolist()) - {0}
    same_values = next((sources.name(path) for path, values in label_values.items() if values == present), None)
    if entry.labels is not None and np.array_equal(voxels, sources.voxels(entry.labels)):
        why = "the same voxels as its own labels file"
    elif same_values is not None:
        why = f"the label values of {same_values}"
    elif distinct.size <= _LABEL_LIKE_VALUES:
        why = f"an image has more than {_LABEL_LIKE_VALUES}"
    else:
        return
    raise ImageError(
        f"{sources.name(entry.image)}: looks like a label map, not an image: {distinct.size} distinct whole-number "
        f"values ({why}); point 'image:' at the intensity image"
    )


def _check_label_map(entry: Atlas | Target, manifest: Manifest, sources: Sources) -> set[int]:
    """Check an entry's label map (see :func:`check_inputs`); returns the labels it holds, background aside."""
    path, declared = sources.name(entry.labels), set(manifest.label_names)
    present = set(check_label_values(path, sources.voxels(entry.labels)).tolist()) - {0}
    is_atlas = isinstance(entry, Atlas)
    if not present and is_atlas:
        raise ImageError(
            f"{path}: label map of atlas {entry.id!r} is empty (all background); fix it or leave the atlas out"
        )
    if not present:
        log.warning("%s: ground truth of target %r is empty (all background): its scores are undefined", path, entry.id)
    if declared and present - declared:
        log.warning(
            "%s: %s %r holds labels [%s] not declared in %s: segmented and scored without a name",
            path,
            "atlas" if is_atlas else "target",
            entry.id,
            _listing(sorted(present - declared)),
            manifest.path,
        )
    if declared and is_atlas and present and declared - present:
        log.warning(
            "%s: atlas %r lacks declared labels %s: it votes background there",
            path,
            entry.id,
            _listing(f"{v} ({manifest.label_names[v]})" for v in sorted(declared - present)),
        )
    return present


# ITK's recursive Gaussian, which smooths images in the affine pyramid and elsewhere, needs this many voxels
# along every axis it smooths.
_MIN_VOXELS = 4


def check_pyramid(geometry: Geometry, path: Path, config: Config) -> None:
    """Refuse, before any work, an image too thin for the registration: fewer than 4 voxels along an axis, or
    (non-rigid stage) fewer voxels along an axis than a level's shrink factor; the message says what to do."""
    size = ", ".join(map(str, geometry.size))
    for axis, count in enumerate(geometry.size):
        if count < _MIN_VOXELS:
            single = " (a single slice: save it as a 2D image)" if count == 1 and geometry.dimension == 3 else ""
            raise ImageError(
                f"{path}: {count} voxel(s) along axis {axis} (size {size}); registration smooths every "
                f"axis and needs at least {_MIN_VOXELS} voxels along each{single}: resample the image "
                "onto more voxels along that axis"
            )
    nonrigid = config.registration.nonrigid
    if not nonrigid.enabled:
        return
    for level, factors in enumerate(level_shrinks(nonrigid, geometry.size, geometry.spacing)):
        for axis, (count, factor) in enumerate(zip(geometry.size, factors)):
            if count < factor:
                raise ImageError(
                    f"{path}: {count} voxels along axis {axis} (size {size}), fewer than the shrink "
                    f"factor {factor} of registration.nonrigid level {level}: lower "
                    "registration.nonrigid.shrink_factors, or resample the image onto more voxels"
                )


# Rough peak bytes per voxel of the largest image: one registration job (two float32 images, their
# normalised and smoothed copies, gradients, and the non-rigid stage's displacement fields: float64 per axis;
# `atlasseg register` with the default config peaked at 261 bytes per voxel on a 128^3 demo pair), and the
# fusion (a float32 vote per label, plus the weights and the intensities of one candidate; what a method keeps
# beyond that, it estimates itself: Fuser.estimate_bytes).
_JOB_BYTES_PER_VOXEL = {2: 160, 3: 256}
_FUSION_BYTES_PER_VOXEL_AND_LABEL = 4
_REPORT_BYTES_PER_VOXEL_AND_LABEL = 2  # the candidates' disagreement: a uint16 vote count per label
MEMORY_LIMIT_ENV = "ATLASSEG_MEMORY_LIMIT"
_MANY_LABELS = 1000  # beyond this, merging labels is part of the advice


def available_memory() -> int:
    """Bytes this run may use: ``$ATLASSEG_MEMORY_LIMIT`` (bytes, or with a K/M/G/T suffix) when set,
    else the memory the system reports available (MemAvailable; free pages elsewhere)."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if text:
        units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        scale = units.get(text[-1].upper(), 1)
        try:
            return int(float(text[:-1] if scale > 1 else text) * scale)
        except ValueError:
            raise AtlassegError(f"{MEMORY_LIMIT_ENV}={text!r}: expected a number of bytes, e.g. 8G") from None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def estimate_memory(geometry: Geometry, config: Config, *, n_tasks: int, n_labels: int) -> tuple[int, int, int]:
    """(total, per registration job, parallel jobs): a rough peak of segmenting on ``geometry``'s grid."""
    voxels = math.prod(geometry.size)
    jobs, _ = thread_budget(config.parallel, max(1, n_tasks))
    per_job = voxels * _JOB_BYTES_PER_VOXEL[geometry.dimension]
    fusion = voxels * _FUSION_BYTES_PER_VOXEL_AND_LABEL * (n_labels + 4)
    if config.output.report:
        fusion += voxels * _REPORT_BYTES_PER_VOXEL_AND_LABEL * n_labels
    fusion += FUSERS[config.fusion.method].estimate_bytes(geometry, _n_candidates(config, n_tasks))
    return jobs * per_job + fusion, per_job, jobs


def _n_candidates(config: Config, n_tasks: int) -> int:
    """How many candidates fusion gets at most: ``selection.k`` of the ``n_tasks`` atlases."""
    k = config.selection.k
    return n_tasks if k == "all" else min(k, n_tasks)


def check_disk(geometry: Geometry | None, config: Config, *, n_tasks: int) -> None:
    """Refuse, before any work, a fusion whose temporary files (joint label fusion's candidates, when too many
    to keep in memory: see :class:`~atlasseg.fusion.jlf.JointLabelFusion`) would not fit in ``TMPDIR``."""
    if geometry is None:
        return
    fuser = FUSERS[config.fusion.method]
    need = fuser.estimate_disk_bytes(geometry, _n_candidates(config, n_tasks))
    if not need:
        return
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ImageError(
            f"{fuser.title} keeps its candidates in {folder}: about {_size(need)} for images of "
            f"{' x '.join(map(str, geometry.size))} voxels, but {_size(free)} are free there: set TMPDIR to a "
            "folder with room, or lower selection.k, or choose another fusion.method"
        )


def check_memory(geometry: Geometry | None, config: Config, *, n_tasks: int, n_labels: int) -> None:
    """Refuse, before any work, a run whose estimated peak memory exceeds :func:`available_memory`."""
    if geometry is None:
        return
    total, per_job, jobs = estimate_memory(geometry, config, n_tasks=n_tasks, n_labels=n_labels)
    available = available_memory()
    if total <= available:
        return
    fewer = f", lower parallel.n_jobs (each registration needs about {_size(per_job)})" if jobs > 1 else ""
    raise ImageError(
        f"images of {' x '.join(map(str, geometry.size))} voxels would need about {_size(total)} "
        f"({jobs} parallel registration(s) and fusion) but {_size(available)} are available (fusion keeps a vote "
        f"per voxel for each of {n_labels} labels, background included): crop or downsample the images{fewer}"
        f"{', merge labels' if n_labels > _MANY_LABELS else ''} (or set {MEMORY_LIMIT_ENV})"
    )


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def check_output_dir(out: Path, config: Config, manifest: Manifest, *, force: bool = False) -> None:
    """Before any work: ``out`` is a writable folder, and holds no outputs of another config.

    A folder with a ``run.json`` whose config differs (``output.dir`` and ``output.report`` aside), or with
    files but no ``run.json``, is refused unless ``force``: outputs of two configs are never silently mixed. A new
    folder gets a ``run.json`` at once (the config, status ``running``), so a stopped run is recognised.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".tmp-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise AtlassegError(
            f"{out}: output folder is not writable ({err.strerror or err}); choose another --out"
        ) from None
    record = out / "run.json"
    wanted = comparable(config.to_dict())
    if record.exists():
        try:
            found = comparable(json.loads(record.read_text())["config"])
        except (OSError, ValueError, KeyError, TypeError):
            found = None
        if found == wanted:
            if removed := remove_temporaries(out):
                log.info("%s: removed %d temporary file(s) of a stopped run", out, removed)
            return
        what = (
            "an unreadable run.json"
            if found is None
            else "outputs of a different config ("
            + ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in _differences(found, wanted)[:3])
            + ")"
        )
    elif any(out.iterdir()):
        what = "files but no run.json"
    else:
        write_json(record, {"config": config.to_dict(), "manifest": str(manifest.path), "status": "running"})
        return
    if not force:
        raise AtlassegError(f"{out}: holds {what}; choose another --out, or --force to write over them")
    log.warning("%s: holds %s; writing over them (--force)", out, what)


def _differences(old, new, prefix: str = "") -> list[tuple[str, object, object]]:
    """(key path, old value, new value) of every leaf that differs between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for key in dict.fromkeys([*old, *new])
            for d in _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        ]
    return [] if old == new else [(prefix, old, new)]


def check_changed_inputs(
    out: Path, targets: list[Target], manifest: Manifest, config: Config, *, force: bool = False
) -> None:
    """Before any work: refuse (unless ``force``) to write over a target's outputs in ``out`` that were made from
    other inputs (another manifest, or files changed since), naming the targets and the files that differ."""
    changed = []
    for target in targets:
        try:
            document = json.loads((out / target.id / TARGET_RECORD).read_text())
            old_key, old_files = document["inputs"], document.get("files", {})
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not segmented there yet (or a record too damaged to be reused: segmented again)
        atlases = manifest.atlases_for(target)
        if old_key == inputs_key(target, atlases, config):
            continue
        new_files = input_digests(target, atlases)
        names = [name for name in dict.fromkeys([*old_files, *new_files]) if old_files.get(name) != new_files.get(name)]
        changed.append(f"{target.id} ({', '.join(names[:3]) + (', ...' if len(names) > 3 else '') or 'inputs'})")
    if not changed:
        return
    what = f"segmentations of {len(changed)} target(s) made from other inputs: {'; '.join(changed[:5])}"
    if not force:
        raise AtlassegError(f"{out}: holds {what}; choose another --out, or --force to write over them")
    log.warning("%s: holds %s; writing over them (--force)", out, what)
