"""LoRA vs full fine-tuning in PPO (memory of one update, tokens/s), and 2 processes vs 1.

    python benchmarks/adapters.py [--device cpu|cuda] [--quick] [--out FILE]

Prints one JSON object. The model is GPT-2 small's shape (12 layers, d=768, 12 heads), random
init, saved to a temp dir: its vocabulary is the shipped tokenizer's (8,192 ids: 92M parameters,
the model of ``rollout.py``) unless ``--vocab 50257`` (GPT-2's vocabulary size over the same
tokenizer, the extra ids never valid actions: 124M parameters). The env is ``TextGen-v0`` built on
that model (``--model DIR``: its reference LM is that model, its reward the shipped reward model).

* ``memory``: ``agents.ppo.train`` itself, run in a fresh process per mode (``full``: all weights;
  ``lora``: ``--peft lora``, r=16, every attention and MLP linear map) and observed through
  wrappers around the functions it calls (``make_env``, ``load_reference``, ``collect_rollout``,
  ``ppo_update``). After the first update it counts the bytes of the tensors held (each storage
  once): the weights of the policy, of the agent's reference and of the env's reference (with
  ``--env-ref-logprob-coef`` > 0 the env runs one), the gradients and the optimizer state; and the
  peak of each update, rollout included: ``torch.cuda.max_memory_allocated`` on CUDA (reset before
  each rollout), the process's peak resident set on CPU (``VmHWM``, reset before each rollout
  through ``/proc/self/clear_refs``; it also counts the reward model, Python and the allocator's
  cached pages, so it is the coarser figure). ``weights_held_ratio`` = weights held / one copy
  of the base weights: LoRA should hold the base once (<= 1.05), full fine-tuning twice.
* ``throughput``: the same runs' ``perf/tokens_per_s`` (metrics.jsonl), median over the updates
  after the first (the warm-up), and LoRA's ratio to full.
* ``processes`` (CPU only, unless ``--no-processes``): the same PPO job (the shipped LM on
  TextGen-v0, the same ``total_steps`` and global batch: 1 process x ``2B`` episodes per update vs
  2 processes x ``B`` each, started by ``torchrun --nproc_per_node 2``) timed end to end, each
  process on ``--threads`` threads. On a 2-core machine the 2-process run uses both cores while the
  single process uses one (at ``--threads 1``), so the ratio is what a second core buys, not a
  measure of scaling. First, each launcher is asked for 2 processes and the world sizes they
  report are recorded: with accelerate 1.15 on a machine without a GPU, ``accelerate launch --cpu
  --num_processes 2`` starts ONE process (its ``--cpu`` path is the single-process launcher), while
  ``accelerate launch --multi_gpu --num_processes 2`` and ``torchrun`` start two; ``processes_seen``
  (total steps / (updates x episodes x tokens)) confirms it for the timed runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the project's packages are importable
    sys.path.insert(0, str(ROOT))


# -- the model --------------------------------------------------------------------------------------
def make_gpt2_small(directory: str | Path, vocab: int = 0, n_layer: int = 12, n_embd: int = 768) -> dict:
    """GPT-2 small's shape (or ``n_layer`` x ``n_embd``, heads of 64), random init (seed 0), over the
    shipped tokenizer, saved (fp32) in ``directory``."""
    from pretrain import load_lm, save_lm
    from pretrain.model import build_gpt2, count_parameters

    _, tokenizer = load_lm("default")
    torch.manual_seed(0)
    model = build_gpt2(vocab or len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), n_positions=256,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    save_lm(model, tokenizer, directory)
    return {"dir": str(directory), "parameters": count_parameters(model), "vocab_size": model.config.vocab_size,
            "tokenizer_size": len(tokenizer), "n_layer": n_layer, "n_embd": n_embd, "n_head": model.config.n_head}


# -- memory accounting ------------------------------------------------------------------------------
def module_tensors(module) -> list[torch.Tensor]:
    """Parameters and buffers of ``module``; for the reference of an adapter policy
    (``pretrain.adapters.ReferenceLM``, which registers no parameters) those of the model it runs."""
    if module is None:
        return []
    tensors = [*module.parameters(), *module.buffers()]
    adapted = getattr(module, "_adapted", None)
    if not tensors and adapted is not None:
        tensors = [*adapted.parameters(), *adapted.buffers()]
    return tensors


def storage_bytes(tensors, seen: set | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a tied or shared weight counted once,
    also across calls that pass the same ``seen``)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device.type, storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def live_tensor_bytes(device: torch.device) -> int:
    """Bytes of every distinct tensor storage alive in the process on ``device``'s type (gc walk):
    everything, the reward model, KV caches and rollout tensors included."""
    tensors = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == device.type:
                tensors.append(obj)
        except Exception:  # objects that fail isinstance/attribute access (lazy modules, proxies)
            continue
    return storage_bytes(tensors)


def optimizer_state_bytes(optimizer) -> int:
    return storage_bytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def read_proc_status(field: str) -> int | None:
    """A ``/proc/self/status`` size (``VmHWM``, ``VmRSS``) in bytes, or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # "5" resets the peak resident set (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def read_peak(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return read_proc_status("VmHWM")


