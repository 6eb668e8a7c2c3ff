"""Decode once, stream from disk (issue 23): the prepared cache of folder:/shards: sources, its
invalidation, interrupted and concurrent builds, hostile files, WebDataset shards, and training from
the cache giving the same bits as training from memory (one process and two, gloo)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vaelab
from vaelab import DataConfig, ModelConfig, RunConfig, TrainConfig
from vaelab.cli import main
from vaelab.data import cache, load_data
from vaelab.data.cache import MappedImages, cache_dir_for, prepare, prepared_root
from vaelab.data.folder import FolderSource
from vaelab.data.shards import ShardSource, expand_braces
from vaelab.errors import DataError, VaelabWarning


def write_folder(root: Path, n: int = 60, seed: int = 0) -> Path:
    """Two classes of small photos of mixed sizes and formats (JPEG, PNG, one grey)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = "cats" if i % 2 else "dogs"
        (root / cls).mkdir(parents=True, exist_ok=True)
        h, w = 10 + i % 5, 12 + i % 7
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i % 11 == 0:
            img = img.convert("L")
        img.save(root / cls / f"{i:03d}.{'png' if i % 3 == 0 else 'jpg'}")
    return root


def png_claiming(w: int, h: int) -> bytes:
    """A valid tiny PNG whose header claims w x h pixels (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(buf, "PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", w, h)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def cfg(spec: str, **kw) -> DataConfig:
    return DataConfig(**{"name": spec, "image_size": 8, "val_size": 6, **kw})


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "photos")


def quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VaelabWarning)
        return fn(*a, **k)


# ---------------------------------------------------------------- round trip
def test_cache_round_trip_holds_the_in_memory_bits_and_opens_without_decoding(photos, monkeypatch, capsys):
    mapped = load_data(cfg(f"folder:{photos}"))
    assert "prepared 60 images" in capsys.readouterr().err
    memory = load_data(cfg(f"folder:{photos}", cache=False))
    assert isinstance(mapped.train, MappedImages) and not isinstance(memory.train, MappedImages)
    assert mapped.describe() == memory.describe()
    for split in ("train", "val", "test"):
        a, b = getattr(mapped, split), getattr(memory, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels), split
    # a second command opens the cache: nothing is decoded again
    monkeypatch.setattr(cache, "build", lambda *a, **k: pytest.fail("rebuilt a current cache"))
    again = load_data(cfg(f"folder:{photos}"))
    assert torch.equal(again.train.images, memory.train.images)
    d = cache_dir_for(FolderSource(str(photos)), 8, False, None)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["shape"] == [60, 3, 8, 8] and meta["num_classes"] == 2 and meta["files"] == 60
    assert np.load(d / "images.npy", mmap_mode="r").shape == (60, 3, 8, 8)  # a plain .npy file
    # batches read from disk are the rows asked for, in the order asked
    pos = [torch.tensor([5, 1, 2, 3]), torch.tensor([0])]
    got = list(mapped.train.batches(pos, pin=False))
    assert torch.equal(got[0][0], memory.train.images[pos[0]]) and torch.equal(got[1][1], memory.train.labels[pos[1]])


def test_a_changed_folder_is_detected_and_rebuilt(photos, capsys):
    first = quiet(load_data, cfg(f"folder:{photos}"))
    before = quiet(load_data, cfg(f"folder:{photos}", cache=False))
    Image.fromarray(np.full((9, 9, 3), 200, np.uint8)).save(photos / "cats" / "new.png")  # a file added
    added = quiet(load_data, cfg(f"folder:{photos}"))
    assert "changed since it was prepared" in capsys.readouterr().err
    assert len(added.train) + len(added.val) + len(added.test) == 61
    victim = photos / "dogs" / "000.png"  # a file rewritten in place: other pixels
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(victim)
    rewritten = quiet(load_data, cfg(f"folder:{photos}"))
    memory = quiet(load_data, cfg(f"folder:{photos}", cache=False))
    assert torch.equal(rewritten.test.images, memory.test.images)
    assert torch.equal(rewritten.train.images, memory.train.images)
    # data opened before the rebuild keep reading the file they were opened on (read only now)
    assert torch.equal(first.train.images, before.train.images) and torch.equal(first.test.images, before.test.images)
    # a different size or grey setting is another prepared set, the first stays
    quiet(load_data, DataConfig(name=f"folder:{photos}", image_size=6, val_size=6))
    assert len(list(prepared_root().glob("folder-photos-*[!k]"))) == 2


def test_an_interrupted_build_leaves_no_cache_and_the_next_one_starts_clean(photos, monkeypatch):
    calls = []
    real = cache._decode_chunk

    def dies_in_the_second_chunk(items, first_row, *rest):
        calls.append(first_row)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(items, first_row, *rest)

    monkeypatch.setattr(cache, "_decode_chunk", dies_in_the_second_chunk)
    monkeypatch.setattr(cache, "CHUNK", 16)
    target = cache_dir_for(FolderSource(str(photos)), 8, False, None)
    with pytest.raises(KeyboardInterrupt):
        quiet(prepare, FolderSource(str(photos)), 8, workers=1)
    assert not target.exists() and not list(target.parent.glob("*.tmp-*"))
    # a build killed outright (SIGKILL) leaves its temporary folder: the next build removes it
    stale = target.parent / f"{target.name}.tmp-999999"
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"half")
    monkeypatch.setattr(cache, "_decode_chunk", real)
    got = quiet(prepare, FolderSource(str(photos)), 8, workers=1)
    assert got.dir == target and not stale.exists() and got.shape == (60, 3, 8, 8)
    # a damaged cache (truncated by a full disk, say) is not trusted: it is rebuilt
    with open(target / "images.npy", "r+b") as f:
        f.truncate(1000)
    again = quiet(prepare, FolderSource(str(photos)), 8, workers=1)
    assert again.shape == (60, 3, 8, 8) and (target / "images.npy").stat().st_size == again.offset + 60 * 192
    for damage in (lambda: (target / "labels.npy").unlink(), lambda: (target / "meta.json").write_text("{[garbage"),
                   lambda: (target / "meta.json").write_text(json.dumps({**again.meta, "num_classes": "2"}))):
        damage()
        fixed = quiet(prepare, FolderSource(str(photos)), 8, workers=1)
        assert fixed.labels().tolist() == again.labels().tolist() and fixed.meta["num_classes"] == 2


def test_parallel_build_in_worker_processes_equals_one_process(photos, monkeypatch, tmp_path):
    monkeypatch.setattr(cache, "INLINE_BELOW", 0)
    monkeypatch.setattr(cache, "CHUNK", 7)
    two = quiet(prepare, FolderSource(str(photos)), 8, workers=2, cache_dir=str(tmp_path / "a"))
    one = quiet(prepare, FolderSource(str(photos)), 8, workers=1, cache_dir=str(tmp_path / "b"))
    assert np.array_equal(np.load(two.images_path), np.load(one.images_path))
    assert torch.equal(two.labels(), one.labels())


def test_concurrent_first_commands_decode_once(photos, tmp_path):
    """Two processes open the same folder at once (torchrun's ranks): one builds, the other waits for
    its lock and opens the result."""
    code = ("import sys, warnings; warnings.simplefilter('ignore');"
            "from vaelab.data.cache import prepare; from vaelab.data.folder import FolderSource;"
            f"prepare(FolderSource({str(photos)!r}), 8, workers=1)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert sum("prepared 60 images" in e for e in errs) == 1, errs


# ---------------------------------------------------------------- hostile files
def test_hostile_files_are_refused_one_line_each_and_counted_as_in_memory(photos):
    (photos / "notes.txt").write_text("not an image")
    (photos / "cats" / "bomb.png").write_bytes(png_claiming(13_000, 13_000))
    good = (photos / "dogs" / "002.jpg").read_bytes()
    (photos / "dogs" / "cut.jpg").write_bytes(good[: len(good) // 2])  # truncated: its header reads, its data do not
    (photos / "dogs" / "empty.jpg").write_bytes(b"")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mapped = load_data(cfg(f"folder:{photos}"))
    lines = [str(w.message) for w in seen if issubclass(w.category, VaelabWarning)]
    assert all("\n" not in m for m in lines)
    assert any("bomb.png" in m and "13000x13000" in m for m in lines)
    assert any("skipped 4 of 64 files" in m for m in lines), lines
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        memory = load_data(cfg(f"folder:{photos}", cache=False))
    assert torch.equal(mapped.train.images, memory.train.images)
    # nothing readable at all: one error naming the folder
    junk = photos.parent / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(DataError, match="junk: none of its 1 files"):
        quiet(load_data, cfg(f"folder:{junk}"))


# ---------------------------------------------------------------- WebDataset shards
def write_shards(root: Path, photos: Path, per_shard: int = 25) -> list[Path]:
    """The photos folder as WebDataset shards: key.jpg/png + key.cls (+ a .pyd pickle that must never be read)."""
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    classes = sorted({p.parent.name for p in files})
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(files), per_shard):
        path = root / f"train-{s // per_shard:03d}.tar"
        with tarfile.open(path, "w") as tf:
            for k, f in enumerate(files[s : s + per_shard]):
                key = f"sample{s + k:05d}"
                members = {f"{key}{f.suffix}": f.read_bytes(), f"{key}.cls": str(classes.index(f.parent.name)).encode(),
                           f"{key}.pyd": b"cos\nsystem\n(S'touch /tmp/pwned'\ntR."}
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def test_webdataset_shards_give_the_folder_s_images_and_labels(photos, tmp_path):
    shards = write_shards(tmp_path / "wds", photos)
    assert len(shards) == 3
    assert expand_braces(str(tmp_path / "wds" / "train-{000..002}.tar")) == [str(s) for s in shards]
    assert expand_braces("a{1,2}-{08..10}") == ["a1-08", "a1-09", "a1-10", "a2-08", "a2-09", "a2-10"]
    folder = quiet(load_data, cfg(f"folder:{photos}"))
    for spec in (f"shards:{tmp_path / 'wds' / 'train-{000..002}.tar'}", f"shards:{tmp_path / 'wds'}"):
        got = quiet(load_data, cfg(spec))
        assert isinstance(got.train, MappedImages)
        for split in ("train", "val", "test"):
            a, b = getattr(got, split), getattr(folder, split)
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels), (spec, split)
    memory = quiet(load_data, cfg(f"shards:{tmp_path / 'wds'}", cache=False))
    assert torch.equal(memory.train.images, folder.train.images)
    # only image and label members are ever read: every item is an image member's data
    lst = ShardSource(str(tmp_path / "wds")).listing()
    with tarfile.open(shards[0]) as tf:
        image_offsets = {m.offset_data for m in tf.getmembers() if m.name.endswith((".jpg", ".png"))}
    assert {it.offset for it in lst.items if it.path == str(shards[0])} == image_offsets
    assert not Path("/tmp/pwned").exists()


def test_bad_shards_are_one_line_naming_the_shard(tmp_path, photos):
    write_shards(tmp_path / "wds", photos)
    with pytest.raises(DataError, match=r"train-\{000\.\.009\}.tar names are missing|train-003.tar: no such shard"):
        quiet(load_data, cfg(f"shards:{tmp_path / 'wds' / 'train-{000..009}.tar'}"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "wds" / "train-000.tar").read_bytes()[:700])
    with pytest.raises(DataError, match="cut.tar"):
        quiet(load_data, cfg(f"shards:{cut}"))
    gz = tmp_path / "z.tar"
    with tarfile.open(gz, "w:gz") as tf:
        tf.add(tmp_path / "wds" / "train-000.tar", "x.jpg")
    with pytest.raises(DataError, match="z.tar: a compressed tar"):
        quiet(load_data, cfg(f"shards:{gz}"))
    bad = tmp_path / "badlabel.tar"
    with tarfile.open(bad, "w") as tf:
        for name, data in (("a.jpg", (photos / "dogs" / "002.jpg").read_bytes()), ("a.cls", b"dog")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match="badlabel.tar: member a.cls: a label must be one decimal integer"):
        quiet(load_data, cfg(f"shards:{bad}"))


# ---------------------------------------------------------------- commands
def test_data_prepare_and_datasets_commands(photos, capsys):
    assert main(["data", "prepare", f"folder:{photos}", "--image-size", "8", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"folder:{photos}: 60 images 3x8x8, 2 classes" in out
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "prepared (decoded once" in out and f"folder:{photos}: 60 images" in out
    assert main(["data", "prepare", "npz:x.npz"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["data", "prepare", f"folder:{photos / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert "nope: no such folder" in err and err.count("\n") == 1


# ---------------------------------------------------------------- the same bits from disk as from memory
def _conv_cfg(spec: str, cache_on: bool) -> RunConfig:
    return RunConfig(
        data=DataConfig(name=spec, image_size=8, val_size=6, cache=cache_on),
        model=ModelConfig(latent_dim=2, hidden=(8,), encoder="conv", decoder="conv", likelihood="discretized-logistic"),
        train=TrainConfig(epochs=2, batch_size=16, progress=False, threads=1, device="cpu"),
    )


def _same_checkpoints(a: Path, b: Path) -> None:
    for name in ("latest", "best"):
        x, y = load_file(a / "checkpoints" / f"{name}.safetensors"), load_file(b / "checkpoints" / f"{name}.safetensors")
        assert sorted(x) == sorted(y)
        assert [k for k in x if not torch.equal(x[k], y[k])] == []
    rows = lambda r: [{k: v for k, v in json.loads(s).items() if k != "elapsed_s"}  # noqa: E731
                      for s in (r / "metrics.jsonl").read_text().splitlines()]
    assert rows(a) == rows(b)


def test_training_from_the_cache_is_bit_identical_to_training_from_memory(photos, tmp_path):
    quiet(vaelab.train, _conv_cfg(f"folder:{photos}", True), tmp_path / "map")
    quiet(vaelab.train, _conv_cfg(f"folder:{photos}", False), tmp_path / "mem")
    _same_checkpoints(tmp_path / "map", tmp_path / "mem")
    # and evaluation of the run reads its test split from the cache
    res = quiet(vaelab.evaluate_run, tmp_path / "map", k=3, progress=False, write=False, device="cpu")
    assert res.n == 6


def test_evaluation_reads_a_prepared_split_batch_by_batch_and_gives_the_in_memory_numbers(photos, tmp_path,
                                                                                         monkeypatch):
    """Evaluating a prepared split never reads it whole (memory holds one batch), and every number is
    the in-memory evaluation's, bit for bit."""
    run = quiet(vaelab.train, _conv_cfg(f"folder:{photos}", True), tmp_path / "run")
    mapped = quiet(load_data, cfg(f"folder:{photos}", cache=True)).train
    memory = quiet(load_data, cfg(f"folder:{photos}", cache=False)).train
    assert isinstance(mapped, MappedImages) and not isinstance(memory, MappedImages)
    reads: list[int] = []
    real = MappedImages.read

    def counted(self, positions, pin=False):
        reads.append(len(positions))
        return real(self, positions, pin)

    monkeypatch.setattr(MappedImages, "read", counted)
    monkeypatch.setattr(MappedImages, "images", property(lambda self: pytest.fail("read the whole split")))
    a = vaelab.evaluate_model(run.model, mapped, k=4, batch_size=10, progress=False)
    b = vaelab.evaluate_model(run.model, memory, k=4, batch_size=10, progress=False)
    assert max(reads) <= 10 and sum(reads) >= len(mapped)
    assert a == b


DDP_SCRIPT = """
import json, os, sys, warnings
warnings.simplefilter("ignore")
import vaelab
from vaelab.data.cache import MappedImages
rank = int(os.environ["RANK"])
read = []
real = MappedImages.batches
def batches(self, positions, pin, **kw):
    read.extend(int(r) for p in positions for r in self.rows[p.numpy()])
    return real(self, positions, pin, **kw)
MappedImages.batches = batches
out = sys.argv[2]
for cache_on in (True, False):
    vaelab.train(vaelab.RunConfig(
        data=vaelab.DataConfig(name="folder:" + sys.argv[1], image_size=8, val_size=6, cache=cache_on),
        model=vaelab.ModelConfig(latent_dim=2, hidden=(8,), encoder="conv", decoder="conv"),
        train=vaelab.TrainConfig(epochs=1, batch_size=8, progress=False, threads=1, device="cpu")),
        os.path.join(out, "map" if cache_on else "mem"))
json.dump(read, open(os.path.join(out, f"rows-{rank}.json"), "w"))
"""


def test_torchrun_ranks_read_only_their_own_part_and_match_memory(photos, tmp_path):
    """Two processes (gloo): each rank reads only its shard of the epoch's rows, the two shards are
    disjoint and cover the usable training rows, and the run equals the in-memory one bit for bit."""
    quiet(prepare, FolderSource(str(photos)), 8, workers=1)  # built here, opened by both ranks
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(photos), str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rows-{r}.json").read_text()) for r in (0, 1))
    data = quiet(load_data, cfg(f"folder:{photos}"))
    train_rows = set(data.train.rows.tolist())
    assert len(r0) == len(r1) == len(train_rows) // 2
    assert not set(r0) & set(r1) and set(r0) | set(r1) <= train_rows
    assert len(set(r0) | set(r1)) == len(train_rows) - len(train_rows) % 2
    _same_checkpoints(tmp_path / "map", tmp_path / "mem")


def test_grey_folders_and_the_grayscale_setting_match_memory(tmp_path, photos):
    grey = tmp_path / "grey"
    grey.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (9 + i % 3, 11), dtype=np.uint8)).save(grey / f"{i}.png")
    for spec, kw in ((f"folder:{grey}", {}), (f"folder:{photos}", {"grayscale": True})):
        a, b = quiet(load_data, cfg(spec, **kw)), quiet(load_data, cfg(spec, cache=False, **kw))
        assert a.shape[0] == 1 and a.shape == b.shape
        assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)


