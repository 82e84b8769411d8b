"""Data-parallel training on ``accelerate``: N processes, one data shard each, gradients all-reduced.

    accelerate launch --num_processes 2 -m agents.cli train ppo ...      # or: torchrun --nproc_per_node 2 ...

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

import torch


class Distributed:
    """The process group of a run (``accelerate.Accelerator``), or a single process.

    Attributes: ``rank`` (0 .. world_size - 1), ``world_size``, ``is_main`` (rank 0), ``device``
    (this process's: ``cuda:<local rank>`` on GPUs, else the CPU).
    """

    def __init__(self, device: str = "auto"):
        from accelerate import Accelerator

        from pretrain.model import resolve_device

        cpu = resolve_device(device).type == "cpu"
        self.accelerator = Accelerator(cpu=cpu)
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = torch.device("cpu") if cpu else self.accelerator.device

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` wrapped for data-parallel training (gradients all-reduced in backward); the module
        itself in a single process. Call the wrapper's ``forward`` for the passes that need gradients."""
        if self.world_size == 1:
            return module
        return self.accelerator.prepare_model(module)

    def _reduce(self, value, op: str) -> torch.Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float64 if self.device.type == "cpu" else torch.float32, device=self.device)
        if self.world_size == 1:
            return tensor
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor / self.world_size if op == "mean" else tensor

    def mean(self, value) -> torch.Tensor:
        """The mean of ``value`` (a number or tensor) over processes."""
        return self._reduce(value, "mean")

    def sum(self, value) -> torch.Tensor:
        """The sum of ``value`` over processes."""
        return self._reduce(value, "sum")

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (a Ctrl-C seen by one process stops them all at the same update)."""
        return bool(self.sum(float(flag)) > 0) if self.world_size > 1 else bool(flag)

    def global_count(self, mask: torch.Tensor) -> torch.Tensor:
        """The mean over processes of ``mask.sum()``: the denominator that makes a per-process token
        mean, averaged by the gradient all-reduce, equal the mean over every process's tokens."""
        count = mask.sum()
        if self.world_size == 1:
            return count.clamp(min=1)
        return self.mean(count.detach()).to(mask.dtype).clamp(min=1)

    def mean_metrics(self, metrics: dict[str, float], summed: tuple[str, ...] = ()) -> dict[str, float]:
        """Every metric averaged over processes (the names in ``summed`` added up); NaN stays NaN."""
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
        """``obj`` of every process, in rank order (JSON-able values: RNG states for a checkpoint)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def wait(self) -> None:
        """Block until every process reaches this point (e.g. after the main process wrote a file)."""
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()
