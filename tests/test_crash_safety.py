"""Crash-safe runs: a kill anywhere inside a checkpoint write resumes exactly, runs never write into
each other, and resume works in every state (mid-run, finished, final/ half-written)."""

import json
import os
import signal
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import ppo
from agents.cli import main
from agents.run import Run
from pretrain.run_dir import CheckpointWarning, RunDir

TOY = dict(env="TextGenToy-v0", max_new_tokens=4, device="cpu")


class SimulatedKill(BaseException):
    """A kill -9 at a chosen point: nothing after it runs (a BaseException, like KeyboardInterrupt,
    is not caught by the library's error handling)."""


def config(out, **kw):
    settings = dict(TOY, num_envs=8, total_steps=8 * 4 * 6, lr=1e-3, num_minibatches=2, checkpoint_every=2, sample_every=2)
    return ppo.PPOConfig(**{**settings, **kw}, out=str(out) if out else "")


def metric_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def final_weights(out):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    ppo.train(config(out))
    return out


def assert_same_run(out, straight):
    assert metric_rows(out) == metric_rows(straight)
    a, b = final_weights(out), final_weights(straight)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# A kill at each point of the atomic write: between the model and the training-state files, after
# all files, after the manifest, after the rename, after pruning; and inside the write of final/.
KILL_POINTS = [("between-files", "checkpoint-4"), ("written", "checkpoint-4"), ("manifest", "checkpoint-4"),
               ("renamed", "checkpoint-4"), ("pruned", "checkpoint-4"), ("written", "final"), ("manifest", "final")]


@pytest.mark.parametrize("stage, target", KILL_POINTS, ids=[f"{s}:{t}" for s, t in KILL_POINTS])
def test_a_kill_inside_a_checkpoint_write_resumes_exactly(tmp_path, monkeypatch, straight, stage, target):
    out = tmp_path / "run"
    if stage == "between-files":  # the policy's files are written, the optimizer/RNG state not yet
        import agents.run

        original = agents.run.save_training_state

        def kill_before_state(directory, **kwargs):
            if directory.name.endswith(target):
                raise SimulatedKill(stage)
            return original(directory, **kwargs)

        monkeypatch.setattr(agents.run, "save_training_state", kill_before_state)
    else:
        def kill(self, at_stage, path):
            if at_stage == stage and path.name == target:
                raise SimulatedKill(stage)

        monkeypatch.setattr(RunDir, "fault", kill)
    with pytest.raises(SimulatedKill):
        ppo.train(config(out))
    monkeypatch.undo()
    ppo.train(config(None, resume=str(out)))
    assert_same_run(out, straight)
    assert not list(out.glob(".tmp-*")), "a half-written dir is removed by the next checkpoint"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def killed_after_checkpoint_4(out, monkeypatch) -> None:
    """A run killed right after its checkpoint of update 4 is complete."""
    def kill(self, at_stage, path):
        if at_stage == "pruned" and path.name == "checkpoint-4":
            raise SimulatedKill

    monkeypatch.setattr(RunDir, "fault", kill)
    with pytest.raises(SimulatedKill):
        ppo.train(config(out))
    monkeypatch.undo()


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, monkeypatch, straight):
    out = tmp_path / "run"
    killed_after_checkpoint_4(out, monkeypatch)
    weights = out / "checkpoint-4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # a disk error in the last bytes
    weights.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match=r"skipping checkpoint .*checkpoint-4: model.safetensors does not match its sha256 "
                                               r"in manifest.json; using .*checkpoint-2 instead"):
        ppo.train(config(None, resume=str(out)))
    assert_same_run(out, straight)


