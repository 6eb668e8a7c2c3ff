"""Decode once: image sources (``folder:PATH``, ``shards:PATH``) are decoded into a prepared cache on
first use, and every later command reads that instead of decoding again.

A prepared data set is a folder under the cache directory (``data.cache_dir``, default
``$XDG_CACHE_HOME/vaelab/prepared``), one per (source, image size, grey setting)::

    <name>-<key>/
      images.npy   uint8 (N, C, S, S), a plain .npy file (np.load(..., mmap_mode="r") opens it)
      labels.npy   int64 (N,), when the source has labels
      meta.json    format, source, size, channels, class count, the sources' fingerprint (names,
                   sizes, mtimes), what was skipped, how long the build took

Opening it costs a listing of the source (to compare fingerprints) and reading meta.json; images are
then read from the file batch by batch (:class:`MappedImages`: a read-only memory map gathered into
fresh buffers, its pages dropped from the process as it goes, so memory holds a few batches, not the
data set, and the page cache, not the process, holds what was read).

Building (:func:`build`) decodes in worker processes, each writing its rows straight into the file
(nothing big crosses a pipe; each worker holds one image at a time), shows progress with images/s,
and is atomic: everything is written into ``<name>-<key>.tmp-<pid>/`` and renamed into place once
complete and flushed, so an interrupted build leaves no cache (its leftovers are removed by the next
build, which starts again). A lock file serialises builds of the same key, so concurrent first
commands (torchrun's ranks) decode once. A source that changed (a file added, removed, resized or
touched) no longer matches the fingerprint and is rebuilt. Images refused by the in-memory reader
(not images, truncated, too many pixels) are refused here by the same code, one line each, counted.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import mmap
import multiprocessing
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch

from ..errors import DataError, VaelabWarning
from ..progress import Progress, duration
from ..safeio import human
from .base import ImageSet
from .sources import cache_root

FORMAT = 1
META_MAX_BYTES = 1 << 20  # meta.json is small; a larger one is not ours
CHUNK = 64  # images per worker task
INLINE_BELOW = 512  # fewer images than this are decoded in this process (no pool to start)
PROGRESS_FROM = 2000  # images: a smaller build runs without a progress line
DROP_EVERY = 16 << 20  # bytes a prepared file's reads may have mapped before its pages are dropped
FAULT_AROUND = 64 << 10  # bytes Linux maps around a page fault of a file mapping (fault_around_bytes)


# ---------------------------------------------------------------- where prepared data live
def prepared_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding prepared data sets: ``cache_dir`` or ``$XDG_CACHE_HOME/vaelab/prepared``."""
    return Path(cache_dir).expanduser() if cache_dir else cache_root() / "prepared"


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to decode: a whole file (``offset`` -1) or ``length`` bytes at ``offset`` of a tar shard."""

    path: str
    offset: int = -1
    length: int = -1


@dataclasses.dataclass
class Listing:
    """What a source holds, in order: the candidate images, their labels (or None), their names for
    messages, and how many files were looked at."""

    items: list[Item]
    names: list[str]
    n_files: int
    # the labels of the images kept (their indices into ``items``): (labels, class count) or (None, None)
    labels_of: Callable[[list[int]], tuple[np.ndarray | None, int | None]]
    skipped: list[str] = dataclasses.field(default_factory=list)  # found unusable while listing


class Source(abc.ABC):
    """An image source that can be prepared: a stable identity, a cheap fingerprint, a full listing."""

    kind = ""

    def __init__(self, arg: str) -> None:
        self.arg = arg

    @property
    @abc.abstractmethod
    def label(self) -> str:  # what messages and ImageSet.source call it
        ...

    @abc.abstractmethod
    def identity(self) -> str:  # the same source wherever the command runs from
        ...

    @abc.abstractmethod
    def fingerprint(self) -> str:  # changes when the data change (names, sizes, mtimes)
        ...

    @abc.abstractmethod
    def listing(self) -> Listing:
        ...

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.arg}"


def hash_lines(lines: Iterator[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()[:32]


# ---------------------------------------------------------------- the cache on disk
@dataclasses.dataclass(frozen=True)
class Prepared:
    """An opened prepared data set: its folder, meta.json, and the images file's layout."""

    dir: Path
    meta: dict[str, Any]
    offset: int  # bytes of .npy header before the first image

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(v) for v in self.meta["shape"])  # type: ignore[return-value]

    @property
    def images_path(self) -> Path:
        return self.dir / "images.npy"

    def labels(self) -> torch.Tensor | None:
        p = self.dir / "labels.npy"
        if not self.meta.get("labelled"):
            return None
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: unreadable ({e}); remove its folder to rebuild it") from None
        if arr.shape != (self.shape[0],) or arr.dtype != np.int64:
            raise DataError(f"{p}: expected int64 labels ({self.shape[0]},), got {arr.dtype} {arr.shape}; "
                            "remove the folder to rebuild it")
        return torch.from_numpy(arr)

    def image_set(self) -> MappedImages:
        store = RowStore(self.images_path, self.offset, self.shape)
        return MappedImages(store, np.arange(self.shape[0], dtype=np.int64), self.labels(),
                            self.meta["source"], self.meta.get("num_classes"))


