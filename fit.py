"""fit.py: scaling laws from run folders (or a table of points), with error bars, a held-out check and plots.

    python fit.py runs/                                   # E(N), E(D), E(C) and the joint E(N, D)
    python fit.py runs/ --where arch=parseq --metric loss --plot plots/ --json
    python fit.py tests/trocr_size_points.csv --holdout largest     # the paper's TrOCR-H check

Laws (Rang et al. 2024, arXiv 2401.00028; ../shared/paper.md section 2), word error fitted as a FRACTION (the TrOCR
size law's X_c is ~1.97e4, as printed; tables show percent), goodness as R^2 and RMSE of log E, CIs by a percentile
bootstrap over runs (all points of a run together):
- per axis X in {N, D, C}: E = (X_c / X)^alpha by least squares in log-log space, as the study fitted;
  `--saturating` adds E = E_inf + (X_c / X)^alpha (Huber loss on log E).
- joint: E = E_inf + A / N^alpha + B / D^beta (Chinchilla approach 3: Huber delta=1e-3 on log E, L-BFGS-B from a
  grid of starts), cross-checked by variable projection; from it the compute-optimal N and D for a FLOP budget.
Points, from train.py's run folders (config.json + metrics.jsonl, error in percent) or a CSV of one finished run per
row (header: any of N, D, C; one of E (word error %), acc (word accuracy %), loss; optional label, arch, seed):
- E(N): each run's final eval (`--best`: its best) on the ladder of runs sharing (arch, D, sample budget) with the
  most distinct N; the median of a size's seeds is fitted, their spread reported. E(D): likewise at fixed N.
- E(C): the lower envelope (compute frontier) of every eval of every run. Joint: every run's final point.
Error at >= 99.5% (a model that reads nothing) carries no information: flagged, kept out of every fit.
Not done here: training (train.py), IsoFLOP parabolas (biased even on clean data: Czech et al. 2026), other forms.
"""
import argparse
import csv
import ctypes
import glob
import json
import math
import os
import sys

import numpy as np
import scipy
from scipy import optimize

METRICS = {"error": "val_error", "loss": "val_loss", "test": "test_error"}  # metrics.jsonl key per --metric
PINNED = 99.5         # % word error at or above which a model reads nothing: flagged, never fitted
DELTA = 1e-3          # Huber delta on log E (Chinchilla approach 3)
MAX_NONLINEAR_BOOT = 200  # bootstrap draws for the L-BFGS fits (each is a refit); the log-log fits use n_boot
AXES = ("N", "D", "C")


def _one_blas_thread():
    """OpenBLAS wakes a thread per core even for L-BFGS-B's 5x5 matrices: 10x slower on 2 busy cores (measured).
    Best effort, for the pip wheels' bundled OpenBLAS (already loaded: CDLL gets the same library)."""
    for pkg in (np, scipy):
        for lib in glob.glob(os.path.join(os.path.dirname(pkg.__file__) + ".libs", "*openblas*")):
            try:
                dll = ctypes.CDLL(lib)
            except OSError:
                continue
            for sym in ("scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                        "openblas_set_num_threads"):
                if hasattr(dll, sym):
                    getattr(dll, sym)(1)
                    break

_one_blas_thread()

# ----------------------------------------------------------------------------- reading runs

def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

def _ok(v):
    return v is not None and math.isfinite(v) and v > 0

def _parse_where(where):
    if isinstance(where, dict):
        return {k: str(v) for k, v in where.items()}
    for item in where or []:
        if "=" not in item:
            raise ValueError(f"--where {item!r}: expected KEY=VALUE, e.g. arch=parseq")
    return dict(item.split("=", 1) for item in where or [])

def _matches(config, where):
    for key, want in where.items():
        v = config
        for part in key.split("."):  # model.enc_width=64 reaches into nested dicts
            v = v.get(part) if isinstance(v, dict) else None
        numeric = _num(v) is not None and _num(want) is not None
        if v is None or (_num(v) != _num(want) if numeric else str(v) != want):
            return False
    return True

def _make_run(name, config, evals, finished):
    # the sample budget: config "train_samples", else the samples seen at the last eval
    budget = _num(config.get("train_samples"))
    if budget is None and evals and _num(evals[-1].get("samples")):
        budget = float(f"{_num(evals[-1]['samples']):.2g}")  # 2 significant figures absorb batch rounding
    return {"name": name, "config": config, "evals": evals, "finished": finished, "arch": config.get("arch"),
            "N": _num(config.get("N")), "D": _num(config.get("D")), "budget": budget,
            "skip": None if evals else "no evals in metrics.jsonl (still starting, or crashed before its first eval)"}

def _read_run(folder):
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return dict(_make_run(folder, {}, [], False), skip=f"unreadable config.json ({e})")
    evals, path = [], os.path.join(folder, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    evals.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # blank, or the last line of a run killed mid-write
    return _make_run(folder, config, evals, os.path.exists(os.path.join(folder, "result.json")))

def _read_csv(path):
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}  # extra fields: key None
                for row in csv.DictReader(f)]
    cols = set(rows[0]) if rows else set()
    if not rows or not cols & {"N", "D", "C"} or not cols & {"E", "acc", "loss"}:
        raise ValueError(f"{path}: needs a header with at least one of N, D, C and one of E (word error %), acc "
                         f"(word accuracy %), loss, and at least one row; found columns {sorted(cols) or 'none'}")
    runs = []
    for i, row in enumerate(rows):
        acc = _num(row.get("acc"))
        err = _num(row.get("E")) if "E" in cols else (None if acc is None else 100 - acc)
        ev = {"flops": _num(row.get("C")), "val_error": err, "test_error": err, "val_loss": _num(row.get("loss"))}
        config = {k: (_num(v) if k in ("N", "D", "C") else v) for k, v in row.items() if k and v != ""}
        if _ok(config.get("C")) and _ok(config.get("D")):
            config["flops_per_sample"] = config["C"] / config["D"]
        runs.append(_make_run(row.get("label") or f"{path}:{i + 2}", config, [ev], True))
    return runs

