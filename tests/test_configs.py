"""Every example config shipped in configs/ parses into a valid RunConfig, and configs round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vaelab import ConfigError, RunConfig
from vaelab.cli import build_parser, config_from_args
from vaelab.config import (
    DataSpec,
    ModelConfig,
    TrainConfig,
    _coerce,
    apply_overrides,
    load_config_file,
)

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


# ---------------------------------------------------------------- coercion, one kind of annotation at a time
def _error(cls, d):
    """The error ``cls.from_dict(d)`` raises (RunConfig's names start with 'config.')."""
    with pytest.raises(ConfigError) as e:
        cls.from_dict(d)
    return str(e.value)


def test_scalars_from_files_and_the_command_line():
    cfg = RunConfig.from_dict({"data": {"download": "no", "grayscale": "Yes", "val_size": "7", "limit_train": 3.0},
                               "train": {"lr": "2e-3", "beta": 2, "epochs": np.int64(4), "weight_decay": np.float32(0.5)}})
    assert (cfg.data.download, cfg.data.grayscale, cfg.data.val_size, cfg.data.limit_train) == (False, True, 7, 3)
    assert cfg.train.lr == 2e-3 and type(cfg.train.beta) is float and cfg.train.beta == 2.0
    assert type(cfg.train.epochs) is int and cfg.train.epochs == 4 and cfg.train.weight_decay == 0.5
    for d, text in [({"data": {"download": "maybe"}}, "config.data.download: expected true/false, got 'maybe'"),
                    ({"data": {"download": 1}}, "config.data.download: expected true/false, got 1"),
                    ({"data": {"val_size": 2.5}}, "config.data.val_size: expected an integer, got 2.5"),
                    ({"data": {"val_size": True}}, "config.data.val_size: expected an integer, got True"),
                    ({"data": {"val_size": "many"}}, "config.data.val_size: expected an integer, got 'many'"),
                    ({"train": {"lr": False}}, "config.train.lr: expected a number, got False"),
                    ({"train": {"lr": "fast"}}, "config.train.lr: expected a number, got 'fast'"),
                    ({"train": {"lr": 10**400}}, "config.train.lr: an integer of 1329 bits is too large a number"),
                    ({"data": {"name": 3}}, "config.data.name: expected a string, got 3")]:
        assert _error(RunConfig, d) == text


def test_scalars_from_python_are_strict():
    assert TrainConfig(epochs=np.int64(3), lr=np.float32(0.25), beta=1).beta == 1.0
    assert type(TrainConfig(epochs=np.int64(3)).epochs) is int
    for kw, text in [({"epochs": "3"}, "train.epochs: expected an integer, got '3'"),
                     ({"epochs": 3.0}, "train.epochs: expected an integer, got 3.0"),
                     ({"lr": "1e-3"}, "train.lr: expected a number, got '1e-3'"),
                     ({"lr": True}, "train.lr: expected a number, got True"),
                     ({"compile": "yes"}, "train.compile: expected true/false, got 'yes'"),
                     ({"lr": 2**2000}, "train.lr: an integer of 2001 bits is too large a number")]:
        with pytest.raises(ConfigError) as e:
            TrainConfig(**kw)
        assert str(e.value) == text


def test_optional_values():
    assert RunConfig.from_dict({"data": {"limit_train": None, "data_dir": None}}).data.limit_train is None
    assert RunConfig.from_dict({"train": {"grad_clip": "1.5"}}).train.grad_clip == 1.5
    # the error is the one for the value's type (not for null)
    assert _error(RunConfig, {"data": {"limit_train": "all"}}) == "config.data.limit_train: expected an integer, got 'all'"
    assert _error(RunConfig, {"train": {"lr": None}}) == "config.train.lr: expected a number, got None"
    with pytest.raises(ConfigError, match=r"^x: may not be null$"):  # a union without None (none in the configs)
        _coerce(int | str, None, "x")
    assert _coerce(int | str, "a", "x") == "a" and _coerce(int | str, "5", "x") == 5


def test_tuples():
    cfg = RunConfig.from_dict({"model": {"hidden": [8, 4]}, "train": {"adam_betas": [0, "0.5"]}})
    assert cfg.model.hidden == (8, 4) and cfg.train.adam_betas == (0.0, 0.5)
    assert all(type(b) is float for b in cfg.train.adam_betas)
    assert DataSpec.from_dict({"shape": [3, 8, 8]}).shape == (3, 8, 8)
    assert _error(DataSpec, {"shape": [3, 8]}) == "data spec.shape: expected 3 values, got 2"
    assert _error(RunConfig, {"train": {"adam_betas": [0.9]}}) == "config.train.adam_betas: expected 2 values, got 1"
    assert _error(RunConfig, {"model": {"hidden": {"a": 1}}}) == "config.model.hidden: expected a list, got {'a': 1}"
    assert _error(RunConfig, {"model": {"hidden": [8, 2.5]}}) == "config.model.hidden: expected an integer, got 2.5"
    assert _error(RunConfig, {"model": {"hidden": None}}) == "config.model.hidden: expected a list, got None"
    assert RunConfig.from_dict({"model": {"upper_hidden": None}}).model.upper_hidden is None
    # from Python: lists become tuples; a tuple already of the right types is kept as it is
    hidden = (16, 8)
    assert ModelConfig(hidden=hidden).hidden is hidden and ModelConfig(hidden=[16, 8]).hidden == (16, 8)
    betas = (0.5, 0.9)
    assert TrainConfig(adam_betas=betas).adam_betas is betas
    assert TrainConfig(adam_betas=(0, 1 / 2)).adam_betas == (0.0, 0.5)
    for kw, text in [({"hidden": "16,8"}, "model.hidden: expected a list, got '16,8'"),
                     ({"hidden": 16}, "model.hidden: expected a list, got 16"),
                     ({"hidden": (16, True)}, "model.hidden: expected an integer, got True")]:
        with pytest.raises(ConfigError) as e:
            ModelConfig(**kw)
        assert str(e.value) == text


def test_lists_spelled_as_on_the_command_line():
    """``--set model.hidden=200,200`` is read as ``--hidden 200,200`` is: text split on commas; a lone
    number is a list of one; empty text an empty list (as ``--upper-hidden ''``)."""
    d = apply_overrides({}, ["model.hidden=200,100", "model.upper_latent=5", "model.layers=2",
                             "model.upper_hidden=", "train.adam_betas=0.8, 0.9"])
    cfg = RunConfig.from_dict(d)
    assert cfg.model.hidden == (200, 100) and cfg.model.upper_latent == (5,) and cfg.model.upper_hidden == ()
    assert cfg.train.adam_betas == (0.8, 0.9)
    assert RunConfig.from_dict({"model": {"hidden": 64}}).model.hidden == (64,)
    assert _error(RunConfig, apply_overrides({}, ["model.hidden=wide"])) == "config.model.hidden: expected an integer, got 'wide'"
    assert _error(RunConfig, apply_overrides({}, ["train.adam_betas=0.9"])) == "config.train.adam_betas: expected 2 values, got 1"
    # through the command line: --set and the flag give the same config
    parser = build_parser()
    via_set = parser.parse_args(["train", "--run", "r", "--set", "model.hidden=200,200", "--set", "model.upper_hidden="])
    via_flags = parser.parse_args(["train", "--run", "r", "--hidden", "200,200", "--upper-hidden", ""])
    assert config_from_args(via_set) == config_from_args(via_flags)
    assert config_from_args(via_set).model.hidden == (200, 200)


def test_nested_configs():
    assert RunConfig.from_dict({"model": {"latent_dim": 3}}).model.latent_dim == 3
    assert _error(RunConfig, {"model": [1]}) == "config.model: expected a table/object, got [1]"
    assert _error(RunConfig, {"model": {"nope": 1}}).startswith("config.model: unknown key(s) ['nope']")
    # strict (a value given in Python): a config as it is, never a dict
    m = ModelConfig(latent_dim=3)
    assert _coerce(ModelConfig, m, "model", strict=True) is m
    with pytest.raises(ConfigError, match=r"^model: expected a ModelConfig, got \{'latent_dim': 3\}$"):
        _coerce(ModelConfig, {"latent_dim": 3}, "model", strict=True)
