"""The step trainers (DPO, SFT, reward model) with adapters, bf16 autocast, gradient checkpointing and
data parallelism: a LoRA DPO step is the DPO loss against the adapter-disabled base, only the adapter
(and the RM's score head) trains, checkpoints hold the adapter and resume exactly, ``final/`` loads
with plain transformers, and 2 processes x B pairs take the steps of 1 process x 2B."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from pretrain import load_lm
from pretrain.adapters import ADAPTER_DIR, AdaptedLM
from pretrain.padding import left_pad, position_ids_from_mask
from pretrain.run_dir import RunDir
from rlhf.dpo import DPOConfig, train_dpo
from rlhf.reward_model import RewardModel
from rlhf.reward_training import RewardConfig, train_reward_model
from rlhf.sft import SFTConfig, train_sft

LORA = dict(peft="lora", lora_r=4, lora_alpha=8.0)
PROMPT_TUNING = dict(peft="prompt-tuning", num_virtual_tokens=4)
TRAINERS = {"dpo": (DPOConfig, train_dpo), "sft": (SFTConfig, train_sft), "reward": (RewardConfig, train_reward_model)}
UNTARGETED = ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.ln_f.bias")
TARGETED = "transformer.h.0.attn.c_attn.weight"  # a LoRA target of GPT-2


class SimulatedKill(BaseException):
    """A kill -9 at a chosen point (not caught by the library's error handling)."""


def write_data(path: Path, n: int = 12) -> Path:
    """Rows that serve as preference pairs and as demonstrations, of different lengths."""
    rows = [{"prompt": f"Review {i}:", "chosen": " wonderful film" + " indeed" * (i % 3), "rejected": " boring film",
             "completion": " a fine film" + " yes" * (i % 4)} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def trainer(name: str, model_dir, data: Path, out: Path | None, **kw):
    """``(train, config)`` of a small run: 12 rows, batches of 4, 2 epochs (6 steps), a checkpoint every 2."""
    config, train = TRAINERS[name]
    fields = dict(model=str(model_dir), data=str(data), out=str(out) if out else "", batch_size=4, epochs=2, lr=1e-2,
                  checkpoint_every=2, device="cpu")
    if name == "dpo":
        fields.update(beta=0.5, max_new_tokens=4)
    if name == "reward":
        fields.update(eval_prompts=2, max_new_tokens=4)
    return train, config(**{**fields, **kw})


def scalars(out: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(out))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


CONTEXTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]


def logits_of(model, contexts=CONTEXTS) -> torch.Tensor:
    ids, mask = left_pad(contexts, 1, "cpu")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return out.float() * mask[..., None]


def rewards_of(rm: RewardModel, contexts=CONTEXTS) -> torch.Tensor:
    with torch.no_grad():
        return rm.sequence_rewards(contexts)


# -- LoRA DPO: the loss against the adapter-disabled base ---------------------------------------------------
def test_a_lora_dpo_step_is_the_dpo_loss_against_the_adapter_disabled_base(tmp_path, tiny_gpt2_dir, tiny_tokenizer):
    """Step 2's logged loss equals -log sigmoid(beta h) computed by hand with plain transformers: log pi
    from the base with checkpoint-1's adapter merged in, log pi_ref from the base model itself."""
    data = write_data(tmp_path / "pairs.jsonl", n=4)
    out = tmp_path / "dpo"
    # checkpoint-1 holds the policy that takes step 2, on all 4 pairs (one batch per epoch).
    train, cfg = trainer("dpo", tiny_gpt2_dir, data, out, checkpoint_every=1, **LORA)
    train(cfg)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir)).eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir)),
                                       str(out / "checkpoint-1" / ADAPTER_DIR)).merge_and_unload().eval()

    def logp(model, prompt: str, completion: str) -> float:  # log pi(completion | prompt), one unpadded sequence
        p = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tiny_tokenizer(completion, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([p + c])).logits[0].double(), -1)
        return sum(float(logprobs[len(p) + j - 1, token]) for j, token in enumerate(c))

    losses = []
    for row in map(json.loads, data.read_text().splitlines()):
        h = ((logp(policy, row["prompt"], row["chosen"]) - logp(base, row["prompt"], row["chosen"]))
             - (logp(policy, row["prompt"], row["rejected"]) - logp(base, row["prompt"], row["rejected"])))
        losses.append(-F.logsigmoid(torch.tensor(cfg.beta * h)).item())
    logged = scalars(out, "loss/dpo")
    assert logged[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6), "LoRA's B = 0: pi = pi_ref at step 1"
    assert logged[1] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert abs(logged[1] - logged[0]) > 1e-3, "the adapter moved in step 1"


