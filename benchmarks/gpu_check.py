"""The checks for a lent GPU, in one run that prints one JSON object (and writes $OUT/gpu_check.json).

On the device machine (carry [".whl"], from ``bash ../shared/gpu/fetch-wheels`` plus the
bitsandbytes wheel described below), one command, timeout_s 600:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false || exit; nvidia-smi -L; PYTHONUNBUFFERED=1 timeout 420 python3 benchmarks/gpu_check.py --budget 340

Here, to check the script's logic on the CPU (each part tiny; 4-5 minutes on 2 busy cores):

    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device cpu --quick

Each part runs in its own process with its own time limit, under one overall budget (``--budget``
seconds: a part gets what is left, and a part with under 15 s left is skipped), so one failure or
hang loses nothing else; the JSON is rewritten after every part. Parts, in the order run:

* ``b_adapters``: ``benchmarks/adapters.py`` on GPT-2 small's shape (124M: ``--vocab 50257``),
  bf16 autocast: LoRA vs full PPO tokens/s and ``torch.cuda.max_memory_allocated`` per update, the
  weights held (LoRA: the base once) and the memory ratio; QLoRA too when bitsandbytes imports.
* ``e_gpu_tests``: ``pytest -q -m gpu`` over the test files that mark a test ``gpu`` (its summary,
  skips and failures).
* ``a_main_job``: the README's main job shortened: ``textgym train ppo`` with its defaults on
  TextGen-v0, ``--total-steps 8192``: wall time and the last update's gold / RM / KL, then
  ``textgym eval`` of it (held-out gold / RM / KL vs the base LM).
* ``c_dpo``: ``textgym dpo`` with few prompts: wall time and its final metrics; again with
  ``--peft lora`` when ``DPOConfig`` has that field.
* ``d_benchmarks``: ``benchmarks/rollout.py`` and ``benchmarks/train_throughput.py --no-sb3`` on
  the device with small settings, their JSON.
* ``f_grpo_trpo``: ``benchmarks/train_throughput.py --methods ppo grpo trl_grpo grpo_mu1 trl_grpo_mu1
  trpo --updates 8`` (our GRPO vs TRL's GRPOTrainer, TRPO vs PPO), then ``textgym train grpo`` and ``trpo`` with ``--peft lora
  --dtype bfloat16`` (TRPO's double backprop through the adapter under autocast): wall time, the
  last update's metrics.

* ``g_pcl``: ``textgym train dqn`` (path consistency, its defaults) and ``textgym train reinforce``,
  ``--total-steps 16384`` each, then one ``textgym eval`` of both: wall times, the last update's
  metrics, held-out gold / RM / KL.

``--parts f_grpo_trpo a_main_job`` runs only those parts (default: all).

bitsandbytes: its stock wheel (0.50.2, manylinux_2_24, 41 MiB) does not fit the 64 MiB that
travels (the tracked tree is ~22 MiB and the other wheels ~15 MiB), and ``fetch-wheels`` does not
ask for its ``manylinux_2_24`` tag. A copy of that wheel with only the CPU, CUDA 13.0 and 13.2
libraries (the image's torch is 2.11+cu130), its RECORD rewritten, is 6.8 MiB; this script
records whether it imports (``environment.bitsandbytes``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's packages, when run as a script
    sys.path.insert(0, str(ROOT))
MIN_PART_S = 15  # a part with less time left than this is skipped


class Check:
    """The overall time budget, the result being built, and where it is written after every part."""

    def __init__(self, budget_s: float, out_file: Path | None):
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.out_file = out_file
        self.result: dict = {}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def write(self) -> None:
        self.result["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        if self.out_file is not None:
            self.out_file.write_text(json.dumps(self.result, indent=1) + "\n")

    def part(self, name: str, limit_s: float, fn) -> None:
        """``fn(timeout_s)`` -> dict, stored under ``name`` with its wall time; an exception or a time-out
        is stored as the part's ``error``, and the next part runs."""
        timeout = min(limit_s, self.left())
        if timeout < MIN_PART_S:
            self.result[name] = {"skipped": f"out of time ({self.left():.0f} s of the budget left)"}
            self.write()
            return
        start = time.perf_counter()
        try:
            entry = fn(timeout)
        except Exception as err:  # noqa: BLE001 - one part's failure must not lose the others
            entry = {"error": f"{type(err).__name__}: {err}"[-2000:]}
        entry["part_wall_s"] = round(time.perf_counter() - start, 1)
        self.result[name] = entry
        self.write()
        print(f"[gpu_check] {name}: {entry['part_wall_s']} s, {self.left():.0f} s left", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, float]:
    """``cmd`` in the repo root (the project importable), killed at ``timeout`` (``TimeoutError``); its wall time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        raise TimeoutError(f"{' '.join(cmd[1:4])} ... ran past {timeout:.0f} s; stderr: {text_tail(stderr)}") from err
    return proc, time.perf_counter() - start


def text_tail(text: str, chars: int = 1500) -> str:
    """The end of a process's stderr, progress bars left out."""
    kept = [line for line in text.replace("\r", "\n").splitlines()
            if line.strip() and "it/s]" not in line and "s/it]" not in line and "━" not in line]
    return "\n".join(kept)[-chars:]