def cache_dir_for(source: Source, size: int, grayscale: bool, cache_dir: str | None) -> Path:
    key = hash_lines(iter([f"format {FORMAT}", source.kind, source.identity(), f"size {size}", f"grey {grayscale}"]))[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.identity()).name or source.kind).strip("._")[:40] or source.kind
    return prepared_root(cache_dir) / f"{source.kind}-{stem}-{key}"


def _read_meta(d: Path) -> dict[str, Any] | None:
    p = d / "meta.json"
    try:
        if p.stat().st_size > META_MAX_BYTES:
            return None
        meta = json.loads(p.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _npy_offset(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)  # a dict literal, parsed without pickle
        if fortran:
            raise ValueError("Fortran order")
        return f.tell(), shape, dtype


def open_prepared(d: Path, fingerprint: str | None = None) -> Prepared | None:
    """The prepared data set in ``d`` if complete, of this format and (given ``fingerprint``) current;
    otherwise None (absent, stale, or damaged: the caller rebuilds it)."""
    meta = _read_meta(d)
    if meta is None or meta.get("format") != FORMAT or (fingerprint is not None and meta.get("fingerprint") != fingerprint):
        return None
    if meta.get("pillow") != PIL.__version__:  # another Pillow may resize to other bits: decode again
        return None
    try:
        shape = tuple(int(v) for v in meta["shape"])
        offset, npy_shape, dtype = _npy_offset(d / "images.npy")
        size = (d / "images.npy").stat().st_size
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        return None
    if npy_shape != shape or dtype != np.uint8 or size != offset + int(np.prod(shape)):
        return None
    classes = meta.get("num_classes")
    if (classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1)) \
            or not isinstance(meta.get("source"), str) or (meta.get("labelled") and not (d / "labels.npy").is_file()):
        return None
    return Prepared(d, meta, offset)