# -- LoRA runs: only the adapter trains; checkpoints hold it; final/ loads; resume is exact ------------------------
@pytest.mark.parametrize("name", ["dpo", "sft", "reward"])
def test_lora_runs_train_the_adapter_alone_and_resume_exactly(tmp_path, monkeypatch, tiny_gpt2_dir, name):
    data = write_data(tmp_path / "data.jsonl")
    train, cfg = trainer(name, tiny_gpt2_dir, data, tmp_path / "straight", **LORA)
    train(cfg)
    straight = tmp_path / "straight"

    def kill(self, at_stage, path):
        if at_stage == "written" and path.name == "checkpoint-4":
            raise SimulatedKill

    monkeypatch.setattr(RunDir, "fault", kill)
    out = tmp_path / "killed"
    train, cfg = trainer(name, tiny_gpt2_dir, data, out, **LORA)
    with pytest.raises(SimulatedKill):
        train(cfg)
    monkeypatch.undo()

    # A checkpoint holds the adapter (and the RM's score head) and the optimizer state of exactly those tensors.
    checkpoint = out / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()
    adapter = load_file(str(checkpoint / ADAPTER_DIR / "adapter_model.safetensors"))
    assert all("lora_" in key or (name == "reward" and "score" in key) for key in adapter)
    assert (name == "reward") == any("score" in key for key in adapter), "the score head trains with the RM's adapter"
    moments = [k for k in load_file(str(checkpoint / "training_state.safetensors")) if k.endswith(".exp_avg")]
    assert len(moments) == len(adapter), "the optimizer holds the trainable tensors, no base weight"

    train, cfg = trainer(name, tiny_gpt2_dir, data, None, resume=str(out), **LORA)
    train(cfg)
    for file in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):  # the resumed run is the straight run
        a, b = load_file(str(out / "final" / file)), load_file(str(straight / "final" / file))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{file}: {key}")

    # final/ is a plain transformers dir (LoRA merged); the base weights outside the adapter are untouched.
    final, base = load_file(str(straight / "final" / "model.safetensors")), load_file(str(tiny_gpt2_dir / "model.safetensors"))
    for key in UNTARGETED:
        torch.testing.assert_close(final[key], base[key], rtol=0, atol=0, msg=key)
    assert (final[TARGETED] - base[TARGETED]).abs().max() > 1e-4, "the adapter was merged into its targets"
    if name == "reward":
        merged = RewardModel.load(straight / "final")
        adapted = RewardModel.from_lm(tiny_gpt2_dir, options=cfg, resume_from=straight / "final")
        assert adapted.peft is not None and merged.peft is None
        torch.testing.assert_close(rewards_of(merged), rewards_of(adapted), rtol=0, atol=1e-5)
        assert final["score.weight"].abs().max() > 0, "the score head (zero at the start) was trained"
    else:
        merged = AutoModelForCausalLM.from_pretrained(str(straight / "final")).eval()
        adapted, _ = load_lm(straight / "final" / ADAPTER_DIR)
        assert isinstance(adapted, AdaptedLM) and adapted.kind == "lora"
        torch.testing.assert_close(logits_of(merged), logits_of(adapted), rtol=0, atol=1e-5)


def test_adapter_dpo_samples_its_preference_data_from_the_base_model(tmp_path, tiny_gpt2_dir):
    """Built data (no --data) comes from the initial policy: for an adapter policy its base with the
    adapter disabled, the same pairs the all-weights run samples from its reference copy."""
    built = {}
    for peft in ("", "lora", "prompt-tuning"):
        out = tmp_path / (peft or "full")
        train_dpo(DPOConfig(model=str(tiny_gpt2_dir), out=str(out), peft=peft, num_prompts=6, k=3, max_new_tokens=4,
                            batch_size=4, device="cpu"))
        built[peft] = (out / "train_pairs.jsonl").read_text()
    assert built[""] and built["lora"] == built[""] and built["prompt-tuning"] == built[""]


@pytest.mark.parametrize("name", ["dpo", "sft"])
def test_a_prompt_tuned_final_dir_loads_through_load_lm(tmp_path, tiny_gpt2_dir, name):
    train, cfg = trainer(name, tiny_gpt2_dir, write_data(tmp_path / "data.jsonl", n=8), tmp_path / "pt", epochs=1, lr=0.1,
                         **PROMPT_TUNING)
    train(cfg)
    final = tmp_path / "pt" / "final"
    assert not (final / "model.safetensors").exists() and not (final / "config.json").exists()
    assert list(load_file(str(final / ADAPTER_DIR / "adapter_model.safetensors"))) == ["prompt_embeddings"]
    model, _ = load_lm(final)
    assert isinstance(model, AdaptedLM) and model.kind == "prompt-tuning" and model.num_virtual_tokens == 4
    base, _ = load_lm(tiny_gpt2_dir)
    assert (logits_of(model) - logits_of(base)).abs().max() > 1e-3, "the soft prompt conditions the model"


@pytest.mark.parametrize("name", ["dpo", "sft"])
def test_qlora_on_the_cpu_is_a_clear_error(tmp_path, tiny_gpt2_dir, name):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):  # from the config, before a run dir is claimed
        trainer(name, tiny_gpt2_dir, write_data(tmp_path / "data.jsonl"), tmp_path / "q", peft="qlora")
    assert not (tmp_path / "q").exists()


