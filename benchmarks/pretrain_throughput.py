"""Pretraining throughput: our training step vs the naive transformers loop, same model and batch.

    python benchmarks/pretrain_throughput.py [--device cpu|cuda] [--steps 10]

Prints one JSON object: tokens/s of ``pretrain.train``'s step (explicit next-token cross-entropy,
AdamW with decoupled decay groups, grad clipping, bf16 autocast on CUDA) and of the loop a user
would write with plain transformers (``model(input_ids, labels=input_ids).loss``, AdamW), their
ratio, and on CUDA the model FLOPs utilisation MFU = 6 * N * tokens/s / peak.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from pretrain.model import build_gpt2, count_parameters, resolve_device
from pretrain.train import PretrainConfig, autocast, make_optimizer

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def ours(model, optimizer, batch, device, max_grad_norm=1.0):
    with autocast(device):
        logits = model(input_ids=batch[:, :-1]).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()


def naive(model, optimizer, batch, device):
    inputs = batch[:, :-1]  # the same T tokens as ours; transformers shifts the labels itself
    loss = model(input_ids=inputs, labels=inputs).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def time_steps(step_fn, model, optimizer, batch, device, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step_fn(model, optimizer, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(model, optimizer, batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = PretrainConfig()  # the shipped recipe's model size and context
    batch_size = args.batch_size or (cfg.batch_size if device.type == "cpu" else 128)
    torch.manual_seed(0)
    batch = torch.randint(2, cfg.vocab_size, (batch_size, cfg.block_size + 1), device=device)
    tokens = batch_size * cfg.block_size
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "batch_size": batch_size, "block_size": cfg.block_size}
    for name, fn in (("ours", ours), ("naive", naive)):
        torch.manual_seed(0)
        model = build_gpt2(cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size).to(device)
        optimizer = make_optimizer(model, cfg, device) if name == "ours" else torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        seconds = time_steps(fn, model, optimizer, batch, device, args.steps)
        result[f"{name}_tokens_per_s"] = round(tokens / seconds, 1)
        result["parameters"] = count_parameters(model)
    result["speedup_vs_naive"] = round(result["ours_tokens_per_s"] / result["naive_tokens_per_s"], 3)
    if device.type == "cuda":
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in result["device"]), None)
        if peak:
            result["mfu"] = round(6 * result["parameters"] * result["ours_tokens_per_s"] / peak, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
