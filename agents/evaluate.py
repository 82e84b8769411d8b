"""Evaluate trained policies on held-out prompts: gold, RM, KL to the reference, diversity, fluency.

    textgym eval --runs runs/ppo runs/reinforce --out runs/eval

For every policy dir (a run dir contributes its complete ``checkpoint-<update>/`` dirs and
``final/``, each distinct model once, plus the initial model at KL 0), episodes are played in the env on held-out prompts (the ``test`` split;
the toy env has only its own prompts) with plain sampling, and we report

One evaluator serves every method (PPO, REINFORCE, DQN, SB3, DPO, SFT): ``textgym eval --runs
runs/dpo`` evaluates a DPO run exactly like a PPO run.

    gold         mean gold score (VADER compound of prompt + completion; the toy: its true reward)
    rm           mean reward-model score (what the agent optimised)
    kl_ref       E_y~pi[ sum_t log pi(y_t|.) - log pi_ref(y_t|.) ], the sequence KL to the reference
    kl_se        its standard error over the episodes
    distinct_1/2 distinct uni/bigrams over all completions
    ref_ppl      the reference LM's perplexity of the completions

to ``eval.json``, and ``eval.png``: gold-vs-KL and RM-vs-KL, one point per model, one series per run.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from agents.policy import LMPolicy, load_reference, reference_logprobs
from agents.rollout import collect_rollout
from agents.run import make_env, make_policy_model
from agents.task_config import TaskConfig, task_kwargs
from pretrain.adapters import adapter_path, is_adapter_dir
from pretrain.config import hparam, require_positive, validate_fields
from pretrain.model import resolve_device, resolve_model_path, sha256_file
from pretrain.progress import progress_bar
from pretrain.run_dir import FINAL, RUN_FILE, RunDir, verify_dir
from rlhf.kl import warn_if_negative_kl


@dataclass
class EvalConfig(TaskConfig):
    """Compare policies (run dirs or HF model dirs) on held-out prompts. The task (env, reward, judge,
    prompts) is the runs' own, from their run.json; a flag given here replaces it for every run."""

    runs: list[str] = hparam(None, "run dirs (from textgym train, dpo, sft) and/or HF model dirs to evaluate")
    env: str = hparam("auto", "env whose reward and gold scorer to use: 'auto' = the runs' env (TextGen-v0 for model dirs)")
    model: str = hparam("auto", "the LM the env is built on (its tokenizer and prompts' encoding): 'auto' = the runs' initial "
                                "model, 'default' or an HF causal-LM dir")
    reference: str = hparam("auto", "reference model for KL: 'auto' = each run's initial model")
    episodes: int = hparam(256, "held-out episodes per model")
    num_envs: int = hparam(64, "episodes per batch")
    max_new_tokens: int = hparam(16, "tokens per episode")
    seed: int = hparam(1234, "sampling seed (the same for every model)")
    device: str = hparam("auto", "'auto', 'cpu' or 'cuda'")
    out: str = hparam("runs/eval", "output dir for eval.json and eval.png")
    overwrite: bool = hparam(False, "write into --out even if it holds another run or other files")

    def __post_init__(self):
        validate_fields(self)
        self.validate_task()
        if not self.runs:
            raise ValueError("give at least one run or model dir with --runs")
        require_positive(self, "episodes", "num_envs", "max_new_tokens")


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over whitespace tokens of all texts (Li et al. 2016)."""
    ngrams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def is_model_dir(path: Path) -> bool:
    """An HF model dir, or a peft adapter dir (``pretrain.load_lm`` loads it on its base)."""
    return (Path(path) / "config.json").is_file() or is_adapter_dir(path)


def models_of(path: Path) -> tuple[str, list[tuple[str, Path]], str | None]:
    """(series name, [(label, model dir)], initial model recorded by the run)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a run dir or an HF model dir)")
    if is_model_dir(path):
        return path.name, [(path.name, path)], None
    candidates = [p for _, p in sorted(RunDir.list_checkpoints(path))] + [path / FINAL]
    found, seen = [], {}
    for model_dir in candidates:
        if is_model_dir(model_dir) and verify_dir(model_dir) is None:
            # An adapter run's checkpoints and a prompt-tuned final/ hold the adapter alone (base + adapter load).
            weights = model_dir / "model.safetensors"
            digest = sha256_file(weights if weights.is_file() else adapter_path(model_dir) / "adapter_model.safetensors")
            if digest in seen:  # the last checkpoint is the final model: evaluate it once, as final
                found.remove(seen[digest])
            seen[digest] = (model_dir.name, model_dir)
            found.append(seen[digest])
    if not found:
        raise FileNotFoundError(f"{path} holds no complete model: expected config.json, or checkpoint-<update>/ or final/ inside")
    initial = None
    if (path / RUN_FILE).is_file():
        initial = json.loads((path / RUN_FILE).read_text()).get("config", {}).get("model")
    if (path / "summary.json").is_file():  # an SB3 run (agents.sb3)
        initial = json.loads((path / "summary.json").read_text()).get("initial_model", initial)
    if (path / "init-model" / "config.json").is_file():
        initial = str(path / "init-model")
    return path.name, found, initial


