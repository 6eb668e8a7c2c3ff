"""Finding data files on disk, or downloading them with a checksum check and a progress bar.

Resolution order for a registered data set ``NAME`` (first place holding every file wins):
``$VAELAB_DATA`` (itself, then ``DIR/NAME``), ``/usr/share/datasets/NAME`` (Debian's dataset
packages), the user cache (``$XDG_CACHE_HOME/vaelab/NAME``, default ``~/.cache``), then a download
from the official mirrors into the cache. An explicit ``--data-dir DIR`` (``data.data_dir``) is
where the data set is: DIR itself or ``DIR/NAME``, and nowhere else (not found there is an error
naming DIR, never a silent fall-back to another copy).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import DataError, DatasetNotFoundError

SYSTEM_ROOT = Path("/usr/share/datasets")


@dataclass(frozen=True)
class RemoteFile:
    """A file of a data set: its name, the mirrors that serve it, its SHA-256 and size."""

    name: str
    urls: tuple[str, ...]  # full URLs, tried in order
    sha256: str | None = None
    size: int | None = None
    alternatives: tuple[str, ...] = ()  # other local names accepted (e.g. the un-gzipped file)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vaelab"


def candidate_dirs(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """The folders searched, in order, for data set ``name``."""
    dirs: list[Path] = []
    for root in (data_dir, os.environ.get("VAELAB_DATA") or None):
        if root:
            dirs += [Path(root), Path(root) / name]
    dirs += [SYSTEM_ROOT / name, cache_root() / name]
    return dirs


def _find_in(folder: Path, f: RemoteFile) -> Path | None:
    for n in (f.name, *f.alternatives):
        p = folder / n
        if p.is_file():
            return p
    return None


def locate(
    name: str,
    files: Sequence[RemoteFile],
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> dict[str, Path]:
    """Return ``{file name: local path}`` for every file of a data set, downloading if allowed.
    With ``data_dir``, only ``data_dir`` and ``data_dir/name`` are searched (see the module's notes)."""
    if data_dir is not None and str(data_dir) != "":
        return _locate_in(name, files, Path(data_dir))
    tried = []
    for folder in candidate_dirs(name, data_dir):
        found = {f.name: _find_in(folder, f) for f in files}
        if all(found.values()):
            return {k: v for k, v in found.items() if v is not None}
        missing = [k for k, v in found.items() if v is None]
        tried.append(f"  {folder}: " + ("missing " + ", ".join(missing) if folder.is_dir() else "no such folder"))
    if download and all(f.urls for f in files):
        target = cache_root() / name
        created = not target.exists()
        errors: list[str] = []
        out: dict[str, Path] = {}
        for f in files:
            existing = _find_in(target, f)
            if existing is not None:
                out[f.name] = existing
                continue
            try:
                out[f.name] = download_file(f, target)
            except DataError as e:
                errors.append(str(e))
                break
        if not errors:
            return out
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # leave no empty cache folder behind a failed first download
        tried.append("  download into " + str(target) + ": " + "; ".join(errors))
    elif not download:
        tried.append("  download: disabled (--no-download)")
    else:
        tried.append("  download: this data set has no official download address")
    raise DatasetNotFoundError(
        f"data set {name!r} not found. Files needed: {', '.join(f.name for f in files)}. Places tried:\n"
        + "\n".join(tried)
        + f"\nPut the files in one of these folders, or pass --data-dir. (Debian/Ubuntu: "
        f"'apt-get install dataset-{name}' where such a package exists.)"
    )


def _locate_in(name: str, files: Sequence[RemoteFile], root: Path) -> dict[str, Path]:
    """The files of data set ``name`` in the explicit data folder ``root`` (itself, then ``root/name``)."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"--data-dir {root}: no such folder (data set {name!r}); give the folder that "
                                   "holds it, or leave --data-dir out to search vaelab's usual places")
    best: list[str] = []
    for folder in (root, root / name):
        found = {f.name: _find_in(folder, f) for f in files}
        if all(found.values()):
            return {k: v for k, v in found.items() if v is not None}
        missing = [k for k, v in found.items() if v is None]
        if folder.is_dir() and (not best or len(missing) < len(best)):
            best = missing
    raise DatasetNotFoundError(
        f"--data-dir {root}: holds no {name!r} data set (looked in it and in {root / name}; missing "
        f"{', '.join(best or [f.name for f in files])}); give the folder that holds it, or leave --data-dir out "
        "to search vaelab's usual places (and download)")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(f: RemoteFile, folder: Path, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download ``f`` into ``folder`` from the first mirror that answers, verifying its SHA-256.

    The file is written to a temporary name and renamed only once complete and verified, so an
    interrupted or corrupted download never leaves a half file under the real name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f.name
    failures = []
    for url in f.urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{f.name}.", suffix=".part", dir=folder)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or f.size
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"download {f.name}", disable=None if progress else True
                ) as bar:
                    while block := resp.read(1 << 16):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            if f.sha256 is not None and digest != f.sha256:
                failures.append(f"{url}: SHA-256 mismatch (got {digest}, expected {f.sha256})")
                continue
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            failures.append(f"{url}: {reason}")
        finally:
            if tmp.exists():
                tmp.unlink()
    raise DataError(f"could not download {f.name}: " + "; ".join(failures))
