"""The gold-vs-KL frontier: how much true reward each method buys per nat of KL to the reference.

A single run says little: every RLHF method has a strength knob (the KL coefficient or target of
PPO/REINFORCE/GRPO, DPO's beta, best-of-n's n) that trades reward against drift from the reference
policy. Sweeping the knob and plotting each evaluated policy as a point

    x = KL(pi || pi_ref)   sequence KL to the reference, nats per sequence
    y = gold score gain    gold (true) score of pi minus that of pi_ref

gives a cloud per method; its upper-left Pareto frontier (no other point of the method has both
lower KL and higher gold) is the method's best achievable trade-off. Comparing frontiers, not single
runs, is how the DPO paper compares methods (Rafailov et al. 2023, "Direct Preference Optimization",
Fig. 2: "DPO produces by far the most efficient frontier").

Optimising a learned (proxy) reward model eventually hurts the gold score. Gao, Schulman & Hilton
(2022), "Scaling Laws for Reward Model Overoptimization", Sec. 1, found with d = sqrt(KL):

    best-of-n:  R_bon(d) = d (alpha_bon - beta_bon d)
    RL:         R_RL(d)  = d (alpha_RL  - beta_RL log d)          R(0) := 0

so the gold gain rises, peaks at d*, and falls. :func:`fit_gao` fits these forms by linear least
squares and reports the peak.

Best-of-n sampling (draw n completions from pi_ref, keep the one the proxy scores highest) trains
nothing; its KL is known in closed form, :func:`best_of_n_kl` (Stiennon et al. 2020, "Learning to
summarize from human feedback").

``textgym frontier`` (:func:`frontier`) runs the whole comparison: it trains every method of
``--methods`` at each strength of its sweep (:data:`SWEEPS`: the KL coefficient of the RL agents,
DPO's and IPO's beta; checkpoints along each run, so each run traces a curve), evaluates every
checkpoint with the one evaluator (``textgym eval``: held-out prompts, the same seed), draws
best-of-n from the base model for each n, and writes ``frontier.json`` (every point), the plots
``gold_vs_kl.png``, ``proxy_vs_kl.png``, ``gold_vs_proxy.png`` and ``frontier.md`` (the best gold
within KL budgets, and the Gao fits). Finished runs and evaluations are skipped, an interrupted run
is resumed, so the command can be stopped and started again.

The analysis functions are pure functions of evaluated points: the KL of best-of-n, the Pareto
frontier, the Gao fit, the KL-budget table and the plots. A point is a dict

    {"kl": float, "gold": float, "kl_se": float (optional), "proxy": float (optional), "label": str (optional)}

with "gold" the gain over the reference's gold score; ``points_by_method`` maps a method name to its
points (one per evaluated run or checkpoint).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from agents.evaluate import EvalConfig, distinct_n, evaluate, evaluate_model
from agents.policy import LMPolicy, load_reference
from agents.rollout import collect_rollout
from agents.run import make_env, make_policy_model
from agents.task_config import TaskConfig, task_kwargs
from pretrain.config import hparam, require_non_negative, require_positive, validate_fields
from pretrain.model import resolve_device
from pretrain.progress import format_seconds
from pretrain.run_dir import FINAL, RunDir, verify_dir

# ---------------------------------------------------------------------------------------------------
# Best-of-n: the no-training baseline
# ---------------------------------------------------------------------------------------------------


def best_of_n_kl(n: int) -> float:
    """KL(pi_BoN || pi_ref) of best-of-n sampling, in nats per sequence:

        KL_bon(n) = log n - (n - 1) / n

    (Stiennon et al. 2020, appendix; Gao et al. 2022, Sec. 2). Derivation: with a continuous reward
    and no ties, the reference-quantile u = F(r(y)) of the selected sample has density n u^(n-1)
    on [0, 1], so KL = E[log(n u^(n-1))] = log n + (n-1) E[log u] = log n - (n-1)/n. With ties
    (a discrete reward, or few distinct completions) it is an upper bound (Beirami et al. 2024,
    "Theoretical guarantees on the best-of-n alignment policy"). n = 1 gives 0; it grows like log n.

    Raises ValueError if n is not an integer >= 1.
    """
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"best-of-n needs an integer n >= 1, got n={n!r}")
    n = int(n)
    return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------------------------------------------
# The Pareto frontier
# ---------------------------------------------------------------------------------------------------


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the upper-left Pareto frontier of ``(kl, score)`` pairs, sorted by increasing KL.

    A point is on the frontier if no other point has KL <= its KL and score >= its score with at
    least one of the two strict (lower KL and higher score are both better). Ties, deterministically:

    - equal KL: only the highest score stays (the others are dominated);
    - equal score: only the lowest KL stays;
    - exact duplicates (same KL and score): only the first one (lowest index) stays.

    So the returned KLs are strictly increasing and the scores strictly increasing too. ``points`` is
    any sequence of pairs (or an (N, 2) array); an empty input gives []. Raises ValueError if a
    value is NaN.
    """
    pairs = [(float(kl), float(score)) for kl, score in points]
    for i, (kl, score) in enumerate(pairs):
        if math.isnan(kl) or math.isnan(score):
            raise ValueError(f"point {i} is ({kl}, {score}): the Pareto frontier needs numbers, not NaN")
    # Sweep by increasing KL (ties: best score first, then the lowest index); a point is on the
    # frontier iff it beats every score seen at lower-or-equal KL.
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i][0], -pairs[i][1], i))
    frontier, best_score = [], -math.inf
    for i in order:
        if pairs[i][1] > best_score:
            frontier.append(i)
            best_score = pairs[i][1]
    return frontier