@torch.no_grad()
def evaluate_model(model_dir, reference, env, episodes: int, seed: int, progress=None, task=None,
                   prompts: Sequence[str] | None = None) -> dict[str, float]:
    """Metrics of one policy over ``episodes`` held-out episodes (``progress.update(task, advance=n)`` per batch).

    ``prompts``: the episodes' prompts, in order, ``env.num_envs`` per batch (at least ``episodes``
    of them, a multiple of ``num_envs``), instead of the env's own draws. The env redraws a row's
    prompt when its episode ends, so two policies that end episodes at other steps are otherwise
    scored on other prompts after the first batch; with the same ``prompts`` and ``seed`` they are
    scored on the same prompts with the same random numbers, and their scores differ by the
    policies alone. Raises ``ValueError`` for too few prompts or a count that is not a multiple."""
    n = env.num_envs
    if prompts is not None and (len(prompts) < episodes or len(prompts) % n):
        raise ValueError(f"prompts: need at least episodes={episodes} and a multiple of the env's num_envs={n}, got {len(prompts)}")
    policy = LMPolicy.load(model_dir, env.device, valid_actions=env.valid_actions, value_head=False).eval()
    torch.manual_seed(seed)
    env.reset(seed=seed)
    gold, rm, kls, texts, prompts_seen, ref_nll, n_tokens = [], [], [], [], [], 0.0, 0
    while len(gold) < episodes:
        rollout = collect_rollout(env, policy, None if prompts is None else list(prompts[len(gold) : len(gold) + n]))
        logprobs, _, _ = policy.evaluate(rollout.input_ids, rollout.attention_mask, rollout.completion_start, entropy="none")
        ref = reference_logprobs(rollout, reference, policy.valid_actions)
        mask = rollout.completion_mask.float()
        kls += ((logprobs - ref) * mask).sum(1).tolist()
        ref_nll -= float((ref * mask).sum())
        n_tokens += int(mask.sum())
        gold += rollout.gold_scores.tolist()
        rm += rollout.rm_scores.tolist()
        texts += rollout.texts
        prompts_seen += rollout.prompts
        if progress is not None:
            progress.update(task, advance=min(len(rollout.texts), episodes - len(gold) + len(rollout.texts)),
                            status=str(model_dir)[-40:])
    k = episodes
    warn_if_negative_kl(torch.tensor(kls[:k]), f"KL of {model_dir} to its reference")
    return {
        "gold": float(np.mean(gold[:k])),
        "rm": float(np.mean(rm[:k])),
        "kl_ref": float(np.mean(kls[:k])),
        "kl_se": float(np.std(kls[:k], ddof=1) / math.sqrt(k)) if k > 1 else 0.0,
        "distinct_1": distinct_n(texts[:k], 1),
        "distinct_2": distinct_n(texts[:k], 2),
        "ref_ppl": math.exp(ref_nll / max(n_tokens, 1)),
        "episodes": k,
        "samples": [{"prompt": p, "completion": t} for p, t in zip(prompts_seen[:3], texts[:3])],
    }


TASK_FIELDS = tuple(f.name for f in fields(TaskConfig) if f.name != "model")


