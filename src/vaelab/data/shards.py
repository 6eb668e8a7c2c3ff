"""``shards:PATH``: WebDataset tar shards (the format of ``webdataset``, ``img2dataset``, LAION, and
many ImageNet and CelebA redistributions), read with the standard library's ``tarfile``.

PATH is one ``.tar`` file, a folder (every ``*.tar`` under it, recursively, in sorted order), or a
brace pattern as WebDataset writes them: ``/data/train-{000000..000146}.tar`` (zero-padded ranges
and ``{a,b}`` lists; every shard it names must exist).

The WebDataset convention: consecutive tar members with the same *key* (the member's path up to the
first dot of its file name) are one sample, and the rest of the name is the field: ``0001.jpg``,
``0001.cls``. vaelab takes from each sample

* its image: the first field that is an image extension (``jpg``, ``jpeg``, ``png``, ``webp``,
  ``bmp``, ``gif``, ``tif``, ``tiff``, ``ppm``, ``pgm``), decoded by Pillow exactly as ``folder:``
  images are (size, crop, grey or RGB, the pixel limit);
* its label: a ``cls`` (or ``cls.txt``, ``label``, ``class``) field holding one decimal integer; the
  set is labelled when every sample has one (class count: the largest label + 1).

Every other field (``.json``, ``.txt``, and above all ``.pyd``/``.pth``/``.pickle``, which the
``webdataset`` library would unpickle) is never read. Nothing is extracted: members are read at
their offsets, links and devices are ignored, and a member over :data:`MAX_MEMBER_BYTES` is skipped
with one line. Shards are decoded once into the prepared cache (:mod:`.cache`), so training reads
a memory-mappable file with the same seeded, per-epoch global shuffle and exact resume position as
any other data set. The test split is a seeded 10% hold-out, as for ``folder:``.
"""

from __future__ import annotations

import os
import re
import tarfile
import warnings
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError, DatasetNotFoundError, VaelabWarning
from .base import ImageSet
from .cache import Item, Listing, Source, decode_source, hash_lines, prepare
from .folder import DEFAULT_SIZE, TEST_FRACTION, holdout
from .registry import SOURCES

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
LABEL_FIELDS = ("cls", "cls.txt", "label", "class")
MAX_MEMBER_BYTES = 64 << 20  # an image member larger than this is not read (a photo is a few MB)
MAX_LABEL_BYTES = 32
MAX_SHARDS = 1_000_000


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar; ``{x,y}`` -> x, y (nested, left to right)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        if int(hi) < int(lo) or int(hi) - int(lo) >= MAX_SHARDS:
            raise DataError(f"shards:{pattern}: the range {{{body}}} is empty or names more than {MAX_SHARDS} shards")
        parts = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        parts = body.split(",")
    return [e for p in parts for e in expand_braces(head + p + tail)]


