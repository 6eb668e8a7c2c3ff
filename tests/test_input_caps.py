"""Caps on what vaelab reads before it reads it: JSON files (an export's config.json, a config file,
evaluation results) by size, and images in a ``folder:`` data set by pixel count, from their header."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaelab.config import load_config_file
from vaelab.data.folder import pixel_limit, read_folder
from vaelab.errors import CheckpointError, ConfigError, VaelabWarning
from vaelab.runs.pretrained import read_export_info
from vaelab.safeio import MAX_JSON_BYTES


def _sparse(path: Path, size: int = 1 << 30) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # no disk written, and nothing read: refused from its size
    return path


def test_a_huge_config_json_in_an_export_is_refused_from_its_size(tmp_path):
    _sparse(tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        read_export_info(tmp_path)
    msg = str(e.value)
    assert "config.json" in msg and "1.0 MiB" in msg and "JSON" in msg and "\n" not in msg


def test_a_huge_json_or_toml_config_file_is_refused_from_its_size(tmp_path):
    for name in ("run.json", "run.toml"):
        with pytest.raises(ConfigError) as e:
            load_config_file(_sparse(tmp_path / name))
        assert name in str(e.value) and "1.0 MiB" in str(e.value)


def test_json_just_under_the_cap_is_still_read(tmp_path):
    p = tmp_path / "run.json"
    p.write_text('{"data": {"name": "mnist"}}' + " " * (MAX_JSON_BYTES - 40))
    assert load_config_file(p)["data"]["name"] == "mnist"


def _png_claiming(w: int, h: int) -> bytes:
    """A few-hundred-byte PNG whose header says ``w`` x ``h`` (its pixel data is a tiny stub)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", w, h)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def test_images_past_the_pixel_limit_are_skipped_from_their_header(tmp_path, monkeypatch):
    """169 megapixels (Pillow would warn and decode ~169 MB), 400 megapixels (Pillow would refuse with
    its own error) and, with the limit lowered, a modest real image: each skipped with one vaelab line
    naming it, counted with the other skipped files, before a pixel is decoded."""
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "bomb169.png").write_bytes(_png_claiming(13_000, 13_000))
    (tmp_path / "bomb400.png").write_bytes(_png_claiming(20_000, 20_000))
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda im: decoded.append(im.size) or real_load(im))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        data = read_folder(tmp_path, image_size=8, progress=False)
    assert len(data) == 3
    assert all(w * h <= pixel_limit(8) for w, h in decoded)  # the bombs were never decoded
    kinds = {type(w.message).__name__ for w in seen}
    assert kinds == {"VaelabWarning"}, [str(w.message) for w in seen]
    lines = [str(w.message) for w in seen]
    assert all("\n" not in m for m in lines)
    assert any("bomb169.png" in m and "13000x13000" in m and "megapixels" in m for m in lines)
    assert any("bomb400.png" in m and "megapixels" in m for m in lines)
    assert any("skipped 2 of 5" in m for m in lines)

    # the limit follows the requested size, with a floor and an absolute cap
    assert pixel_limit(8) <= pixel_limit(1024) <= folder_data_cap()
    monkeypatch.setattr("vaelab.data.folder.pixel_limit", lambda size: 200)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", VaelabWarning)
        with pytest.raises(Exception, match="none of its"):
            read_folder(tmp_path, image_size=8, progress=False)
    assert sum("16x16" in str(w.message) for w in seen) == 3


def folder_data_cap() -> int:
    from vaelab.data.folder import MAX_PIXELS

    return MAX_PIXELS