# ---------------------------------------------------------------- reading rows
class RowStore:
    """Fixed-size uint8 rows of a file, memory-mapped read-only and gathered by ``numpy.take``: one C
    loop per batch with the GIL released. (A ``pread`` per row costs a GIL hand-over per image, and a
    read-ahead thread doing 128 of them per batch, on a loaded machine, stalled the training thread:
    steps 2-3x slower.) So that the pages read do not count against the process, they are dropped from
    its mapping (``MADV_DONTNEED``) after every :data:`DROP_EVERY` bytes; the page cache keeps them."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, int, int, int]) -> None:
        self.path, self.offset, self.shape = path, offset, shape
        self.row_bytes = int(np.prod(shape[1:]))
        self._read = 0  # bytes gathered since the mapping's pages were last dropped
        # Mapped now, so this object keeps reading the file it was opened on even if a rebuild renames
        # a new one into its place (the old one lives on, unlinked, until its last mapping goes).
        want = offset + shape[0] * self.row_bytes
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != want:
                raise DataError(f"{path}: {size} bytes, not the {want} its header says (a damaged cache); remove its "
                                "folder to rebuild it (vaelab datasets lists them)")
            self._mmap = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        self._arr = np.frombuffer(self._mmap, dtype=np.uint8, count=want - offset, offset=offset).reshape(shape)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "offset": self.offset, "shape": self.shape}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.__init__(st["path"], st["offset"], st["shape"])  # type: ignore[misc]

    def read_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows ``rows`` (int64) into ``out`` (len(rows), C, H, W) uint8, contiguous."""
        # what the reads may map: a page fault maps up to 64 KiB around it ("fault-around"), so rows read
        # at random map far more than their own bytes; a large read (a validation split) goes in chunks
        per_row = max(self.row_bytes, FAULT_AROUND)
        chunk = max(1, DROP_EVERY // per_row)
        for i in range(0, len(rows), chunk):
            np.take(self._arr, rows[i : i + chunk], axis=0, out=out[i : i + chunk])
            self._read += min(chunk, len(rows) - i) * per_row
            if self._read >= DROP_EVERY and hasattr(self._mmap, "madvise"):
                self._read = 0
                self._mmap.madvise(mmap.MADV_DONTNEED)  # clean file pages: dropped from this process, kept in the page cache


class MappedImages(ImageSet):
    """Images of a prepared data set, read from its file on demand; stands where an in-memory
    :class:`ImageSet` stands. ``subset`` selects rows without reading; ``images`` reads the selected
    rows into memory (validation sets, pictures, evaluation); training reads them batch by batch
    through :meth:`batches`. Labels are small and held in memory."""

    def __init__(self, store: RowStore, rows: np.ndarray, labels: torch.Tensor | None, source: str,
                 num_classes: int | None) -> None:
        object.__setattr__(self, "store", store)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "num_classes", num_classes)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.store.shape[1:]
        return int(c), int(h), int(w)

    @property
    def images(self) -> torch.Tensor:  # type: ignore[override]
        """The selected images in memory, uint8 (N, C, H, W) (read once, then kept with this object)."""
        got = self.__dict__.get("_images")
        if got is None:
            got = self.read(np.arange(len(self.rows)))
            object.__setattr__(self, "_images", got)
        return got

    def materialize(self) -> ImageSet:
        return ImageSet(self.images, self.labels, self.source, self.num_classes)

    def subset(self, index: torch.Tensor | slice) -> MappedImages:
        idx = index.numpy() if isinstance(index, torch.Tensor) else index
        return MappedImages(self.store, self.rows[idx], None if self.labels is None else self.labels[index],
                            self.source, self.num_classes)

    def read(self, positions: np.ndarray, pin: bool = False) -> torch.Tensor:
        """uint8 images (B, C, H, W) at ``positions`` of this set (pinned host memory with ``pin``)."""
        out = torch.empty((len(positions), *self.shape), dtype=torch.uint8, pin_memory=pin)
        self.store.read_into(self.rows[positions], out.numpy())
        return out

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """uint8 images (B, C, H, W) of rows ``start`` to ``stop`` of this set, read now (evaluation
        reads a whole split this way, batch by batch, holding one batch)."""
        return self.read(np.arange(start, min(stop, len(self.rows))))

    def batches(self, positions: Sequence[torch.Tensor], pin: bool, as_float: bool = False, ahead: bool = True,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each batch of ``positions`` (into this set) as uint8 images and labels, in order; the next
        batch is read by a helper thread while this one is used (numpy releases the GIL while it gathers).
        ``as_float``: float32 intensities k/255, converted in the helper thread too, by numpy on one
        core (the same IEEE division as :func:`~vaelab.data.to_float`, so the same bits; tested).
        ``ahead`` False: each batch read when asked for, in the caller's thread (training on the CPU,
        where a reader thread would compete with the compute threads for the cores)."""
        def load(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            x = self.read(p.numpy(), pin)
            if as_float:
                x = torch.from_numpy(np.divide(x.numpy(), np.float32(255.0), dtype=np.float32))
            return x, None if self.labels is None else self.labels.index_select(0, p)

        if not ahead:
            for p in positions:
                yield load(p)
            return
        with cf.ThreadPoolExecutor(1, thread_name_prefix="vaelab-read") as pool:
            ahead = [pool.submit(load, p) for p in positions[:2]]
            for i in range(len(positions)):
                x, y = ahead.pop(0).result()
                if i + 2 < len(positions):
                    ahead.append(pool.submit(load, positions[i + 2]))
                yield x, y

    def __repr__(self) -> str:
        return f"MappedImages({len(self)} images {self.shape} from {self.store.path})"

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__


# ---------------------------------------------------------------- building
def _worker_context():
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _open_item(item: Item):
    """A file object for Pillow: the file itself, or the member's bytes from a tar shard."""
    if item.offset < 0:
        return item.path
    import io

    fd = os.open(item.path, os.O_RDONLY)
    try:
        data = os.pread(fd, item.length, item.offset)
    finally:
        os.close(fd)
    return io.BytesIO(data)