class ShardSource(Source):
    kind = "shards"

    def __init__(self, arg: str) -> None:
        super().__init__(arg)
        self.pattern = os.path.expanduser(arg)
        self._shards: list[Path] | None = None

    @property
    def label(self) -> str:
        return f"shards:{self.pattern}"

    def identity(self) -> str:
        if "{" in self.pattern:
            return os.path.join(os.path.abspath(os.path.dirname(self.pattern)), os.path.basename(self.pattern))
        return str(Path(self.pattern).resolve())

    def shards(self) -> list[Path]:
        if self._shards is None:
            p = Path(self.pattern)
            if "{" in self.pattern:
                found = [Path(s) for s in expand_braces(self.pattern)]
                missing = [s for s in found if not s.is_file()]
                if missing:
                    raise DatasetNotFoundError(f"{missing[0]}: no such shard ({len(missing)} of the {len(found)} "
                                               f"shards {self.pattern} names are missing)")
            elif p.is_dir():
                found = sorted(f for f in p.rglob("*.tar") if f.is_file())
                if not found:
                    raise DataError(f"{p}: holds no .tar shards (searched recursively)")
            elif p.is_file():
                found = [p]
            else:
                raise DatasetNotFoundError(f"{p}: no such file or folder (shards:PATH needs a .tar shard, a folder "
                                           "of them, or a pattern such as train-{000000..000099}.tar)")
            self._shards = found
        return self._shards

    def fingerprint(self) -> str:
        lines = []
        for s in self.shards():
            st = s.stat()
            lines.append(f"{s}\0{st.st_size}\0{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
        return hash_lines(iter(lines))

    def listing(self) -> Listing:
        items: list[Item] = []
        names: list[str] = []
        labels: list[int | None] = []
        skipped: list[str] = []
        n_members = 0
        for shard in self.shards():
            for key, fields in _samples(shard):
                n_members += len(fields)
                image = next((fields[f] for f in IMAGE_FIELDS if f in fields), None)
                name = f"{shard.name}:{key}"
                if image is None:
                    continue  # a sample without an image (metadata only): nothing to train on
                if image.size > MAX_MEMBER_BYTES:
                    warnings.warn(f"{shard}: member {image.name}: skipped: {image.size / 1e6:.3g} MB (images are read "
                                  f"up to {MAX_MEMBER_BYTES >> 20} MiB)", VaelabWarning, stacklevel=2)
                    skipped.append(name)
                    continue
                lab = next((fields[f] for f in LABEL_FIELDS if f in fields), None)
                items.append(Item(str(shard), image.offset_data, image.size))
                names.append(f"{name}.{image.name.rsplit('/', 1)[-1].split('.', 1)[1]}")
                labels.append(None if lab is None else _label(shard, lab))

        def labels_of(kept: list[int]) -> tuple[np.ndarray | None, int | None]:
            got = [labels[i] for i in kept]
            if not got or any(v is None for v in got):
                return None, None
            arr = np.array(got, dtype=np.int64)
            return arr, int(arr.max()) + 1

        return Listing(items, names, len(items) + len(skipped), labels_of, skipped)


def _samples(shard: Path):
    """(key, {field: member}) of each sample of ``shard``, in order (regular members only)."""
    try:
        tf = tarfile.open(shard, mode="r:")  # uncompressed: members are read at their offsets
    except tarfile.CompressionError as e:
        raise DataError(f"{shard}: compressed tar shards cannot be read at an offset ({e}); decompress them") from None
    except (tarfile.TarError, OSError) as e:
        msg = "a compressed tar (decompress it: members are read at their offsets)" if _compressed(shard) else \
            f"not a readable tar file ({e})"
        raise DataError(f"{shard}: {msg}") from None
    key, fields = None, {}
    try:
        with tf:
            for m in _members(tf, shard):
                if not m.isreg():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                k = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                field = base.split(".", 1)[1].lower()
                if k != key:
                    if key is not None:
                        yield key, fields
                    key, fields = k, {}
                fields.setdefault(field, m)
                tf.members = []  # keep memory flat: tarfile would otherwise keep every member's header
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{shard}: damaged tar file ({e})") from None
    if key is not None:
        yield key, fields


def _members(tf: tarfile.TarFile, shard: Path):
    while True:
        m = tf.next()
        if m is None:
            return
        yield m


def _compressed(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00" or head[:4] == b"\x28\xb5\x2f\xfd"


def _label(shard: Path, m: tarfile.TarInfo) -> int:
    if m.size > MAX_LABEL_BYTES:
        raise DataError(f"{shard}: member {m.name}: a label must be one integer ({m.size} bytes)")
    with open(shard, "rb") as f:
        f.seek(m.offset_data)
        raw = f.read(m.size)
    try:
        v = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{shard}: member {m.name}: a label must be one decimal integer, got {raw[:20]!r}") from None
    if v < 0:
        raise DataError(f"{shard}: member {m.name}: labels must be >= 0, got {v}")
    return v


def load_shards(arg: str, cfg: DataConfig) -> dict[str, ImageSet]:
    src = ShardSource(arg)
    size = cfg.image_size or DEFAULT_SIZE
    images = (prepare(src, size, cfg.grayscale, cache_dir=cfg.cache_dir).image_set() if cfg.cache
              else decode_source(src, size, cfg.grayscale))
    return holdout(images, TEST_FRACTION, cfg.seed)


SOURCES.add("shards", load_shards)