# -- one mode, in its own process ---------------------------------------------------------------------
def ppo_worker(args) -> dict:
    """``agents.ppo.train`` for ``--updates`` updates in this process (``--mode full|lora``), observed:
    the bytes held after the first update, each update's peak memory, and the metrics."""
    from agents import ppo
    from pretrain.model import resolve_device

    device = resolve_device(args.device)
    seen: dict = {"peaks": []}

    def make_env(*a, **kw):
        seen["env"] = env = original["make_env"](*a, **kw)
        return env

    def load_reference(*a, **kw):
        seen["reference"] = reference = original["load_reference"](*a, **kw)
        return reference

    def collect_rollout(*a, **kw):
        gc.collect()
        reset_peak(device)
        return original["collect_rollout"](*a, **kw)

    def ppo_update(model, optimizer, *a, **kw):
        stats = original["ppo_update"](model, optimizer, *a, **kw)
        seen["peaks"].append(read_peak(device))
        if "held" not in seen:
            seen["held"] = held_bytes(model, seen.get("reference"), seen.get("env"), optimizer, device)
        return stats

    original = {name: getattr(ppo, name) for name in ("make_env", "load_reference", "collect_rollout", "ppo_update")}
    for name, wrapper in (("make_env", make_env), ("load_reference", load_reference), ("collect_rollout", collect_rollout),
                          ("ppo_update", ppo_update)):
        setattr(ppo, name, wrapper)
    with tempfile.TemporaryDirectory() as out:
        cfg = ppo.PPOConfig(model=args.model, num_envs=args.num_envs, max_new_tokens=args.max_new_tokens,
                            total_steps=args.updates * args.num_envs * args.max_new_tokens, env_ref_logprob_coef=args.env_ref_logprob_coef,
                            peft="" if args.mode == "full" else args.mode, dtype=args.dtype, gradient_checkpointing=args.gradient_checkpointing,
                            update_epochs=args.update_epochs, num_minibatches=args.num_minibatches,
                            device=str(device), out=out, overwrite=True, checkpoint_every=10_000, seed=0)
        start = time.perf_counter()
        ppo.train(cfg)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    rates = [r["perf/tokens_per_s"] for r in rows]
    measured = rates[1:] or rates  # the first update warms up
    peaks = [p for p in seen["peaks"] if p is not None]
    return {
        "mode": args.mode, "device": str(device), "dtype": args.dtype, "gradient_checkpointing": args.gradient_checkpointing,
        "env_ref_logprob_coef": args.env_ref_logprob_coef, "updates": len(rows), "wall_s_incl_load_and_save": round(wall, 1),
        "tokens_per_s_median": round(statistics.median(measured), 1), "tokens_per_s_per_update": [round(r, 1) for r in rates],
        "peak_bytes_per_update": peaks, "peak_bytes": max(peaks) if peaks else None,
        "peak_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM (peak resident set of the process)",
        **seen.get("held", {}),
        "last_update": {k: rows[-1].get(k) for k in ("reward/rm", "reward/gold", "kl/ref", "policy/approx_kl")},
    }