def test_tensorboard_holds_each_update_once_after_a_resume(tmp_path, monkeypatch, straight):
    out = tmp_path / "run"
    original_log = Run.log

    def log_then_crash(self, metrics, texts=None):
        original_log(self, metrics, texts)
        if self.update == 5:  # logged (TensorBoard + metrics.jsonl) after checkpoint-4, then killed
            raise SimulatedKill

    monkeypatch.setattr(Run, "log", log_then_crash)
    with pytest.raises(SimulatedKill):
        ppo.train(config(out))
    monkeypatch.undo()
    ppo.train(config(None, resume=str(out)))
    events = EventAccumulator(str(out))
    events.Reload()
    steps = [e.step for e in events.Scalars("reward/rm")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events.Scalars("reward/rm")] == pytest.approx([r["reward/rm"] for r in metric_rows(straight)], abs=1e-5)


def test_resuming_a_finished_run_is_a_no_op_that_says_so(tmp_path, capsys, straight):
    out = tmp_path / "run"
    ppo.train(config(out))
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    summary = ppo.train(config(None, resume=str(out)))
    assert "already finished (update 6 of 6)" in capsys.readouterr().err
    assert summary["final"] == str(out / "final") and summary["update"] == 6
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_missing_final_is_written_by_resume(tmp_path, straight):
    import shutil

    out = tmp_path / "run"
    ppo.train(config(out))
    shutil.rmtree(out / "final")
    ppo.train(config(None, resume=str(out)))
    assert_same_run(out, straight)


# -- the CLI: resume reads the run's own settings; runs never write into each other -----------------------------
CLI_FLAGS = ["train", "ppo", "--env", "TextGenToy-v0", "--num-envs", "8", "--max-new-tokens", "4", "--total-steps", "192",
             "--lr", "1e-3", "--num-minibatches", "2", "--checkpoint-every", "2", "--sample-every", "2", "--device", "cpu"]


