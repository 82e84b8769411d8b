import math

import numpy as np
import pytest

from agents.frontier import GaoFit, best_of_n_kl, budget_table, fit_gao, pareto_frontier, plot_frontier, predict

# --- best-of-n KL ----------------------------------------------------------------------------------


def best_of_n_distribution(ref_probs_sorted: np.ndarray, n: int) -> np.ndarray:
    """Exact best-of-n distribution over outcomes sorted by increasing reward: p_i = F(i)^n - F(i-1)^n."""
    cdf = np.cumsum(ref_probs_sorted)
    cdf[-1] = 1.0
    cdf_before = np.concatenate([[0.0], cdf[:-1]])
    return cdf**n - cdf_before**n


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_best_of_n_kl_matches_exact_and_sampled_kl_on_a_toy_distribution(n):
    rng = np.random.default_rng(n)
    n_outcomes = 10_000
    ref_probs = rng.dirichlet(np.ones(n_outcomes))  # a non-uniform reference policy
    rewards = rng.standard_normal(n_outcomes)  # distinct continuous rewards: no ties
    ref_sorted = ref_probs[np.argsort(rewards)]  # index = rank by reward
    bon_probs = best_of_n_distribution(ref_sorted, n)
    assert bon_probs.sum() == pytest.approx(1.0)
    support = bon_probs > 0
    exact_kl = float((bon_probs[support] * np.log(bon_probs[support] / ref_sorted[support])).sum())

    # Monte Carlo: actually run best-of-n (n draws from the reference, keep the highest reward, i.e.
    # the highest rank) and average log pi_bon(y) / pi_ref(y) over the kept samples.
    n_samples = 20_000
    cdf = np.cumsum(ref_sorted)
    draws = np.searchsorted(cdf, rng.random((n_samples, n)) * cdf[-1], side="right")
    kept = np.minimum(draws, n_outcomes - 1).max(axis=1)
    log_ratios = np.log(bon_probs[kept] / ref_sorted[kept])
    sampled_kl, stderr = log_ratios.mean(), log_ratios.std() / math.sqrt(n_samples)

    formula = best_of_n_kl(n)
    assert formula == pytest.approx(math.log(n) - (n - 1) / n)
    assert exact_kl == pytest.approx(formula, abs=1e-4)
    assert exact_kl <= formula + 1e-12  # an upper bound for a discrete reference
    assert sampled_kl == pytest.approx(formula, abs=4 * stderr + 1e-4)
    if n == 1:
        assert formula == 0.0 and sampled_kl == pytest.approx(0.0, abs=1e-12)


def test_best_of_n_kl_is_a_strict_upper_bound_with_few_outcomes():
    ref_sorted = np.full(3, 1 / 3)  # three completions: the continuous-reward formula overestimates
    bon_probs = best_of_n_distribution(ref_sorted, 4)  # [1/81, 15/81, 65/81]
    exact_kl = float((bon_probs * np.log(bon_probs / ref_sorted)).sum())
    assert bon_probs * 81 == pytest.approx([1, 15, 65])
    assert exact_kl < best_of_n_kl(4) - 0.05


def test_best_of_n_kl_rejects_bad_n():
    assert best_of_n_kl(np.int64(2)) == pytest.approx(math.log(2) - 0.5)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"n={bad!r}"):
            best_of_n_kl(bad)


# --- Pareto frontier -------------------------------------------------------------------------------


def test_pareto_frontier_of_a_hand_made_point_set():
    points = [
        (0.0, 0.0),  # 0: the reference: on the frontier
        (1.0, 0.5),  # 1: on
        (1.0, 0.3),  # 2: same KL as 1, lower score: off
        (2.0, 0.4),  # 3: dominated by 1 (more KL, less score): off
        (3.0, 0.9),  # 4: on
        (3.0, 0.9),  # 5: duplicate of 4: only the first stays
        (4.0, 0.9),  # 6: same score as 4 at more KL: off
        (5.0, 1.2),  # 7: on
        (0.5, -0.1),  # 8: more KL than 0 and lower score: off
    ]
    assert pareto_frontier(points) == [0, 1, 4, 7]
    # reversed, the duplicate pair swaps order: reversed index 3 (the old 5) is kept, not 4 (the old 4)
    assert pareto_frontier(points[::-1]) == [8, 7, 3, 1]
    assert pareto_frontier(np.array(points)) == [0, 1, 4, 7]
    assert pareto_frontier([]) == []
    assert pareto_frontier([(2.0, 1.0)]) == [0]
    with pytest.raises(ValueError, match="point 1"):
        pareto_frontier([(0.0, 0.0), (1.0, math.nan)])


# --- Gao et al. fit --------------------------------------------------------------------------------