def test_the_read_ahead_float_conversion_is_to_float_bit_for_bit(photos):
    """Training batches from the cache are converted by numpy in the read-ahead thread: every one of the
    256 values must give the bits of vaelab.data.to_float (torch's division)."""
    from vaelab.data import to_float

    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(torch.from_numpy(np.divide(x.numpy(), np.float32(255.0), dtype=np.float32)), to_float(x))
    data = quiet(load_data, cfg(f"folder:{photos}"))
    pos = [torch.tensor([3, 0, 7]), torch.tensor([1, 2])]
    for (f, _), (u, _) in zip(data.train.batches(pos, False, as_float=True), data.train.batches(pos, False), strict=True):
        assert f.dtype == torch.float32 and torch.equal(f, to_float(u))


def test_the_folder_walk_streams_in_the_order_rglob_sorts(tmp_path, monkeypatch):
    """The walk lists what ``sorted(rglob)`` lists, in that order (names that sort around a folder's name,
    nested folders, a link to a file, an unreadable-free tree), and a warm start's fingerprint is taken
    without holding the listing (the folder's scan is not kept)."""
    from vaelab.data.folder import iter_files

    root = tmp_path / "tree"
    for rel in ["a/x.jpg", "a.jpg", "a-b/y.png", "a/b/z.jpg", "a/b.jpg", "B/q.jpg", "é/w.jpg", "ab", "a/b/c/d/e.jpg"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    os.symlink(root / "ab", root / "link.jpg")
    os.symlink(root / "a", root / "folder-link")  # not followed, as rglob does not
    want = sorted(p.relative_to(root).parts for p in root.rglob("*") if p.is_file())
    assert [rel for rel, _ in iter_files(root)] == want
    src = FolderSource(str(root))
    fp = src.fingerprint()
    assert src._scan is None  # streamed
    assert src.listing().n_files == len(want) and src.fingerprint() == fp  # the kept snapshot hashes the same


def test_a_split_past_the_float_budget_stays_uint8_in_memory_and_trains_the_same_bits(tmp_path, monkeypatch):
    """An in-memory training split whose float32 copy would pass the budget (SVHN with its extra images
    needs 7.4 GB as float) is held as uint8 and converted batch by batch: the same run, bit for bit."""
    from test_reliability import tiny_cfg, write_tiny_mnist

    import vaelab.training.feed as feed

    data_dir = write_tiny_mnist(tmp_path / "data")
    cfg = tiny_cfg(data_dir, 2, 4)
    vaelab.train(cfg, tmp_path / "float")
    monkeypatch.setattr(feed, "FLOAT_BUDGET", 1000)  # bytes: the 160 8x8 images' float copy is 40,960
    made = []
    real = feed.MemoryFeed.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        made.append(self.x.dtype)

    monkeypatch.setattr(feed.MemoryFeed, "__init__", spy)
    vaelab.train(cfg, tmp_path / "uint8")
    assert made == [torch.uint8]
    _same_checkpoints(tmp_path / "float", tmp_path / "uint8")
