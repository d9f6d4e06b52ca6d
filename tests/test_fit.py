"""Tests for fit.py: known laws recovered from synthetic data, the paper's TrOCR check, run folders, bad input."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fit  # noqa: E402

TROCR_CSV = os.path.join(ROOT, "tests", "trocr_size_points.csv")


def run_cli(*args):
    """The command line in a fresh interpreter (slow: use once)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "fit.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def run_main(capsys, *args):
    """fit.main in this process: (exit code, stdout, stderr)."""
    code = fit.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def write_run(root, name, config, evals, finished=True):
    d = os.path.join(root, name)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in evals)
    if finished:
        open(os.path.join(d, "result.json"), "w").write("{}")
    return d


def power_points(k, alpha, xs, noise, rng):
    """(x, E%) with E = (k/x)^alpha as a fraction, times log-normal noise."""
    return [(x, 100 * (k / x) ** alpha * math.exp(rng.normal(0, noise))) for x in xs]


def test_reference_trocr_size_law(capsys):
    # paper.md section 2: fitting TrOCR S, B, L gives alpha ~0.222, k ~1.95e4 and predicts H (9.07%) within 0.2 points
    p = run_cli(TROCR_CSV, "--holdout", "largest", "--json")
    assert p.returncode == 0, p.stderr
    n = json.loads(p.stdout)["N"]
    assert n["n_points"] == 3
    assert n["alpha"] == pytest.approx(0.222, abs=0.002)
    assert n["k"] == pytest.approx(1.95e4, rel=0.02)
    assert n["holdout"]["measured"] == [9.07]
    assert abs(n["holdout"]["predicted"][0] - 9.07) < 0.2
    table = run_main(capsys, TROCR_CSV, "--holdout", "largest")[1]
    assert "held out N=9.5e+08" in table and "not fitted" in table  # D, C and joint: no such columns


def test_recovers_power_law_with_noise():
    rng = np.random.default_rng(0)
    pts = power_points(3e3, 0.4, np.geomspace(1e4, 1e7, 12), 0.03, rng)
    r = fit.fit_all({"N": pts}, n_boot=500)["N"]
    assert r["alpha"] == pytest.approx(0.4, abs=0.03)
    assert r["k"] == pytest.approx(3e3, rel=0.3)
    assert r["ci"]["alpha"][0] < 0.4 < r["ci"]["alpha"][1]
    assert r["ci"]["k"][0] < 3e3 < r["ci"]["k"][1]
    assert r["r2"] > 0.95


def test_bootstrap_ci_coverage():
    rng, hits, trials = np.random.default_rng(1), 0, 40
    for t in range(trials):
        pts = power_points(1e3, 0.5, np.geomspace(1e4, 1e6, 10), 0.05, rng)
        ci = fit.fit_all({"N": pts}, n_boot=300, seed=t)["N"]["ci"]["alpha"]
        hits += ci[0] <= 0.5 <= ci[1]
    assert hits >= 0.75 * trials, f"95% CI covered the true alpha in {hits}/{trials} trials"


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


def joint_runs(true, noise, rng, Ns=np.geomspace(3e4, 1e6, 5), Ds=np.geomspace(2e3, 5e4, 5)):
    runs = []
    for N in Ns:
        for D in Ds:
            E = (true["einf"] + true["A"] / N ** true["alpha"] + true["B"] / D ** true["beta"]) * \
                math.exp(rng.normal(0, noise))
            cfg = {"N": N, "D": D, "arch": "trocr", "flops_per_sample": 20 * N, "train_samples": 1e5}
            runs.append(fit._make_run(f"n{N:.0f}-d{D:.0f}", cfg, [{"samples": 1e5, "flops": 2e6 * N,
                                                                   "val_error": 100 * E, "final": True}], True))
    return runs


def test_joint_fit_recovers_parameters_and_agrees_with_varpro():
    true = dict(einf=0.02, A=300.0, alpha=0.6, B=40.0, beta=0.5)
    j = fit.fit_all(joint_runs(true, 0.0, np.random.default_rng(0)), n_boot=20)["joint"]
    for k, v in true.items():
        assert j[k] == pytest.approx(v, rel=1e-3), k
        assert j["varpro"][k] == pytest.approx(v, rel=1e-3), k
    assert j["starts_at_best"] >= 1 and j["r2"] > 0.9999
    # with noise: still close, CIs cover the exponents, and both methods predict the same errors
    j = fit.fit_all(joint_runs(true, 0.02, np.random.default_rng(1)), n_boot=100)["joint"]
    assert j["alpha"] == pytest.approx(0.6, abs=0.1) and j["beta"] == pytest.approx(0.5, abs=0.1)
    assert j["ci"]["alpha"][0] < 0.6 < j["ci"]["alpha"][1] and j["ci"]["beta"][0] < 0.5 < j["ci"]["beta"][1]
    assert j["varpro"]["max_rel_diff_pred"] < 0.05


