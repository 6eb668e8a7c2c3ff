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

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from ..config import DataConfig
from ..errors import DataError, DatasetNotFoundError, VaelabWarning
from .base import ImageSet
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


def read_folder(path: str | Path, image_size: int | None = None, grayscale: bool = False,
                progress: bool = True) -> ImageSet:
    """All images under ``path`` as uint8 (N, C, size, size), labelled by first-level sub-folder."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: no such folder (folder:PATH needs a folder of images)")
    files = sorted(p for p in root.rglob("*") if p.is_file())
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(p) as im:
                    w, h = im.size
                    mode = im.mode
        except Image.DecompressionBombError:
            _too_large(p, limit, size)
            skipped.append(p)
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            skipped.append(p)
            continue
        if w * h > limit:
            _too_large(p, limit, size, w, h)
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
            with warnings.catch_warnings(), Image.open(p) as im:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                if im.size[0] * im.size[1] > limit:  # changed since pass 1
                    raise ValueError(f"{im.size[0]}x{im.size[1]} pixels")
                im.draft("RGB" if not grey else "L", (size, size))
                img = _to_mode(ImageOps.exif_transpose(im), grey)
                arr = np.asarray(resize_crop(img, size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # truncated/corrupt data
            bad.append(p)
            keep[i] = False
            continue
        out[i] = arr[None] if grey else arr.transpose(2, 0, 1)
    skipped += bad
    if skipped:
        examples = ", ".join(str(p.relative_to(root)) for p in skipped[:3])
        warnings.warn(f"{root}: skipped {len(skipped)} of {len(files)} files that are not readable images "
                      f"(e.g. {examples})", VaelabWarning, stacklevel=2)
    images = [p for p, k in zip(images, keep, strict=True) if k]
    if not images:
        raise DataError(f"{root}: none of its {len(files)} files is an image Pillow can read")
    out = out[keep]

    labels, num_classes = None, None
    rel = [p.relative_to(root).parts for p in images]
    if all(len(r) == 2 for r in rel):
        classes = sorted({r[0] for r in rel})
        index = {c: i for i, c in enumerate(classes)}
        labels, num_classes = np.array([index[r[0]] for r in rel], dtype=np.int64), len(classes)
    return ImageSet.from_numpy(out, labels, source=str(root), num_classes=num_classes)


def _too_large(p: Path, limit: int, size: int, w: int | None = None, h: int | None = None) -> None:
    """One line for an image skipped for its pixel count (``w``, ``h`` None: Pillow refused its header)."""
    what = (f"{w}x{h} ({w * h / 1e6:.3g} megapixels)" if w is not None and h is not None
            else "its header declares too many pixels")
    warnings.warn(f"{p}: skipped: {what}; images are decoded up to {limit / 1e6:.3g} megapixels for "
                  f"{size}x{size} data", VaelabWarning, stacklevel=3)


def load_folder(arg: str, cfg: DataConfig) -> dict[str, ImageSet]:
    return holdout(read_folder(arg, cfg.image_size, cfg.grayscale), TEST_FRACTION, cfg.seed)


SOURCES.add("folder", load_folder)
