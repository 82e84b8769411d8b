"""How the public entry points treat bad input: clear error, unclear error, silently accepted, crash.

    python benchmarks/input_validation.py [--actions 6000] > validation.json

Runs hand-picked bad inputs (env constructors, reset seeds and options, actions, data files, model
dirs, CLI flags) and randomly generated actions (legal and illegal, every integer and float
dtype) through the public API only, so the same script measures any version of the library. An
error is *clear* when it is a ValueError / TypeError / RuntimeError / FileNotFoundError /
FileExistsError whose message contains the offending value; anything else raised is *unclear*; an
illegal input that is accepted is *silent*; a case that exhausts the memory cap (4 GiB) or takes
longer than 20 s is a *crash*. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import signal
import sys
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np

import envs  # noqa: F401  (registers the suite)

CLEAR_TYPES = (ValueError, TypeError, RuntimeError, FileNotFoundError, FileExistsError)
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


class TimedOut(BaseException):
    pass


def run_case(call, names: list[str], illegal: bool = True) -> str:
    """'clear' | 'unclear' | 'silent' | 'crash' for an illegal input; 'accepted' | 'rejected' for a legal one."""
    def alarm(signum, frame):
        raise TimedOut

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            call()
        outcome = "silent" if illegal else "accepted"
    except (TimedOut, MemoryError):
        outcome = "crash"
    except SystemExit as exit_:  # the CLI: exit code 0 accepted, 1/2 with our message
        outcome = "silent" if (exit_.code == 0 and illegal) else ("accepted" if exit_.code == 0 else "clear")
    except Exception as err:  # noqa: BLE001 - classifying is the point
        if not illegal:
            outcome = "rejected"
        else:
            named = any(n in str(err) for n in names)
            outcome = "clear" if isinstance(err, CLEAR_TYPES) and named else "unclear"
    finally:
        signal.alarm(0)
    return outcome


def cli(args: list[str]):
    from agents.cli import main

    def call():
        code = main(args)
        raise SystemExit(code)
    return call


def hand_picked(tmp: Path) -> list[tuple[str, object, list[str]]]:
    """(label, call, strings one of which a clear message contains)."""
    toy = gym.make("TextGenToy-v0").unwrapped
    vec = gym.make_vec("TextGenToy-v0", num_envs=3, vectorization_mode="vector_entry_point").unwrapped
    lm = gym.make("TextGen-v0", max_new_tokens=4).unwrapped

    def reset_then(env, fn):
        def call():
            env.reset(seed=0)
            fn()
        return call

    cases = []
    for value in (2**63, -1, 8, 9, 2**40, 1.5, float("nan"), "3", None, True, [1, 2], np.float32(2), np.array([1, 2])):
        cases.append((f"toy step({value!r})", reset_then(toy, lambda v=value: toy.step(v)), [str(value), type(value).__name__, "dtype", "shape"]))
    for value in (8192, 1, 2**63, -5, 2.0):  # 1 is the pad id of the shipped tokenizer: masked
        cases.append((f"lm step({value!r})", reset_then(lm, lambda v=value: lm.step(v)), [str(value), type(value).__name__]))
    for dtype in (np.float32, np.float64, np.bool_):
        cases.append((f"vector step dtype {dtype.__name__}", reset_then(vec, lambda d=dtype: vec.step(np.array([1, 0, 1], dtype=d))), [np.dtype(dtype).name]))
    cases.append(("vector step uint64 2**64-1", reset_then(vec, lambda: vec.step(np.array([2**64 - 1, 0, 1], dtype=np.uint64))), [str(2**64 - 1)]))
    cases.append(("vector step shape (2,)", reset_then(vec, lambda: vec.step(np.array([1, 0]))), ["(2,)"]))
    for seed in (1.5, -1, "7", [1, 2], [0, -3, 1], float("nan")):
        cases.append((f"vector reset(seed={seed!r})", lambda s=seed: vec.reset(seed=s), [repr(seed), str(seed), "-3"]))
        cases.append((f"toy reset(seed={seed!r})", lambda s=seed: toy.reset(seed=s), [repr(seed), str(seed)]))
    for options in ("prompt", 5, {"promt": "x"}, {"prompt": ""}, {"prompt": 3}, {"prompt": "hello world"},
                    {"prompt": "the <|endoftext|> movie"}):
        cases.append((f"toy reset(options={options!r})", lambda o=options: toy.reset(options=o),
                      [repr(options), str(options), *(f(v) for v in (options.values() if isinstance(options, dict) else ()) for f in (str, repr)), "promt"]))
    for options in ({"prompt": "a <|pad|> b"}, {"prompt": "word " * 300}):
        cases.append((f"lm reset(options={str(options)[:30]!r})", lambda o=options: lm.reset(options=o), ["<|pad|>", "word word"]))
    for kwargs in ({"max_new_tokens": "16"}, {"max_new_tokens": 10**9}, {"max_new_tokens": 0}, {"max_new_tokens": 4.0},
                   {"kl_coef": float("nan")}, {"kl_coef": float("inf")}, {"kl_coef": -1}, {"device": "gpu"}, {"device": "cuda"},
                   {"prompts": []}, {"prompts": ["hello world"]}, {"prompts": 7}):
        cases.append((f"make TextGenToy-v0 {kwargs}", lambda k=kwargs: gym.make("TextGenToy-v0", **k),
                      [repr(v) for v in kwargs.values()] + [str(v) for v in kwargs.values()] + ["cuda", "CUDA", "empty", "hello world"]))
    for kwargs in ({"num_envs": 0}, {"num_envs": 2.5}, {"num_envs": 10**9}):
        cases.append((f"make_vec TextGenToy-v0 {kwargs}", lambda k=kwargs: gym.make_vec("TextGenToy-v0", vectorization_mode="vector_entry_point", **k),
                      [str(v) for v in kwargs.values()]))
    for kwargs in ({"shots": 10**6}, {"shots": -1}, {"top_p": 0.0}, {"top_k": -2}, {"prompt_split": "dev"}, {"kl_coef": float("nan")},
                   {"variant": "chat"}, {"max_new_tokens": 10**6}):
        env_id = "TextGenFewShot-v0" if "shots" in kwargs else "TextGen-v0"
        cases.append((f"make {env_id} {kwargs}", lambda e=env_id, k=kwargs: gym.make(e, **k), [str(v) for v in kwargs.values()]))

    # files
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes("Caf\xe9 was great\n".encode("latin-1"))
    binary = tmp / "binary.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    empty_side = tmp / "empty.jsonl"
    empty_side.write_text(json.dumps({"prompt": "Film:", "chosen": "", "rejected": " bad"}) + "\n")
    same = tmp / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Film:", "chosen": " x", "rejected": " x"}) + "\n")
    from rlhf.preferences import load_jsonl

    cases.append(("make TextGen-v0 prompts=<latin-1 file>", lambda: gym.make("TextGen-v0", prompts=str(latin1)), [str(latin1)]))
    cases.append(("load_jsonl(<binary file>)", lambda: load_jsonl(binary), [str(binary)]))
    cases.append(("load_jsonl(empty chosen)", lambda: load_jsonl(empty_side), ["chosen", str(empty_side)]))
    cases.append(("load_jsonl(chosen == rejected)", lambda: load_jsonl(same), ["chosen", str(same)]))

    # model dirs
    import shutil

    from pretrain import default_model_dir, load_lm
    from rlhf import RewardModel, default_reward_model_dir

    bad_manifest = tmp / "bad-manifest"
    shutil.copytree(default_model_dir(), bad_manifest)
    (bad_manifest / "manifest.json").write_text("{not json")
    no_sha = tmp / "no-sha"
    shutil.copytree(default_model_dir(), no_sha)
    (no_sha / "manifest.json").write_text('{"command": "x"}')
    truncated_rm = tmp / "truncated-rm"
    shutil.copytree(default_reward_model_dir(), truncated_rm)
    (truncated_rm / "manifest.json").unlink()
    data = (truncated_rm / "model.safetensors").read_bytes()
    (truncated_rm / "model.safetensors").write_bytes(data[: len(data) // 2])
    nan_lm = tmp / "nan-lm"
    shutil.copytree(default_model_dir(), nan_lm)
    (nan_lm / "manifest.json").unlink()
    from safetensors.torch import load_file, save_file

    weights = load_file(str(nan_lm / "model.safetensors"))
    first = next(iter(weights))
    weights[first] = weights[first].clone()
    weights[first].view(-1)[0] = float("nan")
    save_file(weights, str(nan_lm / "model.safetensors"), metadata={"format": "pt"})
    cases.append(("load_lm(bad manifest.json)", lambda: load_lm(bad_manifest), [str(bad_manifest)]))
    cases.append(("load_lm(manifest without sha256)", lambda: load_lm(no_sha), [str(no_sha)]))
    cases.append(("RewardModel.load(truncated, no manifest)", lambda: RewardModel.load(truncated_rm), [str(truncated_rm)]))
    cases.append(("load_lm(NaN weights, no manifest)", lambda: load_lm(nan_lm), [str(nan_lm)]))
    cases.append(("load_lm(<reward-model dir>)", lambda: load_lm(default_reward_model_dir()), ["ForSequenceClassification"]))

    # CLI
    cases.append(("textgym sample --prompt ''", cli(["sample", "--prompt", ""]), ["prompt"]))
    cases.append(("textgym sample --model <reward-model dir>", cli(["sample", "--model", str(default_reward_model_dir())]), ["ForSequenceClassification"]))
    cases.append(("textgym train ppo --kl-coef nan", cli(["train", "ppo", "--kl-coef", "nan", "--out", str(tmp / "r1")]), ["kl_coef"]))
    cases.append(("textgym train ppo --lr-rate 3", cli(["train", "ppo", "--lr-rate", "3", "--out", str(tmp / "r2")]), ["--lr-rate"]))

    # replay
    from agents.replay import PrioritizedReplayBuffer

    def zero_priority():
        buf = PrioritizedReplayBuffer(8, 4, eps=0.0)
        for _ in range(3):
            buf.add([1], 1, 0.0, [], True, 1.0)
        buf.update_priorities(np.arange(3), np.zeros(3))
        _, weights = buf.sample_indices(4)
        if not np.isfinite(weights).all():
            raise FloatingPointError("nan importance weights")
    cases.append(("PrioritizedReplayBuffer(eps=0), zero TD errors", zero_priority, ["eps"]))
    return cases


def generated_actions(n: int, seed: int = 0) -> dict[str, int]:
    """Random single and vector actions on the toy env and the shipped env: legal ones must be
    accepted, illegal ones rejected with a clear error."""
    rng = np.random.default_rng(seed)
    counts = {"actions": 0, "legal": 0, "legal_rejected": 0, "illegal": 0, "illegal_clear": 0, "illegal_unclear": 0, "illegal_silent": 0}
    singles = {"toy": gym.make("TextGenToy-v0").unwrapped, "lm": gym.make("TextGen-v0", max_new_tokens=4).unwrapped}
    vectors = {name: gym.make_vec(env_id, num_envs=3, vectorization_mode="vector_entry_point", max_new_tokens=4).unwrapped
               for name, env_id in (("toy", "TextGenToy-v0"), ("lm", "TextGen-v0"))}
    for i in range(n):
        vector = i % 2 == 1
        env = (vectors if vector else singles)["toy" if i % 4 < 2 else "lm"]
        env.reset(seed=int(rng.integers(1000)))
        masks = env.action_masks().reshape(-1, env.action_masks().shape[-1])
        dtype = [*INT_DTYPES, np.float32, np.float64][int(rng.integers(10))]
        size = 3 if vector else 1
        values = rng.integers(-3, masks.shape[1] + 3, size=size)
        if np.dtype(dtype).kind in "iu":
            info = np.iinfo(dtype)
            values = np.clip(values, info.min, info.max)
        actions = values.astype(dtype)
        legal = np.dtype(dtype).kind in "iu" and all(0 <= int(a) < masks.shape[1] and masks[j, int(a)] for j, a in enumerate(actions))
        action = actions if vector else actions[0]
        names = [str(int(a)) for a in actions if np.dtype(dtype).kind in "iu"] + [np.dtype(dtype).name, str(action)]
        outcome = run_case(lambda e=env, a=action: e.step(a), names, illegal=not legal)
        counts["actions"] += 1
        if legal:
            counts["legal"] += 1
            counts["legal_rejected"] += outcome == "rejected"
        else:
            counts["illegal"] += 1
            counts[f"illegal_{outcome if outcome in ('clear', 'unclear', 'silent') else 'unclear'}"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=6000, help="generated actions")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, resource.RLIM_INFINITY))
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = {}
        for label, call, names in hand_picked(Path(tmp)):
            outcomes[label] = run_case(call, [n for n in names if n])
    summary = {k: sum(v == k for v in outcomes.values()) for k in ("clear", "unclear", "silent", "crash")}
    result = {"hand_picked": {"inputs": len(outcomes), **summary,
                              "not_clear": {k: v for k, v in outcomes.items() if v != "clear"}},
              "generated": generated_actions(args.actions)}
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
