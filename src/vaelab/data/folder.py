"""``folder:PATH``: a folder of images in any format Pillow reads (PNG, JPEG, BMP, GIF, WebP, TIFF...).

Rules (see docs/data.md):

* every file under PATH, recursively, in sorted order; files Pillow cannot open as an image are
  skipped and counted in a warning;
* labels: when every image sits in a first-level sub-folder (``PATH/cat/1.jpg``), the sorted
  sub-folder names are the classes; otherwise there are no labels;
* size: the shorter side is resized to ``data.image_size`` (default 64) and the centre cropped to a
  square, so images of mixed sizes and aspect ratios become one size; EXIF orientation is applied;
* channels: grey (one channel) when ``data.grayscale`` or when every image is grey, else RGB
  (palette and alpha images are converted; alpha is dropped);
* huge images: one with more pixels than :func:`pixel_limit` allows for the requested size (read
  from its header, before any pixel is decoded) is skipped with a warning naming it;
* test split: a seeded 10% hold-out (``data.seed``); the validation split is then taken from the
  rest as for every data set (``data.val_size``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from ..config import DataConfig
from ..errors import DataError, DatasetNotFoundError, VaelabWarning
from .base import ImageSet
from .cache import Item, Listing, Source, hash_lines, prepare
from .registry import SOURCES

DEFAULT_SIZE = 64
TEST_FRACTION = 0.1
MAX_PIXELS = 64_000_000  # never decode more pixels than this from one image (an 8000 x 8000 photo)
MIN_PIXEL_LIMIT = 24_000_000  # whatever the size asked for, a 24-megapixel camera photo is read
PIXELS_PER_OUTPUT = 1024  # beyond the floor: up to 32x the requested side, in both directions
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def holdout(images: ImageSet, fraction: float, seed: int) -> dict[str, ImageSet]:
    """Seeded split into train and a ``fraction`` test hold-out (at least one image when n >= 2)."""
    n = len(images)
    n_test = 0 if n < 2 else max(1, round(fraction * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7_331 + seed))
    test_idx, train_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
    return {"train": images.subset(train_idx), "test": images.subset(test_idx)}


def pixel_limit(size: int) -> int:
    """The most pixels an image may have to be decoded for ``size`` x ``size`` output: a generous
    multiple of the output, at least :data:`MIN_PIXEL_LIMIT`, at most :data:`MAX_PIXELS` (always
    below Pillow's own decompression-bomb threshold, so its warning never fires for images read)."""
    return min(MAX_PIXELS, max(MIN_PIXEL_LIMIT, PIXELS_PER_OUTPUT * size * size))


def resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (antialiased bicubic), then crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _to_mode(img: Image.Image, grey: bool) -> Image.Image:
    if grey:
        if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit grey: rescale to 8 bits
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
            return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        return img.convert("L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


class NotAnImage(Exception):
    """A file Pillow cannot open or decode as an image (text, truncated or corrupt data)."""


class TooLarge(NotAnImage):
    """An image with more pixels than the limit; args: (width, height), or none when Pillow refused its header."""


def probe_image(src, limit: int) -> str:
    """The mode of the image in ``src`` (a path or a binary file object), from its header alone
    (Pillow opens lazily: no pixel is decoded). Raises :class:`TooLarge` past ``limit`` pixels and
    :class:`NotAnImage` when Pillow cannot read it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as im:
                w, h = im.size
                mode = im.mode
    except Image.DecompressionBombError:
        raise TooLarge() from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise NotAnImage() from None
    if w * h > limit:
        raise TooLarge(w, h)
    return mode


def decode_image(src, size: int, grey: bool, limit: int) -> np.ndarray:
    """One image as uint8 (C, size, size): EXIF orientation, grey or RGB, shorter side resized to
    ``size``, centre square cropped. JPEG "draft" mode decodes at a reduced scale directly. The one
    decoder of the in-memory path and of the prepared cache (:mod:`.cache`), so both hold the same bits.
    Raises :class:`NotAnImage` for data Pillow cannot decode (truncated, corrupt, grown past ``limit``)."""
    try:
        with warnings.catch_warnings(), Image.open(src) as im:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if im.size[0] * im.size[1] > limit:  # changed since its header was read
                raise ValueError(f"{im.size[0]}x{im.size[1]} pixels")
            im.draft("RGB" if not grey else "L", (size, size))
            img = _to_mode(ImageOps.exif_transpose(im), grey)
            arr = np.asarray(resize_crop(img, size))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise NotAnImage() from None
    return arr[None] if grey else arr.transpose(2, 0, 1)


class DecodeFailed(NotAnImage):
    """An image whose header reads but whose data do not decode (truncated, corrupt); args: (mode,)."""


def read_image(src, size: int, grey: bool, limit: int) -> tuple[str, np.ndarray]:
    """:func:`probe_image` and :func:`decode_image` on one opening of ``src``: its header's mode and
    its pixels as uint8 (C, size, size), the same bits as the two calls. Raises :class:`TooLarge`,
    :class:`NotAnImage` (the header does not read) or :class:`DecodeFailed` (the data do not)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(src)
    except Image.DecompressionBombError:
        raise TooLarge() from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise NotAnImage() from None
    with im:
        try:
            (w, h), mode = im.size, im.mode
        except (OSError, ValueError, SyntaxError, EOFError):
            raise NotAnImage() from None
        if w * h > limit:
            raise TooLarge(w, h)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.draft("RGB" if not grey else "L", (size, size))
                img = _to_mode(ImageOps.exif_transpose(im), grey)
                arr = np.asarray(resize_crop(img, size))
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
            raise DecodeFailed(mode) from None
    return mode, (arr[None] if grey else arr.transpose(2, 0, 1))


def iter_files(root: Path) -> Iterator[tuple[tuple[str, ...], os.stat_result]]:
    """Every file under ``root``, recursively, as (relative parts, stat), in the order ``Path`` objects
    sort (by their parts): what ``sorted(p for p in root.rglob("*") if p.is_file())`` lists, with one
    ``scandir`` per folder and one ``stat`` per file instead of ``Path`` objects (20x faster on 100,000
    files). Each folder's entries are sorted by name and a sub-folder is walked where its name falls,
    which is that order, so the walk streams: it holds one folder's entries per level, not the tree.
    Like ``rglob``, symbolic links to folders are not followed; links to files are; folders that
    cannot be read are passed over."""

    def entries(folder: str) -> Iterator[os.DirEntry]:
        try:
            return iter(sorted(os.scandir(folder), key=lambda e: e.name))
        except OSError:
            return iter(())

    stack: list[tuple[Iterator[os.DirEntry], tuple[str, ...]]] = [(entries(str(root)), ())]
    while stack:
        it, rel = stack[-1]
        e = next(it, None)
        if e is None:
            stack.pop()
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                stack.append((entries(e.path), (*rel, e.name)))
            elif e.is_file():
                yield (*rel, e.name), e.stat()
        except OSError:  # vanished or unreadable since it was listed
            continue


def walk_files(root: Path) -> list[tuple[tuple[str, ...], os.stat_result]]:
    """:func:`iter_files` as a list."""
    return list(iter_files(root))


def read_folder(path: str | Path, image_size: int | None = None, grayscale: bool = False,
                progress: bool = True) -> ImageSet:
    """All images under ``path`` as uint8 (N, C, size, size), labelled by first-level sub-folder."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: no such folder (folder:PATH needs a folder of images)")
    files = [root.joinpath(*rel) for rel, _ in walk_files(root)]
    if not files:
        raise DataError(f"{root}: the folder is empty (no files, searched recursively)")
    size = image_size or DEFAULT_SIZE

    # Pass 1: headers only (lazy open), to skip non-images and images too large to decode, and to
    # decide grey vs colour, before decoding anything. Pillow's own bomb warning is replaced by ours.
    images: list[Path] = []
    modes: list[str] = []
    skipped: list[Path] = []
    limit = pixel_limit(size)
    for p in files:
        try:
            mode = probe_image(p, limit)
        except TooLarge as e:
            _too_large(p, limit, size, *e.args)
            skipped.append(p)
            continue
        except NotAnImage:
            skipped.append(p)
            continue
        modes.append(mode)
        images.append(p)
    if not images:
        raise DataError(f"{root}: none of its {len(files)} files is an image Pillow can read "
                        f"(e.g. {skipped[0].relative_to(root)})")
    grey = grayscale or all(m in GREY_MODES for m in modes)

    # Pass 2: decode, orient, resize, crop. JPEG "draft" mode decodes at a reduced scale directly.
    out = np.empty((len(images), 1 if grey else 3, size, size), dtype=np.uint8)
    bad: list[Path] = []
    keep = np.ones(len(images), dtype=bool)
    for i, p in enumerate(tqdm(images, desc=f"read {root.name}", disable=not progress or len(images) < 2000,
                               leave=False)):
        try:
            arr = decode_image(p, size, grey, limit)
        except NotAnImage:  # truncated/corrupt data
            bad.append(p)
            keep[i] = False
            continue
        out[i] = arr
    skipped += bad
    if skipped:
        examples = ", ".join(str(p.relative_to(root)) for p in skipped[:3])
        warnings.warn(f"{root}: skipped {len(skipped)} of {len(files)} files that are not readable images "
                      f"(e.g. {examples})", VaelabWarning, stacklevel=2)
    images = [p for p, k in zip(images, keep, strict=True) if k]
    if not images:
        raise DataError(f"{root}: none of its {len(files)} files is an image Pillow can read")
    out = out[keep]

    labels, num_classes = folder_labels([p.relative_to(root).parts for p in images])
    return ImageSet.from_numpy(out, labels, source=str(root), num_classes=num_classes)


def _too_large(p: Path, limit: int, size: int, w: int | None = None, h: int | None = None) -> None:
    """One line for an image skipped for its pixel count (``w``, ``h`` None: Pillow refused its header)."""
    what = (f"{w}x{h} ({w * h / 1e6:.3g} megapixels)" if w is not None and h is not None
            else "its header declares too many pixels")
    warnings.warn(f"{p}: skipped: {what}; images are decoded up to {limit / 1e6:.3g} megapixels for "
                  f"{size}x{size} data", VaelabWarning, stacklevel=3)


def folder_labels(rel: list[tuple[str, ...]]) -> tuple[np.ndarray | None, int | None]:
    """Labels from relative paths: the sorted first-level sub-folders when every image sits in one."""
    if rel and all(len(r) == 2 for r in rel):
        classes = sorted({r[0] for r in rel})
        index = {c: i for i, c in enumerate(classes)}
        return np.array([index[r[0]] for r in rel], dtype=np.int64), len(classes)
    return None, None


class FolderSource(Source):
    """``folder:PATH`` as a source to prepare: every file under PATH, recursively, in sorted order
    (the in-memory reader's order); the fingerprint hashes each file's relative name, size and mtime."""

    kind = "folder"

    def __init__(self, arg: str) -> None:
        super().__init__(arg)
        self.root = Path(arg).expanduser()
        self._scan: list[tuple[tuple[str, ...], int, str]] | None = None

    @property
    def label(self) -> str:
        return str(self.root)

    def identity(self) -> str:
        return str(self.root.resolve())

    def _rows(self) -> Iterator[tuple[tuple[str, ...], int, str]]:
        """(relative parts, size, times and inode) of every file, in the in-memory reader's order, as the
        walk finds them."""
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"{self.root}: no such folder (folder:PATH needs a folder of images)")
        n = 0
        for rel, st in iter_files(self.root):
            n += 1
            # size and times (mtime, and ctime, which any rewrite moves) plus the inode (a file replaced)
            yield rel, st.st_size, f"{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
        if not n:
            raise DataError(f"{self.root}: the folder is empty (no files, searched recursively)")

    def scan(self) -> list[tuple[tuple[str, ...], int, str]]:
        """:meth:`_rows` as a list, kept: one snapshot of the folder for a build's listing and fingerprint."""
        if self._scan is None:
            self._scan = list(self._rows())
        return self._scan

    def fingerprint(self) -> str:
        """The hash of every file's name, size, times and inode: of the snapshot a listing took, else of
        a walk that holds nothing (a warm start's memory does not grow with the number of files)."""
        rows = self._scan if self._scan is not None else self._rows()
        return hash_lines(f"{'/'.join(rel)}\0{n}\0{t}" for rel, n, t in rows)

    def listing(self) -> Listing:
        files = self.scan()
        rel = [r for r, _, _ in files]
        root = str(self.root)
        return Listing([Item(os.path.join(root, *r)) for r in rel], ["/".join(r) for r in rel], len(files),
                       lambda kept: folder_labels([rel[i] for i in kept]))


def open_cached(source: Source, cfg: DataConfig) -> ImageSet:
    """The source's images from its prepared cache (built on first use): read from disk batch by batch."""
    size = cfg.image_size or DEFAULT_SIZE
    return prepare(source, size, cfg.grayscale, cache_dir=cfg.cache_dir).image_set()


def load_folder(arg: str, cfg: DataConfig) -> dict[str, ImageSet]:
    images = open_cached(FolderSource(arg), cfg) if cfg.cache else read_folder(arg, cfg.image_size, cfg.grayscale)
    return holdout(images, TEST_FRACTION, cfg.seed)


SOURCES.add("folder", load_folder)
