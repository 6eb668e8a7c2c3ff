"""Caps on what vaelab reads before it reads it: JSON files (an export's config.json, a config file,
evaluation results) by size, and images in a ``folder:`` data set by pixel count, from their header."""

from __future__ import annotations

from pathlib import Path

import pytest

from vaelab.config import load_config_file
from vaelab.errors import CheckpointError, ConfigError
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
