"""Data-parallel training on ``accelerate``: N processes, one data shard each, gradients all-reduced.

    accelerate launch --multi_gpu --num_processes 2 -m agents.cli train ppo ...   # or: torchrun --nproc_per_node 2 ...

(``accelerate launch --cpu`` starts a single process whatever ``--num_processes`` says; on CPUs use
torchrun, or ``--multi_gpu``, which falls back to gloo.)

Every trainer builds one :class:`Distributed` from its ``--device``. Run without a launcher it is
a single process (world size 1) and every method below is the identity; under ``accelerate
launch`` / ``torchrun`` each process

* holds a full copy of the trainable model, wrapped by :meth:`Distributed.prepare` in PyTorch's
  DistributedDataParallel (or the DeepSpeed / FSDP engine that ``accelerate config`` chose), so a
  backward pass all-reduces the gradients (their mean over processes) and every process takes the
  same optimizer step;
* draws its own data (its seed offset by its rank, a disjoint shard of the prompts or pairs);
* reduces its metrics (:meth:`mean`, :meth:`sum`) so every process logs the global numbers,
  while the main process (rank 0) alone writes the run dir: TensorBoard, metrics, checkpoints.

A loss that is a mean over a local batch of equal size on every process needs nothing more (the
mean of the per-process means is the global mean); a mean over tokens, whose count differs between
processes, divides by :meth:`global_count` instead, so that N processes x B sequences take exactly
the step of 1 process x N B (tested).
"""

from __future__ import annotations

import atexit
import os

import torch


def process_group(device: str = "auto") -> SingleProcess:
    """This run's process group: :class:`Distributed` when a launcher (``torchrun``, ``accelerate
    launch``) started more than one process (``WORLD_SIZE`` > 1), else a :class:`SingleProcess`,
    which leaves accelerate's process-wide state alone (so one Python process may run a CUDA
    trainer and then a CPU one, as the tests do)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return Distributed(device)
    return SingleProcess(device)


class SingleProcess:
    """The process group of a run in one process: every reduction is the identity.

    Attributes: ``rank`` 0, ``world_size`` 1, ``is_main`` True, ``device`` (``--device`` resolved).
    :class:`Distributed` has the same methods, over all processes."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, device: str | torch.device = "cpu"):
        from pretrain.model import resolve_device

        self.device = resolve_device(device)

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` wrapped for data-parallel training (gradients all-reduced in backward); the module
        itself in a single process. Call the wrapper's ``forward`` for the passes that need gradients."""
        return module

    def mean(self, value) -> torch.Tensor:
        """The mean of ``value`` (a number or tensor) over processes."""
        return torch.as_tensor(value, dtype=torch.float64)

    def sum(self, value) -> torch.Tensor:
        """The sum of ``value`` over processes."""
        return torch.as_tensor(value, dtype=torch.float64)

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` replaced in place by its mean over processes, on its own device and dtype (a
        flat gradient or Fisher-vector product: no copy to the CPU); returns it."""
        return tensor

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (a Ctrl-C seen by one process stops them all at the same update)."""
        return bool(flag)

    def global_count(self, mask: torch.Tensor) -> torch.Tensor:
        """The mean over processes of ``mask.sum()`` (float): the denominator that makes a per-process
        token mean, averaged by the gradient all-reduce, equal the mean over every process's tokens."""
        return mask.float().sum().clamp(min=1)

    def mean_metrics(self, metrics: dict[str, float], summed: tuple[str, ...] = ()) -> dict[str, float]:
        """Every metric averaged over processes (the names in ``summed`` added up)."""
        return metrics

    def gather_objects(self, obj) -> list:
        """``obj`` of every process, in rank order (RNG states for a checkpoint)."""
        return [obj]

    def wait(self) -> None:
        """Block until every process reaches this point (e.g. after the main process wrote a file)."""

    def on_main(self, action, what: str = "this run"):
        """``action()`` run by the main process alone (writing the run dir, building data) while the
        others wait; returns its result there and None elsewhere. An error on the main process is
        raised on every process (the others raise ``RuntimeError``), so none waits forever."""
        result, error = None, None
        if self.is_main:
            try:
                result = action()
            except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the other processes
                error = err
        if self.any(error is not None):
            if error is not None:
                raise error
            raise RuntimeError(f"the main process of {what} stopped with an error; see its output")
        return result


def destroy_process_group() -> None:
    """``torch.distributed.destroy_process_group()`` if one is up (idempotent)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Distributed(SingleProcess):
    """The process group of a data-parallel run (``accelerate.Accelerator``): the methods of
    :class:`SingleProcess`, over every process. ``device`` is this process's (``cuda:<local rank>``
    on GPUs, else the CPU)."""

    def __init__(self, device: str = "auto"):
        from accelerate import Accelerator

        from pretrain.model import resolve_device

        cpu = resolve_device(device).type == "cpu"
        self.accelerator = Accelerator(cpu=cpu)
        # Tear the process group down before the interpreter does: left to exit, gloo's threads are
        # destroyed still joinable now and then ("terminate called without an active exception", exit -6).
        atexit.register(destroy_process_group)
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = torch.device("cpu") if cpu else self.accelerator.device

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return module
        return self.accelerator.prepare_model(module)

    def _all_reduce(self, value, op: str) -> torch.Tensor:
        # gloo reduces float64 on the CPU; NCCL wants a CUDA tensor.
        tensor = torch.as_tensor(value, dtype=torch.float64 if self.device.type == "cpu" else torch.float32, device=self.device)
        if self.world_size == 1:
            return tensor.cpu().double()
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        tensor = tensor / self.world_size if op == "mean" else tensor
        return tensor.cpu().double()

    def mean(self, value) -> torch.Tensor:
        return self._all_reduce(value, "mean")

    def sum(self, value) -> torch.Tensor:
        return self._all_reduce(value, "sum")

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def any(self, flag: bool) -> bool:
        return bool(self.sum(float(flag)) > 0)

    def global_count(self, mask: torch.Tensor) -> torch.Tensor:
        count = mask.float().sum()
        if self.world_size == 1:
            return count.clamp(min=1)
        return self.mean(count.detach()).to(device=mask.device, dtype=torch.float32).clamp(min=1)

    def mean_metrics(self, metrics: dict[str, float], summed: tuple[str, ...] = ()) -> dict[str, float]:
        if self.world_size == 1:
            return metrics
        names = sorted(metrics)
        values = self.mean(torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64))
        reduced = {k: float(v) for k, v in zip(names, values.tolist())}
        for k in summed:
            if k in reduced:
                reduced[k] *= self.world_size
        return {k: reduced[k] for k in metrics}

    def gather_objects(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def wait(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()
