"""Every speed trick of vaelab, behind one object chosen once per run: :class:`Accelerator`.

The rest of vaelab (distributions, models, objectives, evaluation, runs, the training step) is plain
eager PyTorch; an accelerator changes how it is computed, never what:

- kernels (:mod:`.kernels`, :mod:`.machine`): float32 linear products on oneDNN where this machine
  measured it clearly faster, by a plan decided once per machine and torch, persisted, and recorded in
  the run's config (``train.kernels``); :meth:`Accelerator.prepare` swaps the model's ``nn.Linear``
  layers for ones that follow the plan;
- the compiled step (``train.compile``, :mod:`.step`): the whole gradient pass or the forward pass and
  the loss by ``torch.compile``, with the run's own draws handed in as tensors (:mod:`.noise`);
- compiled evaluation passes (``evaluate --compile``, :mod:`.evaluation`);
- denormals flushed to zero while training (:func:`.step.flush_denormal`).

The determinism contract (docs/reliability.md): the same command, data, seed and torch on the same
machine compute with the same kernels and the same graphs, fresh or resumed, so they give the same bits.
Every private torch feature used here is probed (:func:`.compiler.has`), and where one is missing the
trick that needs it is left out with one line saying so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn

from ..errors import CheckpointError
from . import compiler, kernels, machine
from .kernels import KernelPlan

__all__ = ["Accelerator", "KernelPlan", "compiler", "kernels", "machine"]


def _plan(setting: str, model: nn.Module, rows: int, say: Callable[[str], None]) -> KernelPlan:
    # (aten and onednn are rules of their own, the same on every machine; auto depends on the machine)
    """The plan ``train.kernels`` asks for: ``auto`` (this machine's persisted decisions at ``rows`` rows),
    ``aten``, ``onednn`` (every layer) or a recorded plan."""
    shapes = kernels.linear_shapes(model)
    if setting == "auto":
        if not shapes or not compiler.has("onednn_linear"):
            return KernelPlan()
        got = machine.decisions([(min(rows, kernels.TIME_ROWS), i, o) for i, o in shapes], kernels.measure, say)
        return KernelPlan({(i, o): b for (_, i, o), b in got.items()})
    if setting == "onednn":
        return KernelPlan({s: kernels.FWD | kernels.DX | kernels.DW for s in shapes})
    return KernelPlan.parse(setting)


class Accelerator:
    """The speed tricks of one run (or one evaluation): its kernel plan and whether it compiles.

    ``Accelerator.for_model(setting, model, rows=...)`` resolves ``train.kernels``; :attr:`kernels` is
    the plan to record in the run's config; :meth:`prepare` applies it to the model; :meth:`step_parts`
    gives the training step's objective and gradient pass; :meth:`passes` the evaluation's passes;
    :meth:`state` the checkpoint's opaque section; :meth:`training` the context a run trains in."""

    # where the steps are decided: None, on the device except on the CPU; True/False: on the device
    # everywhere / nowhere (tests and benchmarks set it)
    device_guard: bool | None = None
    # conv models channels_last: None, on a CUDA GPU; True/False: everywhere / nowhere (tests set it)
    channels_last_on: bool | None = None

    def __init__(self, plan: KernelPlan | None = None, compile: bool = False,
                 say: Callable[[str], None] = print, setting: str | None = None) -> None:
        self.plan, self.compile, self.say = plan or KernelPlan(), compile, say
        self.setting = setting or str(self.plan)
        self.step_kind = "eager"  # what step_parts chose: eager, fused or objective
        self.channels_last, self.device_type, self.cudnn_benchmark = False, "cpu", False  # set by place()

    @classmethod
    def for_model(cls, setting: str, model: nn.Module, *, rows: int, compile: bool = False,
                  say: Callable[[str], None] = print) -> Accelerator:
        plan = _plan(setting, model, rows, say)
        return cls(plan, compile, say, str(plan) if setting == "auto" else setting)

    @staticmethod
    def check_setting(setting: str) -> None:
        """A one-line :class:`~vaelab.errors.ConfigError` for a ``train.kernels`` that is neither a
        setting nor a plan (said before any data is read)."""
        if setting not in kernels.SETTINGS:
            KernelPlan.parse(setting)

    @property
    def kernels(self) -> str:
        """What to record in ``train.kernels``: the plan ``auto`` resolved to here, else the setting
        (``aten``, ``onednn`` and a recorded plan are the same on every machine)."""
        return self.setting

    def prepare(self, model: nn.Module) -> nn.Module:
        """Apply the kernel plan to ``model``'s linear layers (in place: the same parameters)."""
        plan = self.plan
        if plan.uses_onednn() and not compiler.has("onednn_linear", self.say):
            plan = KernelPlan()
        kernels.swap_linears(model, plan)
        return model

    def step_parts(self, model: nn.Module, optimizer: Any, objective: Any, *, batch_size: int, precision: str,
                   grad_clip: float | None, world: int, scaler: object | None) -> tuple[Any, Any]:
        """(objective, gradient pass) for :func:`~vaelab.training.step.train_step`: the eager ones, or
        with ``compile`` the fused gradient pass where it computes the same pass, else the compiled
        objective with the eager backward pass."""
        from ..training.step import backward_pass
        from .step import CompiledObjective, FusedGradients

        if not self.compile:
            return objective, backward_pass
        fused = FusedGradients.build(model, objective, batch_size, precision, grad_clip, world, scaler, self.say)
        if fused is not None:
            self.step_kind = "fused"
            return objective, fused
        self.step_kind = "objective"
        return CompiledObjective(objective, batch_size, self.say), backward_pass

    def guard(self, optimizer: Any, device: Any, every: int, limit: int, run: int) -> Any:
        """Where the training steps are decided (:class:`~vaelab.training.step.StepGuard`): on the device,
        read by the host every ``every`` steps (``train.sync_every``), where the optimizer skips an
        update inside its kernel (``found_inf``: torch's fused Adam, AdamW, SGD, Adagrad) and the device
        is not the CPU; else by the host at each step (on the CPU reading a step costs nothing, and
        deciding there saves the device-side bookkeeping). Both give the same updates, bit for bit."""
        from ..training.step import StepGuard

        # the protocol torch.amp.GradScaler drives: optimizer.found_inf, honoured by the fused kernels
        masked = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        masked = masked and (device.type != "cpu" if self.device_guard is None else self.device_guard)
        return StepGuard(masked, every, limit, run, device)

    def place(self, model: nn.Module, device: Any, *, cudnn_benchmark: bool = False) -> None:
        """The device's layout and convolution settings for a training run. On a CUDA GPU a model with
        2-d convolutions holds its conv weights channels_last (NHWC), and :meth:`layout` gives it
        channels_last batches: cuDNN's tensor-core kernels take NHWC, and with the weights in it the
        decoder's activations are NHWC too. :meth:`training` then has cuDNN choose its algorithms by
        deterministic heuristics among deterministic ones (a run is bit-identical to the same command
        again), or with ``cudnn_benchmark`` by timing them (faster; not bit-identical)."""
        import torch

        want = device.type == "cuda" if self.channels_last_on is None else self.channels_last_on
        self.channels_last = want and any(isinstance(m, nn.Conv2d | nn.ConvTranspose2d) for m in model.modules())
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.device_type, self.cudnn_benchmark = device.type, cudnn_benchmark and device.type == "cuda"
        if cudnn_benchmark and device.type == "cuda":
            self.say("cudnn_benchmark: cuDNN times its convolution algorithms; this run will not be "
                     "bit-identical to the same command again")

    def layout(self, x: Any) -> Any:
        """A batch of images in the layout :meth:`place` chose for the model."""
        import torch

        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def match_layouts(self, optimizer: Any) -> None:
        """After an optimizer's state was loaded (a checkpoint holds plain contiguous tensors): each
        state tensor of a parameter's shape in that parameter's layout again, as a fresh run has it (an
        update kernel walks a parameter and its moments element by element in memory)."""
        import torch

        for group in optimizer.param_groups:
            for p in group["params"]:
                for k, v in optimizer.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                        optimizer.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)

    def passes(self) -> Any:
        """The evaluation's forward passes: None (the loop's eager ones) or compiled ones."""
        from .evaluation import CompiledPasses

        return CompiledPasses(self.say) if self.compile else None

    def state(self) -> dict[str, str]:
        """What a checkpoint keeps of the accelerator (one opaque section): the plan it computed with."""
        return {"kernels": str(self.plan)}

    @staticmethod
    def check_state(saved: object, source: str) -> Mapping[str, str]:
        """A checkpoint's section, checked before use (a one-line :class:`CheckpointError`)."""
        if not isinstance(saved, Mapping) or len(saved) > 16 or not all(
                isinstance(k, str) and isinstance(v, str) and len(v) < 100_000 for k, v in saved.items()):
            raise CheckpointError(f"{source}: corrupted training state: accel must map names to strings")
        if "kernels" in saved and saved["kernels"] not in kernels.SETTINGS:
            try:
                KernelPlan.parse(saved["kernels"], f"{source}: accel.kernels")
            except Exception as e:  # noqa: BLE001  (a ConfigError: the file is what is wrong)
                raise CheckpointError(f"{source}: corrupted training state: {e}") from None
        return saved

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The context a run trains in: denormals flushed; on a CUDA GPU cuDNN's algorithm choice as
        :meth:`place` set it (the process's settings are put back after)."""
        import torch

        from .step import flush_denormal

        cudnn = torch.backends.cudnn
        before = (cudnn.benchmark, cudnn.deterministic)
        if self.device_type == "cuda":
            cudnn.benchmark, cudnn.deterministic = self.cudnn_benchmark, not self.cudnn_benchmark
        try:
            with flush_denormal():
                yield
        finally:
            cudnn.benchmark, cudnn.deterministic = before