def test_cli_resume_needs_only_the_run_dir_and_prints_how_to_resume(tmp_path, monkeypatch, capsys, straight):
    out = tmp_path / "a"
    original_log = Run.log

    def log_then_ctrl_c(self, metrics, texts=None):
        original_log(self, metrics, texts)
        if self.update == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Run, "log", log_then_ctrl_c)
    assert main([*CLI_FLAGS, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted after update 3 of 6; checkpoint: {out / 'checkpoint-3'}" in err
    assert f"resume with: textgym train ppo --resume {out}" in err
    monkeypatch.undo()
    assert main(["train", "ppo", "--num-envs", "16", "--resume", str(out)]) == 1
    assert "num_envs: checkpoint 8, this run 16" in capsys.readouterr().err
    assert main(["train", "ppo", "--resume", str(out), "--out", str(tmp_path / "b")]) == 1
    assert "continues that run in its own dir" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main(["train", "ppo", "--resume", str(out)]) == 0
    assert_same_run(out, straight)


def test_no_command_writes_into_a_dir_that_is_not_its_own_run(tmp_path, capsys):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"mine": true}')
    for argv in ([*CLI_FLAGS, "--out", str(model_dir)],
                 ["eval", "--runs", str(model_dir), "--env", "TextGenToy-v0", "--out", str(model_dir)],
                 ["dpo", "--out", str(model_dir)], ["sft", "--out", str(model_dir)], ["reward", "--out", str(model_dir)],
                 ["pretrain", "--out", str(model_dir)]):
        assert main(argv) == 1, argv
        assert "is not empty and holds no run of this library (config.json); pick another --out, or pass --overwrite" \
            in capsys.readouterr().err
    assert (model_dir / "config.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"]


def test_overwrite_replaces_a_previous_run(tmp_path, straight):
    out = tmp_path / "run"
    ppo.train(config(out, lr=5e-4))
    with pytest.raises(FileExistsError, match="already holds a 'train ppo' run; continue it with --resume"):
        ppo.train(config(out))
    ppo.train(config(out, overwrite=True))
    assert_same_run(out, straight)


def test_no_warning_for_a_clean_resume(tmp_path, monkeypatch, straight):
    out = tmp_path / "run"
    killed_after_checkpoint_4(out, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        ppo.train(config(None, resume=str(out)))


# -- the step-counted trainers: SFT, DPO, reward model ---------------------------------------------------------
def step_trainer(name, tiny_gpt2_dir, data, out, **kw):
    from rlhf import dpo, reward_training, sft

    common = dict(model=str(tiny_gpt2_dir), data=str(data), batch_size=4, epochs=2, checkpoint_every=2, device="cpu",
                  out=str(out) if out else "", **kw)
    if name == "sft":
        return sft.train_sft, sft.SFTConfig(**common, lr=1e-3)
    if name == "dpo":
        return dpo.train_dpo, dpo.DPOConfig(**common, lr=1e-3, max_new_tokens=4)
    return reward_training.train_reward_model, reward_training.RewardConfig(**common, lr=1e-3, eval_prompts=2, max_new_tokens=4)


@pytest.mark.parametrize("name", ["sft", "dpo", "reward"])
def test_step_trainers_resume_exactly_after_a_kill_inside_a_checkpoint_write(tmp_path, monkeypatch, tiny_gpt2_dir, name):
    rows = [{"prompt": f"Review {i}:", "chosen": " wonderful film", "rejected": " boring film", "completion": " a fine film"}
            for i in range(12)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    train, cfg = step_trainer(name, tiny_gpt2_dir, data, tmp_path / "straight")
    train(cfg)

    def kill(self, at_stage, path):
        if at_stage == "written" and path.name == "checkpoint-4":
            raise SimulatedKill

    monkeypatch.setattr(RunDir, "fault", kill)
    out = tmp_path / "killed"
    train, cfg = step_trainer(name, tiny_gpt2_dir, data, out)
    with pytest.raises(SimulatedKill):
        train(cfg)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    monkeypatch.undo()
    train, cfg = step_trainer(name, tiny_gpt2_dir, data, None, resume=str(out))
    train(cfg)
    a, b = load_file(str(out / "final" / "model.safetensors")), load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    events = EventAccumulator(str(out))
    events.Reload()
    tag = {"sft": "loss/sft", "dpo": "loss/dpo", "reward": "loss/bradley_terry"}[name]
    assert [e.step for e in events.Scalars(tag)] == list(range(1, len(events.Scalars(tag)) + 1)), "each step once"
    train, cfg = step_trainer(name, tiny_gpt2_dir, data, None, resume=str(out))
    train(cfg)  # finished: a no-op


SB3_FLAGS = {
    "ppo": ["--n-steps", "8", "--batch-size", "32"],
    "dqn": ["--learning-starts", "32", "--batch-size", "16", "--train-freq", "4", "--gradient-steps", "1"],
}


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_sb3_runs_checkpoint_stop_on_ctrl_c_and_resume(tmp_path, monkeypatch, capsys, algo):
    from agents import sb3

    out = tmp_path / algo
    original = sb3.TextGenCallback._on_rollout_end
    calls = {"n": 0}

    def ctrl_c_at_the_third_rollout(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(sb3.TextGenCallback, "_on_rollout_end", ctrl_c_at_the_third_rollout)
    flags = ["--env", "TextGenToy-v0", "--num-envs", "4", "--max-new-tokens", "4", "--total-steps", "192",
             "--checkpoint-every", "32", "--device", "cpu", *SB3_FLAGS[algo]]
    assert main(["train", f"sb3-{algo}", *flags, "--out", str(out)]) == 130
    assert f"resume with: textgym train sb3-{algo} --resume {out}" in capsys.readouterr().err
    assert not (out / "final").exists()
    checkpoints = RunDir.list_checkpoints(out)
    assert checkpoints and (checkpoints[0][1] / "policy.safetensors").is_file()
    assert (checkpoints[0][1] / "replay").is_dir() == (algo == "dqn")
    monkeypatch.undo()
    assert main(["train", f"sb3-{algo}", "--resume", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env_steps"] >= 192 and (out / "final" / "config.json").is_file()
    events = EventAccumulator(str(out))
    events.Reload()
    steps = [e.step for e in events.Scalars("reward/rm")]
    assert steps == sorted(set(steps)), "each logged step once"
