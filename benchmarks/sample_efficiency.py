"""Sample efficiency at equal KL: held-out gold gained per 1,000 generated tokens, method against method.

    python benchmarks/sample_efficiency.py [--methods dqn reinforce] [--seeds 0 1] [--kl 4 8 12] [--out runs/sample-efficiency]

Trains each method with its defaults on the embedded default (``textgym train <method> --seed s
--checkpoint-every 8 --keep-checkpoints 8``: a checkpoint every 4,096 tokens; a run dir that already
holds a finished run is reused), evaluates every checkpoint with the one evaluator (``textgym eval``:
256 held-out episodes each), and prints one JSON object. Along each run's curve of (tokens, KL,
gold) it finds where the held-out sequence KL to the base first reaches each budget, interpolating
linearly between checkpoints, and reports the tokens generated to get there and the gold gain over
the base LM per 1,000 of them; then each method's ratio to the first one listed after it
(``dqn_vs_reinforce``), per seed and as the mean over seeds. About 10 minutes on a 2-core CPU for
the defaults (two methods x two seeds, then the evaluation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def train(method: str, seed: int, out: Path) -> None:
    if (out / "final").is_dir():
        return
    cmd = [sys.executable, "-m", "agents.cli", "train", method, "--seed", str(seed), "--checkpoint-every", "8",
           "--keep-checkpoints", "8", "--out", str(out), "--overwrite"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def curve(run: Path, points: list[dict]) -> list[tuple[float, float, float]]:
    """(tokens, kl, gold) of each evaluated model of a run: initial, checkpoint-<update>, final."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tokens_at = {r["update"]: r["env_steps"] for r in rows}
    out = []
    for p in points:
        label = p["label"]
        tokens = 0 if label == "initial" else rows[-1]["env_steps"] if label == "final" else tokens_at[int(label.split("-")[1])]
        out.append((float(tokens), p["kl_ref"], p["gold"]))
    return sorted(out)


def at_kl(points: list[tuple[float, float, float]], budget: float) -> dict | None:
    """Where the curve's KL first reaches ``budget``: tokens and gold there (linear between checkpoints), or None."""
    base_gold = points[0][2]
    for (t0, k0, g0), (t1, k1, g1) in zip(points, points[1:]):
        if k0 < budget <= k1:
            w = (budget - k0) / (k1 - k0)
            tokens, gold = t0 + w * (t1 - t0), g0 + w * (g1 - g0)
            return {"tokens": round(tokens), "gold": round(gold, 4), "gold_gain_per_1k_tokens": round((gold - base_gold) / tokens * 1000, 5)}
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["dqn", "reinforce"], help="textgym train subcommands; the first is compared to the others")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--kl", nargs="+", type=float, default=[4.0, 8.0, 12.0], help="KL budgets, nats per sequence")
    parser.add_argument("--out", default="runs/sample-efficiency")
    args = parser.parse_args()
    out = Path(args.out)
    runs = {(m, s): out / f"{m}_s{s}" for m in args.methods for s in args.seeds}
    for (method, seed), run in runs.items():
        train(method, seed, run)
    evaluation = out / "eval"
    cmd = [sys.executable, "-m", "agents.cli", "eval", "--runs", *map(str, runs.values()), "--out", str(evaluation), "--overwrite"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((evaluation / "eval.json").read_text())
    report: dict = {"kl_budgets": args.kl, "runs": {}}
    for run in runs.values():
        points = curve(run, results[run.name])
        report["runs"][run.name] = {"curve": [{"tokens": t, "kl": round(k, 3), "gold": round(g, 4)} for t, k, g in points],
                                    **{f"kl_{b:g}": at_kl(points, b) for b in args.kl}}
    first = args.methods[0]
    for other in args.methods[1:]:
        for b in args.kl:
            ratios = []
            for seed in args.seeds:
                a, o = (report["runs"][f"{m}_s{seed}"][f"kl_{b:g}"] for m in (first, other))
                ratios.append(a["gold_gain_per_1k_tokens"] / o["gold_gain_per_1k_tokens"] if a and o and o["gold_gain_per_1k_tokens"] > 0 else None)
            known = [r for r in ratios if r is not None]
            report[f"{first}_vs_{other}_kl_{b:g}"] = {"per_seed": [None if r is None else round(r, 3) for r in ratios],
                                                       "mean": round(float(np.mean(known)), 3) if known else None}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