def load_runs(paths, where=None):
    """Run dicts from run folders (searched recursively for config.json) and/or CSV files, filtered by `where`
    ({key: value} or ["key=value", ...], any config.json field, dotted for nested ones). Each run: name, config,
    evals (the metrics.jsonl lines), finished (result.json present), arch, N, D, budget, skip (why unusable)."""
    where, runs = _parse_where(where), []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        if os.path.isfile(p) and str(p).lower().endswith(".csv"):
            runs += _read_csv(p)
        elif os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                if "config.json" in files:
                    runs.append(_read_run(root))
        else:
            raise FileNotFoundError(f"{p}: neither a folder of runs (config.json + metrics.jsonl) nor a .csv file")
    return [r for r in runs if _matches(r["config"], where)]

# ----------------------------------------------------------------------------- points per axis

def _observations(run, axis, key, best):
    """(n, 2) array of a run's (x, y) on an axis, or a string saying why it has none."""
    evs = [e for e in run["evals"] if _num(e.get(key)) is not None]
    if not evs:
        return f"no '{key}' in its evals"
    if axis == "C":
        xy = np.array([(_num(e.get("flops")) or np.nan, _num(e[key])) for e in evs])
        xy = xy[np.isfinite(xy).all(1) & (xy > 0).all(1)]
        return xy if len(xy) else f"no eval with finite positive 'flops' and '{key}'"
    good = [e for e in evs if _ok(_num(e[key]))]
    e = min(good, key=lambda e: _num(e[key])) if best and good else evs[-1]
    x, y = run[axis], _num(e[key])
    if not (_ok(x) and _ok(y)):
        return f"{axis}={x}, {key}={y}: need finite positive values (log space)"
    return np.array([[x, y]])

