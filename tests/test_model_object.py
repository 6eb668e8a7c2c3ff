"""A module of the user's own, given to ``vaelab.train(..., model=...)`` (issue 25, item 4d): trained,
recorded, resumed and opened again with the same kind of module, as Lightning's ``fit(module)`` takes
one; without it, opening the run says what to do in one line."""

from __future__ import annotations

import pytest
import torch

import vaelab
from vaelab.config import DataSpec, ModelConfig, TrainConfig
from vaelab.errors import CheckpointError, ConfigError
from vaelab.models import VAE


class MyVAE(VAE):
    """Stands for a user's module: not registered in vaelab.MODELS, under a name of its own."""


SPEC = DataSpec((1, 28, 28), 10, 0)
MCFG = ModelConfig(model="my-vae", latent_dim=3, hidden=(16,))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from conftest import write_mnist

    return write_mnist(tmp_path_factory.mktemp("own") / "data" / "mnist").parent


def _cfg(data_dir, epochs: int = 1) -> vaelab.RunConfig:
    return vaelab.RunConfig(
        data=vaelab.DataConfig(name="mnist", data_dir=str(data_dir), val_size=20, download=False, limit_train=100),
        train=TrainConfig(epochs=epochs, batch_size=20, progress=False, threads=1, device="cpu"))


def _mine() -> MyVAE:
    torch.manual_seed(0)  # seeded before it is built: the same seed gives the same bits
    return MyVAE(MCFG, SPEC)


def test_a_module_of_ones_own_trains_resumes_and_opens_again(data_dir, tmp_path):
    assert "my-vae" not in vaelab.MODELS
    res = vaelab.train(_cfg(data_dir), tmp_path / "run", model=_mine())
    assert res.config.model == MCFG and res.state.epoch == 1
    again = vaelab.train(_cfg(data_dir), tmp_path / "again", model=_mine())
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), again.model.state_dict().values(),
                                                  strict=True))
    # opened again with the same kind of module: the trained weights, and every *_run function takes it
    run = vaelab.load_run(tmp_path / "run", "latest", model=MyVAE(MCFG, SPEC))
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        res.model.eval()
        a = vaelab.iwae_bound(res.model, x, 5, generator=torch.Generator().manual_seed(1))
        b = vaelab.iwae_bound(run.model, x, 5, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, b)
    assert vaelab.sample_run(run, tmp_path / "s.png", n=4).exists()
    assert vaelab.evaluate_run(run, k=2, progress=False, write=False).nll > 0
    # resumed with the same kind of module
    more = vaelab.train(_cfg(data_dir, epochs=2), tmp_path / "run", model=MyVAE(MCFG, SPEC))
    assert more.state.epoch == 2


def test_without_the_module_or_with_the_wrong_one_it_is_one_line(data_dir, tmp_path):
    vaelab.train(_cfg(data_dir), tmp_path / "run", model=_mine())
    with pytest.raises(CheckpointError, match=r"not a registered model.*load_run\(path, model=YourModule"):
        vaelab.load_run(tmp_path / "run")
    # another module's tensors, or the same tensors under other settings: refused, naming the difference
    with pytest.raises(CheckpointError, match="checkpoint has shape"):
        vaelab.load_run(tmp_path / "run", model=MyVAE(ModelConfig(model="my-vae", latent_dim=4, hidden=(16,)), SPEC))
    with pytest.raises(ConfigError, match="differs from the model settings"):
        vaelab.load_run(tmp_path / "run", model=MyVAE(ModelConfig(model="my-vae", latent_dim=3, hidden=(16,),
                                                                  activation="tanh"), SPEC))
    with pytest.raises(ConfigError, match="expected a torch.nn.Module"):
        vaelab.train(_cfg(data_dir), tmp_path / "x", model=object())
    with pytest.raises(ConfigError, match="does not follow the latent contract.*encode"):
        vaelab.train(_cfg(data_dir), tmp_path / "y", model=torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="was built for images of shape"):
        vaelab.train(_cfg(data_dir), tmp_path / "z", model=MyVAE(MCFG, DataSpec((1, 8, 8), 10, 0)))