def eval_task(cfg: EvalConfig, run_paths: Sequence[str], given: set[str]) -> TaskConfig:
    """The task the runs were trained on (their run.json), with the fields of ``cfg`` in ``given``
    (set on the command line, or differing from the defaults) on top. ``ValueError`` when runs of
    different tasks are compared without flags that make the task one."""
    defaults = TaskConfig()
    tasks = {}
    for path in run_paths:
        saved = {}
        if (Path(path) / RUN_FILE).is_file():
            saved = json.loads((Path(path) / RUN_FILE).read_text()).get("config", {})
        task = {name: saved.get(name, getattr(defaults, name)) for name in TASK_FIELDS}
        tasks[str(path)] = {k: v for k, v in task.items() if k not in given}
    distinct = {json.dumps(t, sort_keys=True) for t in tasks.values()}
    if len(distinct) > 1:
        keys = sorted({k for t in tasks.values() for k in t if len({json.dumps(u.get(k)) for u in tasks.values()}) > 1})
        raise ValueError(f"the runs were trained on different tasks (they differ in {', '.join(keys)}); evaluate them "
                         f"separately, or set {', '.join('--' + k.replace('_', '-') for k in keys)} to judge them alike")
    merged = json.loads(distinct.pop()) if distinct else {}
    task = TaskConfig(**{**merged, **{k: getattr(cfg, k) for k in given if k in TASK_FIELDS}, "model": cfg.model})
    if task.env == "auto":
        task.env = "TextGen-v0"
    return task


def evaluate(cfg: EvalConfig) -> dict:
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    runs = [(run_path, *models_of(Path(run_path))) for run_path in cfg.runs]  # every path checked before any work
    defaults = EvalConfig(runs=["-"])
    given = {name for name in TASK_FIELDS if getattr(cfg, name) != getattr(defaults, name)}
    task = eval_task(cfg, cfg.runs, given)
    RunDir(out, "eval", overwrite=cfg.overwrite, config=asdict(cfg))
    if task.prompts and not task.eval_prompts and not Path(task.prompts).is_dir():
        warnings.warn(f"no held-out prompts (--eval-prompts) were given with --prompts {task.prompts}: evaluating on the "
                      "training prompts", stacklevel=2)
    env_kwargs = dict(max_new_tokens=cfg.max_new_tokens, prompt_split="test", **task_kwargs(task, split="test"))
    env = make_env(task.env, cfg.num_envs, device, cfg.seed, model=cfg.model, **env_kwargs)
    initials = {str(initial) for _, _, _, initial in runs if initial and initial != "auto"}
    if cfg.model == "auto" and env.lm_path is not None and len(initials) == 1:  # the runs' own LM, e.g. a user's
        initial = Path(resolve_model_path(initials.pop())).resolve()
        if initial != Path(env.lm_path).resolve():
            env = make_env(task.env, cfg.num_envs, device, cfg.seed, model=str(initial), **env_kwargs)
    results: dict[str, list[dict]] = {}
    n_models = sum(1 + len(models) for _, _, models, _ in runs)
    with progress_bar("eval") as progress:
        task = progress.add_task("eval", total=n_models * cfg.episodes)
        for _run_path, series, models, initial in runs:
            initial = initial if cfg.reference == "auto" else cfg.reference
            initial = make_policy_model(initial or "auto", env, out, 0) if (initial or "auto") == "auto" else initial
            reference = load_reference(initial, env, device)
            points = [{"model": str(initial), "label": "initial",
                       **evaluate_model(initial, reference, env, cfg.episodes, cfg.seed, progress, task)}]
            for label, model_dir in models:
                points.append({"model": str(model_dir), "label": label,
                               **evaluate_model(model_dir, reference, env, cfg.episodes, cfg.seed, progress, task)})
            results[series] = points
    for series, points in results.items():
        for p in points:
            print(f"{series:>16} {p['label']:>10}  gold {p['gold']:+.3f}  rm {p['rm']:+.3f}  kl {p['kl_ref']:.2f}  "
                  f"distinct-2 {p['distinct_2']:.2f}  ref-ppl {p['ref_ppl']:.1f}")
    (out / "eval.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "eval.png")
    return results


def plot(results: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for series, points in results.items():
        kl = [p["kl_ref"] for p in points]
        for ax, key in zip(axes, ("gold", "rm")):
            ax.plot(kl, [p[key] for p in points], marker="o", label=series)
    for ax, key in zip(axes, ("gold score", "reward-model score")):
        ax.set_xlabel("KL(pi || pi_ref) per sequence (nats)")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("gold vs KL")
    axes[1].set_title("RM vs KL")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