def _reduce(axis, xy, pin):
    """Points to fit from raw observations: (x, y, pinned) with per-size medians (N, D) or the compute frontier (C)."""
    o = np.lexsort((xy[:, 1], xy[:, 0]))
    x, y = xy[o, 0], xy[o, 1]
    if axis == "C":
        keep = y < pin  # a pinned start of training would otherwise open every frontier
        x, y = x[keep], y[keep]
        lower = y < np.minimum.accumulate(np.r_[np.inf, y[:-1]])  # below everything cheaper: on the envelope
        return x[lower], y[lower], np.zeros(lower.sum(), bool)
    ux, first, count = np.unique(x, return_index=True, return_counts=True)
    my = (y[first + (count - 1) // 2] + y[first + count // 2]) / 2  # median of each size's seeds
    return ux, my, my >= pin

def _ladder(runs, axis):
    """Indices of the runs on the best ladder for axis N (fixed arch, D, budget) or D (fixed arch, N and either a
    fixed sample budget or fixed epochs: budget proportional to D, as train.py's --epochs and the sweep plan it).
    Best: most distinct values of the axis, then the larger fixed N or D, then a fixed budget over fixed epochs."""
    other = "D" if axis == "N" else "N"
    groups = {}
    for i, r in enumerate(runs):
        groups.setdefault((r["arch"], r[other], "budget", r["budget"]), []).append(i)
        if axis == "D" and r["budget"] and r["D"]:
            groups.setdefault((r["arch"], r[other], "epochs", round(r["budget"] / r["D"], 2)), []).append(i)
    key = max(groups, key=lambda k: (len({runs[i][axis] for i in groups[k]}), k[1] or 0, k[2] == "budget"))
    return groups[key], {"arch": key[0], other: key[1], key[2]: key[3]}

# ----------------------------------------------------------------------------- fitting

def _goodness(res, ly):
    """R^2 and RMSE in log space, from the residuals and the log targets."""
    ss = ((ly - ly.mean()) ** 2).sum()
    return (1 - (res ** 2).sum() / ss if ss else 1.0), float(np.sqrt((res ** 2).mean()))

def fit_power(x, y):
    """E = (k/x)^alpha by least squares on log E = alpha*log k - alpha*log x.
    Returns alpha, k, r2, rmse (log space) and the line's coefficients (slope, intercept) of log E on log x."""
    lx, ly = np.log(x), np.log(y)
    dx, dy = lx - lx.mean(), ly - ly.mean()
    slope = (dx * dy).sum() / (dx * dx).sum()
    c = np.array([slope, ly.mean() - slope * lx.mean()])
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # flat curve: alpha ~ 0, k astronomical
        k = float(np.exp(c[1] / -c[0]))
    r2, rmse = _goodness(dy - slope * dx, ly)
    return -c[0], k, r2, rmse, c

def _lse_terms(theta, F):
    """The log of each term of the saturating or joint law at each point, (n, m+1); E_hat is their exps' sum.
    F = log X, theta = (a_1, alpha_1, ..., a_m, alpha_m, e): term j is exp(a_j) / X_j^alpha_j, E_inf = exp(e)."""
    m = F.shape[1]
    return np.column_stack([theta[0:2 * m:2] - theta[1:2 * m:2] * F, np.full(len(F), theta[-1])])

def _lse_loss(theta, F, ly):
    """Summed Huber loss of log E_hat - log E, and its gradient."""
    m = F.shape[1]
    Z = _lse_terms(theta, F)
    zmax = Z.max(1, keepdims=True)
    W = np.exp(Z - zmax)
    S = W.sum(1, keepdims=True)
    r = zmax[:, 0] + np.log(S[:, 0]) - ly
    W /= S  # d log E_hat / d log term
    absr = np.abs(r)
    loss = np.where(absr <= DELTA, 0.5 * r * r, DELTA * (absr - 0.5 * DELTA)).sum()
    g = np.clip(r, -DELTA, DELTA)  # d Huber / d r
    grad = np.empty_like(theta)
    grad[0:2 * m:2] = g @ W[:, :m]
    grad[1:2 * m:2] = -(g[:, None] * W[:, :m] * F).sum(0)
    grad[-1] = g @ W[:, m]
    return loss, grad

def _lse_fit(F, ly, starts):
    """L-BFGS-B from each start; returns (best theta, its loss, how many starts reached it). Optimised with F
    centred (a_j - alpha_j * F_j = (a_j - alpha_j * mu_j) - alpha_j * (F_j - mu_j)): decorrelates a_j and alpha_j."""
    m, mu = F.shape[1], F.mean(0)
    shift = np.zeros(2 * m + 1)
    bounds = [(None, None), (1e-4, 10.0)] * m + [(None, None)]
    fits = []
    for s in starts:
        shift[0:2 * m:2] = s[1:2 * m:2] * mu
        f = optimize.minimize(_lse_loss, s - shift, args=(F - mu, ly), jac=True, method="L-BFGS-B", bounds=bounds,
                              options=dict(maxiter=5000, ftol=1e-15, gtol=1e-12))
        shift[0:2 * m:2] = f.x[1:2 * m:2] * mu
        fits.append((f.fun, f.x + shift))
    best = min(fits, key=lambda f: f[0])
    reached = int(sum(f[0] <= best[0] * (1 + 1e-3) + 1e-12 for f in fits))
    return best[1], float(best[0]), reached

def _lse_starts(F, ly, alphas=(0.25, 0.5, 1.0, 2.0), floors=(0.01, 0.5)):
    """A grid of starts scaled to the data: every exponent in `alphas`, each term at half the typical E at the mean
    log X, E_inf at each of `floors` times the smallest E. 4^m * 2 starts (32 for the joint law)."""
    m, starts = F.shape[1], []
    for combo in np.array(np.meshgrid(*([alphas] * m + [floors]))).reshape(m + 1, -1).T:
        th = np.empty(2 * m + 1)
        th[1:2 * m:2] = combo[:m]
        th[0:2 * m:2] = combo[:m] * F.mean(0) + ly.mean() + math.log(0.5)
        th[-1] = ly.min() + math.log(combo[-1])
        starts.append(th)
    return starts

def _warm(theta, y):
    """Bootstrap start: the full-data fit with E_inf lifted to >= 10% of the smallest E (a floor fitted to ~0 has
    no gradient left and would stay stuck there)."""
    return np.r_[theta[:-1], max(theta[-1], math.log(0.1 * y.min()))]

def varpro(logN, logD, y):
    """Cross-check of the joint fit without starting points: for fixed (alpha, beta) the law is linear in
    (E_inf, A, B), solved by non-negative least squares on relative residuals (E_hat - E)/E ~ log E_hat - log E;
    (alpha, beta) from a grid, then Nelder-Mead. Returns dict(einf, A, alpha, B, beta)."""
    def inner(p):
        M = np.column_stack([np.ones_like(y), np.exp(-p[0] * logN), np.exp(-p[1] * logD)]) / y[:, None]
        scale = np.linalg.norm(M, axis=0)
        coef, rnorm = optimize.nnls(M / scale, np.ones_like(y))
        return coef / scale, rnorm
    grid = np.linspace(0.02, 3.0, 40)
    p0 = min(((a, b) for a in grid for b in grid), key=lambda p: inner(p)[1])
    p = optimize.minimize(lambda p: inner(p)[1] if min(p) > 0 else np.inf, p0, method="Nelder-Mead",
                          options=dict(xatol=1e-9, fatol=1e-15, maxiter=4000)).x
    c = inner(p)[0]
    return {"einf": float(c[0]), "A": float(c[1]), "alpha": float(p[0]), "B": float(c[2]), "beta": float(p[1])}

# ----------------------------------------------------------------------------- per axis and joint

def _holdout_cut(spec, axis, x):
    """Points with x >= the returned value are held out of the fit (inf: none)."""
    if not spec:
        return math.inf
    spec = str(spec)
    if "=" in spec:
        ax, spec = spec.split("=", 1)
        if ax.strip() != axis:
            return math.inf
    if spec.startswith("largest"):
        k = int(spec.split(":")[1]) if ":" in spec else 1
        ux = np.unique(x)
        return ux[-min(k, len(ux))] if len(ux) else math.inf
    v = _num(spec)
    if v is None:
        raise ValueError(f"--holdout {spec!r}: use largest, largest:K, a value, or AXIS=VALUE (e.g. N=5e8)")
    return v

def _percentile_ci(samples, level):
    s = np.asarray(samples, float)
    s = s[np.isfinite(s)]
    q = 50 * (1 - level)
    return [float(np.percentile(s, q)), float(np.percentile(s, 100 - q))] if len(s) > 1 else None

def _fit_axis(runs, axis, o):
    key, scale, pin = o["key"], o["scale"], o["pin"]
    has_x = lambda r: any(e.get("flops") is not None for e in r["evals"]) if axis == "C" else r[axis] is not None
    cand = [r for r in runs if not r["skip"] and has_x(r)]
    if not cand:
        source = "'flops' in metrics.jsonl" if axis == "C" else f"config.json '{axis}'"
        return {"error": f"no run has {axis} ({source} or a CSV column '{axis}')"}
    skipped, obs, used, group = [], [], [], None
    for r in cand:
        xy = _observations(r, axis, key, o["best"])
        if isinstance(xy, str):
            skipped.append(f"{r['name']}: {xy}")
        else:
            obs.append(xy)
            used.append(r)
    if axis != "C" and obs:
        idx, group = _ladder(used, axis)
        if len(obs) > len(idx):
            fixed = ", ".join(f"{k}={v}" for k, v in group.items())
            skipped.append(f"{len(obs) - len(idx)} run(s) off this ladder (fixed {fixed})")
        obs, used = [obs[i] for i in idx], [used[i] for i in idx]
    out = {"group": group, "skipped": skipped, "n_runs": len(obs)}
    if not obs:
        return dict(out, error=f"{axis}: no usable runs")
    x, y, pinned = _reduce(axis, np.concatenate(obs), pin)
    cut = _holdout_cut(o["holdout"], axis, x[~pinned])
    fit = ~pinned & (x < cut)
    if len(np.unique(x[fit])) < 3:
        why = f", {(~pinned).sum()} not pinned at >= {pin}%" if pinned.any() else ""
        why += ", after the holdout" if cut < math.inf else ""
        return dict(out, error=f"{axis}: {fit.sum()} usable point(s) ({len(x)} in all{why}); need at least 3 "
                               f"distinct {axis}")
    alpha, k, r2, rmse, line = fit_power(x[fit], y[fit] / scale)
    boot = []  # (slope, intercept) per draw
    for _ in range(o["n_boot"]):
        bx, by = _resample(obs, axis, cut, o)
        if len(np.unique(bx)) >= 2:
            boot.append(fit_power(bx, by)[4])
    boot = np.array(boot).reshape(-1, 2)
    grid, q = np.geomspace(x.min(), x.max(), 40), 50 * (1 - o["level"])
    curves = np.exp(boot[:, 1:2] + boot[:, 0:1] * np.log(grid)) * scale
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        boot_k = np.exp(boot[:, 1] / -boot[:, 0])
    out.update(k=k, alpha=alpha, r2=r2, rmse=rmse, n_points=int(fit.sum()),
               ci={"alpha": _percentile_ci(-boot[:, 0], o["level"]), "k": _percentile_ci(boot_k, o["level"]),
                   "level": o["level"], "method": "bootstrap over runs", "n_boot": len(boot)},
               band=None if len(boot) < 2 else {"x": grid.tolist(), "lo": np.percentile(curves, q, 0).tolist(),
                                                 "hi": np.percentile(curves, 100 - q, 0).tolist()})
    pred = np.exp(np.polyval(line, np.log(x))) * scale
    held = ~pinned & (x >= cut)
    out["holdout"] = None if not held.any() else {
        "x": x[held].tolist(), "measured": y[held].tolist(), "predicted": pred[held].tolist(),
        "rel_error": ((pred[held] - y[held]) / y[held]).tolist()}
    out["points"] = [{"x": float(xi), "y": float(yi), "pinned": bool(pi), "held_out": bool(hi),
                      "log_residual": float(np.log(yi / pr)), **_support(axis, xi, yi, obs, used)}
                     for xi, yi, pi, hi, pr in zip(x, y, pinned, held, pred)]
    if o["saturating"]:
        out["saturating"] = _fit_saturating(x[fit], y[fit] / scale, obs, axis, cut, o)
    return out

def _resample(obs, axis, cut, o):
    """One bootstrap draw: resample runs (all points of a run together), rebuild the points to fit."""
    draw = o["rng"].integers(0, len(obs), len(obs))
    x, y, pinned = _reduce(axis, np.concatenate([obs[i] for i in draw]), o["pin"])
    m = ~pinned & (x < cut)
    return x[m], y[m] / o["scale"]

def _support(axis, x, y, obs, runs):
    """Which runs a point stands for: the seeds of a size (and their spread), or the run a frontier point is from."""
    hits = [(r, xy[xy[:, 0] == x, 1]) for r, xy in zip(runs, obs) if (xy[:, 0] == x).any()]
    if axis == "C":
        hits = [next((r, ys) for r, ys in hits if (ys == y).any())]
    ys = np.concatenate([v for _, v in hits])
    return {"runs": [r["name"] for r, _ in hits], "spread": [float(ys.min()), float(ys.max())],
            "unfinished": any(not r["finished"] for r, _ in hits)}

def _fit_saturating(x, y, obs, axis, cut, o):
    if len(x) < 5:  # 3 parameters: with 4 points every bootstrap draw that can be fitted is the data itself
        return {"error": f"saturating {axis}: needs at least 5 points, has {len(x)}"}
    F, ly = np.log(x)[:, None], np.log(y)
    starts = _lse_starts(F, ly)
    th, loss, reached = _lse_fit(F, ly, starts)
    unpack = lambda t: [math.exp(t[2]), t[1], math.exp(t[0] / t[1])]  # einf, alpha, k
    boot = []
    for _ in range(min(o["n_boot"], MAX_NONLINEAR_BOOT)):
        bx, by = _resample(obs, axis, cut, o)
        if len(np.unique(bx)) >= 4:
            boot.append(unpack(_lse_fit(np.log(bx)[:, None], np.log(by), [_warm(th, by)])[0]))
    boot = np.array(boot).reshape(-1, 3)
    r2, rmse = _goodness(np.log(np.exp(_lse_terms(th, F)).sum(1)) - ly, ly)
    einf, alpha, k = unpack(th)
    ci = {n: _percentile_ci(boot[:, i], o["level"]) for i, n in enumerate(("einf", "alpha", "k"))}
    return {"einf": einf, "alpha": alpha, "k": k, "r2": r2, "rmse": rmse, "loss": loss, "starts": len(starts),
            "starts_at_best": reached, "ci": dict(ci, n_boot=len(boot))}

def _flops_per_sample(runs):
    """FLOPs per training sample as c0 * N^gamma, fitted over the runs' config (train.py's count)."""
    pairs = []
    for r in runs:
        f = _num(r["config"].get("flops_per_sample"))
        if not _ok(f):  # older logs: C / samples of any eval
            f = next((e["flops"] / e["samples"] for e in r["evals"] if _ok(_num(e.get("flops")))
                      and _ok(_num(e.get("samples")))), None)
        if _ok(f) and _ok(r["N"]):
            pairs.append((r["N"], f))
    if not pairs:
        return None
    lN, lf = np.log(np.array(pairs)).T
    if len(np.unique(lN)) > 1:
        gamma, lc0 = np.polyfit(lN, lf, 1)
        return {"c0": math.exp(lc0), "gamma": float(gamma), "source": f"power fit over {len(pairs)} runs"}
    return {"c0": math.exp(lf.mean() - lN.mean()), "gamma": 1.0, "source": "one model size: assumed ~ N"}

def _optimum(p, fps, C):
    """argmin over N of E_inf + A N^-alpha + B D^-beta subject to c0 N^gamma D = C (closed form)."""
    a, b, g, c0 = p["alpha"], p["beta"], fps["gamma"], fps["c0"]
    if min(a, b, g, p["A"], p["B"]) <= 0:
        return math.nan, math.nan, math.nan
    N = (a * p["A"] / (b * g * p["B"] * (c0 / C) ** b)) ** (1 / (a + g * b))
    D = C / (c0 * N ** g)
    return N, D, p["einf"] + p["A"] / N ** a + p["B"] / D ** b

def _compute_optimal(p, boot, N, D, runs, o):
    """Compute-optimal N, D (with CIs) and predicted E per FLOP budget. C = flops_per_sample(N) * D: one pass over D
    unique images (Chinchilla's convention; a run that repeats epochs spent more). Default budgets: that compute for
    the biggest run, x10, x100."""
    fps = _flops_per_sample(runs)
    if fps is None:
        return {"error": "no flops_per_sample in config.json (nor flops/samples in metrics.jsonl)"}
    g, c0 = fps["gamma"], fps["c0"]
    i = int(np.argmax(N ** g * D))
    opt = []
    for C in o["budgets"] or [c0 * N[i] ** g * D[i] * m for m in (1, 10, 100)]:
        n, d, e = _optimum(p, fps, C)
        bs = np.array([_optimum(b, fps, C) for b in boot]).reshape(-1, 3)
        ci = {"N": _percentile_ci(bs[:, 0], o["level"]), "D": _percentile_ci(bs[:, 1], o["level"])}
        opt.append({"C": C, "N": n, "D": d, "E": e * o["scale"], "ci": ci})
    return {"flops_per_sample": fps, "budgets": opt, "N_exponent": p["beta"] / (p["alpha"] + g * p["beta"]),
            "D_exponent": p["alpha"] / (p["alpha"] + g * p["beta"])}

def _fit_joint(runs, o):
    both = [r for r in runs if _ok(r["N"]) and _ok(r["D"])]
    if not both:
        return {"error": "joint E(N, D): no run has both N and D"}
    rows = []
    for r in both:
        xy = None if r["skip"] else _observations(r, "N", o["key"], o["best"])
        if isinstance(xy, np.ndarray) and xy[0, 1] < o["pin"]:
            rows.append((r["N"], r["D"], xy[0, 1], r["name"]))
    nN, nD = len({r[0] for r in rows}), len({r[1] for r in rows})
    if len(rows) < 7 or nN < 3 or nD < 3:  # 5 parameters: at least 2 degrees of freedom, 3 values per axis
        return {"error": f"joint E(N, D): needs >= 7 usable runs spanning >= 3 N and >= 3 D; has {len(rows)} runs "
                         f"not pinned, {nN} N, {nD} D"}
    N, D, y, names = (np.array([r[i] for r in rows]) for i in range(4))
    ax = "D" if str(o["holdout"]).startswith("D=") else "N"  # held out along N unless the spec says D=
    hx = D if ax == "D" else N
    held = hx >= _holdout_cut(o["holdout"], ax, hx)
    fit = ~held
    if fit.sum() < 7:
        return {"error": f"joint E(N, D): {fit.sum()} runs left after the holdout; need >= 7"}
    F, ly, ys = np.log(np.column_stack([N, D])), np.log(y / o["scale"]), y / o["scale"]
    starts = _lse_starts(F[fit], ly[fit])
    th, loss, reached = _lse_fit(F[fit], ly[fit], starts)
    unpack = lambda t: {"einf": math.exp(t[4]), "A": math.exp(t[0]), "alpha": t[1], "B": math.exp(t[2]), "beta": t[3]}
    p = unpack(th)
    pred = np.exp(_lse_terms(th, F)).sum(1)
    r2, rmse = _goodness(np.log(pred[fit]) - ly[fit], ly[fit])
    vp = varpro(F[fit, 0], F[fit, 1], ys[fit])
    vpred = vp["einf"] + vp["A"] / N[fit] ** vp["alpha"] + vp["B"] / D[fit] ** vp["beta"]
    vp["max_rel_diff_params"] = max(abs(vp[k] - p[k]) / abs(p[k]) for k in p)
    vp["max_rel_diff_pred"] = float(np.max(np.abs(vpred / pred[fit] - 1)))
    boot, idx = [], np.flatnonzero(fit)
    for _ in range(min(o["n_boot"], MAX_NONLINEAR_BOOT)):
        b = o["rng"].choice(idx, len(idx))
        if len(np.unique(N[b])) >= 2 and len(np.unique(D[b])) >= 2:
            boot.append(unpack(_lse_fit(F[b], ly[b], [_warm(th, ys[b])])[0]))
    ci = {k: _percentile_ci([b[k] for b in boot], o["level"]) for k in p}
    ci.update(level=o["level"], method="bootstrap over runs", n_boot=len(boot))
    points = [{"N": float(a), "D": float(b), "y": float(c), "run": str(n), "held_out": bool(h),
               "predicted": float(q * o["scale"])} for a, b, c, n, h, q in zip(N, D, y, names, held, pred)]
    out = dict(p, r2=r2, rmse=rmse, loss=loss, n_points=int(fit.sum()), starts=len(starts), starts_at_best=reached,
               varpro=vp, ci=ci, points=points, holdout=None)
    if held.any():
        out["holdout"] = {"x": hx[held].tolist(), "axis": ax, "N": N[held].tolist(), "D": D[held].tolist(),
                          "measured": y[held].tolist(), "predicted": (pred[held] * o["scale"]).tolist(),
                          "rel_error": (pred[held] * o["scale"] / y[held] - 1).tolist()}
    out["compute_optimal"] = _compute_optimal(p, boot, N, D, runs, o)
    return out

def fit_all(points_or_runs, metric="error", holdout=None, saturating=False, n_boot=1000, seed=0, best=False,
            level=0.95, budgets=None, pinned=PINNED):
    """Fit every axis and the joint law. points_or_runs: run dicts (load_runs), path(s), or {axis: [(x, y), ...]}
    with y in the metric's unit (percent for error). Returns the object `--json` prints; an axis that could not be
    fitted holds {"error": message}; "ok" says whether anything was fitted."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: use one of {sorted(METRICS)}")
    key, src = METRICS[metric], points_or_runs
    if isinstance(src, dict):  # one finished run per point
        runs = [_make_run(f"{ax}={x:g}", {} if ax == "C" else {ax: x}, [{"flops": x if ax == "C" else None, key: y}],
                          True) for ax, pts in src.items() for x, y in pts]
    elif isinstance(src, (str, os.PathLike)) or (isinstance(src, (list, tuple)) and src and isinstance(src[0], str)):
        runs = load_runs(src)
    else:
        runs = list(src)
    scale = 100.0 if metric in ("error", "test") else 1.0
    o = dict(key=key, scale=scale, pin=pinned if scale == 100 else math.inf, best=best, holdout=holdout,
             saturating=saturating, n_boot=n_boot, level=level, budgets=budgets, rng=np.random.default_rng(seed))
    out = {"metric": metric, "key": key, "unit": "% (fitted as a fraction)" if scale == 100 else "as logged",
           "runs": len(runs), "unfinished": [r["name"] for r in runs if not r["finished"]],
           "skipped": [f"{r['name']}: {r['skip']}" for r in runs if r["skip"]]}
    if not runs:
        out["error"] = "no runs found (or none match --where)"
    for ax in AXES:
        out[ax] = _fit_axis(runs, ax, o) if runs else {"error": "no runs"}
    out["joint"] = _fit_joint(runs, o) if runs else {"error": "no runs"}
    out["ok"] = any("error" not in out[ax] for ax in (*AXES, "joint"))
    return out

# ----------------------------------------------------------------------------- output

def _ci(c, fmt="{:.4g}"):
    return f"[{fmt.format(c[0])}, {fmt.format(c[1])}]" if c else "[n/a]"

def format_table(result):
    """A plain-text report of fit_all's result (stdout, and REPORT.md via ocrscale.py)."""
    pct = result["metric"] in ("error", "test")
    u = "%" if pct else ""
    L = [f"metric: {result['metric']} ({result['key']}, {result['unit']}); {result['runs']} runs"
         + (f", {len(result['unfinished'])} unfinished" if result["unfinished"] else "")]
    L += [f"  skipped {s}" for s in result["skipped"]]
    level = next((result[a]["ci"]["level"] for a in AXES if "ci" in result[a]), 0.95)
    L.append(f"\nE = (X_c / X)^alpha, least squares in log-log space; {level:.0%} bootstrap CIs over runs")
    L.append(f"{'axis':<5}{'points':>7}  {'X_c':>11} {'CI':<25}{'alpha':>8} {'CI':<20}{'R2(log)':>8}{'RMSE(log)':>10}")
    for ax in AXES:
        r = result[ax]
        if "error" in r:
            L.append(f"{ax:<5}  not fitted: {r['error']}")
        else:
            L.append(f"{ax:<5}{r['n_points']:>7}  {r['k']:>11.4g} {_ci(r['ci']['k']):<25}{r['alpha']:>8.4f} "
                     f"{_ci(r['ci']['alpha']):<20}{r['r2']:>8.4f}{r['rmse']:>10.4f}")
    for ax in AXES:
        r = result[ax]
        if "error" in r:
            L += [f"  {ax}: skipped {s}" for s in r.get("skipped", [])]
            continue
        grp = ", ".join(f"{k}={v}" for k, v in (r["group"] or {}).items() if v is not None)
        L.append(f"\n{ax} points" + (f" (ladder at {grp})" if grp else "") + f": {ax}, {result['metric']}{u}")
        for p in r["points"]:
            tag = " PINNED (not fitted)" if p["pinned"] else " HELD OUT" if p["held_out"] else ""
            tag += " (unfinished)" if p["unfinished"] else ""
            n = len(p["runs"])
            who = f"{n} runs {p['spread'][0]:.4g}..{p['spread'][1]:.4g}" if n > 1 else p["runs"][0]
            L.append(f"  {p['x']:>11.4g} {p['y']:>9.4g}  log resid {p['log_residual']:+.4f}  {who}{tag}")
        L += [f"  skipped {s}" for s in r["skipped"]]
        if r["holdout"]:
            for x, m, pr, e in zip(*(r["holdout"][k] for k in ("x", "measured", "predicted", "rel_error"))):
                L.append(f"  held out {ax}={x:.4g}: measured {m:.4g}{u}, predicted {pr:.4g}{u} "
                         f"({pr - m:+.3g}{' points' if pct else ''}, {e:+.2%})")
        s = r.get("saturating")
        if s and "error" in s:
            L.append(f"  saturating E_inf + (X_c/X)^alpha: {s['error']}")
        elif s:
            L.append(f"  saturating E_inf + (X_c/X)^alpha: E_inf {s['einf']:.4g} {_ci(s['ci']['einf'])}, X_c "
                     f"{s['k']:.4g} {_ci(s['ci']['k'])}, alpha {s['alpha']:.4f} {_ci(s['ci']['alpha'])}, R2 "
                     f"{s['r2']:.4f} ({s['starts_at_best']}/{s['starts']} starts at best)")
    j = result["joint"]
    L.append("\njoint E = E_inf + A/N^alpha + B/D^beta (Huber on log E, L-BFGS-B from a grid of starts)")
    if "error" in j:
        L.append(f"  not fitted: {j['error']}")
        return "\n".join(L)
    for k in ("einf", "A", "alpha", "B", "beta"):
        L.append(f"  {k:<6}{j[k]:>12.5g} {_ci(j['ci'][k])}   variable projection: {j['varpro'][k]:.5g}")
    L.append(f"  {j['n_points']} runs, R2(log) {j['r2']:.4f}, RMSE(log) {j['rmse']:.4f}, {j['starts_at_best']}/"
             f"{j['starts']} starts reached the best; variable projection predictions differ by at most "
             f"{j['varpro']['max_rel_diff_pred']:.2%}")
    if j["holdout"]:
        h = j["holdout"]
        for n, d, m, pr in zip(h["N"], h["D"], h["measured"], h["predicted"]):
            L.append(f"  held out N={n:.4g}, D={d:.4g}: measured {m:.4g}{u}, predicted {pr:.4g}{u}")
    co = j["compute_optimal"]
    if "error" in co:
        L.append(f"  compute-optimal: {co['error']}")
        return "\n".join(L)
    f = co["flops_per_sample"]
    L.append(f"  compute-optimal (C = {f['c0']:.3g} * N^{f['gamma']:.3f} FLOPs/sample [{f['source']}] * D): "
             f"N ~ C^{co['N_exponent']:.3f}, D ~ C^{co['D_exponent']:.3f}")
    for b in co["budgets"]:
        L.append(f"    C {b['C']:.3g}: N {b['N']:.3g} {_ci(b['ci']['N'], '{:.3g}')}, D {b['D']:.3g} "
                 f"{_ci(b['ci']['D'], '{:.3g}')}, predicted {result['metric']} {b['E']:.4g}{u}")
    return "\n".join(L)

def plot_all(result, out_dir):
    """Log-log PNGs: per axis the points, the fit, its CI band, pinned and held-out points marked; the joint fit
    as one curve per D. Returns the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from e
    os.makedirs(out_dir, exist_ok=True)
    u = "%" if result["metric"] in ("error", "test") else ""
    scale, paths = (100.0 if u else 1.0), []
    ylab = f"{result['metric']} ({result['key']}{', ' + u if u else ''})"
    names = {"N": "parameters N", "D": "training images D", "C": "training compute C (FLOPs)"}

    def save(fig, a, name):
        a.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    for ax in AXES:
        r = result[ax]
        if "error" in r:
            continue
        fig, a = plt.subplots(figsize=(5.5, 4))
        pts = r["points"]
        for sel, style in ((lambda p: not p["pinned"] and not p["held_out"], dict(c="C0", marker="o", label="fitted")),
                           (lambda p: p["held_out"], dict(c="C3", marker="*", s=120, label="held out")),
                           (lambda p: p["pinned"], dict(c="grey", marker="x", label="pinned: not fitted"))):
            ps = [p for p in pts if sel(p)]
            if ps:
                a.scatter([p["x"] for p in ps], [p["y"] for p in ps], zorder=3, **style)
        if r["band"]:
            a.fill_between(r["band"]["x"], r["band"]["lo"], r["band"]["hi"], color="C0", alpha=0.2,
                           label=f"{r['ci']['level']:.0%} CI")
        xs = np.geomspace(min(p["x"] for p in pts), max(p["x"] for p in pts), 100)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a fit may come out flat or rising
            a.plot(xs, (r["k"] / xs) ** r["alpha"] * scale, "C0-",
                   label=f"({r['k']:.3g}/{ax})^{r['alpha']:.3f}, R2 {r['r2']:.3f}")
        a.set(xscale="log", yscale="log", xlabel=names[ax], ylabel=ylab, title=f"{result['metric']} vs {ax}")
        save(fig, a, f"fit_{ax}.png")
    j = result["joint"]
    if "error" not in j:
        fig, a = plt.subplots(figsize=(5.5, 4))
        Ds = sorted({p["D"] for p in j["points"]})
        Ns = np.geomspace(min(p["N"] for p in j["points"]), max(p["N"] for p in j["points"]), 100)
        for i, D in enumerate(Ds):
            ps = [p for p in j["points"] if p["D"] == D]
            a.scatter([p["N"] for p in ps], [p["y"] for p in ps], c=f"C{i % 10}",
                      marker="*" if any(p["held_out"] for p in ps) else "o")
            a.plot(Ns, (j["einf"] + j["A"] / Ns ** j["alpha"] + j["B"] / D ** j["beta"]) * scale, f"C{i % 10}-",
                   label=f"D={D:.3g}")
        a.set(xscale="log", yscale="log", xlabel=names["N"], ylabel=ylab, title="joint fit E(N, D)")
        save(fig, a, "fit_joint.png")
    return paths

def _finite(obj):
    """JSON has no inf/nan: None instead."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj

def main(argv=None):
    p = argparse.ArgumentParser(description="Fit OCR scaling laws to run folders or a CSV of points.")
    p.add_argument("paths", nargs="+", help="run folders (searched recursively) and/or CSV files")
    p.add_argument("--metric", choices=sorted(METRICS), default="error",
                   help="error: val word error (%%, the study's target); loss: val loss per character; test: "
                        "final test-set error")
    p.add_argument("--best", action="store_true", help="use each run's best eval instead of its final one (N, D)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose config.json has KEY=VALUE (repeatable; dotted keys reach into 'model')")
    p.add_argument("--holdout", default=None, help="largest, largest:K, a value (x >= it) or AXIS=VALUE: fit without "
                   "those points and report predicted vs measured")
    p.add_argument("--saturating", action="store_true", help="also fit E = E_inf + (X_c/X)^alpha per axis")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (nonlinear fits use at most "
                   f"{MAX_NONLINEAR_BOOT})")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--budget", type=float, action="append", default=None, metavar="FLOPS",
                   help="FLOP budget(s) for the compute-optimal N, D (default: biggest run's, x10, x100)")
    p.add_argument("--pinned", type=float, default=PINNED, help="word error %% at which a point counts as pinned")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--plot", metavar="DIR", default=None, help="write log-log PNG plots here (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        runs = load_runs(args.paths, args.where)
    except (ValueError, OSError) as e:
        print(f"fit.py: {e}", file=sys.stderr)
        return 2
    try:
        result = fit_all(runs, metric=args.metric, holdout=args.holdout, saturating=args.saturating,
                         n_boot=args.n_boot, seed=args.seed, best=args.best, level=args.ci, budgets=args.budget,
                         pinned=args.pinned)
    except ValueError as e:  # e.g. an unreadable --holdout
        print(f"fit.py: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_finite(result), indent=1) if args.json else format_table(result))
    if args.plot:
        try:
            for path in plot_all(result, args.plot):
                print(f"wrote {path}", file=sys.stderr)
        except ImportError as e:
            print(f"fit.py: {e}", file=sys.stderr)
            return 2
    if not result["ok"]:
        print("fit.py: nothing could be fitted (see the messages above)", file=sys.stderr)
    return 0 if result["ok"] else 1

if __name__ == "__main__":
    sys.exit(main())
