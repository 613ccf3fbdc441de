"""On-disk cache of registration results, shared by every run that names the same folder.

An entry is a registration's transform (``<key>.h5``) and its outcome (``<key>.json``: the
record, or the reason it failed, and for the affine stage the selection score). The key is
a SHA-256 of everything the result depends on: the contents of the target's and the atlas's
files (image, mask, landmarks), the registration config (and, for the affine stage, the
selection settings that shape the score) and the atlasseg version. So another fusion method,
another ``k`` or other evaluation settings find the registrations of an earlier run, and a
run that was killed finds what it finished before. Both files are written atomically, the
JSON last: an entry without its JSON does not exist (a write killed midway leaves only a
``.tmp-*`` file, which ``clear`` and ``prune`` remove).

Contents are not trusted: the JSON carries a SHA-256 of its outcome and of the transform file's
bytes, checked on every read before the transform is parsed; an entry that does not match
(garbled, truncated, edited) is a warning, is removed and is computed again. The folder is
private to the user (0700). Its size is capped (``output.cache_max_gb``): after each target the
least recently used entries are removed until it fits, never one in use (used in the last
``IN_USE_SECONDS``, or since the target being segmented began).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .errors import AtlassegError
from .imageio import TMP_PREFIX, atomic_write, atomic_write_text
from .registration import save_transform

CACHE_ENV = "ATLASSEG_CACHE_DIR"
STAGES = ("affine", "nonrigid", "quality", "library")  # quality: calibration samples (atlasseg.quality), no
# transform; library: atlases and targets in the reference space (atlasseg.library)
IN_USE_SECONDS = 600  # an entry read or written this recently may be held by a run: never evicted
_FORMAT = 2  # entries carry checksums

log = logging.getLogger("atlasseg")


def default_dir() -> Path:
    """``$ATLASSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/atlasseg``, else ``~/.cache/atlasseg``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atlasseg"