def test_compute_optimal_matches_numerical_minimum():
    true = dict(einf=0.02, A=300.0, alpha=0.6, B=40.0, beta=0.5)
    j = fit.fit_all(joint_runs(true, 0.0, np.random.default_rng(0)), n_boot=10, budgets=[1e13])["joint"]
    co = j["compute_optimal"]
    assert co["flops_per_sample"]["gamma"] == pytest.approx(1.0) and co["flops_per_sample"]["c0"] == pytest.approx(20)
    b = co["budgets"][0]
    E = lambda lN: true["einf"] + true["A"] * math.exp(-0.6 * lN) + true["B"] * (20 * math.exp(lN) / 1e13) ** 0.5
    lN = optimize.minimize_scalar(E, bounds=(5, 25), method="bounded", options=dict(xatol=1e-10)).x
    assert b["N"] == pytest.approx(math.exp(lN), rel=1e-3)
    assert b["D"] == pytest.approx(1e13 / (20 * b["N"]), rel=1e-6)
    assert b["E"] == pytest.approx(100 * E(lN), rel=1e-4)


def test_saturating_fit_recovers_floor():
    rng = np.random.default_rng(2)
    xs = np.geomspace(1e3, 1e7, 12)
    pts = [(x, 100 * (0.05 + (2e3 / x) ** 0.7) * math.exp(rng.normal(0, 0.005))) for x in xs]
    s = fit.fit_all({"D": pts}, saturating=True, n_boot=50)["D"]["saturating"]
    assert s["einf"] == pytest.approx(0.05, rel=0.1)
    assert s["alpha"] == pytest.approx(0.7, rel=0.1)
    assert s["k"] == pytest.approx(2e3, rel=0.2)


