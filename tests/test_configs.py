"""Every example config shipped in configs/ parses into a valid RunConfig, and configs round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from vaelab import ConfigError, RunConfig
from vaelab.config import load_config_file

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = RunConfig.from_dict(load_config_file(path))
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_round_trip_and_errors():
    cfg = RunConfig()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"train": {"lr": -1}}, {"model": {"latent_dim": 0}}, {"data": {"binarize": "maybe"}},
                {"train": {"grad_clip": 0}}, {"model": {"hidden": "wide"}}, {"nope": {}}):
        with pytest.raises(ConfigError):
            RunConfig.from_dict(bad)