def resolve_dir(configured: str | None) -> Path:
    """The cache folder: ``output.cache_dir`` when set, else :func:`default_dir`."""
    return Path(configured).expanduser() if configured else default_dir()


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path | None) -> str | None:
    """SHA-256 of a file's bytes (of every file in it, by relative name, for a folder such as a DICOM
    series); remembered per path, size and modification time, so each file is read once per process."""
    if path is None:
        return None
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = (str(path.resolve()), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _DIGESTS:
        digest = hashlib.sha256()
        for file in files:
            digest.update(str(file.relative_to(path)).encode() if path.is_dir() else b"")
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        _DIGESTS[stamp] = digest.hexdigest()
    return _DIGESTS[stamp]


def entry_key(stage: str, *, files: dict[str, Path | None], settings: dict) -> str:
    """The key of one registration result: the stage, its inputs' contents, its settings, the version."""
    document = {
        "stage": stage,
        "version": __version__,
        "settings": settings,
        "files": {name: file_digest(path) for name, path in files.items()},
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


class Cache:
    """Registration results under ``root/<stage>/<key>.{h5,json}``.

    ``refresh`` (``--force``) ignores what is there and writes over it; ``enabled=False`` neither reads nor writes;
    ``max_bytes`` (None: no cap) is what :meth:`evict` brings the folder down to.
    """

    def __init__(self, root: str | Path, *, enabled: bool = True, refresh: bool = False, max_bytes: int | None = None):
        self.root = Path(root)
        self.enabled = enabled
        self.refresh = refresh
        self.max_bytes = max_bytes

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> tuple[sitk.Transform | None, dict] | None:
        """(transform or None for a failed registration, outcome) of a finished, intact entry, else None.
        A damaged entry (its checksums do not match) is removed with a warning; a used one is stamped as used."""
        if not self.enabled or self.refresh:
            return None
        base = self.path(stage, key)
        json_path, h5_path = base.with_suffix(".json"), base.with_suffix(".h5")
        document = self._verified(json_path, h5_path)
        if document is None:
            return None
        outcome = document["outcome"]
        try:
            transform = sitk.ReadTransform(str(h5_path)) if outcome["ok"] else None
        except (OSError, RuntimeError):  # removed by another process since the check: computed again
            return None
        try:
            os.utime(json_path)  # the use stamp least-recently-used eviction goes by
        except OSError:  # a cache this user may read but not write: used all the same
            pass
        return transform, outcome

    def _verified(self, json_path: Path, h5_path: Path) -> dict | None:
        """An entry's JSON document when the entry is intact; None when absent, or damaged (then removed, with a
        warning: it is computed again)."""
        try:
            document = json.loads(json_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            document = None
        problem = _damage(document, h5_path)
        if problem is None:
            return document
        older = isinstance(document, dict) and document.get("format") != _FORMAT  # expected once after an upgrade
        log.log(
            logging.INFO if older else logging.WARNING,
            "%s: cached registration %s; it is computed again",
            json_path,
            problem,
        )
        self._remove(json_path, h5_path, h5_path.with_suffix(".npz"))
        return None

    def check(self) -> int:
        """Verify every entry's checksums and remove the damaged ones (each with a warning); returns how many."""
        damaged = 0
        for _, _, json_path, h5_path in self.entries():
            damaged += json_path.exists() and self._verified(json_path, h5_path) is None
        return damaged

    def store(
        self,
        stage: str,
        key: str,
        transform: sitk.Transform | None,
        outcome: dict,
        *,
        arrays: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write an entry (the transform and ``arrays`` first, then the JSON with their checksums that makes it
        visible); ``outcome['ok']`` says whether the registration succeeded. ``arrays`` (``<key>.npz``) are
        what :meth:`load_arrays` returns."""
        if not self.enabled:
            return
        self._make_folders(stage)
        base = self.path(stage, key)
        outcome = {"ok": transform is not None, **outcome}
        transform_sha = arrays_sha = None
        if transform is not None:
            save_transform(transform, base.with_suffix(".h5"))
            transform_sha = _sha256_file(base.with_suffix(".h5"))
        if arrays is not None:
            atomic_write(base.with_suffix(".npz"), lambda tmp: np.savez(tmp, **arrays), what="arrays")
            arrays_sha = _sha256_file(base.with_suffix(".npz"))
        document = {
            "format": _FORMAT,
            "outcome": outcome,
            "outcome_sha256": _sha256_json(outcome),
            "transform_sha256": transform_sha,
            **({"arrays_sha256": arrays_sha} if arrays is not None else {}),
        }
        atomic_write_text(base.with_suffix(".json"), json.dumps(document) + "\n")

    def _make_folders(self, stage: str) -> None:
        """The cache folder and its stage folder, private to the user (0700) whatever the umask."""
        for folder in (self.root, self.root / stage):
            if not folder.is_dir():
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    os.chmod(folder, 0o700)
                except OSError as err:
                    raise AtlassegError(
                        f"{folder}: cannot create the cache folder ({err.strerror or err}); "
                        "set output.cache_dir or $ATLASSEG_CACHE_DIR"
                    ) from None

    @staticmethod
    def _remove(*paths: Path) -> None:
        for path in paths:  # the JSON first: the entry is gone before its transform
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    def entries(self) -> list[tuple[float, int, Path, Path]]:
        """Every entry as (last use, bytes of its files, JSON path, transform path), least recently used first."""
        found = []
        for stage in STAGES:
            folder = self.root / stage
            for json_path in folder.glob("*.json") if folder.is_dir() else ():
                if json_path.name.startswith(TMP_PREFIX):
                    continue
                h5_path = json_path.with_suffix(".h5")
                try:
                    used, size = json_path.stat().st_mtime, json_path.stat().st_size
                    size += sum(p.stat().st_size for p in (h5_path, json_path.with_suffix(".npz")) if p.exists())
                except OSError:  # removed meanwhile
                    continue
                found.append((used, size, json_path, h5_path))
        return sorted(found, key=lambda e: (e[0], str(e[2])))

    def size(self) -> int:
        """Bytes under the stage folders (entries, and any stray or temporary file)."""
        return sum(
            f.stat().st_size
            for stage in STAGES
            if (self.root / stage).is_dir()
            for f in (self.root / stage).iterdir()
            if f.is_file()
        )

    def evict(self, *, max_bytes: int | None = None, in_use_since: float | None = None) -> tuple[int, int]:
        """Remove least recently used entries until the folder holds at most ``max_bytes`` (default: the cap);
        never one used after ``in_use_since`` (a time stamp) nor in the last :data:`IN_USE_SECONDS`.
        Stray transforms (without their JSON) and temporaries older than that go too.
        Returns (entries removed, bytes freed)."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        if not self.enabled or limit is None:
            return 0, 0
        recent = time.time() - IN_USE_SECONDS
        protected_after = recent if in_use_since is None else min(recent, in_use_since)
        freed = self._remove_strays(protected_after)
        total, removed = self.size(), 0
        for used, size, json_path, h5_path in self.entries() if total > limit else ():
            if total <= limit:
                break
            if used >= protected_after:
                continue
            self._remove(json_path, h5_path, h5_path.with_suffix(".npz"))
            total -= size
            freed += size
            removed += 1
        if total > limit:
            log.warning(
                "%s: the registration cache holds %s, above output.cache_max_gb (%s), in entries in use; "
                "they become evictable once unused for %d minutes",
                self.root,
                _gib(total),
                _gib(limit),
                IN_USE_SECONDS // 60,
            )
        return removed, freed

    def _remove_strays(self, older_than: float) -> int:
        """Delete transforms without a JSON and temporaries last touched before ``older_than``; returns bytes freed."""
        freed = 0
        for stage in STAGES:
            folder = self.root / stage
            for path in list(folder.iterdir()) if folder.is_dir() else ():
                orphan = path.suffix in (".h5", ".npz") and not path.with_suffix(".json").exists()
                stray = orphan or path.name.startswith(TMP_PREFIX)
                try:
                    if stray and path.stat().st_mtime < older_than:
                        freed += path.stat().st_size
                        path.unlink()
                except OSError:
                    pass
        return freed

    def load_arrays(self, stage: str, key: str) -> dict[str, np.ndarray] | None:
        """The arrays :meth:`store` wrote with an entry that :meth:`load` found intact (their checksum is checked
        there), else None (absent, or removed since: computed again)."""
        if not self.enabled or self.refresh:
            return None
        try:
            with np.load(self.path(stage, key).with_suffix(".npz")) as stored:
                return {name: stored[name] for name in stored.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            return None

    def info(self) -> dict:
        """Entries and bytes per stage, the total and the cap."""
        summary = {"dir": str(self.root), "stages": {}, "max_bytes": self.max_bytes}
        for stage in STAGES:
            folder = self.root / stage
            files = list(folder.iterdir()) if folder.is_dir() else []
            entries = sum(f.suffix == ".json" and not f.name.startswith(TMP_PREFIX) for f in files)
            summary["stages"][stage] = {"entries": entries, "bytes": sum(f.stat().st_size for f in files)}
        summary["bytes"] = sum(s["bytes"] for s in summary["stages"].values())
        return summary

    def clear(self) -> int:
        """Remove every entry; returns the number removed."""
        count = sum(s["entries"] for s in self.info()["stages"].values())
        for stage in STAGES:
            try:
                shutil.rmtree(self.root / stage)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise AtlassegError(f"{self.root / stage}: cannot clear the cache ({err.strerror or err})") from None
        return count


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _damage(document, h5_path: Path) -> str | None:
    """Why a cache entry cannot be trusted (its JSON ``document``, its transform file), or None when it is intact."""
    if not isinstance(document, dict):
        return "is unreadable"
    if document.get("format") != _FORMAT:  # entries of atlasseg before checksums
        return "was written by another atlasseg (no checksums)"
    if not isinstance(document.get("outcome"), dict):
        return "is unreadable"
    if document.get("outcome_sha256") != _sha256_json(document["outcome"]):
        return "record does not match its checksum (edited or damaged)"
    if not document["outcome"].get("ok"):
        return None
    for path, checksum, what in (
        (h5_path, document.get("transform_sha256"), "transform"),
        (h5_path.with_suffix(".npz"), document.get("arrays_sha256"), "arrays"),
    ):
        if what == "arrays" and "arrays_sha256" not in document:
            continue
        try:
            actual = _sha256_file(path)
        except OSError:
            return f"has no readable {what} file {path.name}"
        if actual != checksum:
            return f"{what} {path.name} does not match its checksum (edited, truncated or damaged)"
    return None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def settings(config) -> dict:
    """A config dataclass as the plain mapping a key is made of."""
    return json.loads(json.dumps(asdict(config), default=str))


def open_cache(config, *, force: bool = False) -> Cache:
    """The cache a run with ``config`` uses (``force``: recompute, writing over what is there)."""
    return Cache(
        resolve_dir(config.output.cache_dir), enabled=config.output.cache, refresh=force, max_bytes=max_bytes(config)
    )


def max_bytes(config) -> int | None:
    """``output.cache_max_gb`` in bytes (None: no cap)."""
    cap = config.output.cache_max_gb
    return None if cap is None else int(cap * 2**30)
