"""Opening a run for training (fresh or resumed) and saving it: the units around the loop.

Exact resume: every source of randomness is either re-derived from (seed, epoch) (the data order)
or saved in the checkpoint (the noise generator used for z, binarization and conditions, and the
global torch/numpy/Python RNGs), so a run resumed from any checkpoint continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..accel import Accelerator
from ..conditioning import build_condition, describe_data
from ..config import DataSpec, RunConfig
from ..data import DataSplits, load_data
from ..data.validate import check_splits
from ..devices import autocast, resolve_device
from ..distributed import all_gather, unwrap
from ..errors import CheckpointError, NonFiniteError
from ..models import build_model, own_model
from ..models.priors import PRIORS
from ..pipeline import BatchPipeline
from ..runs.checkpoint import (
    Checkpoint,
    atomic_write,
    capture_global_rng,
    load_checkpoint,
    load_model_state,
    remove_stale_temps,
    restore_global_rng,
    save_checkpoint,
)
from ..runs.rundir import RunDir
from ..runs.validate import check_optimizer_state, check_rng, check_rng_tensor, check_train_state
from .ema import EMA
from .schedules import SCHEDULES
from .step import TrainState

OptimizerFactory = Callable[[nn.Module, RunConfig], torch.optim.Optimizer]


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    t = cfg.train
    kw: dict[str, Any] = {"lr": t.lr, "betas": t.adam_betas, "eps": t.adam_eps, "weight_decay": t.weight_decay}
    # The fused kernel does the whole update in one pass over the parameters (~3x faster than
    # the default on CPU) and computes the same Adam.
    return torch.optim.Adam(model.parameters(), fused=True, **kw)


@dataclass
class Session:
    """Everything a training run holds while it trains."""

    run: RunDir
    cfg: RunConfig
    spec: DataSpec
    data: DataSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    noise: torch.Generator  # z draws, dynamic binarization, conditions: this process's stream
    state: TrainState
    pipeline: BatchPipeline
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scaler: torch.amp.GradScaler | None = None  # fp16 only: the loss scale, saved with the run
    accel: Accelerator = field(default_factory=Accelerator)  # the run's speed tricks (vaelab.accel)
    ema: EMA | None = None  # the moving average of the weights (train.ema), saved with the run

    def eval_model(self) -> contextlib.AbstractContextManager[nn.Module]:
        """The model validation evaluates: the moving average of the weights where the run keeps one
        (the model holds it inside the block), else the model as it is."""
        return self.ema.applied_to(self.model) if self.ema is not None else contextlib.nullcontext(self.model)

    def say(self, msg: str) -> None:
        """Print on rank 0 only (through tqdm, so progress bars stay intact)."""
        _say(self.rank)(msg)

    def last_good(self) -> str:
        return str(self.run.latest) if self.run.latest.exists() else "(none yet)"

    def save(self, paths: Sequence[Path]) -> None:
        """Write the same checkpoint to each of ``paths`` in order (rank 0). A failed write stops
        training with an error that names the file; the files already there stay intact."""
        rng, rng_meta = capture_global_rng()
        states = all_gather(self.noise.get_state(), self.world)  # every rank's noise stream
        if self.rank != 0:
            return
        rng.update({f"noise/{r}": s for r, s in enumerate(states)})
        st = {**dataclasses.asdict(self.state), "rng_meta": rng_meta, "world_size": self.world,
              "device": self.device.type, "accel": self.accel.state()}
        if self.data.info.get("fingerprint"):  # data given from Python: resuming needs the same again
            st["data_fingerprint"] = self.data.info["fingerprint"]
        if self.scaler is not None:
            st["grad_scaler"] = self.scaler.state_dict()
        model = {k: v.detach().cpu() for k, v in unwrap(self.model).state_dict().items()}
        ckpt = Checkpoint(self.cfg, self.spec, model, _to_cpu(self.optimizer.state_dict()), st, rng,
                          None if self.ema is None else self.ema.state())
        for path in paths:
            try:
                save_checkpoint(path, ckpt)
            except NonFiniteError as e:
                raise NonFiniteError(
                    f"training stopped at step {self.state.step}: the parameters or optimizer state became "
                    f"non-finite. {e}. Try a lower train.lr or train.grad_clip."
                ) from None
            except CheckpointError as e:
                raise CheckpointError(
                    f"training stopped at step {self.state.step}: {e}. Fix the cause and "
                    "re-run the same command to resume from the last good checkpoint."
                ) from None
        # config.json follows the settings in force (a resumed run may have changed its epoch count)
        text = self.cfg.to_json()
        try:
            current = self.run.config.read_text()
        except (OSError, UnicodeDecodeError):
            current = None
        if current != text:
            atomic_write(self.run.config, text.encode())

    def save_epoch(self, improved: bool) -> None:
        """Best before latest: a crash between the two writes then resumes from the older latest and
        redoes this epoch, rewriting best identically. Without validation data there is no best
        (``RunDir.checkpoint("best")`` falls back to latest)."""
        self.save([self.run.best, self.run.latest] if improved else [self.run.latest])


def _say(rank: int) -> Callable[[str], None]:
    """Print on rank 0 only (through tqdm, so progress bars stay intact)."""
    return tqdm.write if rank == 0 else (lambda msg: None)


def _to_cpu(sd: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict with its tensors on the CPU (checkpoints are device-free)."""
    state = {pid: {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for pid, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def _previous(run: RunDir, resume: bool | None, model: nn.Module | None = None) -> Checkpoint | None:
    if run.latest.exists() and resume is not False:
        return load_checkpoint(run.latest, model)
    if resume:
        raise CheckpointError(f"{run.root}: nothing to resume (no {run.latest})")
    if run.latest.exists():
        raise CheckpointError(f"{run.root}: already holds a run; resume it or choose a new directory")
    return None


def _restore(s: Session, ckpt: Checkpoint) -> None:
    """Weights, optimizer, counters and every RNG from ``ckpt``, each checked before it reaches torch
    (runs/validate.py); errors name the file and the entry."""
    source = str(s.run.latest)
    load_model_state(s.model, ckpt.model, source)
    if s.ema is not None:
        if ckpt.ema is None:
            raise CheckpointError(f"{source}: holds no moving average of the weights (ema/ tensors), "
                                  f"which train.ema = {s.cfg.train.ema} keeps")
        s.ema.load(ckpt.ema, f"{source} (ema/)")
    st = check_train_state(ckpt.state, source)
    rng_meta = st.pop("rng_meta", {})
    saved_world = st.pop("world_size", 1)
    saved_device = st.pop("device", "cpu")
    scaler_state = st.pop("grad_scaler", None)
    st.pop("data_fingerprint", None)  # compared in open_session
    Accelerator.check_state(st.pop("accel", {}), source)  # its kernels are the config's train.kernels
    st.pop("gemm", None)  # written before vaelab.accel: the config's plan (auto) decides now
    if isinstance(saved_world, bool) or not isinstance(saved_world, int) or saved_world < 1:
        raise CheckpointError(f"{source}: corrupted training state: world_size must be a whole number >= 1")
    if ckpt.optimizer is not None:
        check_optimizer_state(s.optimizer, ckpt.optimizer, source)
    key = f"noise/{s.rank}"
    if key in ckpt.rng:
        check_rng_tensor(ckpt.rng[key], key, source)
    check_rng(ckpt.rng, rng_meta, source)
    try:
        if ckpt.optimizer is not None:
            s.optimizer.load_state_dict(ckpt.optimizer)
            s.accel.match_layouts(s.optimizer)
        s.state = TrainState(**st)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source}: corrupted optimizer or training state ({e!r})") from None
    if s.state.step_in_epoch and saved_world != s.world:
        raise CheckpointError(
            f"{source}: taken mid-epoch with {saved_world} processes; resume with the same number"
        )
    restore_global_rng(ckpt.rng, rng_meta, source)
    if s.scaler is not None and scaler_state:
        s.scaler.load_state_dict(scaler_state)
    if saved_device != s.device.type:
        # A generator's state does not carry over between device kinds: the run goes on, from a
        # stream re-derived from (seed, rank, step), but no longer bit-identical to one that stayed.
        s.noise.manual_seed(s.cfg.train.seed + 7919 * s.rank + 1_000_003 * s.state.step)
        s.say(f"resuming on {s.device.type} a run trained on {saved_device}: it continues correctly but not "
              f"bit-identically to a run that stayed on {saved_device}")
    elif key in ckpt.rng:
        try:
            s.noise.set_state(ckpt.rng[key])
        except RuntimeError as e:
            raise CheckpointError(f"{source}: corrupted random number generator state rng/{key} ({e})") from None


def open_session(
    cfg: RunConfig, run: RunDir, data: DataSplits | None, resume: bool | None, rank: int, world: int,
    make_optimizer: OptimizerFactory = make_optimizer, model_object: nn.Module | None = None,
) -> Session:
    """A fresh run in ``run`` with ``cfg``, or the run already there resumed with ``cfg``'s resumable
    settings (any other difference is an error that lists it); ``model_object``: the user's own module
    to train instead of building ``cfg.model``."""
    if rank == 0:  # left by a process killed mid-write (checkpoints, config.json, metrics.jsonl); we hold the lock
        remove_stale_temps(run.checkpoints)
        remove_stale_temps(run.root)
    ckpt = _previous(run, resume, model_object)
    if ckpt is not None:
        cfg = ckpt.config.resume_with(cfg)
    t = cfg.train
    SCHEDULES.get(t.schedule)  # unknown names are one-line errors before any data is read
    PRIORS.get(cfg.model.prior)
    Accelerator.check_setting(t.kernels)
    device = resolve_device(t.device)  # a device or precision that is not there: said before any work
    autocast(device, t.precision)
    if t.threads:
        torch.set_num_threads(t.threads)
    data = data if data is not None else load_data(cfg.data)
    check_splits(data)
    spec = describe_data(data.shape, data.num_classes, cfg.model.condition)
    if ckpt is not None and ckpt.spec != spec:
        raise CheckpointError(f"{run.root}: cannot resume: the run was trained on data with {ckpt.spec.describe()}; "
                              f"the data now give {spec.describe()}")
    saved_fp = ckpt.state.get("data_fingerprint") if ckpt is not None else None
    if saved_fp is not None and saved_fp != data.info.get("fingerprint"):
        raise CheckpointError(f"{run.root}: cannot resume: the data given now ({data.describe()}; fingerprint "
                              f"{data.info.get('fingerprint')}) are not the data it was trained on (fingerprint {saved_fp}); "
                              "pass the same arrays or Dataset again, or train into a new run directory")
    # Seed every global RNG, not only torch's: checkpoints save all of them, and a run must not depend
    # on what the process drew before (a resumed run restores them).
    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2**32)
    random.seed(t.seed)
    model = (build_model(cfg.model, spec) if model_object is None else own_model(model_object, spec)).to(device)
    # the kernels: this machine's persisted decisions (train.kernels auto), recorded in the config
    accel = Accelerator.for_model(t.kernels, model, rows=t.batch_size, compile=t.compile, say=_say(rank))
    cfg = cfg.replace(train=dataclasses.replace(t, kernels=accel.kernels))
    accel.prepare(model)
    accel.place(model, device, cudnn_benchmark=t.cudnn_benchmark)
    pipeline = BatchPipeline(build_condition(cfg.model.condition, spec), cfg.data.binarize)
    noise = torch.Generator(device=device).manual_seed(t.seed + 7919 * rank)
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    ema = EMA(model, t.ema) if t.ema > 0 else None  # from the initial weights (a resume loads the saved one)
    s = Session(run, cfg, spec, data, model, make_optimizer(model, cfg), noise, TrainState(), pipeline, rank, world,
                device, scaler, accel, ema)
    if device.type != "cpu" or t.precision != "fp32":
        s.say(f"device {device}, precision {t.precision}")
    s.say(f"data {data.describe()}")
    if ckpt is not None:
        _restore(s, ckpt)
        if rank == 0:
            run.truncate_metrics(s.state.step)
        if s.state.epoch >= t.epochs and not s.state.step_in_epoch:
            s.say(f"{run.root} is already trained for {s.state.epoch} epochs (train.epochs = {t.epochs}): "
                  "nothing to train; give more epochs to continue it")
        else:
            s.say(f"resuming {run.root} from epoch {s.state.epoch}, step {s.state.step}")
    elif rank == 0:
        run.root.mkdir(parents=True, exist_ok=True)
        atomic_write(run.config, cfg.to_json().encode())
        if run.metrics.exists():
            run.metrics.unlink()
    return s