def _decode_chunk(items: list[Item], first_row: int, path: str, offset: int, size: int, grey: bool,
                  limit: int) -> list[tuple[str, Any]]:
    """Decode each item (one opening: header, then pixels) and write it as row ``first_row + k`` of the
    images file. Per item: ("ok", mode) | ("bad", mode) (header read, data did not) | ("large", (w, h)
    or ()) | ("none", None) (not an image)."""
    from .folder import DecodeFailed, NotAnImage, TooLarge, read_image

    out: list[tuple[str, Any]] = []
    row_bytes = (1 if grey else 3) * size * size
    fd = os.open(path, os.O_WRONLY)
    try:
        for k, it in enumerate(items):
            try:
                mode, arr = read_image(_open_item(it), size, grey, limit)
            except TooLarge as e:
                out.append(("large", tuple(e.args)))
                continue
            except DecodeFailed as e:
                out.append(("bad", e.args[0]))
                continue
            except (NotAnImage, OSError):
                out.append(("none", None))
                continue
            os.pwrite(fd, np.ascontiguousarray(arr).tobytes(), offset + (first_row + k) * row_bytes)
            out.append(("ok", mode))
    finally:
        os.close(fd)
    return out


def _run_chunks(fn, chunks: list[tuple], workers: int, bar: Progress, sizes: list[int]) -> list[Any]:
    """``fn(*chunk)`` for every chunk, in worker processes (at most 4 tasks each in flight, so memory
    holds a few chunks' results), results in chunk order; ``bar`` advances by each chunk's size."""
    results: list[Any] = [None] * len(chunks)
    t0 = time.monotonic()

    def tick(i: int) -> None:
        bar.update(sizes[i])
        rate = (bar.n - bar.start) / max(time.monotonic() - t0, 1e-9)
        bar.set_postfix(f"{rate:,.0f} images/s")

    if workers <= 1 or sum(sizes) < INLINE_BELOW:
        for i, c in enumerate(chunks):
            results[i] = fn(*c)
            tick(i)
        return results
    with cf.ProcessPoolExecutor(workers, mp_context=_worker_context()) as pool:
        pending: dict[cf.Future, int] = {}
        nxt = 0
        try:
            while nxt < len(chunks) or pending:
                while nxt < len(chunks) and len(pending) < 4 * workers:
                    pending[pool.submit(fn, *chunks[nxt])] = nxt
                    nxt += 1
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    i = pending.pop(f)
                    results[i] = f.result()
                    tick(i)
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return results


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _decode_all(items: list[Item], path: Path, size: int, grey: bool, limit: int, workers: int, show: bool,
                label: str) -> tuple[list[tuple[str, Any]], int, int]:
    """Every item decoded into a fresh images file at ``path`` (one row per item; rows of items that
    fail stay zero). Returns each item's status, the file's header size and the channel count."""
    c = 1 if grey else 3
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(items), c, size, size))
    offset = int(mm.offset)
    del mm  # a sparse file of the full size: the workers write into it
    tasks = [(items[i : i + CHUNK], i, str(path), offset, size, grey, limit) for i in range(0, len(items), CHUNK)]
    with Progress(len(items), f"prepare {label}", enabled=show) as bar:
        results = _run_chunks(_decode_chunk, tasks, workers, bar, [len(t[0]) for t in tasks])
    return [r for rs in results for r in rs], offset, c