def held_bytes(policy, reference, env, optimizer, device) -> dict:
    """What the run holds after an update: weights (policy, agent's reference, env's reference; each
    storage once), one copy of the base weights, gradients, optimizer state, all live tensors."""
    base = [p for name, p in policy.model.named_parameters() if "lora_" not in name and "prompt_encoder" not in name]
    trainable = [p for p in policy.parameters() if p.requires_grad]
    env_reference = getattr(getattr(env, "batch", None), "reference", None)
    env_reference_model = getattr(env_reference, "model", None)
    seen: set = set()
    policy_bytes = storage_bytes(module_tensors(policy), seen)
    reference_bytes = storage_bytes(module_tensors(reference), seen)  # new bytes only: shared storages count once
    env_reference_bytes = storage_bytes(module_tensors(env_reference_model), seen)
    weights = policy_bytes + reference_bytes + env_reference_bytes
    base_bytes = storage_bytes(base)
    grads = storage_bytes(p.grad for p in policy.parameters())
    opt = optimizer_state_bytes(optimizer)
    return {
        "base_weights_bytes": base_bytes,
        "policy_weights_bytes": policy_bytes,
        "agent_reference_extra_bytes": reference_bytes,
        "agent_reference": type(reference).__name__ if reference is not None else "none (the env's per-step ref_logprobs)",
        "env_reference_extra_bytes": env_reference_bytes,
        "env_reference": type(env_reference_model).__name__ if env_reference_model is not None else "none",
        "weights_held_bytes": weights,
        "weights_held_ratio": round(weights / base_bytes, 4),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "gradient_bytes": grads,
        "optimizer_state_bytes": opt,
        "optimizer_state_params": sum(p.numel() for p in optimizer.state),
        "accounted_bytes": weights + grads + opt,
        "live_tensor_bytes": live_tensor_bytes(torch.device(device)),
        "rss_after_update_bytes": read_proc_status("VmRSS"),
    }


def stderr_tail(text: str, lines: int = 4) -> str:
    """The last ``lines`` lines of a traceback or error message (progress bars left out)."""
    kept = [line for line in text.strip().splitlines() if line.strip() and "it/s]" not in line and "━" not in line]
    return " | ".join(kept[-lines:]) if kept else "(no output)"


def run_worker(args, mode: str, env_ref_logprob_coef: float) -> dict:
    """``ppo_worker`` in a fresh process (its own peak, its own allocator); the error text if it fails."""
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--model", args.model, "--device", args.device,
           "--num-envs", str(args.num_envs), "--max-new-tokens", str(args.max_new_tokens), "--updates", str(args.updates),
           "--update-epochs", str(args.update_epochs), "--num-minibatches", str(args.num_minibatches), "--dtype", args.dtype,
           "--env-ref-logprob-coef", str(env_ref_logprob_coef)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"mode": mode, "env_ref_logprob_coef": env_ref_logprob_coef, "error": f"exit {proc.returncode}: {stderr_tail(proc.stderr)}"}
    return json.loads(lines[-1])


def compare_modes(args) -> dict:
    """Each of ``args.modes`` (LoRA first) in its own process, at the same settings. A mode that fails
    with the env's reference (``--env-ref-logprob-coef`` > 0) is retried without one, its error kept
    (``with_env_reference_failed``); a comparison says whether both sides ran with the same setting."""
    result = {}
    for mode in sorted(args.modes, key=lambda m: m != "lora"):
        entry = run_worker(args, mode, args.env_ref_logprob_coef)
        if "error" in entry and args.env_ref_logprob_coef > 0:
            failed = entry
            entry = run_worker(args, mode, 0.0)
            entry["with_env_reference_failed"] = failed["error"]
        result[mode] = entry
    full = result.get("full", {})
    for mode in ("lora", "qlora"):
        adapted = result.get(mode, {})
        if not adapted or "error" in adapted or not full or "error" in full:
            continue
        result[f"{mode}_vs_full"] = {
            "peak_bytes_ratio": round(adapted["peak_bytes"] / full["peak_bytes"], 3) if adapted.get("peak_bytes") and full.get("peak_bytes") else None,
            "accounted_bytes_ratio": round(adapted["accounted_bytes"] / full["accounted_bytes"], 3),
            "tokens_per_s_ratio": round(adapted["tokens_per_s_median"] / full["tokens_per_s_median"], 3),
            "weights_held_ratio": adapted["weights_held_ratio"],  # (policy + references) / one copy of its own base weights
            "holds_base_once": adapted["weights_held_ratio"] <= 1.05,
            "optimizer_state_is_adapter_only": adapted["optimizer_state_params"] == adapted["trainable_parameters"]
                                               and adapted["trainable_parameters"] < 0.1 * full["trainable_parameters"],
            "same_env_ref_logprob_coef": adapted["env_ref_logprob_coef"] == full["env_ref_logprob_coef"],
        }
    return result