# ---------------------------------------------------------------------------------------------------
# Gao et al. (2022): gold score vs d = sqrt(KL)
# ---------------------------------------------------------------------------------------------------

GAO_FORMS = ("rl", "bon")


@dataclass
class GaoFit:
    """A fitted Gao et al. (2022) curve gold(d) = d (alpha - beta log d) ("rl") or d (alpha - beta d) ("bon")."""

    form: str
    """'rl' or 'bon'"""
    alpha: float
    """the initial slope of gold in d (gold score gain per sqrt-nat)"""
    beta: float
    """the strength of over-optimisation: > 0 means the curve turns over"""
    peak_d: float
    """d* = argmax over d >= 0 of the curve: exp(alpha/beta - 1) (rl), alpha/(2 beta) (bon); inf when it
    never turns over (beta < 0, or beta = 0 < alpha); 0 when it never rises above 0"""
    peak_kl: float
    """d*^2, in nats per sequence"""
    peak_gold: float
    """the curve at d*: the predicted best gold gain (inf when unbounded)"""
    r2: float
    """1 - SS_res / SS_tot on the fitted points (the form has no intercept, so it can be < 0; NaN if all
    gold values are equal)"""
    n_points: int
    """points used (those with KL > 0)"""


def _design(d: np.ndarray, form: str) -> np.ndarray:
    """(N, 2) design matrix: gold = X @ [alpha, beta]. d log d -> 0 at d = 0."""
    if form == "rl":
        d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
        return np.stack([d, -d_log_d], axis=1)
    if form == "bon":
        return np.stack([d, -d * d], axis=1)
    raise ValueError(f"unknown Gao form {form!r}: choose one of {GAO_FORMS}")


def _peak(alpha: float, beta: float, form: str) -> tuple[float, float]:
    """(d*, gold(d*)) of the curve over d >= 0."""
    if beta < 0 or (beta == 0 and alpha > 0):
        return math.inf, math.inf  # never turns over
    if beta == 0:
        return 0.0, 0.0  # gold = alpha d <= 0: best at the reference
    if form == "rl":
        # d/dd [alpha d - beta d log d] = alpha - beta (log d + 1) = 0; there gold = beta d*
        exponent = alpha / beta - 1
        if exponent > 700:  # beyond float range
            return math.inf, math.inf
        peak_d = math.exp(exponent)
        return peak_d, beta * peak_d
    # bon: d/dd [alpha d - beta d^2] = alpha - 2 beta d = 0; there gold = alpha^2 / (4 beta)
    if alpha <= 0:
        return 0.0, 0.0
    return alpha / (2 * beta), alpha**2 / (4 * beta)