def build(source: Source, size: int, grayscale: bool, target: Path, fingerprint: str, *,
          workers: int | None = None, progress: bool = True, limit: int | None = None) -> Prepared:
    """Decode ``source`` into the prepared data set ``target`` (see the module docstring). The caller
    holds the lock for ``target``."""
    from .folder import GREY_MODES, pixel_limit

    workers = workers or default_workers()
    limit = limit or pixel_limit(size)
    t0 = time.monotonic()
    lst = source.listing()
    fingerprint = source.fingerprint()  # of the snapshot the listing took (the folder may have changed since the caller's)
    items, names = lst.items, lst.names
    if not items:
        raise DataError(f"{source.label}: holds no image files (searched recursively)")
    show = progress and len(items) >= PROGRESS_FROM

    target.parent.mkdir(parents=True, exist_ok=True)
    for old in target.parent.glob(f"{target.name}.tmp-*"):  # an interrupted build's leftovers (we hold the lock)
        shutil.rmtree(old, ignore_errors=True)
    tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        # One pass, one opening per file: each worker reads an image's header (refusing non-images and
        # images past the pixel limit before any pixel is decoded), decodes it and writes it at its
        # row. Colour unless data.grayscale; if every image turns out grey, the in-memory rule (grey
        # when every image is grey) is met by decoding again as grey (a folder of grey images only).
        images_path = tmp / "images.npy"
        statuses, offset, c = _decode_all(items, images_path, size, grayscale, limit, workers, show, source.label)
        modes = [info for what, info in statuses if what in ("ok", "bad")]
        if not grayscale and modes and all(m in GREY_MODES for m in modes):
            images_path.unlink()
            statuses, offset, c = _decode_all(items, images_path, size, True, limit, workers, show, source.label)
        keep, skipped = [], list(lst.skipped)
        for i, (what, info) in enumerate(statuses):
            if what == "ok":
                keep.append(i)
                continue
            skipped.append(names[i])
            if what == "large":
                got = f"{info[0]}x{info[1]} ({info[0] * info[1] / 1e6:.3g} megapixels)" if info else \
                    "its header declares too many pixels"
                warnings.warn(f"{names[i]}: skipped: {got}; images are decoded up to {limit / 1e6:.3g} megapixels "
                              f"for {size}x{size} data", VaelabWarning, stacklevel=2)
        if not keep:
            raise DataError(f"{source.label}: none of its {lst.n_files} files is an image Pillow can read "
                            f"(e.g. {skipped[0] if skipped else '?'})")
        rows = np.array(keep, dtype=np.int64) if len(keep) < len(items) else None
        if rows is not None:  # drop the rows of what was skipped
            _compact(images_path, offset, (len(items), c, size, size), rows)
            offset, _, _ = _npy_offset(images_path)
        final_rows = keep
        n = len(final_rows)
        labels, num_classes = lst.labels_of(final_rows)
        labelled = labels is not None
        if labelled:
            np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
        seconds = time.monotonic() - t0
        meta = {
            "format": FORMAT, "source": source.label, "spec": source.spec, "identity": source.identity(),
            "image_size": size, "grayscale": grayscale, "shape": [n, c, size, size], "labelled": labelled,
            "num_classes": num_classes, "fingerprint": fingerprint, "files": lst.n_files,
            "skipped": len(skipped), "skipped_examples": skipped[:3], "build_seconds": round(seconds, 3),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "workers": workers,
            "pillow": PIL.__version__,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            _fsync(f)
        # Publish: the old copy (stale) is moved aside first, then the new one renamed into place.
        old = None
        if target.exists():
            old = target.parent / f"{target.name}.tmp-old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"vaelab: prepared {n} images of {source.label} ({c}x{size}x{size}) in {duration(seconds)}, "
              f"{n / max(seconds, 1e-9):,.0f} images/s, with {workers} worker{'s' * (workers > 1)}: {target}",
              file=sys.stderr, flush=True)
    got = open_prepared(target, fingerprint)
    if got is None:  # pragma: no cover - we just wrote it
        raise DataError(f"{target}: the prepared data could not be read back")
    return got


def _compact(path: Path, offset: int, shape: tuple[int, int, int, int], rows: np.ndarray) -> None:
    """Rewrite the images file keeping ``rows`` (sorted), a chunk at a time."""
    new = path.with_name("images.compact.npy")
    out = np.lib.format.open_memmap(new, mode="w+", dtype=np.uint8, shape=(len(rows), *shape[1:]))
    store = RowStore(path, offset, shape)
    step = 1024
    for i in range(0, len(rows), step):
        part = rows[i : i + step]
        buf = np.empty((len(part), *shape[1:]), dtype=np.uint8)
        store.read_into(part, buf)
        out[i : i + len(part)] = buf
    out.flush()
    del out, store
    os.replace(new, path)


def decode_source(source: Source, size: int, grayscale: bool = False) -> ImageSet:
    """All of ``source`` decoded into memory, in this process, by the rules and code of :func:`build`
    (``data.cache = false``: the in-memory path)."""
    from .folder import GREY_MODES, NotAnImage, TooLarge, decode_image, pixel_limit, probe_image

    limit = pixel_limit(size)
    lst = source.listing()
    keep, modes, skipped = [], [], list(lst.skipped)
    for i, it in enumerate(lst.items):
        try:
            modes.append(probe_image(_open_item(it), limit))
            keep.append(i)
        except TooLarge as e:
            got = f"{e.args[0]}x{e.args[1]}" if e.args else "its header declares too many pixels"
            warnings.warn(f"{lst.names[i]}: skipped: {got}; images are decoded up to {limit / 1e6:.3g} megapixels "
                          f"for {size}x{size} data", VaelabWarning, stacklevel=2)
            skipped.append(lst.names[i])
        except (NotAnImage, OSError):
            skipped.append(lst.names[i])
    grey = grayscale or all(m in GREY_MODES for m in modes)
    rows, arrays = [], []
    for i in keep:
        try:
            arrays.append(decode_image(_open_item(lst.items[i]), size, grey, limit))
            rows.append(i)
        except (NotAnImage, OSError):
            skipped.append(lst.names[i])
    if skipped:
        warnings.warn(f"{source.label}: skipped {len(skipped)} of {lst.n_files} files that are not readable images "
                      f"(e.g. {', '.join(skipped[:3])})", VaelabWarning, stacklevel=2)
    if not rows:
        raise DataError(f"{source.label}: none of its {lst.n_files} files is an image Pillow can read")
    labels, num_classes = lst.labels_of(rows)
    return ImageSet.from_numpy(np.stack(arrays), labels, source=source.label, num_classes=num_classes)


