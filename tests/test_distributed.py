"""Data-parallel training (accelerate, gloo on the CPU): N processes x B sequences take exactly the
step of 1 process x N B; a killed 2-process run resumes to the uninterrupted run's metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("dist_agent_worker.py")
# torchrun (what ``accelerate launch --multi_gpu`` runs on GPUs): ``accelerate launch --cpu`` starts a
# single process whatever --num_processes says, so it cannot test data parallelism on the CPU.
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def run(cmd, **kw):
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


MODES = ("full:ppo", "lora:ppo", "full:trpo")  # <peft>:<algorithm>, all in one launch per process count


def test_two_processes_take_the_step_of_one_process_with_twice_the_batch(tmp_path, tiny_gpt2_dir):
    from agents.policy import LMPolicy
    from pretrain.adapters import ModelOptions

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run([sys.executable, str(WORKER), str(tiny_gpt2_dir), str(tmp_path / "one"), "1", *MODES])
    run([*LAUNCH, str(WORKER), str(tiny_gpt2_dir), str(tmp_path / "two"), "2", *MODES])
    for mode in MODES:
        peft = mode.split(":")[0]
        name = f"{mode.replace(':', '-')}.safetensors"
        one, two = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert one.keys() == two.keys()
        torch.manual_seed(0)
        start = LMPolicy.load(tiny_gpt2_dir, "cpu", options=ModelOptions(peft="" if peft == "full" else peft)).state_dict()
        changed = 0
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=f"{mode}: {key}")
            changed += not torch.equal(one[key], start[key])
        assert changed > 0, f"{mode}: the update did not move the weights"


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_a_killed_two_process_lora_run_resumes_to_the_uninterrupted_metrics(tmp_path):
    def train(out: Path, *extra: str) -> list[str]:
        return [*LAUNCH, "-m", "agents.cli", "train", "ppo", "--env", "TextGenToy-v0", "--max_new_tokens", "4", "--num_envs", "8",
                "--total_steps", str(8 * 4 * 2 * 12), "--checkpoint_every", "2", "--num_minibatches", "2", "--lr", "1e-2",
                "--peft", "lora", "--device", "cpu", "--out", str(out), *extra]

    run(train(tmp_path / "straight"))
    straight = metrics(tmp_path / "straight")
    assert len(straight) == 12 and straight[-1]["env_steps"] > 0

    out = tmp_path / "killed"
    proc = subprocess.Popen(train(out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoint-2" / "manifest.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    # Every process of the run, at once, mid-update. torchrun starts each worker in a session of its own,
    # so killing the launcher's process group would leave the workers to finish the run unkilled.
    launcher = psutil.Process(proc.pid)
    processes = [*launcher.children(recursive=True), launcher]
    for p in processes:
        p.kill()
    psutil.wait_procs(processes, timeout=30)
    proc.wait()
    assert not (out / "final").exists()
    run([*LAUNCH, "-m", "agents.cli", "train", "ppo", "--resume", str(out)])
    assert metrics(out) == straight
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()