def test_the_reward_model_takes_lora_or_all_weights_only():
    for peft in ("qlora", "prompt-tuning"):
        with pytest.raises(ValueError, match=f"LoRA adapter \\(--peft lora\\), not --peft {peft}"):
            RewardConfig(peft=peft)


@pytest.mark.parametrize("name", ["dpo", "sft", "reward"])
def test_bf16_autocast_with_gradient_checkpointing_trains_fp32_weights_close_to_fp32(tmp_path, tiny_gpt2_dir, name):
    data = write_data(tmp_path / "data.jsonl", n=8)
    runs = {}
    for label, extra in (("fp32", {}), ("bf16", dict(dtype="bfloat16", gradient_checkpointing=True))):
        train, cfg = trainer(name, tiny_gpt2_dir, data, tmp_path / label, epochs=1, **LORA, **extra)
        train(cfg)
        runs[label] = tmp_path / label
    tag = {"dpo": "loss/dpo", "sft": "loss/sft", "reward": "loss/bradley_terry"}[name]
    assert scalars(runs["bf16"], tag) == pytest.approx(scalars(runs["fp32"], tag), abs=0.05)
    weights = load_file(str(runs["bf16"] / "final" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_gradient_checkpointing_takes_the_same_steps(tmp_path, tiny_gpt2_dir):
    data = write_data(tmp_path / "data.jsonl", n=8)
    for label, checkpointing in (("plain", False), ("checkpointed", True)):
        train, cfg = trainer("sft", tiny_gpt2_dir, data, tmp_path / label, epochs=1, gradient_checkpointing=checkpointing)
        train(cfg)
    a, b = (load_file(str(tmp_path / label / "final" / "model.safetensors")) for label in ("plain", "checkpointed"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


# -- data parallelism: 2 processes x B == 1 process x 2B ---------------------------------------------------------
WORKER = Path(__file__).with_name("dist_worker.py")
# torchrun, not ``accelerate launch --cpu --num_processes 2``: accelerate's --cpu launch starts ONE process
# (multi-CPU needs mpirun there). --standalone picks a free port, so concurrent test runs do not collide.
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_two_processes_take_the_steps_of_one_process_with_twice_the_batch(tmp_path, tiny_gpt2_dir):
    """DPO (all weights; one pair per pass, so each process sums its gradients before the all-reduce),
    SFT (LoRA; unequal shards of a 7-demonstration epoch) and the reward model (LoRA) with 2 processes x
    batch 2 end where 1 process x batch 4 does; only the main process writes."""
    data = write_data(tmp_path / "data.jsonl", n=8)
    runs = [("dpo", {"micro_batch_size": 1}), ("sft", LORA), ("reward", LORA)]

    def fields(name, extra, out, batch_size):  # lr 1e-3: Adam's first steps amplify float noise in gradients near 0 by lr / eps
        _, cfg = trainer(name, tiny_gpt2_dir, data, out, epochs=1, checkpoint_every=1, lr=1e-3, **extra)
        return {**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "batch_size": batch_size}

    two = [[name, fields(name, extra, tmp_path / "two" / name, 2)] for name, extra in runs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run([*LAUNCH, str(WORKER), json.dumps(two)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name, extra in runs:
        one = tmp_path / "one" / name
        config, train = TRAINERS[name]
        train(config(**fields(name, extra, one, 4)))
        two_dir = tmp_path / "two" / name
        assert json.loads((two_dir / "final" / "metrics.json").read_text())["steps"] == 2
        a, b = load_file(str(one / "final" / "model.safetensors")), load_file(str(two_dir / "final" / "model.safetensors"))
        start = load_file(str(tiny_gpt2_dir / "model.safetensors"))
        moved = max(float((a[key] - start.get(key, torch.zeros_like(a[key]))).abs().max()) for key in a)  # the RM's head starts at 0
        assert moved > 1e-3, "the steps moved the weights"
        for key in a:  # steps of ~1e-3 per weight: equal to ~1% of one step
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-5, msg=lambda m, name=name, key=key: f"{name} {key}: {m}")
        tag = {"dpo": "loss/dpo", "sft": "loss/sft", "reward": "loss/bradley_terry"}[name]
        assert scalars(two_dir, tag) == pytest.approx(scalars(one, tag), rel=1e-5), "the same losses (over the global batch)"
        assert len(list(two_dir.glob("events.out.tfevents*"))) == 1, "the main process alone writes TensorBoard"

    # A 2-process run resumes with 2 processes only: each process's data follows from the count.
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "two" / "dpo", copy)
    shutil.rmtree(copy / "final")
    with pytest.raises(ValueError, match=r"checkpointed by 2 process\(es\); resume it with 2, not 1"):
        train_dpo(DPOConfig(resume=str(copy), **{k: v for k, v in two[0][1].items() if k not in ("resume", "out")}))
