"""Tests for fit.py: known laws recovered from synthetic data, textbook intervals and their coverage, the paper's
TrOCR check, run folders, the compute optimum in samples seen, bad input."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize, stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fit  # noqa: E402

TROCR_CSV = os.path.join(ROOT, "tests", "trocr_size_points.csv")
TRUE = dict(einf=0.02, A=300.0, alpha=0.6, B=40.0, beta=0.5)


def run_main(capsys, *args):
    """fit.main in this process: (exit code, stdout, stderr)."""
    code = fit.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_run(root, name, config, evals, finished=True, extra_lines=()):
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines([json.dumps(e) + "\n" for e in evals] + list(extra_lines))
    if finished:
        open(os.path.join(d, "result.json"), "w").write("{}")
    return d


def power_points(k, alpha, xs, noise, rng):
    """(x, E%) with E = (k/x)^alpha as a fraction, times log-normal noise."""
    return [(x, 100 * (k / x) ** alpha * math.exp(rng.normal(0, noise))) for x in xs]


def joint_runs(true, noise, rng, Ns=np.geomspace(3e4, 1e6, 5), Ds=np.geomspace(2e3, 5e4, 5), samples=1e5):
    """One finished run per (N, D), trained for `samples` samples seen at 20 N FLOPs each."""
    runs = []
    for N in Ns:
        for D in Ds:
            E = (true["einf"] + true["A"] / N ** true["alpha"] + true["B"] / D ** true["beta"]) * \
                math.exp(rng.normal(0, noise))
            cfg = {"N": N, "D": D, "arch": "trocr", "train_samples": samples, "flops_convention": "C = 20 N per sample"}
            runs.append(fit._make_run(f"n{N:.0f}-d{D:.0f}", cfg, [{"samples": samples, "flops": 20 * N * samples,
                                                                   "val_error": 100 * E, "final": True}], True))
    return runs


def test_reference_trocr_size_law_and_t_interval(capsys):
    # the study (§2): fitting TrOCR S, B, L gives alpha ~0.222, k ~1.95e4 and predicts H (9.07%) within 0.2 points
    p = subprocess.run([sys.executable, os.path.join(ROOT, "fit.py"), TROCR_CSV, "--holdout", "N=largest", "--json"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    n = json.loads(p.stdout)["N"]
    assert n["n_points"] == 3
    assert n["alpha"] == pytest.approx(0.222, abs=0.002)
    assert n["k"] == pytest.approx(1.95e4, rel=0.02)
    assert n["holdout"]["measured"] == [9.07]
    assert abs(n["holdout"]["predicted"][0] - 9.07) < 0.2
    assert n["holdout"]["lo"][0] < 9.07 < n["holdout"]["hi"][0]
    # textbook: alpha +- t(0.975, n-2) * the OLS slope's standard error (scipy's linregress); issue 13: [0.199, 0.246]
    lx, ly = np.log([43.5e6, 282.5e6, 505.6e6]), np.log([0.1801, 0.1184, 0.1045])
    lr, t = stats.linregress(lx, ly), stats.t.ppf(0.975, 1)
    assert n["ci"]["method"] == "t (1 dof)"
    assert n["ci"]["alpha"] == pytest.approx([-lr.slope - t * lr.stderr, -lr.slope + t * lr.stderr], rel=1e-9)
    assert n["ci"]["alpha"] == pytest.approx([0.199, 0.246], abs=0.001)
    # delta method for log k = -intercept / slope, from linregress's standard errors and their covariance
    cov = -lx.mean() * lr.stderr ** 2  # Cov(intercept, slope) of OLS
    g = np.array([-1 / lr.slope, lr.intercept / lr.slope ** 2])
    se = math.sqrt(g @ np.array([[lr.intercept_stderr ** 2, cov], [cov, lr.stderr ** 2]]) @ g)
    assert n["ci"]["k"] == pytest.approx(np.exp(-lr.intercept / lr.slope + np.array([-t, t]) * se), rel=1e-6)
    table = run_main(capsys, TROCR_CSV, "--holdout", "N=largest")[1]
    assert "held out (--holdout): N=9.5e+08 measured 9.07%" in table and "not fitted" in table
    assert "t (1 dof)" in table


def test_small_n_interval_coverage():
    # >= 200 series of 3, 4 and 5 points with log-normal noise: the nominal 95% interval must cover the true exponent
    # 90-98% of the time (a percentile bootstrap over runs covered 74% / 89% / 90%: issue 13)
    rng = np.random.default_rng(0)
    for n in (3, 4, 5):
        hits = 0
        for _ in range(250):
            pts = power_points(2e4, 0.25, np.geomspace(4e7, 5e8, n), 0.05, rng)
            r = fit.fit_all({"N": pts})["N"]
            assert r["ci"]["method"] == f"t ({n - 2} dof)"
            hits += r["ci"]["alpha"][0] <= 0.25 <= r["ci"]["alpha"][1]
        assert 0.90 <= hits / 250 <= 0.98, (n, hits)


def test_bootstrap_above_small_n_recovers_and_covers():
    rng = np.random.default_rng(0)
    pts = power_points(3e3, 0.4, np.geomspace(1e4, 1e7, 12), 0.03, rng)
    r = fit.fit_all({"N": pts}, n_boot=500)["N"]
    assert r["ci"]["method"] == "bootstrap over runs (500 draws)"
    assert r["alpha"] == pytest.approx(0.4, abs=0.03) and r["k"] == pytest.approx(3e3, rel=0.3)
    assert r["ci"]["alpha"][0] < r["alpha"] < r["ci"]["alpha"][1] < r["ci"]["alpha"][0] + 0.1
    assert r["r2"] > 0.95
    hits, trials = 0, 40
    for t in range(trials):
        pts = power_points(1e3, 0.5, np.geomspace(1e4, 1e6, 10), 0.05, rng)
        ci = fit.fit_all({"N": pts}, n_boot=300, seed=t)["N"]["ci"]["alpha"]
        hits += ci[0] <= 0.5 <= ci[1]
    assert hits >= 0.75 * trials, f"95% CI covered the true alpha in {hits}/{trials} trials"


def test_extrapolation_report_matches_textbook_prediction_interval(capsys):
    rng = np.random.default_rng(5)
    pts = power_points(1e3, 0.5, np.geomspace(1e4, 1e6, 6), 0.03, rng)
    r = fit.fit_all({"N": pts}, level=0.9)
    ex = r["N"]["extrapolation"]
    assert [(e["held_out"], e["n_fitted"], len(e["x"])) for e in ex] == [(1, 5, 1), (2, 4, 2)]
    for e in ex:  # refit on the rest by np.polyfit; prediction interval yhat +- t s sqrt(1 + 1/n + (x0-xbar)^2/Sxx)
        n = e["n_fitted"]
        lx, ly = np.log([p[0] for p in pts[:n]]), np.log([p[1] for p in pts[:n]])
        b, a = np.polyfit(lx, ly, 1)
        s = math.sqrt(((ly - a - b * lx) ** 2).sum() / (n - 2))
        x0 = np.log(e["x"])
        half = stats.t.ppf(0.95, n - 2) * s * np.sqrt(1 + 1 / n + (x0 - lx.mean()) ** 2 / ((lx - lx.mean()) ** 2).sum())
        assert e["predicted"] == pytest.approx(np.exp(a + b * x0))
        assert e["lo"] == pytest.approx(np.exp(a + b * x0 - half)) and e["hi"] == pytest.approx(np.exp(a + b * x0 + half))
        assert e["measured"] == [p[1] for p in pts[n:]]
    assert "extrapolation: fit on 4, without the largest 2: N=1e+06 measured" in fit.format_table(r)


def test_compute_frontier_of_hand_made_curves(tmp_path):
    # three runs' (C, error%) curves; the frontier is each point below everything cheaper
    curves = {"a": [(1, 99.9), (2, 80), (4, 60), (8, 50)],   # first point pinned: never on the frontier
              "b": [(3, 70), (6, 45), (12, 30)],
              "c": [(5, 65), (10, 35), (20, 25), (40, 24)]}
    for name, pts in curves.items():
        write_run(tmp_path, name, {"N": 1e4, "D": 1e3}, [{"samples": c, "flops": c * 1e9, "val_error": e}
                                                           for c, e in pts])
    r = fit.fit_all(fit.load_runs(str(tmp_path)), n_boot=50)["C"]
    # by hand: 2:80(a) 3:70(b) 4:60(a) 6:45(b) 10:35(c) 12:30(b) 20:25(c) 40:24(c); 5:65, 8:50 are above cheaper points
    assert [(p["x"] / 1e9, p["y"], p["runs"][0][-1]) for p in r["points"]] == [
        (2, 80, "a"), (3, 70, "b"), (4, 60, "a"), (6, 45, "b"), (10, 35, "c"), (12, 30, "b"), (20, 25, "c"),
        (40, 24, "c")]
    assert r["ci"]["method"] == "bootstrap over runs (50 draws)"
    # fewer than 2 usable draws: the t-interval instead of a percentile of nothing
    assert fit.fit_all(fit.load_runs(str(tmp_path)), n_boot=1)["C"]["ci"]["method"] == "t (6 dof)"


def test_joint_fit_recovers_parameters_and_reports_its_huber_loss():
    j = fit.fit_all(joint_runs(TRUE, 0.0, np.random.default_rng(0)), n_boot=10)["joint"]
    for k, v in TRUE.items():
        assert j[k] == pytest.approx(v, rel=1e-3), k
    assert j["starts_at_best"] >= 1 and j["r2"] > 0.9999 and j["converged"]
    # with noise: close, CIs cover the exponents; the reported loss is the summed Huber loss of its log residuals
    runs = joint_runs(TRUE, 0.02, np.random.default_rng(1))
    r = fit.fit_all(runs, n_boot=60)
    j = r["joint"]
    assert j["alpha"] == pytest.approx(0.6, abs=0.1) and j["beta"] == pytest.approx(0.5, abs=0.1)
    assert j["ci"]["alpha"][0] < 0.6 < j["ci"]["alpha"][1] and j["ci"]["beta"][0] < 0.5 < j["ci"]["beta"][1]
    N, D, y = (np.array([p[k] for p in j["points"]]) for k in ("N", "D", "y"))
    huber = lambda r: np.where(abs(r) <= 1e-3, 0.5 * r * r, 1e-3 * (abs(r) - 0.5e-3)).sum()
    assert huber(np.log((j["einf"] + j["A"] / N ** j["alpha"] + j["B"] / D ** j["beta"]) * 100 / y)) == \
        pytest.approx(j["loss"], rel=1e-9)


def test_joint_bootstrap_drops_unidentifiable_draws():
    # a 3 x 3 grid: some resamples hold only 2 distinct N or D (issue 13: 16%); they must be dropped and counted
    runs = joint_runs(TRUE, 0.02, np.random.default_rng(2), Ns=[2e5, 1e6, 5e6], Ds=[1e4, 5e4, 2.5e5])
    j = fit.fit_all(runs, n_boot=300)["joint"]
    n_drop = sum(j["ci"]["dropped"].values())
    # the expected share, by simulation with an independent generator
    rng, idx = np.random.default_rng(99), np.arange(9)
    bad = np.mean([min(len(set(d // 3)), len(set(d % 3))) < 3 or len(set(d)) < 5
                   for d in (rng.choice(idx, 9) for _ in range(20000))])
    assert abs(n_drop / 300 - bad) < 4 * math.sqrt(bad * (1 - bad) / 300)
    assert j["ci"]["n_boot"] == 300 - n_drop and j["ci"]["alpha"][1] < 5  # no draw stuck at the bound 10
    assert any("fewer than 3 distinct values per variable" in why for why in j["ci"]["dropped"])


def test_unconverged_fits_are_reported_and_dropped(monkeypatch):
    real = fit.least_squares

    def never_converges(*a, **k):
        res = real(*a, **k)
        res.success = False
        return res
    monkeypatch.setattr(fit, "least_squares", never_converges)
    r = fit.fit_all(joint_runs(TRUE, 0.02, np.random.default_rng(1)), n_boot=5)
    assert not r["joint"]["converged"] and r["joint"]["ci"]["dropped"] == {"did not converge": 5}
    assert "NOT converged" in fit.format_table(r)


def test_compute_optimum_in_samples_seen(capsys):
    # runs trained for several epochs: D is unique images, samples seen differ; C = 20 N per sample seen.
    runs = joint_runs(TRUE, 0.0, np.random.default_rng(0), samples=2e5)
    r = fit.fit_all(runs, n_boot=10, budgets=["1e13"])
    co = r["joint"]["compute_optimal"]
    assert co["flops_per_sample"]["gamma"] == pytest.approx(1.0) and co["flops_per_sample"]["c0"] == pytest.approx(20)
    b = co["budgets"][0]
    E = lambda lN: TRUE["einf"] + TRUE["A"] * math.exp(-0.6 * lN) + TRUE["B"] * (20 * math.exp(lN) / 1e13) ** 0.5
    lN = optimize.minimize_scalar(E, bounds=(5, 25), method="bounded", options=dict(xatol=1e-10)).x
    assert b["N"] == pytest.approx(math.exp(lN), rel=1e-3)
    assert b["S"] == pytest.approx(1e13 / (20 * b["N"]), rel=1e-6)
    assert b["E"] == pytest.approx(100 * E(lN), rel=1e-4)
    assert len(co["multi_epoch"]) == r["joint"]["n_points"] == 19 and "n1000000-d2000 (100 epochs)" in co["multi_epoch"]
    table = fit.format_table(r)
    assert "runs trained for more than one epoch" in table and "C convention: C = 20 N per sample" in table
    assert "N_opt = [alpha A / (gamma beta B) (C / c0)^beta]^(1/(alpha + gamma beta))" in table
    # the default budgets start at the biggest run's logged compute
    assert fit.fit_all(runs, n_boot=5)["joint"]["compute_optimal"]["budgets"][0]["C"] == 20 * 1e6 * 2e5


def test_run_folders_grouping_seeds_pinned_and_unfinished(tmp_path):
    def evals(N, final):  # two evals: halfway (worse) and final
        return [{"step": 1, "samples": 5e4, "flops": 10 * N * 5e4, "val_error": min(100, 2 * final), "val_loss": 1.0},
                {"step": 2, "samples": 1e5, "flops": 10 * N * 1e5, "val_error": final, "val_loss": 0.5, "final": True}]
    base = {"arch": "trocr", "train_samples": 100000}
    ladder = {1e4: [100.0], 3e4: [60.0], 1e5: [40.0, 30.0, 100.0], 3e5: [20.0], 1e6: [12.0]}  # N: errors per seed
    for N, errs in ladder.items():
        for s, e in enumerate(errs):
            write_run(tmp_path, f"n{N:g}-s{s}", dict(base, N=N, D=5e4, seed=s), evals(N, e))
    write_run(tmp_path, "n3e6-running", dict(base, N=3e6, D=5e4, seed=0), evals(3e6, 5.0), finished=False)
    write_run(tmp_path, "other-d", dict(base, N=3e4, D=1e4, seed=0), evals(3e4, 70.0))   # off the N ladder
    write_run(tmp_path, "parseq", dict(base, arch="parseq", N=3e4, D=5e4), evals(3e4, 5.0))
    write_run(tmp_path, "empty", dict(base, N=1e5, D=5e4), [])                          # no evals
    os.makedirs(tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert "unreadable config.json" in fit.load_runs(str(tmp_path / "broken"))[0]["skip"]
    runs = fit.load_runs([str(tmp_path)], where=["arch=trocr"])
    assert len(runs) == 10 and all(r["group"]["arch"] == "trocr" for r in runs)
    r = fit.fit_all(runs, n_boot=100)
    assert any("empty" in s and "no evals" in s for s in r["skipped"])
    running = os.path.join(str(tmp_path), "n3e6-running")
    assert r["unfinished"] == [running] and r["runs"] == 9  # excluded by default
    assert f"1 unfinished run(s) excluded (no result.json; fit them with --include-unfinished): {running}" in \
        fit.format_table(r)
    n = r["N"]
    assert n["ladder"] == {"D": 5e4, "budget": 1e5}
    assert any("1 run(s) off this ladder" in s for s in n["skipped"])
    assert [p["x"] for p in n["points"]] == [1e4, 3e4, 1e5, 3e5, 1e6]
    assert [p["y"] for p in n["points"]] == [100.0, 60.0, 40.0, 20.0, 12.0]  # median of 40, 30, 100 seeds
    assert [p["pinned"] for p in n["points"]] == [True, False, False, False, False] and n["n_points"] == 4
    assert n["points"][2]["spread"] == [30.0, 100.0] and len(n["points"][2]["runs"]) == 3
    expected = fit.fit_power(np.array([3e4, 1e5, 3e5, 1e6]), np.array([0.6, 0.4, 0.2, 0.12]))
    assert n["alpha"] == pytest.approx(expected["alpha"]) and n["k"] == pytest.approx(expected["k"])
    with_running = fit.fit_all(runs, n_boot=10, include_unfinished=True)["N"]
    assert with_running["n_points"] == 5 and with_running["points"][-1]["unfinished"]
    # D ladder at N=3e4: D=1e4 (70%) and 5e4 (60%): too few points, with a message naming the axis
    assert "need at least 3 distinct D" in r["D"]["error"]
    # loss metric (no pinning); best = lowest, here the final eval; where with a number; where on a missing key
    assert [p["y"] for p in fit.fit_all(runs, metric="loss", n_boot=10)["N"]["points"]] == [0.5] * 5
    assert [p["y"] for p in fit.fit_all(runs, best=True, n_boot=10)["N"]["points"]] == [100.0, 60, 40, 20, 12]
    assert len(fit.load_runs(str(tmp_path), where={"N": "30000"})) == 3
    assert fit.load_runs(str(tmp_path), where=["nosuchkey=1"]) == []
    assert "needs >= 7 usable runs spanning >= 3 N and >= 3 D" in r["joint"]["error"]  # only 2 D values
    table = fit.format_table(r)
    assert "PINNED (not fitted)" in table and "3 runs 30..100" in table and "not fitted: D:" in table


def test_d_ladder_at_fixed_epochs(tmp_path):
    # train.py's --epochs and the sweep planner give each D its own budget (20 x D): still one D ladder.
    for D, err in ((1e3, 80.0), (3e3, 50.0), (1e4, 30.0), (3e4, 18.0)):
        write_run(tmp_path, f"d{D:g}", {"arch": "parseq", "N": 1e5, "D": D, "train_samples": 20 * D},
                  [{"step": 1, "samples": 20 * D, "flops": 1e6 * D, "val_error": err, "final": True}])
    r = fit.fit_all(fit.load_runs(str(tmp_path)), n_boot=10)
    assert r["D"]["ladder"] == {"N": 1e5, "epochs": 20.0} and r["D"]["n_points"] == 4


def test_accuracy_column_flat_and_malformed(tmp_path, capsys):
    acc = tmp_path / "acc.csv"  # word accuracy in percent: error = 100 - acc
    acc.write_text("N,acc\n43.5e6,81.99\n282.5e6,88.16\n505.6e6,89.55\n")
    a = fit.fit_all(str(acc))
    assert a["N"]["alpha"] == pytest.approx(0.2225, abs=5e-4) and not a["notes"]
    assert [p["y"] for p in a["N"]["points"]] == pytest.approx([18.01, 11.84, 10.45])
    # a flat series has no R2 (it was 1.0); a non-monotone one gets a warning
    flat = fit.fit_all({"N": [(1e4, 50), (2e4, 50), (4e4, 50)]})["N"]
    assert flat["r2"] is None and "flat or do not fall monotonically" in flat["warnings"][0]
    bumpy = fit.fit_all({"N": [(1e4, 50), (2e4, 30), (4e4, 40), (8e4, 20)]})
    assert bumpy["N"]["r2"] is None and "not fall monotonically" in bumpy["N"]["warnings"][0]
    assert "undef" in fit.format_table(bumpy) and "WARNING N: the fitted points are flat" in fit.format_table(bumpy)
    # metrics.jsonl lines that are not a JSON object (or not JSON) are skipped and counted
    write_run(tmp_path / "runs", "r0", {"N": 1e4, "D": 1e3}, [{"samples": 1, "flops": 1e9, "val_error": 50}],
              extra_lines=["[1, 2]\n", "7\n", "{truncated\n", "\n"])
    r = fit.fit_all(fit.load_runs(str(tmp_path / "runs")))
    assert r["notes"] == ["skipped 3 line(s) of metrics.jsonl that were not a JSON object"]


def test_bad_input_messages(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("size,score\n1,2\n")
    code, out, err = run_main(capsys, bad)
    assert code == 2 and "needs a header with at least one of N, D, C" in err
    fractions = tmp_path / "fractions.csv"  # read as percent, these would fit alpha ~0.0003 instead of ~0.2
    fractions.write_text("N,acc\n1e6,0.8199\n1e7,0.8816\n1e8,0.8955\n")
    code, out, err = run_main(capsys, fractions)
    assert code == 2 and err.count("\n") == 1 and "column acc is in percent; every value is at most 1" in err
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"N,E\n1e6,\xff9\n")
    code, out, err = run_main(capsys, latin1)
    assert code == 2 and f"{latin1}: not UTF-8 text" in err
    two = tmp_path / "two.csv"
    two.write_text("N,D,acc\n1e4,100,50\n2e4,100,60\n")
    code, out, err = run_main(capsys, two)
    assert code == 1 and "need at least 3 distinct N" in out and "nothing could be fitted" in err
    odd = tmp_path / "odd.csv"  # NaN, negative, 0% error and unreadable rows are skipped with a reason
    odd.write_text("N,E\n1e4,50\n2e4,nan\n-3e4,30\n4e4,0\n8e4,25\n1.6e5,20\nlots,10\n")
    r = fit.fit_all(fit.load_runs(str(odd)), n_boot=10)
    assert r["N"]["n_points"] == 3 and len(r["N"]["skipped"]) == 3 and r["skipped"] == [f"{odd}:8: unreadable N='lots'"]
    assert any("need finite positive values" in s for s in r["N"]["skipped"])
    assert "no run has D" in r["D"]["error"] and "no run has C" in r["C"]["error"]
    excel = tmp_path / "excel.csv"  # byte-order mark, and a row with a trailing comma
    excel.write_text("\ufeffN,E\n1e4,50\n2e4,40,\n4e4,30\n", encoding="utf-8")
    assert [r["N"] for r in fit.load_runs(str(excel))] == [1e4, 2e4, 4e4]
    both = tmp_path / "both.csv"  # N and C columns: a bare holdout value would mean different things per axis
    both.write_text("N,C,E\n1e4,1e12,50\n2e4,2e12,40\n4e4,4e12,30\n8e4,8e12,25\n")
    for args, msg in ((("--holdout", "biggest"), "--holdout 'biggest'"),
                      (("--holdout", "5e4"), "a bare value is ambiguous with 2 axes fitted (N, C); name the axis"),
                      (("--holdout", "Q=largest"), "AXIS one of N, D, C"),
                      (("--budget", "0"), "--budget 0: a FLOP budget must be a positive number"),
                      (("--budget=-1e9",), "--budget -1e9"), (("--ci", "95"), "--ci 95.0: give a confidence level"),
                      (("--n-boot", "0"), "--n-boot 0")):
        code, out, err = run_main(capsys, both, *args)
        assert code == 2 and msg in err and err.count("\n") == 1, (args, err)
    code, out, err = run_main(capsys, both, "--holdout", "C=8e12", "--json")
    out = json.loads(out)
    assert out["C"]["holdout"]["x"] == [8e12] and out["N"]["holdout"] is None and out["N"]["n_points"] == 4
    code, out, err = run_main(capsys, TROCR_CSV, "--holdout", "9e8", "--json")  # one axis fitted: a bare value is fine
    assert code == 0 and json.loads(out)["N"]["holdout"]["x"] == [9.5e8]
    code, out, err = run_main(capsys, tmp_path / "missing")
    assert code == 2 and "neither a folder of runs" in err
    empty = tmp_path / "runs"
    write_run(empty, "r0", {"N": 1e4, "D": 1e3}, [])
    code, out, err = run_main(capsys, empty)
    assert code == 1 and "no evals" in out


def test_json_keys_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(3)
    for r in joint_runs(TRUE, 0.02, rng):
        write_run(tmp_path / "runs", r["name"], r["config"], r["evals"])
    code, out, err = run_main(capsys, tmp_path / "runs", "--json", "--n-boot", "20", "--holdout", "largest",
                              "--plot", tmp_path / "png", "--budget", "1e13")
    assert code == 0, err
    out = json.loads(out)
    for ax in ("N", "D", "C"):
        assert {"k", "alpha", "r2", "rmse", "ci", "n_points", "holdout", "points", "skipped", "extrapolation"} <= \
            set(out[ax])
        assert set(out[ax]["holdout"]) == {"x", "measured", "predicted", "lo", "hi", "rel_error"}
    assert {"einf", "A", "alpha", "B", "beta", "ci", "compute_optimal", "holdout"} <= set(out["joint"])
    assert out["joint"]["compute_optimal"]["budgets"][0]["C"] == 1e13
    pngs = sorted(os.listdir(tmp_path / "png"))
    assert pngs == ["fit_C.png", "fit_D.png", "fit_N.png", "fit_joint.png"]
    assert all(os.path.getsize(tmp_path / "png" / f) > 1000 for f in pngs)


def test_plot_ticks_are_plain_and_minor_labels_off():
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, a = plt.subplots()
    a.set(xscale="log", yscale="log")
    a.plot([3e4, 4.5e4], [12, 30])
    fit._log_ticks(a.xaxis, 3e4, 4.5e4)  # under a factor 2: finer steps, plain short labels
    fit._log_ticks(a.yaxis, 8.5, 99)
    fig.canvas.draw()
    assert [t.get_text() for t in a.get_xticklabels()] == ["3e4", "4e4"]
    assert [t.get_text() for t in a.get_yticklabels()] == ["10", "20", "50"]
    assert all(t.get_text() == "" for t in a.get_xticklabels(minor=True) + a.get_yticklabels(minor=True))
    fit._log_ticks(a.xaxis, 1e3, 1e9)  # wide: decades only, at most 6
    assert list(a.xaxis.get_major_locator().locs) == [1e3, 1e5, 1e7, 1e9]
    fit._log_ticks(a.xaxis, 22, 130)
    assert list(a.xaxis.get_major_locator().locs) == [30, 50, 70, 90, 120]
    plt.close(fig)


def test_runs_of_two_datasets_in_one_folder_are_fitted_apart(tmp_path, capsys, monkeypatch):
    # issue 21: a Latin N ladder and a Cyrillic fine-tune's (own val set, --init) in one folder, same arch, D and
    # budget; seeds and per-size recipes (lr) differ within a dataset and must not split it.
    monkeypatch.chdir(tmp_path)
    char = "char:0123456789abcdefghijklmnopqrstuvwxyz"
    sets = {"latin": ({"train": [[str(tmp_path / "latin"), 1.0]], "val": str(tmp_path / "latin-val"), "init": None},
                      2e3, 0.3),
            "cyrillic": ({"train": [["/data/cyrillic", 1.0]], "val": "/data/cyrillic-val", "init": "/x/best.pt"},
                         5e3, 0.6)}
    Ns, errors, expected = np.geomspace(1e4, 1e6, 5), {}, {}
    for name, (fields, k, alpha) in sets.items():
        group = dict(fields, arch="parseq", tokenizer=char, set={}, img=[32, 128], eval="refine=1")
        errors[name] = np.array([100 * (k / N) ** alpha * (1 + 0.03 * (-1) ** i) for i, N in enumerate(Ns)])
        for i, (N, e) in enumerate(zip(Ns, errors[name])):
            for seed in range(1 + (i == 2)):  # two seeds of the middle size: one point, their median
                write_run(tmp_path / "runs", f"{name}-n{N:.0f}-s{seed}",
                          {"arch": "parseq", "N": N, "D": 1e4, "train_samples": 1e5, "seed": seed, "lr": 1e-3 / (i + 1),
                           "fit_group": group}, [{"samples": 1e5, "flops": 6 * N * 1e5, "val_error": e}])
        expected[name] = -np.polyfit(np.log(Ns), np.log(errors[name] / 100), 1)[0]  # this dataset alone
    pooled = -np.polyfit(np.log(Ns), np.log((errors["latin"] + errors["cyrillic"]) / 200), 1)[0]  # a size's median
    assert min(abs(pooled - a) for a in expected.values()) > 0.1  # pooling gives neither exponent

    code, out, err = run_main(capsys, "runs", "--json", "--n-boot", "20", "--plot", "png")
    assert code == 0, err
    groups = json.loads(out)["groups"]
    assert groups[0]["name"] == "train=/data/cyrillic val=/data/cyrillic-val init=/x/best.pt"
    assert groups[1]["name"].startswith("train=/") and groups[1]["name"].endswith("/latin-val init=none")
    assert max(len(part) for part in groups[1]["name"].split()) <= 48  # long paths cut in the middle
    for g, name in zip(groups, ("cyrillic", "latin")):
        assert g["n_runs"] == 6 and g["N"]["n_points"] == 5 and g["N"]["alpha"] == pytest.approx(expected[name])
        assert [p["runs"][0].split(os.sep)[-1].split("-")[0] for p in g["C"]["points"]] == [name] * len(g["C"]["points"])
        assert "error" in g["joint"]  # one D: no joint law, rather than one across both datasets
    assert sorted(os.listdir("png")) == ["group1", "group2"] and "fit_N.png" in os.listdir("png/group2")
    table = run_main(capsys, "runs", "--n-boot", "20")[1]
    assert "2 fit groups: their runs differ in more than the fitted axes" in table
    assert "=== group 1 of 2: train=/data/cyrillic val=/data/cyrillic-val init=/x/best.pt (6 runs)" in table
    # --where picks one group: init=none (was: nothing, null never equalled 'None'), a path relative or absolute
    for where, name in (("init=None", "latin"), ("init=/x/best.pt", "cyrillic"), ("train=latin", "latin"),
                        ("train=/data/cyrillic", "cyrillic"), ("val=latin-val", "latin")):
        code, out, err = run_main(capsys, "runs", "--json", "--n-boot", "20", "--where", where)
        assert code == 0 and json.loads(out)["N"]["alpha"] == pytest.approx(expected[name]), where
    assert fit.load_runs("runs", where=["img=32x128", "set=none", "eval=refine=1", "arch=parseq"]) == \
        fit.load_runs("runs") and fit.load_runs("runs", where=["img=32x96"]) == []


def test_older_config_and_csv_runs_group_by_what_they_record(tmp_path):
    # config.json without fit_group: img from model, --set items, --init; seed, N and lr never split a group
    base = {"arch": "trocr", "train": ["/d/train:3", "http://host:8080/synth"], "val": "/d/val", "init": None,
            "set": [], "beam": 1, "tokenizer": {"type": "char", "charset": "abc", "max_len": 25}}
    variants = {"base": {}, "wide": {"model": {"img_h": 32, "img_w": 96}}, "set": {"set": ["enc_width=96"]},
                "ft": {"init": "/x/best.pt"}, "beam": {"beam": 5}}
    for name, change in variants.items():
        for seed, N in enumerate((1e4, 3e4)):
            config = {**base, "model": {"img_h": 32, "img_w": 128}, "seed": seed, "N": N, "lr": seed / 1e3, **change}
            write_run(tmp_path, f"{name}-{seed}", config, [{"val_error": 50}])
    groups = fit._groups(fit.load_runs(str(tmp_path)))
    assert [(name, len(rs)) for name, _, rs in groups] == [
        ("init=none set=none img=32x128 eval=beam=1", 2), ("init=none set=none img=32x128 eval=beam=5", 2),
        ("init=/x/best.pt set=none img=32x128 eval=beam=1", 2), ("init=none set=enc_width=96 img=32x128 eval=beam=1", 2),
        ("init=none set=none img=32x96 eval=beam=1", 2)]
    assert groups[0][1]["train"] == [["/d/train", 3.0], ["http://host:8080/synth", 1.0]]
    assert len(fit.load_runs(str(tmp_path), where=["init=none", "train=/d/train", "set=none"])) == 6
    assert len(fit.load_runs(str(tmp_path), where=["set=enc_width=96"])) == 2
    assert len(fit.load_runs(str(tmp_path), where=["seed=1", "eval=beam=1"])) == 4  # config keys still work
    # CSV rows: by the fit group columns they have
    table = tmp_path / "points.csv"
    table.write_text("N,E,arch\n1e4,50,trocr\n2e4,40,trocr\n4e4,30,trocr\n1e4,20,parseq\n2e4,19,parseq\n4e4,18,parseq\n")
    r = fit.fit_all(str(table))
    assert [(g["name"], g["N"]["n_points"]) for g in r["groups"]] == [("arch=trocr", 3), ("arch=parseq", 3)]
    assert r["groups"][1]["N"]["alpha"] == pytest.approx(-np.polyfit(np.log([1e4, 2e4, 4e4]), np.log([.2, .19, .18]),
                                                                      1)[0])


def test_damaged_and_degenerate_run_folders_are_named_not_misread(tmp_path, capsys):
    rng = np.random.default_rng(3)
    # one run's evals give the C axis 10 points: a bootstrap over one run would be a zero-width interval
    points = power_points(10, 0.3, np.geomspace(1e3, 1e5, 10), 0.02, rng)
    evals = [{"samples": s, "flops": 1e9 * s, "val_error": e} for s, e in points]
    write_run(tmp_path, "one", {"N": 1e5, "D": 1e4, "arch": "parseq"}, evals)
    r = fit.fit_all(fit.load_runs([str(tmp_path), str(tmp_path / "one")]), n_boot=50)  # the folder given twice
    assert r["runs"] == 1 and r["C"]["ci"]["method"].startswith("t (") and r["C"]["ci"]["alpha"][0] < r["C"]["alpha"]
    # a finished run whose config.json is cut, and one whose fit_group was edited by hand: skipped, saying why
    write_run(tmp_path, "cut", {}, evals)
    (tmp_path / "cut" / "config.json").write_text('{"N": 1')
    write_run(tmp_path, "edited", {"N": 2e5, "fit_group": {"train": 5}}, evals)
    r = fit.fit_all(fit.load_runs(str(tmp_path)), n_boot=50)
    assert r["unfinished"] == [] and [s.split(": ", 1)[1][:24] for s in r["skipped"]] == [
        "unreadable config.json (", "damaged fit_group in con"]
    code, out, err = run_main(capsys, tmp_path, "--where", "arch=trocr")  # matching nothing: said so
    assert code == 1 and "no finished runs found (or none match --where)" in out
    code, out, err = run_main(capsys, tmp_path, "--pinned", "nan")
    assert code == 2 and "--pinned nan: give a word error in percent" in err


def test_groups_shortened_alike_are_named_in_full(tmp_path):
    rng = np.random.default_rng(4)
    long = "/data/" + "x" * 40
    for i, weight in enumerate((1, 3)):  # train sets that differ only in a weight, after a long path
        group = {"arch": "parseq", "train": [[f"{long}/synth", weight], [f"{long}/real", 1.0]]}
        for j, (n, e) in enumerate(power_points(1e3, 0.3, np.geomspace(1e4, 1e6, 4), 0.02, rng)):
            write_run(tmp_path, f"w{i}-{j}", {"N": n, "fit_group": group}, [{"val_error": e}])
    names = [g["name"] for g in fit.fit_all(fit.load_runs(str(tmp_path)), n_boot=10)["groups"]]
    assert len(set(names)) == 2 and all("synth:3" in n or "synth," in n for n in names), names