# ---------------------------------------------------------------- open or build
class _Lock:
    """An exclusive ``flock`` on ``path`` (serialises builds of one prepared data set)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _Lock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock


def prepare(source: Source, size: int, grayscale: bool = False, *, cache_dir: str | None = None,
            workers: int | None = None, progress: bool = True, rebuild: bool = False) -> Prepared:
    """The prepared data set of ``source`` at ``size`` (built if absent, stale or ``rebuild``)."""
    target = cache_dir_for(source, size, grayscale, cache_dir)
    fp = source.fingerprint()
    got = None if rebuild else open_prepared(target, fp)
    if got is None:
        try:
            with _Lock(target.parent / f"{target.name}.lock"):
                got = None if rebuild else open_prepared(target, fp)  # built by another process meanwhile?
                if got is None:
                    if target.exists() and progress:
                        print(f"vaelab: {source.label} changed since it was prepared (or its cache is damaged): "
                              "preparing it again", file=sys.stderr, flush=True)
                    got = build(source, size, grayscale, target, fp, workers=workers, progress=progress)
        except PermissionError as e:
            raise DataError(f"{target.parent}: cannot write the prepared data there ({e.strerror}); set "
                            "data.cache_dir (--set data.cache_dir=DIR) to a writable folder") from None
        except OSError as e:  # a full disk, say: the partial build was removed
            raise DataError(f"{target.parent}: preparing {source.label} failed: {e.strerror or e}; nothing was "
                            "left behind. Free space or set data.cache_dir to another folder") from None
    if got.meta.get("skipped"):
        ex = ", ".join(got.meta.get("skipped_examples") or [])
        warnings.warn(f"{source.label}: skipped {got.meta['skipped']} of {got.meta.get('files')} files that are not "
                      f"readable images (e.g. {ex})", VaelabWarning, stacklevel=2)
    return got


def list_prepared(cache_dir: str | None = None) -> list[dict[str, Any]]:
    """Every prepared data set under the cache directory: meta.json plus ``dir`` and ``bytes`` on disk."""
    root = prepared_root(cache_dir)
    out = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not d.is_dir() or ".tmp-" in d.name:
            continue
        meta = _read_meta(d)
        if meta is None:
            continue
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        out.append({**meta, "dir": str(d), "bytes": size})
    return out


def describe_prepared(m: dict[str, Any]) -> str:
    n, c, h, w = m.get("shape", [0, 0, 0, 0])
    classes = f", {m['num_classes']} classes" if m.get("num_classes") else ""
    return (f"{m.get('spec')}: {n} images {c}x{h}x{w}{classes}, {human(m['bytes'])} on disk, built {m.get('built')} "
            f"in {duration(float(m.get('build_seconds') or 0))}; {m['dir']}")


def prepare_spec(cfg: Any, *, workers: int | None = None, rebuild: bool = False, progress: bool = True) -> Prepared:
    """``vaelab data prepare``: the prepared data set of ``cfg.name`` (a ``folder:`` or ``shards:`` source)."""
    from .folder import DEFAULT_SIZE, FolderSource
    from .shards import ShardSource

    kinds = {"folder": FolderSource, "shards": ShardSource}
    prefix, _, arg = cfg.name.partition(":")
    if prefix not in kinds or not arg:
        raise DataError(f"{cfg.name}: only image sources are prepared (decoded once): folder:PATH or shards:PATH; "
                        "registered data sets and npz:/npy: arrays are read from their files as they are")
    return prepare(kinds[prefix](arg), cfg.image_size or DEFAULT_SIZE, cfg.grayscale, cache_dir=cfg.cache_dir,
                   workers=workers, progress=progress, rebuild=rebuild)