def checked(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {text_tail(proc.stderr)}")
    return proc


def last_json(text: str) -> dict:
    """The last line of ``text`` that is a JSON object."""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in the output: {text[-500:]!r}")


def last_metrics(run_dir: str | Path) -> dict:
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows[-1] if rows else {}


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name in ("transformers", "peft", "accelerate", "gymnasium", "trl", "bitsandbytes"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "?")
        except Exception as err:  # noqa: BLE001 - an import that fails is what we want to know
            env[name] = f"not importable: {type(err).__name__}: {str(err)[:200]}"
    return env


# -- the parts --------------------------------------------------------------------------------------
def part_adapters(args, tmp: Path):
    def fn(timeout):
        out = tmp / "adapters.json"
        modes = ["lora", "full"] + (["qlora"] if args.device == "cuda" and importlib.util.find_spec("bitsandbytes") else [])
        sizes = ["--vocab", "50257", "--dtype", "bfloat16"]  # GPT-2 small's 124M; bf16 autocast
        if args.quick:  # the same flags on a 2-layer model, a few tokens
            sizes += ["--layers", "2", "--width", "64", "--num-envs", "4", "--max-new-tokens", "4", "--updates", "2", "--quick"]
        else:
            sizes += ["--num-envs", "64", "--max-new-tokens", "32", "--updates", "4"]
        proc, wall = run([sys.executable, "benchmarks/adapters.py", "--device", args.device, "--no-processes", "--out", str(out),
                          "--modes", *modes, *sizes], timeout)
        checked(proc)
        result = json.loads(out.read_text())
        return {"wall_s": round(wall, 1), **result}
    return fn


def part_gpu_tests(args, tmp: Path):
    def fn(timeout):
        # Only the files that mark a test gpu are collected (collecting the whole suite takes ~20 s).
        files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in f.read_text())
        if not files:
            return {"exit_code": None, "summary": "no test file marks a test with pytest.mark.gpu", "files": []}
        proc, wall = run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs", *files], timeout)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        # exit 5: no test selected
        return {"exit_code": proc.returncode, "wall_s": round(wall, 1), "files": files, "summary": lines[-1] if lines else "",
                "skipped": [line for line in lines if line.startswith("SKIPPED")][:20],
                "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:20],
                "output_tail": "\n".join(lines[-40:])[-4000:] if proc.returncode not in (0, 5) else ""}
    return fn


def part_main_job(args, tmp: Path):
    def fn(timeout):
        out = tmp / "ppo"
        steps = ["--total-steps", "64", "--num-envs", "8", "--max-new-tokens", "8"] if args.quick else ["--total-steps", "8192"]
        proc, wall = run([sys.executable, "-m", "agents.cli", "train", "ppo", "--device", args.device, "--out", str(out),
                          "--overwrite", *steps], timeout)
        checked(proc)
        last = last_metrics(out)
        entry = {"command": f"textgym train ppo --device {args.device} {' '.join(steps)}", "train_wall_s": round(wall, 1),
                 "updates": last.get("update"), "env_steps": last.get("env_steps"),
                 **{k: last.get(k) for k in ("reward/gold", "reward/rm", "kl/ref", "perf/tokens_per_s", "perf/gpu_memory_gb")}}
        episodes = ["--episodes", "16", "--num-envs", "8"] if args.quick else []
        eval_timeout = min(90.0, timeout - wall)
        if eval_timeout < MIN_PART_S:
            entry["eval"] = {"skipped": "out of time"}
            return entry
        try:
            proc, eval_wall = run([sys.executable, "-m", "agents.cli", "eval", "--runs", str(out), "--device", args.device,
                                   "--out", str(tmp / "eval"), "--overwrite", *episodes], eval_timeout)
            checked(proc)
            entry["eval"] = {"wall_s": round(eval_wall, 1), **json.loads((tmp / "eval" / "eval.json").read_text())}
        except Exception as err:  # noqa: BLE001
            entry["eval"] = {"error": f"{type(err).__name__}: {err}"[-1500:]}
        return entry
    return fn