def gao_curve(kl, alpha, beta, form):
    d = np.sqrt(np.asarray(kl, dtype=np.float64))
    if form == "bon":
        return d * (alpha - beta * d)
    d_log_d = np.array([x * math.log(x) if x > 0 else 0.0 for x in np.atleast_1d(d)]).reshape(d.shape)
    return alpha * d - beta * d_log_d


@pytest.mark.parametrize("form,alpha,beta,peak_d", [
    ("rl", 0.8, 0.5, math.exp(0.8 / 0.5 - 1)),
    ("bon", 0.6, 0.15, 0.6 / (2 * 0.15)),
])
def test_gao_fit_recovers_the_coefficients_and_the_peak(form, alpha, beta, peak_d):
    kl = np.array([0.0, 0.3, 1.0, 2.0, 4.0, 7.0, 12.0, 20.0])  # KL 0 is dropped
    fit = fit_gao(kl, gao_curve(kl, alpha, beta, form), form)
    assert isinstance(fit, GaoFit) and fit.form == form and fit.n_points == 7
    assert fit.alpha == pytest.approx(alpha, abs=1e-6)
    assert fit.beta == pytest.approx(beta, abs=1e-6)
    assert fit.peak_d == pytest.approx(peak_d, rel=1e-6)
    assert fit.peak_kl == pytest.approx(peak_d**2, rel=1e-6)
    assert fit.peak_gold == pytest.approx(float(gao_curve(peak_d**2, alpha, beta, form)), rel=1e-6)
    assert fit.r2 == pytest.approx(1.0)
    # d* is the maximum: the curve is lower on both sides
    assert predict(fit, fit.peak_kl) > max(predict(fit, 0.9 * fit.peak_kl), predict(fit, 1.1 * fit.peak_kl))
    assert predict(fit, 0.0) == 0.0
    assert predict(fit, kl) == pytest.approx(gao_curve(kl, alpha, beta, form), abs=1e-9)


@pytest.mark.parametrize("form", ["rl", "bon"])
def test_gao_fit_with_noise_is_close(form):
    rng = np.random.default_rng(0)
    alpha, beta = 0.8, 0.3
    kl = np.repeat(np.linspace(0.5, 25.0, 20), 3)
    gold = gao_curve(kl, alpha, beta, form) + rng.normal(0.0, 0.02, kl.size)
    fit = fit_gao(kl, gold, form)
    assert fit.alpha == pytest.approx(alpha, abs=0.03)
    assert fit.beta == pytest.approx(beta, abs=0.03)
    assert 0.9 < fit.r2 < 1.0


def test_gao_fit_peak_when_the_curve_never_turns_over():
    kl = np.array([1.0, 4.0, 9.0])
    rising = fit_gao(kl, gao_curve(kl, 0.5, -0.1, "bon"), "bon")
    assert rising.peak_d == math.inf and rising.peak_gold == math.inf
    falling = fit_gao(kl, gao_curve(kl, -0.5, 0.1, "bon"), "bon")  # below 0 everywhere: best is the reference
    assert falling.peak_d == 0.0 and falling.peak_gold == 0.0


def test_gao_fit_rejects_too_few_points_and_unknown_forms():
    with pytest.raises(ValueError, match="at least 2 points with KL > 0, got 1"):
        fit_gao([0.0, -0.01, 2.0], [0.0, 0.0, 0.5], "rl")
    with pytest.raises(ValueError, match="at least 2 distinct KL"):
        fit_gao([2.0, 2.0], [0.4, 0.5], "bon")
    with pytest.raises(ValueError, match="unknown Gao form 'ppo'"):
        fit_gao([1.0, 2.0], [0.1, 0.2], "ppo")
    with pytest.raises(ValueError, match="differ in length"):
        fit_gao([1.0, 2.0], [0.1], "rl")
    with pytest.raises(ValueError, match="KL must be >= 0"):
        predict(GaoFit("rl", 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2), -1.0)


# --- budget table and plots ------------------------------------------------------------------------

POINTS = {
    "ppo": [
        {"kl": 0.0, "gold": 0.0},
        {"kl": 1.5, "gold": 0.2, "kl_se": 0.1},
        {"kl": 5.0, "gold": 0.45, "kl_se": 0.3},  # exactly at a budget: within it
        {"kl": 9.0, "gold": 0.3, "kl_se": 0.5},
    ],
    "dpo": [
        {"kl": 3.0, "gold": 0.5, "proxy": 1.0},
        {"kl": 2.5, "gold": 0.5, "proxy": 0.9},  # same gold at lower KL: this one is reported
        {"kl": 12.0, "gold": 0.9, "proxy": 2.0},
    ],
    "best-of-n": [],
}