def test_run_folders_grouping_seeds_pinned_and_unfinished(tmp_path):
    def evals(N, final):  # two evals: halfway (worse) and final
        return [{"step": 1, "samples": 5e4, "flops": 10 * N * 5e4, "val_error": min(100, 2 * final), "val_loss": 1.0},
                {"step": 2, "samples": 1e5, "flops": 10 * N * 1e5, "val_error": final, "val_loss": 0.5, "final": True}]
    base = {"arch": "trocr", "train_samples": 100000}
    ladder = {1e4: [100.0], 3e4: [60.0], 1e5: [40.0, 30.0, 100.0], 3e5: [20.0], 1e6: [12.0]}  # N: errors per seed
    for N, errs in ladder.items():
        for s, e in enumerate(errs):
            write_run(tmp_path, f"n{N:g}-s{s}", dict(base, N=N, D=5e4, seed=s, flops_per_sample=10 * N), evals(N, e),
                      finished=not (N == 1e6))
    write_run(tmp_path, "other-d", dict(base, N=3e4, D=1e4, seed=0), evals(3e4, 70.0))   # off the N ladder
    write_run(tmp_path, "parseq", dict(base, arch="parseq", N=3e4, D=5e4), evals(3e4, 5.0))
    write_run(tmp_path, "empty", dict(base, N=1e5, D=5e4), [])                          # no evals
    os.makedirs(tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert "unreadable config.json" in fit.load_runs(str(tmp_path / "broken"))[0]["skip"]
    runs = fit.load_runs([str(tmp_path)], where=["arch=trocr"])
    assert len(runs) == 9 and all(r["arch"] == "trocr" for r in runs)
    r = fit.fit_all(runs, n_boot=100)
    assert any("empty" in s and "no evals" in s for s in r["skipped"])
    assert r["unfinished"] == [os.path.join(str(tmp_path), "n1e+06-s0")]
    n = r["N"]
    assert n["group"] == {"arch": "trocr", "D": 5e4, "budget": 1e5}
    assert any("1 run(s) off this ladder" in s for s in n["skipped"])
    assert [p["x"] for p in n["points"]] == [1e4, 3e4, 1e5, 3e5, 1e6]
    assert [p["y"] for p in n["points"]] == [100.0, 60.0, 40.0, 20.0, 12.0]  # median of 40, 30, 100 seeds
    assert [p["pinned"] for p in n["points"]] == [True, False, False, False, False] and n["n_points"] == 4
    assert n["points"][2]["spread"] == [30.0, 100.0] and len(n["points"][2]["runs"]) == 3
    assert [p["unfinished"] for p in n["points"]] == [False, False, False, False, True]
    expected = fit.fit_power(np.array([3e4, 1e5, 3e5, 1e6]), np.array([0.6, 0.4, 0.2, 0.12]))
    assert n["alpha"] == pytest.approx(expected[0]) and n["k"] == pytest.approx(expected[1])
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
    assert r["D"]["group"] == {"arch": "parseq", "N": 1e5, "epochs": 20.0} and r["D"]["n_points"] == 4


def test_bad_input_messages(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("size,score\n1,2\n")
    code, out, err = run_main(capsys, bad)
    assert code == 2 and "needs a header with at least one of N, D, C" in err
    two = tmp_path / "two.csv"
    two.write_text("N,D,acc\n1e4,100,50\n2e4,100,60\n")
    code, out, err = run_main(capsys, two)
    assert code == 1 and "need at least 3 distinct N" in out and "nothing could be fitted" in err
    odd = tmp_path / "odd.csv"  # NaN, negative and 0% error rows are skipped with a reason; the rest still fit
    odd.write_text("N,E\n1e4,50\n2e4,nan\n-3e4,30\n4e4,0\n8e4,25\n1.6e5,20\n")
    r = fit.fit_all(fit.load_runs(str(odd)), n_boot=10)
    assert r["N"]["n_points"] == 3 and len(r["N"]["skipped"]) == 3
    assert any("need finite positive values" in s for s in r["N"]["skipped"])
    assert "no run has D" in r["D"]["error"] and "no run has C" in r["C"]["error"]
    excel = tmp_path / "excel.csv"  # byte-order mark, and a row with a trailing comma
    excel.write_text("\ufeffN,E\n1e4,50\n2e4,40,\n4e4,30\n", encoding="utf-8")
    assert [r["N"] for r in fit.load_runs(str(excel))] == [1e4, 2e4, 4e4]
    code, out, err = run_main(capsys, TROCR_CSV, "--holdout", "biggest")
    assert code == 2 and "--holdout 'biggest'" in err
    code, out, err = run_main(capsys, tmp_path / "missing")
    assert code == 2 and "neither a folder of runs" in err
    empty = tmp_path / "runs"
    write_run(empty, "r0", {"N": 1e4, "D": 1e3}, [])
    code, out, err = run_main(capsys, empty)
    assert code == 1 and "no evals" in out


def test_json_keys_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(3)
    runs = joint_runs(dict(einf=0.02, A=300.0, alpha=0.6, B=40.0, beta=0.5), 0.02, rng)
    for r in runs:
        write_run(tmp_path / "runs", r["name"], r["config"], r["evals"])
    code, out, err = run_main(capsys, tmp_path / "runs", "--json", "--n-boot", "30", "--holdout", "largest",
                              "--plot", tmp_path / "png", "--budget", "1e13")
    assert code == 0, err
    out = json.loads(out)
    for ax in ("N", "D", "C"):
        assert {"k", "alpha", "r2", "rmse", "ci", "n_points", "holdout", "points", "skipped"} <= set(out[ax])
        assert set(out[ax]["holdout"]) == {"x", "measured", "predicted", "rel_error"}
    assert {"einf", "A", "alpha", "B", "beta", "ci", "varpro", "compute_optimal", "holdout"} <= set(out["joint"])
    assert out["joint"]["compute_optimal"]["budgets"][0]["C"] == 1e13
    pngs = sorted(os.listdir(tmp_path / "png"))
    assert pngs == ["fit_C.png", "fit_D.png", "fit_N.png", "fit_joint.png"]
    assert all(os.path.getsize(tmp_path / "png" / f) > 1000 for f in pngs)


def test_holdout_specs():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert fit._holdout_cut(None, "N", x) == math.inf
    assert fit._holdout_cut("largest", "N", x) == 5 and fit._holdout_cut("largest:2", "D", x) == 4
    assert fit._holdout_cut("3.5", "C", x) == 3.5
    assert fit._holdout_cut("N=2", "N", x) == 2 and fit._holdout_cut("N=2", "D", x) == math.inf
    with pytest.raises(ValueError, match="--holdout"):
        fit._holdout_cut("biggest", "N", x)
    rng = np.random.default_rng(4)
    r = fit.fit_all({"N": power_points(1e3, 0.5, np.geomspace(1e4, 1e6, 6), 0.01, rng)}, holdout="largest:2",
                    n_boot=20)["N"]
    assert r["n_points"] == 4 and len(r["holdout"]["x"]) == 2 and max(map(abs, r["holdout"]["rel_error"])) < 0.05