def part_dpo(args, tmp: Path):
    def fn(timeout):
        from rlhf.dpo import DPOConfig

        sizes = (["--num-prompts", "8", "--k", "2", "--max-new-tokens", "8", "--batch-size", "4"] if args.quick
                 else ["--num-prompts", "128", "--k", "4", "--max-new-tokens", "32", "--batch-size", "32"])
        variants = {"full": []}
        if "peft" in getattr(DPOConfig, "__dataclass_fields__", {}):
            variants["lora"] = ["--peft", "lora"]
        entry = {"settings": " ".join(sizes), "dpo_config_has_peft": "lora" in variants}
        deadline = time.perf_counter() + timeout
        for name, extra in variants.items():
            left = deadline - time.perf_counter()
            if left < MIN_PART_S:
                entry[name] = {"skipped": "out of time"}
                continue
            try:
                out = tmp / f"dpo-{name}"
                proc, wall = run([sys.executable, "-m", "agents.cli", "dpo", "--device", args.device, "--out", str(out), "--overwrite",
                                  *sizes, *extra], left)
                checked(proc)
                entry[name] = {"wall_s": round(wall, 1), **last_json(proc.stdout)}
            except Exception as err:  # noqa: BLE001
                entry[name] = {"error": f"{type(err).__name__}: {err}"[-1500:]}
        return entry
    return fn


def part_benchmarks(args, tmp: Path):
    def fn(timeout):
        if args.quick:
            rollout = ["--models", "default", "--batches", "8", "--max-new-tokens", "8", "--repeats", "1", "--classifier", ""]
            train = ["--updates", "2", "--batch", "8", "--max-new-tokens", "8", "--no-sb3"]
        else:
            rollout = ["--batches", "64", "256", "--max-new-tokens", "24", "--repeats", "2"]
            train = ["--updates", "8", "--batch", "32", "--no-sb3"]
        entry = {}
        deadline = time.perf_counter() + timeout
        for name, script, flags, share in (("rollout", "benchmarks/rollout.py", rollout, 0.5),
                                           ("train_throughput", "benchmarks/train_throughput.py", train, 1.0)):
            left = deadline - time.perf_counter()
            limit = left * share if share < 1 else left
            if limit < MIN_PART_S:
                entry[name] = {"skipped": "out of time"}
                continue
            try:
                proc, wall = run([sys.executable, script, "--device", args.device, *flags], limit)
                checked(proc)
                entry[name] = {"command": f"python {script} --device {args.device} {' '.join(flags)}", "wall_s": round(wall, 1),
                               **last_json(proc.stdout)}
            except Exception as err:  # noqa: BLE001
                entry[name] = {"error": f"{type(err).__name__}: {err}"[-1500:]}
        return entry
    return fn


def part_grpo_trpo(args, tmp: Path):
    def fn(timeout):
        deadline = time.perf_counter() + timeout
        entry = {}
        flags = (["--updates", "2", "--batch", "8", "--max-new-tokens", "8"] if args.quick
                 else ["--updates", "8", "--batch", "32", "--max-new-tokens", "16"])
        try:
            proc, wall = run([sys.executable, "benchmarks/train_throughput.py", "--device", args.device, "--methods", "ppo", "grpo",
                              "trl_grpo", "grpo_mu1", "trl_grpo_mu1", "trpo", *flags], (deadline - time.perf_counter()) * 0.65)
            checked(proc)
            entry["train_throughput"] = {"flags": " ".join(flags), "wall_s": round(wall, 1), **last_json(proc.stdout)}
        except Exception as err:  # noqa: BLE001
            entry["train_throughput"] = {"error": f"{type(err).__name__}: {err}"[-1500:]}
        steps = ["--total-steps", "64", "--num-envs", "8", "--max-new-tokens", "8"] if args.quick else ["--total-steps", "4096"]
        for algo in ("trpo", "grpo"):
            left = deadline - time.perf_counter()
            if left < MIN_PART_S:
                entry[f"{algo}_lora_bf16"] = {"skipped": "out of time"}
                continue
            try:
                out = tmp / f"{algo}-lora"
                proc, wall = run([sys.executable, "-m", "agents.cli", "train", algo, "--device", args.device, "--peft", "lora",
                                  "--dtype", "bfloat16", "--out", str(out), "--overwrite", *steps], left)
                checked(proc)
                last = last_metrics(out)
                entry[f"{algo}_lora_bf16"] = {"wall_s": round(wall, 1), **{k: v for k, v in last.items() if not k.startswith("reward/terms")}}
            except Exception as err:  # noqa: BLE001
                entry[f"{algo}_lora_bf16"] = {"error": f"{type(err).__name__}: {err}"[-1500:]}
        return entry
    return fn