def test_budget_table_is_the_expected_markdown():
    expected = (
        "| method | KL ≤ 2 | KL ≤ 5 | KL ≤ 10 |\n"
        "|---|---|---|---|\n"
        "| ppo | 0.200 (KL 1.50) | 0.450 (KL 5.00) | 0.450 (KL 5.00) |\n"
        "| dpo | – | 0.500 (KL 2.50) | 0.500 (KL 2.50) |\n"
        "| best-of-n | – | – | – |"
    )
    assert budget_table(POINTS) == expected
    assert budget_table({"ppo": POINTS["ppo"]}, budgets=(0.5,)) == "| method | KL ≤ 0.5 |\n|---|---|\n| ppo | 0.000 (KL 0.00) |"


def test_plot_frontier_writes_pngs(tmp_path):
    with_proxy = {
        "ppo": [dict(p, proxy=0.5 * p["kl"]) for p in POINTS["ppo"]],
        "dpo": POINTS["dpo"],
    }
    for x, y in (("kl", "gold"), ("kl", "proxy"), ("proxy", "gold")):
        path = plot_frontier(with_proxy, tmp_path / "plots" / f"{y}_vs_{x}.png", x=x, y=y)
        assert path == tmp_path / "plots" / f"{y}_vs_{x}.png"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match="point 0 of 'ppo' has no 'proxy'"):
        plot_frontier(POINTS, tmp_path / "bad.png", x="proxy")


# --- textgym frontier --------------------------------------------------------------------------------


def test_frontier_quick_on_the_toy_env_writes_one_point_per_run_and_checkpoint_and_skips_finished_runs(tmp_path):
    import json

    from agents.cli import main
    from pretrain.run_dir import RunDir

    out = tmp_path / "frontier"
    argv = ["frontier", "--quick", "--env", "TextGenToy-v0", "--methods", "best-of-n", "ppo", "reinforce", "--total-steps", "512",
            "--max-new-tokens", "4", "--episodes", "16", "--num-envs", "16", "--best-of-n", "1", "2", "4", "--device", "cpu",
            "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "frontier.json").read_text())
    points = result["points"]
    assert list(points) == ["ppo", "reinforce", "best-of-n"]
    for method in ("ppo", "reinforce"):
        run = out / "runs" / f"{method}-kl_coef=0.05"
        checkpoints = [p.name for _, p in sorted(RunDir.list_checkpoints(run))]
        labels = [p["label"] for p in points[method]]
        # the initial model, every checkpoint, and final (the last checkpoint is the final model: evaluated once, as final)
        assert labels[0] == "initial" and labels[-1] == "final" and len(labels) == len(checkpoints) + 1, (labels, checkpoints)
        assert set(labels[1:-1]) <= set(checkpoints)
        assert points[method][0]["kl"] == pytest.approx(0.0, abs=1e-5) and points[method][0]["gold"] == pytest.approx(0.0, abs=1e-9)
        assert all(p["kl_se"] >= 0 and {"proxy", "distinct_2", "ref_ppl", "kl_coef"} <= set(p) for p in points[method])
    bon = points["best-of-n"]
    assert [p["n"] for p in bon] == [1, 2, 4]
    assert [p["kl"] for p in bon] == pytest.approx([best_of_n_kl(n) for n in (1, 2, 4)])
    assert bon[2]["proxy"] >= bon[0]["proxy"], "the best of 4 scores at least the first of them, prompt by prompt"
    assert set(result["gao_fits"]) == {"ppo", "reinforce", "best-of-n"}
    for name in ("gold_vs_kl.png", "proxy_vs_kl.png", "gold_vs_proxy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "frontier.md").read_text()
    assert "| ppo |" in table and "| best-of-n |" in table and "KL ≤ 2" in table

    # Run again: every run and evaluation is finished, so nothing is trained again.
    final = out / "runs" / "ppo-kl_coef=0.05" / "final"
    stamp = final.stat().st_mtime
    assert main(argv) == 0
    assert final.stat().st_mtime == stamp
    # Other settings would reuse runs made with these: refused, naming the setting.
    from agents.frontier import FrontierConfig, frontier

    with pytest.raises(ValueError, match="total_steps: 512 there, 1024 here"):
        frontier(FrontierConfig(quick=True, env="TextGenToy-v0", methods=["ppo"], total_steps=1024, max_new_tokens=4, episodes=16,
                                num_envs=16, device="cpu", out=str(out)))


def test_frontier_config_names_what_cannot_run():
    from agents.frontier import FrontierConfig

    with pytest.raises(ValueError, match="unknown method 'ppo2'"):
        FrontierConfig(methods=["ppo2"])
    with pytest.raises(ValueError, match="dpo trains on text preference pairs"):
        FrontierConfig(methods=["ppo", "dpo"], env="TextGenToy-v0")
    with pytest.raises(ValueError, match="best_of_n must be integers >= 1"):
        FrontierConfig(best_of_n=[0, 4])
    assert FrontierConfig(quick=True).methods == ["best-of-n", "ppo", "dpo"]