LAUNCHERS = {  # how a data-parallel CPU job is started (pretrain.distributed); each is checked for the processes it starts
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate_multi_gpu_flag": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                  "--mixed_precision", "no", "--dynamo_backend", "no"],
    "accelerate_cpu_flag": ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no"],
}
WORLD_PROBE = """import sys
from pathlib import Path
from pretrain.distributed import Distributed
d = Distributed("cpu")
Path(f"{sys.argv[1]}-{d.rank}-of-{d.world_size}").touch()  # one file per process: the processes' outputs would interleave
"""


def process_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def launcher_world_sizes(tmp: str, threads: int) -> dict:
    """What ``pretrain.distributed.Distributed('cpu')`` sees under each launcher asked for 2 processes:
    the processes started and the world size each reports."""
    probe = Path(tmp) / "world_probe.py"
    probe.write_text(WORLD_PROBE)
    seen = {}
    for name, launcher in LAUNCHERS.items():
        marks = Path(tmp) / f"world-{name}"
        proc = subprocess.run([sys.executable, *launcher, str(probe), str(marks)], capture_output=True, text=True, cwd=ROOT,
                              env=process_env(threads), timeout=180)
        worlds = sorted(int(f.name.rsplit("-of-", 1)[1]) for f in Path(tmp).glob(f"world-{name}-*"))
        seen[name] = {"processes_started": len(worlds), "world_sizes": worlds} if proc.returncode == 0 else {
            "error": f"exit {proc.returncode}: {stderr_tail(proc.stderr)}"}
    return seen