def part_pcl(args, tmp: Path):
    def fn(timeout):
        deadline = time.perf_counter() + timeout
        entry = {}
        steps = ["--total-steps", "64", "--num-envs", "8", "--max-new-tokens", "8"] if args.quick else ["--total-steps", "16384"]
        for algo in ("dqn", "reinforce"):
            left = deadline - time.perf_counter()
            if left < MIN_PART_S:
                entry[algo] = {"skipped": "out of time"}
                continue
            try:
                out = tmp / f"{algo}-pcl-part"
                proc, wall = run([sys.executable, "-m", "agents.cli", "train", algo, "--device", args.device, "--out", str(out),
                                  "--overwrite", *steps], left * (0.6 if algo == "dqn" else 0.7))
                checked(proc)
                last = last_metrics(out)
                entry[algo] = {"wall_s": round(wall, 1), **{k: v for k, v in last.items() if not k.startswith("reward/terms")}}
            except Exception as err:  # noqa: BLE001
                entry[algo] = {"error": f"{type(err).__name__}: {err}"[-1500:]}
        runs = [str(tmp / f"{algo}-pcl-part") for algo in ("dqn", "reinforce") if "wall_s" in entry.get(algo, {})]
        left = deadline - time.perf_counter()
        if runs and left > MIN_PART_S:
            try:
                episodes = ["--episodes", "16", "--num-envs", "8", "--max-new-tokens", "8"] if args.quick else []
                proc, wall = run([sys.executable, "-m", "agents.cli", "eval", "--device", args.device, "--runs", *runs,
                                  "--out", str(tmp / "pcl-eval"), "--overwrite", *episodes], left)
                checked(proc)
                points = json.loads((tmp / "pcl-eval" / "eval.json").read_text())
                entry["eval"] = {"wall_s": round(wall, 1), **{name: [{k: p.get(k) for k in ("label", "gold", "rm", "kl_ref")} for p in pts]
                                                             for name, pts in points.items() if isinstance(pts, list)}}
            except Exception as err:  # noqa: BLE001
                entry["eval"] = {"error": f"{type(err).__name__}: {err}"[-1500:]}
        return entry
    return fn


PARTS = {"b_adapters": (part_adapters, 180), "e_gpu_tests": (part_gpu_tests, 90), "a_main_job": (part_main_job, 120),
         "c_dpo": (part_dpo, 90), "d_benchmarks": (part_benchmarks, 150), "f_grpo_trpo": (part_grpo_trpo, 360),
         "g_pcl": (part_pcl, 300)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="'cuda' (the GPU machine) or 'cpu' (a logic check here, with --quick)")
    parser.add_argument("--quick", action="store_true", help="every part tiny (the CPU logic check)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all parts together (default: 340)")
    parser.add_argument("--out", default="", help="the JSON file (default: $OUT/gpu_check.json when OUT is set)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="the parts to run (default: all)")
    args = parser.parse_args()
    budget = args.budget or 340.0
    out_file = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    check = Check(budget, out_file)
    check.result = {"device_arg": args.device, "quick": args.quick, "budget_s": budget, "environment": environment()}
    if args.device == "cuda" and not check.result["environment"]["cuda_available"]:
        check.result["error"] = "CUDA is not available: nothing run"
        check.write()
        print(json.dumps(check.result))
        sys.exit(1)
    check.write()
    # Limits per part (seconds, in PARTS): the GPU run's expected times with room; the budget caps the sum.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.parts:
            make, limit = PARTS[name]
            check.part(name, limit, make(args, tmp))
    check.write()
    print(json.dumps(check.result))


if __name__ == "__main__":
    main()