def fit_gao(kl: Sequence[float], gold_gain: Sequence[float], form: str) -> GaoFit:
    """Fit Gao et al.'s (2022, Sec. 1) form to (KL, gold gain) points by linear least squares.

    With d = sqrt(kl), both forms are linear in (alpha, beta):

        rl:   gold = alpha * d - beta * d log d      design columns [d, -d log d]
        bon:  gold = alpha * d - beta * d^2          design columns [d, -d^2]

    and are solved on gold directly (not on gold / d, which would weight small-d points up).

    Args:
        kl: (N,) KL(pi || pi_ref) of each point, nats per sequence. Points with KL <= 0 are dropped
            (d = 0 carries no information: every curve passes through 0 there, and a KL estimate
            slightly below 0 is noise around the reference).
        gold_gain: (N,) gold score minus the reference's gold score (the curve has R(0) = 0).
        form: "rl" (any trained method: PPO, REINFORCE, DPO, ...) or "bon" (best-of-n).

    Raises ValueError for an unknown form, mismatched lengths, NaN values, or fewer than 2 points
    with KL > 0 at distinct KLs (two parameters need two equations).
    """
    if form not in GAO_FORMS:
        raise ValueError(f"unknown Gao form {form!r}: choose one of {GAO_FORMS}")
    kl = np.asarray(kl, dtype=np.float64).ravel()
    gold = np.asarray(gold_gain, dtype=np.float64).ravel()
    if kl.shape != gold.shape:
        raise ValueError(f"kl and gold_gain differ in length: {kl.size} vs {gold.size}")
    if np.isnan(kl).any() or np.isnan(gold).any():
        raise ValueError("kl and gold_gain must not contain NaN")
    keep = kl > 0
    d, gold = np.sqrt(kl[keep]), gold[keep]
    if d.size < 2:
        raise ValueError(f"the Gao fit needs at least 2 points with KL > 0, got {d.size} (of {kl.size}); "
                         "evaluate more checkpoints or sweep values")
    design = _design(d, form)
    (alpha, beta), _, rank, _ = np.linalg.lstsq(design, gold, rcond=None)
    if rank < 2:
        raise ValueError(f"the Gao fit needs at least 2 distinct KL values > 0, got {np.unique(d**2).tolist()}")
    alpha, beta = float(alpha), float(beta)
    residuals = gold - design @ np.array([alpha, beta])
    ss_res, ss_tot = float(residuals @ residuals), float(((gold - gold.mean()) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else math.nan
    peak_d, peak_gold = _peak(alpha, beta, form)
    return GaoFit(form=form, alpha=alpha, beta=beta, peak_d=peak_d, peak_kl=peak_d**2, peak_gold=peak_gold,
                  r2=r2, n_points=int(d.size))


def predict(fit: GaoFit, kl: float | Sequence[float] | np.ndarray) -> float | np.ndarray:
    """The fitted gold gain at ``kl`` (nats per sequence; a float or an array of any shape; 0 at KL 0).

    Raises ValueError for a negative KL."""
    kl_array = np.asarray(kl, dtype=np.float64)
    if (kl_array < 0).any():
        raise ValueError(f"KL must be >= 0 to predict, got min {kl_array.min()}")
    d = np.sqrt(kl_array).ravel()
    gold = (_design(d, fit.form) @ np.array([fit.alpha, fit.beta])).reshape(kl_array.shape)
    return float(gold) if gold.ndim == 0 else gold


# ---------------------------------------------------------------------------------------------------
# Reporting: the KL-budget table and the plots
# ---------------------------------------------------------------------------------------------------


def budget_table(points_by_method: Mapping[str, Sequence[Mapping]], budgets: Sequence[float] = (2.0, 5.0, 10.0)) -> str:
    """Markdown table of each method's best gold within each KL budget.

    One row per method (in the mapping's order), one column per budget: the highest "gold" among the
    method's points with "kl" <= budget (the point estimate; "kl_se" is not used), formatted
    ``gold (KL kl)`` with gold to 3 decimals and KL to 2, or '–' if no point is within the budget.
    A tie in gold goes to the lower KL. No trailing newline.

    >>> print(budget_table({"bon": [{"kl": 0.19, "gold": 0.1}, {"kl": 3.17, "gold": 0.3}]}, budgets=(2, 5)))
    | method | KL ≤ 2 | KL ≤ 5 |
    |---|---|---|
    | bon | 0.100 (KL 0.19) | 0.300 (KL 3.17) |
    """
    header = "| method | " + " | ".join(f"KL ≤ {budget:g}" for budget in budgets) + " |"
    rows = [header, "|---" * (len(budgets) + 1) + "|"]
    for method, points in points_by_method.items():
        cells = []
        for budget in budgets:
            within = [p for p in points if p["kl"] <= budget]
            if not within:
                cells.append("–")
                continue
            best = max(within, key=lambda p: (p["gold"], -p["kl"]))
            cells.append(f"{best['gold']:.3f} (KL {best['kl']:.2f})")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


AXIS_LABELS = {
    "kl": "KL(pi || pi_ref) [nats per sequence]",
    "gold": "gold score gain",
    "proxy": "proxy (reward-model) score",
}


def plot_frontier(points_by_method: Mapping[str, Sequence[Mapping]], path: str | Path, x: str = "kl", y: str = "gold",
                  xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
                  frontier: bool | None = None) -> Path:
    """Scatter every method's points (one colour per method) and draw its Pareto frontier; save a PNG.

    Args:
        points_by_method: method name -> points (dicts holding the keys ``x`` and ``y``).
        path: the PNG to write (parent dirs are created).
        x, y: the point keys to plot: ("kl", "gold") for the frontier (Rafailov et al. 2023, Fig. 2),
            ("kl", "proxy") for the optimised score, ("proxy", "gold") for Gao et al.'s gold vs proxy.
            If the points have ``f"{x}_se"`` (e.g. "kl_se"), it is drawn as a horizontal error bar.
        xlabel, ylabel, title: default to :data:`AXIS_LABELS` (with units) and "y vs x".
        frontier: draw each method's upper-left Pareto frontier (lower x, higher y) as a line; by
            default only when x is "kl" (for x = "proxy", lower is not better).

    Returns the path. Raises ValueError if a point lacks ``x`` or ``y``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if frontier is None:
        frontier = x == "kl"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, (method, points) in enumerate(points_by_method.items()):
        for j, p in enumerate(points):
            if x not in p or y not in p:
                raise ValueError(f"point {j} of {method!r} has no {x!r} or {y!r}: {p}")
        xs = np.array([p[x] for p in points], dtype=np.float64)
        ys = np.array([p[y] for p in points], dtype=np.float64)
        color = f"C{i % 10}"
        if any(f"{x}_se" in p for p in points):
            x_se = [p.get(f"{x}_se", 0.0) for p in points]
            ax.errorbar(xs, ys, xerr=x_se, fmt="none", ecolor=color, alpha=0.5, capsize=2)
        ax.scatter(xs, ys, color=color, alpha=0.6, s=20, label=method)
        if frontier and len(points):
            on_frontier = pareto_frontier(list(zip(xs, ys)))
            ax.plot(xs[on_frontier], ys[on_frontier], color=color, linewidth=1.5)
    ax.set_xlabel(xlabel or AXIS_LABELS.get(x, x))
    ax.set_ylabel(ylabel or AXIS_LABELS.get(y, y))
    ax.set_title(title or f"{y} vs {x}")
    ax.grid(alpha=0.3)
    if points_by_method:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# The sweep: train, evaluate, draw best-of-n, report
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """How ``textgym frontier`` runs one method: its command, the strength it sweeps and the values."""

    command: tuple[str, ...]  # the textgym subcommand (and fixed flags)
    knob: str  # the config field swept: the KL coefficient, or DPO's beta
    values: tuple[float, ...]  # the default sweep
    quick: tuple[float, ...]  # --quick's
    checkpoint_every: int = 8  # updates (DPO: optimizer steps) between the checkpoints that trace the curve

    @property
    def is_dpo(self) -> bool:
        return self.command[0] == "dpo"


SWEEPS: dict[str, Sweep] = {
    "ppo": Sweep(("train", "ppo"), "kl_coef", (0.02, 0.05, 0.15), (0.05,)),
    "reinforce": Sweep(("train", "reinforce"), "kl_coef", (0.02, 0.05, 0.15), (0.05,)),
    "grpo": Sweep(("train", "grpo"), "kl_coef", (0.02, 0.05, 0.15), (0.05,)),
    "trpo": Sweep(("train", "trpo"), "kl_coef", (0.05, 0.15), (0.05,)),
    "dqn": Sweep(("train", "dqn"), "kl_coef", (0.05, 0.1, 0.3), (0.1,)),
    "sb3-ppo": Sweep(("train", "sb3-ppo"), "kl_coef", (0.05,), (0.05,), checkpoint_every=2048),  # env steps
    # A smaller beta lets DPO move further from the reference in its one epoch (0.5 and above barely move it).
    "dpo": Sweep(("dpo",), "beta", (0.01, 0.03, 0.1), (0.1,), checkpoint_every=40),
    "ipo": Sweep(("dpo", "--loss-type", "ipo"), "beta", (0.01, 0.03, 0.1), (0.1,), checkpoint_every=40),
}
BEST_OF_N = "best-of-n"
DEFAULT_METHODS = [BEST_OF_N, "ppo", "reinforce", "grpo", "trpo", "dqn", "dpo", "ipo"]
QUICK_METHODS = [BEST_OF_N, "ppo", "dpo"]


@dataclass
class FrontierConfig(TaskConfig):
    """Sweep every method's strength, evaluate every checkpoint with one evaluator, and draw the
    gold-vs-KL frontier with best-of-n and the Gao et al. (2022) fits. The task flags (env, model,
    reward, judge, prompts) go to every RL run and to the evaluation; DPO and IPO take --model and
    train on pairs sampled from it and labelled by the shipped gold scorer (``textgym dpo``)."""

    methods: list[str] = hparam(None, f"methods to compare: {', '.join([BEST_OF_N, *SWEEPS])} (default: "
                                      f"{' '.join(DEFAULT_METHODS)}; --quick: {' '.join(QUICK_METHODS)})")
    out: str = hparam("runs/frontier", "sweep dir: runs/<method>-<knob>=<value>/, eval/, frontier.json, *.png, frontier.md")
    total_steps: int = hparam(0, "generated tokens per RL run (0 = each method's default; --quick: 2048)")
    best_of_n: list[int] | None = hparam(None, "the n of best-of-n (default: 1 2 4 8 16 32 64; --quick: 1 2 4)")
    dpo_prompts: int = hparam(1000, "prompts whose sampled pairs DPO and IPO train on (one data set for every beta)")
    episodes: int = hparam(0, "held-out episodes per evaluated model, and prompts of best-of-n (0 = 256; --quick: 64)")
    num_envs: int = hparam(64, "episodes per batch when evaluating")
    max_new_tokens: int = hparam(16, "tokens per episode, in training, evaluation and DPO's data")
    budgets: list[float] | None = hparam(None, "KL budgets of the table, nats per sequence (default: 2 5 10 20)")
    quick: bool = hparam(False, "a few-minute sweep: ppo, dpo and best-of-n at one strength each, short runs")
    seed: int = hparam(0, "seed of every run, and of the evaluation's sampling")
    device: str = hparam("auto", "'auto', 'cpu' or 'cuda'")

    def __post_init__(self):
        validate_fields(self)
        self.validate_task()
        if self.methods is None:
            self.methods = list(QUICK_METHODS if self.quick else DEFAULT_METHODS)
        self.methods = list(dict.fromkeys(self.methods))  # a method named twice runs and counts once
        unknown = [m for m in self.methods if m != BEST_OF_N and m not in SWEEPS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; expected some of {', '.join([BEST_OF_N, *SWEEPS])}")
        if not self.methods:
            raise ValueError("give at least one method with --methods")
        dpo_family = [m for m in self.methods if m in SWEEPS and SWEEPS[m].is_dpo]
        if dpo_family and self.env == "TextGenToy-v0":
            raise ValueError(f"{dpo_family[0]} trains on text preference pairs sampled from an LM and labelled by the gold "
                             "scorer; the toy env has neither: drop it from --methods, or use an LM env")
        if self.best_of_n is None:
            self.best_of_n = [1, 2, 4] if self.quick else [1, 2, 4, 8, 16, 32, 64]
        if not self.best_of_n or any(n < 1 for n in self.best_of_n):
            raise ValueError(f"best_of_n must be integers >= 1, got {self.best_of_n}")
        if self.budgets is None:
            self.budgets = [2.0, 5.0, 10.0, 20.0]
        if any(b <= 0 for b in self.budgets):
            raise ValueError(f"KL budgets must be > 0, got {self.budgets}")
        if self.gold == "none":
            raise ValueError("the frontier is drawn in the gold score: --gold none gives none; name a judge (or leave the env's own)")
        require_non_negative(self, "total_steps", "episodes")
        require_positive(self, "dpo_prompts", "num_envs", "max_new_tokens")

    @property
    def steps(self) -> int:
        return self.total_steps or (2048 if self.quick else 0)

    @property
    def eval_episodes(self) -> int:
        return self.episodes or (64 if self.quick else 256)


def task_flags(cfg: TaskConfig) -> list[str]:
    """The task fields of ``cfg`` that differ from the defaults, as CLI flags for every run."""
    defaults, flags = TaskConfig(), []
    for f in fields(TaskConfig):
        value = getattr(cfg, f.name)
        if value == getattr(defaults, f.name):
            continue
        flags.append(f"--{f.name.replace('_', '-')}")
        flags += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return flags


def run_commands(cfg: FrontierConfig, runs: Path) -> list[tuple[str, str, float, Path, list[str]]]:
    """(method, knob, value, run dir, textgym argv) of every training run of the sweep, DPO and IPO
    sharing the preference data of the first DPO-family run."""
    jobs, pairs = [], None
    for method in cfg.methods:
        if method == BEST_OF_N:
            continue
        sweep = SWEEPS[method]
        for value in sweep.quick if cfg.quick else sweep.values:
            out = runs / f"{method}-{sweep.knob}={value:g}"
            every = sweep.checkpoint_every if not cfg.quick else 5 if sweep.is_dpo else 2
            argv = [*sweep.command, f"--{sweep.knob.replace('_', '-')}", str(value), "--seed", str(cfg.seed), "--device", cfg.device,
                    "--checkpoint-every", str(every), "--keep-checkpoints", "1000"]
            if sweep.is_dpo:
                argv += ["--max-new-tokens", str(cfg.max_new_tokens), "--model", "default" if cfg.model == "auto" else cfg.model]
                if pairs is None:  # the first DPO-family run samples and labels the pairs; the others train on them
                    pairs = out / "train_pairs.jsonl"
                    argv += ["--num-prompts", str(100 if cfg.quick else cfg.dpo_prompts)]
                else:
                    argv += ["--data", str(pairs)]
            else:
                argv += ["--max-new-tokens", str(cfg.max_new_tokens), *task_flags(cfg)]
                if cfg.steps:
                    argv += ["--total-steps", str(cfg.steps)]
            jobs.append((method, sweep.knob, value, out, argv))
    return jobs


def run_is_finished(run: Path) -> bool:
    return (run / FINAL).is_dir() and verify_dir(run / FINAL) is None


def train_run(argv: list[str], run: Path) -> bool:
    """Train one run in a child process (``python -m agents.cli``): a finished run is skipped (returns
    False), an interrupted one resumed from its newest checkpoint. ``RuntimeError`` if the run fails."""
    if run_is_finished(run):
        return False
    if run.is_dir() and RunDir.list_checkpoints(run):
        prefix = argv[:2] if argv[0] == "train" else argv[:1]  # "train ppo" or "dpo": the run keeps its own settings
        argv = [*prefix, "--resume", str(run)]
    else:
        argv = [*argv, "--out", str(run), "--overwrite"]
    result = subprocess.run([sys.executable, "-m", "agents.cli", *argv])
    if result.returncode != 0:
        raise RuntimeError(f"textgym {' '.join(argv)} failed (exit {result.returncode}; its error is above); once that is "
                           "fixed, textgym frontier resumes the sweep")
    return True


@torch.no_grad()
def best_of_n(env, model_dir, ns: Sequence[int], prompts: int, seed: int) -> list[dict]:
    """Best-of-n from the base model on ``prompts`` held-out prompts: max(ns) completions each, and
    for each n the first n of them ranked by the proxy (the env's reward), the best one kept.

    Returns one point per n: "kl" = :func:`best_of_n_kl` (n), "gold_abs" and "proxy" = means over the
    prompts of the kept completion's gold and proxy scores, "gold_base" = the mean gold of all the
    samples (the base model's gold on these very prompts: the baseline of best-of-n's gain, so n = 1
    lands at 0 up to sampling noise), "distinct_2" of the kept texts."""
    policy = LMPolicy.load(model_dir, env.device, valid_actions=env.valid_actions, value_head=False).eval()
    torch.manual_seed(seed)
    env.reset(seed=seed)
    # ``prompts`` draws of the held-out prompts: each once in a random order, cycling when there are fewer.
    chosen = [env.prompts[i] for i in np.resize(np.random.default_rng(seed).permutation(len(env.prompts)), prompts)]
    n_max = max(ns)
    queue = [p for p in chosen for _ in range(n_max)]
    proxy, gold, texts = [], [], []
    for start in range(0, len(queue), env.num_envs):
        part = queue[start : start + env.num_envs]
        rollout = collect_rollout(env, policy, part + part[-1:] * (env.num_envs - len(part)))
        proxy += rollout.rm_scores[: len(part)].tolist()
        gold += rollout.gold_scores[: len(part)].tolist()
        texts += rollout.texts[: len(part)]
    proxy_table = np.array(proxy).reshape(len(chosen), n_max)
    gold_table = np.array(gold).reshape(len(chosen), n_max)
    points = []
    for n in sorted(set(ns)):
        best = proxy_table[:, :n].argmax(1)
        rows = np.arange(len(chosen))
        kept = [texts[i * n_max + j] for i, j in zip(rows, best)]
        points.append({"label": f"n={n}", "n": n, "kl": best_of_n_kl(n), "kl_se": 0.0, "gold_abs": float(gold_table[rows, best].mean()),
                       "gold_base": float(gold_table.mean()), "proxy": float(proxy_table[rows, best].mean()),
                       "distinct_2": distinct_n(kept, 2)})
    return points


def evaluated_run(run: Path, cfg: FrontierConfig, evals: Path) -> tuple[list[dict], bool]:
    """``textgym eval`` of one run (its initial model, checkpoints and final model), cached in
    ``evals/<run>/eval.json`` until the run changes."""
    out = evals / run.name
    cached = out / "eval.json"
    if cached.is_file() and cached.stat().st_mtime >= (run / FINAL).stat().st_mtime:
        return json.loads(cached.read_text())[run.name], False
    eval_cfg = EvalConfig(runs=[str(run)], out=str(out), overwrite=True, episodes=cfg.eval_episodes, num_envs=cfg.num_envs,
                          max_new_tokens=cfg.max_new_tokens, seed=1234 + cfg.seed, device=cfg.device,
                          **{f.name: getattr(cfg, f.name) for f in fields(TaskConfig) if f.name != "model"})
    return evaluate(eval_cfg)[run.name], True


# What the runs and evaluations kept in a sweep dir depend on: a later call must not mix in other settings.
SWEEP_SETTINGS = ("quick", "total_steps", "dpo_prompts", "episodes", "num_envs", "max_new_tokens", "seed",
                  *(f.name for f in fields(TaskConfig)))
SWEEP_FILE = "sweep.json"


def check_same_sweep(cfg: FrontierConfig, out: Path, record: bool = False) -> None:
    """Raise ``ValueError`` naming each setting that differs from the sweep recorded in ``out``: its
    finished runs and evaluations would be reused as if made with these settings (methods, n and
    budgets may change: they add runs or change the report). ``record``: write this sweep's settings
    (once its first run has finished, so a run that fails on a bad setting does not lock the dir)."""
    mine = {name: getattr(cfg, name) for name in SWEEP_SETTINGS}
    path = out / SWEEP_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        differences = [f"{k}: {saved.get(k)!r} there, {v!r} here" for k, v in mine.items() if saved.get(k) != v]
        if differences:
            raise ValueError(f"{out} holds a sweep made with other settings ({'; '.join(differences)}); give another --out")
    elif record:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1))


def frontier(cfg: FrontierConfig) -> dict:
    """``textgym frontier``: train, evaluate, report (module docstring). Returns what frontier.json holds."""
    out = Path(cfg.out)
    runs, evals = out / "runs", out / "eval"
    check_same_sweep(cfg, out)
    jobs = run_commands(cfg, runs)
    n_units = 2 * len(jobs) + (BEST_OF_N in cfg.methods)
    start, done, worked = time.perf_counter(), 0, 0  # units done, and those that did work (skipped ones take no time)

    def report(what: str) -> None:  # the sweep's own progress line, between the runs' bars
        elapsed = time.perf_counter() - start
        eta = elapsed / worked * (n_units - done) if worked else None
        print(f"frontier [{done}/{n_units}] {what}  elapsed {format_seconds(elapsed)}  eta {format_seconds(eta)}", file=sys.stderr,
              flush=True)  # stdout carries the table

    for method, knob, value, run, argv in jobs:
        report(f"training {method} {knob}={value:g} -> {run}")
        worked += train_run(argv, run)
        check_same_sweep(cfg, out, record=True)  # a finished run: from now on the dir holds this sweep
        done += 1
    points: dict[str, list[dict]] = {}
    base = None
    for method, knob, value, run, _argv in jobs:
        report(f"evaluating {run.name}")
        evaluated, ran = evaluated_run(run, cfg, evals)
        for p in evaluated:
            if p["label"] == "initial":
                base = base or p  # the same base model, seed and prompts in every run's evaluation
                if points.get(method):
                    continue
            points.setdefault(method, []).append({"run": run.name, knob: value, "label": p["label"], "kl": p["kl_ref"],
                                                  "kl_se": p["kl_se"], "gold_abs": p["gold"], "proxy": p["rm"],
                                                  "distinct_2": p["distinct_2"], "ref_ppl": p["ref_ppl"]})
        done, worked = done + 1, worked + ran
    if BEST_OF_N in cfg.methods:
        report(f"best-of-n, n = {' '.join(map(str, cfg.best_of_n))}, on {cfg.eval_episodes} draws of the held-out prompts")
        device = resolve_device(cfg.device)
        env = make_env(cfg.env, cfg.num_envs, device, 1234 + cfg.seed, model=cfg.model, max_new_tokens=cfg.max_new_tokens,
                       prompt_split="test", **task_kwargs(cfg, split="test"))
        model_dir = make_policy_model(cfg.model, env, out, cfg.seed)
        if base is None:
            base = evaluate_model(model_dir, load_reference(model_dir, env, device), env, cfg.eval_episodes, 1234 + cfg.seed)
        points[BEST_OF_N] = best_of_n(env, model_dir, cfg.best_of_n, cfg.eval_episodes, cfg.seed)
        done, worked = done + 1, worked + 1
    for method_points in points.values():  # gold as the gain over the base model: the frontier starts at (0, 0)
        for p in method_points:
            p["gold"] = p["gold_abs"] - p.get("gold_base", base["gold"])
    fits = {}
    for method, method_points in points.items():
        try:
            fit = fit_gao([p["kl"] for p in method_points], [p["gold"] for p in method_points], "bon" if method == BEST_OF_N else "rl")
            fits[method] = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(fit).items()}
        except ValueError as err:
            fits[method] = {"error": str(err)}
    result = {"base": {k: base[k] for k in ("gold", "rm", "distinct_2", "ref_ppl")}, "points": points, "gao_fits": fits,
              "budgets": cfg.budgets, "config": asdict(cfg)}
    (out / "frontier.json").write_text(json.dumps(result, indent=1))
    plot_frontier(points, out / "gold_vs_kl.png", "kl", "gold", title="gold vs KL: each method's frontier")
    plot_frontier(points, out / "proxy_vs_kl.png", "kl", "proxy", title="proxy (RM) vs KL")
    plot_frontier(points, out / "gold_vs_proxy.png", "proxy", "gold", title="gold vs proxy")
    table = budget_table(points, cfg.budgets)
    fit_rows = ["| method | form | alpha | beta | peak KL (d*²) | peak gold gain | R² | points |", "|---|---|---|---|---|---|---|---|"]
    for method, fit in fits.items():
        if "error" in fit:
            fit_rows.append(f"| {method} | – | – | – | – | – | – | {fit['error']} |")
            continue
        peak_kl = "never turns over" if fit["peak_kl"] is None else f"{fit['peak_kl']:.2f}"
        peak_gold = "–" if fit["peak_gold"] is None else f"{fit['peak_gold']:+.3f}"
        r2 = "–" if fit["r2"] is None else f"{fit['r2']:.3f}"
        fit_rows.append(f"| {method} | {fit['form']} | {fit['alpha']:.4f} | {fit['beta']:.4f} | {peak_kl} | {peak_gold} | "
                        f"{r2} | {fit['n_points']} |")
    bon_base = f"; best-of-n's over the base model's samples of its own prompt draws, {points[BEST_OF_N][0]['gold_base']:+.3f}" \
        if BEST_OF_N in points else ""
    markdown = (f"Best held-out gold gain over the base model (gold {base['gold']:+.3f}{bon_base}) within each KL budget "
                f"(nats per sequence; the point's KL in parentheses):\n\n{table}\n\n"
                f"Gao et al. (2022) fits on d = sqrt(KL): gold gain = d (alpha - beta log d) (RL, DPO), d (alpha - beta d) "
                f"(best-of-n):\n\n" + "\n".join(fit_rows) + "\n")
    (out / "frontier.md").write_text(markdown)
    done = n_units
    report(f"wrote {out / 'frontier.json'}, {out / 'frontier.md'} and the plots")
    print(markdown)
    return result