def time_processes(args) -> dict:
    """The same PPO job (shipped LM, TextGen-v0, same total_steps and global batch) in 1 and in 2
    processes (``torchrun``; which launchers really start 2 processes is checked first)."""
    batch, tokens, updates = 2 * args.num_envs, args.max_new_tokens, args.process_updates
    total_steps = updates * batch * tokens
    common = ["train", "ppo", "--max-new-tokens", str(tokens), "--total-steps", str(total_steps), "--device", "cpu",
              "--overwrite", "--checkpoint-every", "10000"]
    launches = {
        "1_process": ([sys.executable, "-m", "agents.cli"], batch),
        "2_processes": ([sys.executable, *LAUNCHERS["torchrun"], "-m", "agents.cli"], args.num_envs),
    }
    result = {"model": "default (shipped LM)", "env": "TextGen-v0", "total_steps": total_steps, "global_batch": batch,
              "max_new_tokens": tokens, "threads_per_process": args.threads, "cpu_cores": os.cpu_count(),
              "launcher": "python -m torch.distributed.run --nproc_per_node 2 -m agents.cli train ppo ..."}
    with tempfile.TemporaryDirectory() as tmp:
        result["launchers_asked_for_2_processes"] = launcher_world_sizes(tmp, args.threads)
        for name, (launcher, num_envs) in launches.items():
            out = f"{tmp}/{name}"
            start = time.perf_counter()
            proc = subprocess.run([*launcher, *common, "--num-envs", str(num_envs), "--out", out], capture_output=True, text=True,
                                  cwd=ROOT, env=process_env(args.threads))
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                result[name] = {"error": f"exit {proc.returncode}: {stderr_tail(proc.stderr)}"}
                continue
            rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
            rates = [r["perf/tokens_per_s"] for r in rows]
            result[name] = {"num_envs_per_process": num_envs, "updates": len(rows),
                            # total_steps / (updates x episodes x tokens per update and process): the processes that ran
                            "processes_seen": round(total_steps / (len(rows) * num_envs * tokens), 2),
                            "wall_s": round(wall, 1), "tokens_per_s_median": round(statistics.median(rates[1:] or rates), 1),
                            "reward/rm_last": rows[-1].get("reward/rm"), "kl/ref_last": rows[-1].get("kl/ref")}
    if "error" not in result["1_process"] and "error" not in result["2_processes"]:
        result["speedup_wall"] = round(result["1_process"]["wall_s"] / result["2_processes"]["wall_s"], 3)
        result["speedup_tokens_per_s"] = round(result["2_processes"]["tokens_per_s_median"] / result["1_process"]["tokens_per_s_median"], 3)
    result["note"] = (f"{os.cpu_count()} CPU cores shared with other work; each process runs {args.threads} thread(s), so 2 processes "
                      "use twice the cores of 1: the speedup is what a second core buys through data parallelism (gradient "
                      "all-reduce over gloo, both processes loading the model and the reward model), not a scaling curve. "
                      "wall_s includes start-up and loading; tokens_per_s (summed over processes) excludes the first update")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    parser.add_argument("--quick", action="store_true", help="small settings (a 2-core CPU: about 2-4 minutes)")
    parser.add_argument("--out", default="", help="also write the JSON to this file")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size of the GPT-2-small-shape model (0 = the shipped tokenizer's)")
    parser.add_argument("--layers", type=int, default=12, help="layers of the model (GPT-2 small: 12)")
    parser.add_argument("--width", type=int, default=768, help="hidden size of the model (GPT-2 small: 768; heads of 64)")
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full", "qlora", "prompt-tuning"],
                        help="how the policy is trained: LoRA, all weights, QLoRA (CUDA + bitsandbytes), prompt tuning")
    parser.add_argument("--num-envs", type=int, default=None, help="episodes per update (default: 64 on CUDA, 8 on CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens per episode (default: 32 on CUDA, 16 on CPU, 8 quick)")
    parser.add_argument("--updates", type=int, default=None, help="PPO updates per mode, the first a warm-up (default: 6 CUDA, 3 CPU)")
    parser.add_argument("--update-epochs", type=int, default=None, help="PPO epochs per update (default: 4; 1 with --quick)")
    parser.add_argument("--num-minibatches", type=int, default=None, help="minibatches per epoch (default: 4; 2 with --quick)")
    parser.add_argument("--dtype", default="float32", help="'float32' or 'bfloat16' (autocast)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--env-ref-logprob-coef", type=float, default=0.05,
                        help="the env's beta * log pi_ref shaping: > 0 makes the env run a reference LM, which is counted")
    parser.add_argument("--no-processes", action="store_true", help="skip 2 processes vs 1")
    parser.add_argument("--process-updates", type=int, default=None, help="PPO updates of the 2-vs-1-process job (default 6, quick 4)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process in the 2-vs-1-process job")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(ppo_worker(args)))
        return

    from pretrain.model import resolve_device

    device = resolve_device(args.device)
    args.device = device.type
    cuda = device.type == "cuda"
    defaults = dict(num_envs=64 if cuda else 8, max_new_tokens=32 if cuda else (8 if args.quick else 16), updates=6 if cuda else 3,
                    update_epochs=1 if args.quick else 4, num_minibatches=2 if args.quick else 4, process_updates=4 if args.quick else 6)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    result = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores, OMP_NUM_THREADS="
                                                                        f"{os.environ.get('OMP_NUM_THREADS', 'unset')})",
              "torch": torch.__version__, "settings": {k: getattr(args, k) for k in (
                  "num_envs", "max_new_tokens", "updates", "update_epochs", "num_minibatches", "dtype", "gradient_checkpointing",
                  "env_ref_logprob_coef", "quick")}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result["model"] = make_gpt2_small(f"{tmp}/gpt2-small", args.vocab, args.layers, args.width)
        args.model = result["model"]["dir"]
        result["ppo"] = compare_modes(args)
    if not cuda and not args.no_processes:
        result["processes"] = time_processes(args)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
