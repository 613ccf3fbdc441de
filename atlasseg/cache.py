"""On-disk cache of registration results, shared by every run that names the same folder.

An entry is a registration's transform (``<key>.h5``) and its outcome (``<key>.json``: the
record, or the reason it failed, and for the affine stage the selection score). The key is
a SHA-256 of everything the result depends on: the contents of the target's and the atlas's
files (image, mask, landmarks), the registration config (and, for the affine stage, the
selection settings that shape the score) and the atlasseg version. So another fusion method,
another ``k`` or other evaluation settings find the registrations of an earlier run, and a
run that was killed finds what it finished before. Both files are written atomically, the
JSON last: an entry without its JSON does not exist (a write killed midway leaves only a
``.tmp-*`` file, which ``clear`` removes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
STAGES = ("affine", "nonrigid", "library")  # library: atlases and targets in the reference space (atlasseg.library)


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
    document = {"stage": stage, "version": __version__, "settings": settings,
                "files": {name: file_digest(path) for name, path in files.items()}}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


class Cache:
    """Registration results under ``root/<stage>/<key>.{h5,json}``.

    ``refresh`` (``--force``) ignores what is there and writes over it; ``enabled=False`` neither reads nor writes.
    """

    def __init__(self, root: str | Path, *, enabled: bool = True, refresh: bool = False):
        self.root = Path(root)
        self.enabled = enabled
        self.refresh = refresh

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> tuple[sitk.Transform | None, dict] | None:
        """(transform or None for a failed registration, outcome) of a finished entry, else None."""
        if not self.enabled or self.refresh:
            return None
        base = self.path(stage, key)
        try:
            outcome = json.loads(base.with_suffix(".json").read_text())
            transform = sitk.ReadTransform(str(base.with_suffix(".h5"))) if outcome["ok"] else None
        except (OSError, ValueError, KeyError, RuntimeError):  # absent, or damaged: computed again
            return None
        return transform, outcome

    def store(self, stage: str, key: str, transform: sitk.Transform | None, outcome: dict) -> None:
        """Write an entry (the transform first, then the JSON that makes it visible); ``outcome['ok']`` says
        whether the registration succeeded."""
        if not self.enabled:
            return
        base = self.path(stage, key)
        if transform is not None:
            save_transform(transform, base.with_suffix(".h5"))
        atomic_write_text(base.with_suffix(".json"), json.dumps({"ok": transform is not None, **outcome}) + "\n")

    def store_arrays(self, stage: str, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Write an entry's arrays (``<key>.npz``, atomically); call before :meth:`store`, whose JSON makes the
        entry visible, so that a write killed midway leaves no entry that :meth:`load_arrays` would trust."""
        if self.enabled:
            atomic_write(self.path(stage, key).with_suffix(".npz"), lambda tmp: np.savez(tmp, **arrays), what="arrays")

    def load_arrays(self, stage: str, key: str) -> dict[str, np.ndarray] | None:
        """The arrays of an entry :meth:`store_arrays` wrote, else None (absent or damaged: computed again)."""
        if not self.enabled or self.refresh:
            return None
        try:
            with np.load(self.path(stage, key).with_suffix(".npz")) as stored:
                return {name: stored[name] for name in stored.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
            return None

    def info(self) -> dict:
        """Entries and bytes per stage."""
        summary = {"dir": str(self.root), "stages": {}}
        for stage in STAGES:
            folder = self.root / stage
            files = list(folder.iterdir()) if folder.is_dir() else []
            entries = sum(f.suffix == ".json" and not f.name.startswith(TMP_PREFIX) for f in files)
            summary["stages"][stage] = {"entries": entries,
                                        "bytes": sum(f.stat().st_size for f in files)}
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


def settings(config) -> dict:
    """A config dataclass as the plain mapping a key is made of."""
    return json.loads(json.dumps(asdict(config), default=str))


def open_cache(config, *, force: bool = False) -> Cache:
    """The cache a run with ``config`` uses (``force``: recompute, writing over what is there)."""
    return Cache(resolve_dir(config.output.cache_dir), enabled=config.output.cache, refresh=force)
