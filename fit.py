"""fit.py: the study's power laws from run folders or a CSV of points, with honest intervals, holdout and plots.

    python fit.py runs/                                   # E(N), E(D), E(C), the joint E(N, D), compute-optimal N, S
    python fit.py runs/ --where arch=parseq --metric loss --plot plots/ --json
    python fit.py tests/trocr_size_points.csv --holdout N=largest    # the paper's TrOCR-H check

Rang et al. 2024 (arXiv 2401.00028) fit E = (X_c / X)^alpha per axis X by least squares in log-log space, E the word
error as a fraction. Here: read runs -> group them (runs pool only within a fit group) -> per-axis OLS with intervals
-> holdout and extrapolation -> the joint law E = E_inf + A/N^alpha + B/D^beta and its compute optimum -> table, plots.
CSV rows: a header with any of N, D, C, samples; one of E (word error %), acc (word accuracy %), loss; optional label
and fit group fields. Error >= 99.5% (a model that reads nothing) is never fitted. Not done here: training, IsoFLOP
parabolas.
"""
import argparse, collections, csv, json, math, os, sys, zlib

import numpy as np
from scipy.optimize import least_squares
from scipy.special import stdtrit  # Student t quantile: stdtrit(dof, p)

METRICS = {"error": "val_error", "loss": "val_loss", "test": "test_error"}  # metrics.jsonl key per --metric
PINNED = 99.5    # % word error at or above which a model reads nothing: flagged, never fitted
DELTA = 1e-3     # Huber delta on log E (Chinchilla approach 3)
SMALL_N = 8      # below this many points an axis gets t-intervals instead of the run bootstrap
AXES = ("N", "D", "C")
GROUP = ("arch", "train", "val", "tokenizer", "init", "set", "img", "eval")  # train.py's fit_group fields
JOINT = ("einf", "A", "alpha", "B", "beta")
BOUNDS = ([-np.inf, 1e-4, -np.inf, 1e-4, -np.inf], [np.inf, 10, np.inf, 10, np.inf])  # (a, alpha, b, beta, e)

# ----------------------------------------------------------------------------- reading runs
def _num(v):
    """A float from a number or a numeric string, else None: every input number is parsed here."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None

def _ok(v):
    return v is not None and math.isfinite(v) and v > 0

def _make_run(name, config, lines, finished):
    """A run dict from its config and metrics.jsonl entries (those that are no JSON object counted as malformed); its
    sample budget: "train_samples", else the last eval's samples to 2 significant figures (batch rounding)."""
    evals = [{k: _num(e.get(k)) for k in ("samples", "flops", *METRICS.values())} for e in lines if isinstance(e, dict)]
    budget, group = _num(config.get("train_samples")), _fit_group(config)
    if budget is None and evals and _ok(evals[-1]["samples"]):
        budget = float(f"{evals[-1]['samples']:.2g}")
    train = group.get("train") or []  # a hand-damaged fit_group: skipped, not a traceback
    whole = isinstance(train, list) and all(isinstance(t, list) and len(t) == 2 for t in train) and \
        isinstance(group.get("set") or {}, dict)
    return {"name": name, "config": config, "evals": evals, "finished": finished, "group": group,
            "N": _num(config.get("N")), "D": _num(config.get("D")), "budget": budget,
            "malformed": len(lines) - len(evals),
            "skip": "damaged fit_group in config.json" if not whole else None if evals else
            "no evals in metrics.jsonl (still starting, or crashed before its first eval)"}

def _read_run(folder):
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:  # finished or not as result.json says: skipped either way, and listed
        finished = os.path.exists(os.path.join(folder, "result.json"))
        return dict(_make_run(folder, {}, [], finished), skip=f"unreadable config.json ({e})")
    lines, path = [], os.path.join(folder, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, errors="replace") as f:  # undecodable bytes make a malformed line
            for line in filter(str.strip, f):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:  # e.g. the last line of a run killed mid-write
                    lines.append(None)
    return _make_run(folder, config, lines, os.path.exists(os.path.join(folder, "result.json")))

def _read_csv(path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str)}  # extras: key None
                    for row in csv.DictReader(f)]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    cols = set(rows[0]) if rows else set()
    if not cols & set(AXES) or not cols & {"E", "acc", "loss"}:
        raise ValueError(f"{path}: needs a header with at least one of N, D, C and one of E (word error), acc "
                         f"(word accuracy), loss, and at least one row; found columns {sorted(cols) or 'none'}")
    for k in ("E", "acc"):
        values = [x for x in (_num(row.get(k)) for row in rows) if x is not None]
        if len(values) > 1 and max(values) <= 1:  # fractions read as percent would fit a silently wrong law
            raise ValueError(f"{path}: column {k} is in percent; every value is at most 1, as fractions would be "
                             "(multiply them by 100)")
    runs = []
    for i, row in enumerate(rows):
        v = {k: _num(row.get(k)) for k in (*AXES, "samples", "E", "acc", "loss")}
        err = v["E"] if "E" in cols else None if v["acc"] is None else 100 - v["acc"]
        run = _make_run(row.get("label") or f"{path}:{i + 2}", {k: v.get(k, s) for k, s in row.items() if s != ""},
                        [{"flops": v["C"], "samples": v["samples"], "val_error": err, "test_error": err,
                          "val_loss": v["loss"]}], True)
        bad = [f"{k}={row[k]!r}" for k in v if row.get(k) and v[k] is None]
        runs.append(dict(run, skip=f"unreadable {', '.join(bad)}") if bad else run)
    return runs

def _items(v):
    """train.py's list of --train or --set arguments, or a CSV cell, as one list of its comma-separated items."""
    return [s for s in ",".join(v if isinstance(v, list) else [str(v)] if v else []).split(",") if s]

def _fit_group(config):
    """What a run shares with every run it may be pooled with: train.py's "fit_group", else what an older config.json
    or a CSV row's columns record (None where nothing does; such runs never pool with fit_group runs)."""
    if isinstance(config.get("fit_group"), dict):
        return config["fit_group"]
    model, tok = (config[k] if isinstance(config.get(k), dict) else {} for k in ("model", "tokenizer"))
    arch, train = config.get("arch"), []
    for item in _items(config.get("train")):  # DIR or DIR:WEIGHT (a URL's other colons are not weights)
        path, _, weight = item.rpartition(":")
        train.append([path, _num(weight)] if path and _num(weight) is not None else [item, 1.0])
    setting = config.get("beam") if arch == "trocr" else config.get("refine_iters") if arch == "parseq" else None
    return {"arch": arch, "train": train, "val": config.get("val"), "init": config.get("init"),
            "tokenizer": f"char:{tok['charset']}" if "charset" in tok else
            f"{tok.get('type')}:{zlib.crc32(json.dumps(tok, sort_keys=True).encode()):08x}" if tok else
            config.get("tokenizer") or config.get("spm") or config.get("charset"),
            "set": dict(item.partition("=")[::2] for item in _items(config.get("set"))),
            "img": [model["img_h"], model["img_w"]] if "img_h" in model else config.get("img"),
            "eval": config.get("eval") if setting is None else f"{'beam' if arch == 'trocr' else 'refine'}={setting}"}

def _show(field, value):
    """A fit group field as text, as group names show it and --where compares it."""
    if value in (None, {}, []):
        return "none"
    if field == "train":
        return ",".join(p if w == 1 else f"{p}:{w:g}" for p, w in value)
    if field == "set":
        return ",".join(f"{k}={v}" for k, v in value.items())
    return "x".join(map(str, value)) if field == "img" and isinstance(value, list) else str(value)

def _matches(run, where):
    """--where KEY=VALUE on a fit group field (none matches null or empty, a path as given or made absolute, train and
    set any one of their items) or else on a config.json key (dotted for nested dicts, numbers compared as numbers)."""
    for key, want in where.items():
        if key in GROUP:
            v = run["group"].get(key)
            shown = _show(key, v)
            items = [p for p, _ in v or []] if key == "train" else shown.split(",") if key == "set" else [shown]
            if not ({want, os.path.abspath(want)} & set(items) or want.lower() == "none" == shown):
                return False
            continue
        v = run["config"]
        for part in key.split("."):  # model.enc_width=64 reaches into nested dicts
            v = v.get(part) if isinstance(v, dict) else None
        if v is None or (_num(v) != _num(want) if None not in (_num(v), _num(want)) else str(v) != want):
            return False
    return True

def _groups(runs):
    """[(name, fields, runs)] per fit group in the order first seen, named by the fields in which the groups differ."""
    members = {}
    for r in runs:
        members.setdefault(json.dumps(r["group"], sort_keys=True), []).append(r)
    groups = [rs[0]["group"] for rs in members.values()]
    keys = dict.fromkeys(k for g in groups for k in (*GROUP, *g))  # a field train.py adds later splits groups too
    differ = [k for k in keys if len({json.dumps(g.get(k), sort_keys=True) for g in groups}) > 1]
    parts = [[f"{k}={_show(k, g.get(k))}" for k in differ] for g in groups]
    names = [" ".join(s if len(s) <= 48 else f"{s[:22]}...{s[-23:]}" for s in p) for p in parts]
    if len(set(names)) < len(names):  # shortened alike (paths differing in a weight): named in full
        names = [" ".join(p) for p in parts]
    return list(zip(names, groups, members.values()))

def load_runs(paths, where=None):
    """Run dicts (name, config, evals, finished, group, N, D, budget, malformed, skip) from run folders (searched
    recursively) and/or CSV files, filtered by `where`: {key: value} or ["key=value", ...] (see _matches)."""
    if not isinstance(where, dict):
        for item in where or []:
            if "=" not in item:
                raise ValueError(f"--where {item!r}: expected KEY=VALUE, e.g. arch=parseq")
        where = dict(item.split("=", 1) for item in where or [])
    runs, seen = [], set()
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        if os.path.isfile(p) and str(p).lower().endswith(".csv"):
            runs += _read_csv(p)
        elif os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                if "config.json" in files and os.path.realpath(root) not in seen:  # a folder given twice: once
                    seen.add(os.path.realpath(root))
                    runs.append(_read_run(root))
        else:
            raise FileNotFoundError(f"{p}: neither a folder of runs (config.json + metrics.jsonl) nor a .csv file")
    return [r for r in runs if _matches(r, {k: str(v) for k, v in where.items()})]

# ----------------------------------------------------------------------------- per-axis law: OLS in log-log space
def _pick_eval(run, key, best):
    """The eval a run stands for: its last one with the metric, or (best) the lowest; None if none has it."""
    evs = [e for e in run["evals"] if e[key] is not None]
    good = [e for e in evs if _ok(e[key])]
    return min(good, key=lambda e: e[key]) if best and good else evs[-1] if evs else None

def _has_axis(run, axis):
    return any(e["flops"] is not None for e in run["evals"]) if axis == "C" else run[axis] is not None

def _observations(run, axis, key, best):
    """(n, 2) array of a run's (x, y) on an axis (C: every eval), or a string saying why it has none."""
    picked = _pick_eval(run, key, best)
    if picked is None:
        return f"no '{key}' in its evals"
    if axis == "C":
        xy = np.array([(e["flops"], e[key]) for e in run["evals"]], float)  # None -> NaN, dropped below
        xy = xy[np.isfinite(xy).all(1) & (xy > 0).all(1)]
        return xy if len(xy) else f"no eval with finite positive 'flops' and '{key}'"
    x, y = run[axis], picked[key]
    ok = _ok(x) and _ok(y)
    return np.array([[x, y]]) if ok else f"{axis}={x}, {key}={y}: need finite positive values (log space)"

def _reduce(axis, xy, pin):
    """Points to fit from raw observations: (x, y, pinned) with per-size medians (N, D) or the compute frontier (C)."""
    o = np.lexsort((xy[:, 1], xy[:, 0]))
    x, y = xy[o, 0], xy[o, 1]
    if axis == "C":
        x, y = x[y < pin], y[y < pin]  # a pinned start of training would otherwise open every frontier
        lower = y < np.minimum.accumulate(np.r_[np.inf, y[:-1]])  # below everything cheaper: on the envelope
        return x[lower], y[lower], np.zeros(lower.sum(), bool)
    ux, first, count = np.unique(x, return_index=True, return_counts=True)
    my = (y[first + (count - 1) // 2] + y[first + count // 2]) / 2  # median of each size's seeds
    return ux, my, my >= pin

def _ladder(obs, axis):
    """The (run, xy) on the best ladder for axis N (fixed D, budget) or D (fixed N, and a fixed budget or fixed epochs,
    as train.py's --epochs plans it): most distinct values, then the larger fixed N or D, then fixed budget."""
    other, ladders = "D" if axis == "N" else "N", {}
    for r, xy in obs:
        ladders.setdefault((r[other], "budget", r["budget"]), []).append((r, xy))
        if axis == "D" and r["budget"] and r["D"]:
            ladders.setdefault((r[other], "epochs", round(r["budget"] / r["D"], 2)), []).append((r, xy))
    key = max(ladders, key=lambda k: (len({r[axis] for r, _ in ladders[k]}), k[0] or 0, k[1] == "budget"))
    return ladders[key], {other: key[0], key[1]: key[2]}

def _holdout_specs(holdout, axes):
    """{axis: 'largest' | 'largest:K' | value} from --holdout's AXIS=SPEC items; no AXIS: every axis in `axes`."""
    specs = {}
    for item in holdout if isinstance(holdout, (list, tuple)) else [] if holdout is None else [holdout]:
        ax, _, spec = (s.strip() for s in str(item).rpartition("="))
        largest = spec == "largest" or (spec.startswith("largest:") and spec[8:].isdigit() and int(spec[8:]) > 0)
        if (ax and ax not in AXES) or not (largest or _num(spec) is not None):
            raise ValueError(f"--holdout {item!r}: use AXIS=largest, AXIS=largest:K or AXIS=VALUE (x >= VALUE), "
                             f"AXIS one of N, D, C; e.g. N=largest or D=5e4")
        if not ax and not largest and len(axes) > 1:
            raise ValueError(f"--holdout {item!r}: a bare value is ambiguous with {len(axes)} axes fitted "
                             f"({', '.join(axes)}); name the axis, e.g. {axes[0]}={spec}")
        specs.update({a: spec for a in ([ax] if ax else AXES)})
    return specs

def _holdout_cut(spec, x):
    """Points with x >= the returned value are held out of the fit (inf: none)."""
    if spec is None or not len(x):
        return math.inf
    if spec.startswith("largest"):
        ux = np.unique(x)
        return ux[-min(int(spec[8:] or 1), len(ux))]
    return _num(spec)

def fit_power(x, y):
    """E = (k/x)^alpha by least squares on log E = alpha log k - alpha log x (r2 None for a flat series)."""
    lx, ly = np.log(x), np.log(y)
    mx, sxx, n = lx.mean(), ((lx - lx.mean()) ** 2).sum(), len(lx)
    slope = ((lx - mx) * (ly - ly.mean())).sum() / sxx
    intercept = ly.mean() - slope * mx
    res = ly - intercept - slope * lx
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # flat curve: alpha ~ 0, k astronomical
        k = float(np.exp(-intercept / slope))
    r2 = None if np.ptp(ly) < 1e-12 else float(1 - (res ** 2).sum() / ((ly - ly.mean()) ** 2).sum())
    s = float(np.sqrt((res ** 2).sum() / (n - 2))) if n > 2 else math.nan  # residual standard error
    return {"alpha": float(-slope), "k": k, "r2": r2, "rmse": float(np.sqrt((res ** 2).mean())), "slope": float(slope),
            "intercept": float(intercept), "n": n, "s": s, "mean_logx": float(mx), "sxx": float(sxx)}

def _t_intervals(f, level):
    """OLS t-intervals (n-2 dof) for alpha and, by the delta method on log k = mean log x - mean log E / slope, k."""
    t, b = stdtrit(f["n"] - 2, 0.5 + level / 2), np.float64(f["slope"])
    my = f["intercept"] + b * f["mean_logx"]
    with np.errstate(all="ignore"):  # a flat series: slope 0, k undefined
        se_logk = f["s"] * np.sqrt(1 / (f["n"] * b ** 2) + my ** 2 / (b ** 4 * f["sxx"]))
        k_ci = np.exp(np.log(f["k"]) + np.array([-t, t]) * se_logk).tolist()
    half = t * f["s"] / math.sqrt(f["sxx"])
    return {"alpha": [f["alpha"] - half, f["alpha"] + half], "k": k_ci}

def _line_interval(f, x, level, new):
    """Fitted E at x with its t-interval (n-2 dof): for the line (new=False) or for a new point (prediction)."""
    lx = np.log(np.asarray(x, float))
    t = stdtrit(f["n"] - 2, 0.5 + level / 2)
    half = t * f["s"] * np.sqrt(new + 1 / f["n"] + (lx - f["mean_logx"]) ** 2 / f["sxx"])
    mid = f["intercept"] + f["slope"] * lx
    return np.exp(mid), np.exp(mid - half), np.exp(mid + half)

def _percentile_ci(samples, level):
    s, q = np.asarray(samples, float), 50 * (1 - level)
    return np.percentile(s[np.isfinite(s)], [q, 100 - q]).tolist() if np.isfinite(s).sum() > 1 else None

def _bootstrap(refit, n_units, names, name, o):
    """Percentile intervals of `names` over o["n_boot"] resamples of n_units runs, drawn from the fit's own random
    stream (seed, fit name); refit(draw) gives a parameter dict, or why the draw is unusable. Returns (kept, ci)."""
    rng = np.random.default_rng([o["seed"], zlib.crc32(name.encode())])
    refits = [refit(d) for d in [rng.integers(0, n_units, n_units) for _ in range(o["n_boot"])]]
    kept = [p for p in refits if not isinstance(p, str)]
    dropped = dict(collections.Counter(p for p in refits if isinstance(p, str)))
    return kept, dict({k: _percentile_ci([p[k] for p in kept], o["level"]) for k in names}, n_boot=len(kept),
                      dropped=dropped)

def _refit_axis(obs, draw, axis, cut, o):
    """One bootstrap refit on the runs in `draw` (all points of a run together), or why it cannot be fitted."""
    x, y, pinned = _reduce(axis, np.concatenate([obs[i][1] for i in draw]), o["pin"])
    keep = ~pinned & (x < cut)
    if len(np.unique(x[keep])) < 3:
        return f"fewer than 3 distinct {axis}"
    return fit_power(x[keep], y[keep] / o["scale"])

def _predict(x, y, fitted, held, o):
    """Refit on the `fitted` points; observed vs predicted at the `held` ones, with the t prediction interval."""
    f = fit_power(x[fitted], y[fitted] / o["scale"])
    pred, lo, hi = (v * o["scale"] for v in _line_interval(f, x[held], o["level"], new=True))
    return {"x": x[held].tolist(), "measured": y[held].tolist(), "predicted": pred.tolist(), "lo": lo.tolist(),
            "hi": hi.tolist(), "rel_error": (pred / y[held] - 1).tolist()}

def _support(axis, x, y, obs):
    """Which runs a point stands for: the seeds of a size (and their spread), or the run a frontier point is from."""
    hits = [(r, xy[xy[:, 0] == x, 1]) for r, xy in obs if (xy[:, 0] == x).any()]
    if axis == "C":
        hits = [next((r, ys) for r, ys in hits if (ys == y).any())]
    ys = np.concatenate([v for _, v in hits])
    return {"runs": [r["name"] for r, _ in hits], "spread": [float(ys.min()), float(ys.max())],
            "unfinished": any(not r["finished"] for r, _ in hits)}

def _fit_axis(runs, axis, o):
    """E = (k/x)^alpha on one axis: the law, its intervals, points, warnings, holdout and extrapolation checks."""
    obs = [(r, _observations(r, axis, o["key"], o["best"])) for r in runs if _has_axis(r, axis)]
    if not obs:
        source = "'flops' in metrics.jsonl" if axis == "C" else f"config.json '{axis}'"
        return {"error": f"no run has {axis} ({source} or a CSV column '{axis}')"}
    skipped = [f"{r['name']}: {xy}" for r, xy in obs if isinstance(xy, str)]
    obs, ladder = [(r, xy) for r, xy in obs if not isinstance(xy, str)], None
    if axis != "C" and obs:
        on, ladder = _ladder(obs, axis)
        if len(on) < len(obs):
            fixed = ", ".join(f"{k}={v}" for k, v in ladder.items())
            skipped.append(f"{len(obs) - len(on)} run(s) off this ladder (fixed {fixed})")
        obs = on
    out = {"ladder": ladder, "skipped": skipped, "n_runs": len(obs), "warnings": []}
    if not obs:
        return dict(out, error=f"{axis}: no usable runs")
    x, y, pinned = _reduce(axis, np.concatenate([xy for _, xy in obs]), o["pin"])
    cut = _holdout_cut(o["holdout"].get(axis), x[~pinned])
    use, held = ~pinned & (x < cut), ~pinned & (x >= cut)
    ux = np.unique(x[use])  # x is distinct after _reduce: one point per size, or per frontier step
    if len(ux) < 3:
        why = (f", {(~pinned).sum()} not pinned at >= {o['pin']}%" if pinned.any() else "") + \
              (", after the holdout" if cut < math.inf else "")
        return dict(out, error=f"{axis}: {use.sum()} usable point(s) ({len(x)} in all{why}); need at least 3 "
                               f"distinct {axis}")
    f = fit_power(x[use], y[use] / o["scale"])
    if f["r2"] is None or np.any(np.diff(y[use]) >= 0):
        f["r2"] = None
        out["warnings"].append(f"{axis}: the fitted points are flat or do not fall monotonically: R2 undefined")
    grid, kept, ci = np.geomspace(x.min(), x.max(), 40), [], {"dropped": {}}
    if f["n"] >= SMALL_N and len(obs) >= 3:  # resampling one or two runs gives no interval worth the name
        kept, ci = _bootstrap(lambda d: _refit_axis(obs, d, axis, cut, o), len(obs), ("alpha", "k"), axis, o)
    if len(kept) < 2:  # few points (or no usable draw): the OLS t-intervals
        ci = dict(_t_intervals(f, o["level"]), method=f"t ({f['n'] - 2} dof)", dropped=ci["dropped"])
        lo, hi = _line_interval(f, grid, o["level"], new=False)[1:]
    else:
        ci["method"], q = f"bootstrap over runs ({len(kept)} draws)", 50 * (1 - o["level"])
        lo, hi = np.percentile([np.exp(b["intercept"] + b["slope"] * np.log(grid)) for b in kept], [q, 100 - q], 0)
    pred = np.exp(f["intercept"] + f["slope"] * np.log(x)) * o["scale"]
    extrapolation = [dict(_predict(x, y, use & (x < ux[-k]), use & (x >= ux[-k]), o), held_out=k, n_fitted=len(ux) - k)
                     for k in (1, 2) if len(ux) - k >= 3]  # refit without the largest k points, predict them
    return dict(out, **{k: f[k] for k in ("alpha", "k", "r2", "rmse")}, n_points=int(use.sum()),
                ci=dict(ci, level=o["level"]),
                band={"x": grid.tolist(), "lo": (lo * o["scale"]).tolist(), "hi": (hi * o["scale"]).tolist()},
                holdout=_predict(x, y, use, held, o) if held.any() else None, extrapolation=extrapolation,
                points=[{"x": float(xi), "y": float(yi), "pinned": bool(p), "held_out": bool(h),
                         "log_residual": float(np.log(yi / pr)), **_support(axis, xi, yi, obs)}
                        for xi, yi, p, h, pr in zip(x, y, pinned, held, pred)])

# ----------------------------------------------------------------------------- joint law and compute optimum
def _log_terms(th, F):
    """log A/N^alpha, log B/D^beta, log E_inf per point, (n, 3), for th = (a, alpha, b, beta, e) = (log A, alpha,
    log B, beta, log E_inf) and F = (log N, log D) per point."""
    return np.column_stack([th[0] - th[1] * F[:, 0], th[2] - th[3] * F[:, 1], np.full(len(F), th[4])])

def _log_residuals(th, F, ly):
    return np.logaddexp.reduce(_log_terms(th, F), axis=1) - ly

def _log_jacobian(th, F, ly):
    Z = _log_terms(th, F)
    W = np.exp(Z - np.logaddexp.reduce(Z, axis=1, keepdims=True))  # d log E / d log term
    return np.column_stack([W[:, 0], -W[:, 0] * F[:, 0], W[:, 1], -W[:, 1] * F[:, 1], W[:, 2]])

def _huber_fit(F, ly, starts):
    """The joint law from each start th by least_squares (cost: the summed Huber loss of the log residuals), log N and
    log D centred so that a and alpha (b and beta) decorrelate: (the best fit's named parameters and loss, its th)."""
    mu = F.mean(0)
    # each start moved to centred log N, log D (undone on the best fit below)
    fits = [least_squares(_log_residuals, s - [s[1] * mu[0], 0, s[3] * mu[1], 0, 0], _log_jacobian, bounds=BOUNDS,
                          method="dogbox", loss="huber", f_scale=DELTA, args=(F - mu, ly), xtol=1e-12, ftol=1e-12,
                          gtol=1e-12) for s in starts]
    best = min(fits, key=lambda f: f.cost)
    th = best.x + [best.x[1] * mu[0], 0, best.x[3] * mu[1], 0, 0]  # back from centred log N, log D
    named = dict(zip(JOINT, (math.exp(th[4]), math.exp(th[0]), float(th[1]), math.exp(th[2]), float(th[3]))))
    reached = int(sum(f.cost <= best.cost * (1 + 1e-3) + 1e-12 for f in fits))
    return dict(named, loss=float(best.cost), starts_at_best=reached, converged=bool(best.success)), th

def _refit_joint(F, ly, th):
    """One bootstrap refit from the full fit (E_inf lifted to >= 10% of the smallest E: a floor at ~0 has no
    gradient): the named parameters, or why the draw was dropped."""
    if min(len(np.unique(c)) for c in F.T) < 3 or len(np.unique(F, axis=0)) < len(th):
        return f"fewer than 3 distinct values per variable or {len(th)} distinct points"
    fit = _huber_fit(F, ly, [np.r_[th[:4], max(th[4], ly.min() + math.log(0.1))]])[0]
    return fit if fit["converged"] else "did not converge"

def _fit_joint(runs, o):
    """E = E_inf + A/N^alpha + B/D^beta on every run with N and D (its picked eval), bootstrapped over runs."""
    rows = []  # N, D, E, name, samples seen S, C, S_assumed (no samples logged: S = D, one pass)
    for r in runs:
        e = _pick_eval(r, o["key"], o["best"]) or dict.fromkeys((o["key"], "samples", "flops"))
        y, S, C = e[o["key"]], e["samples"], e["flops"]
        if _ok(r["N"]) and _ok(r["D"]) and _ok(y) and y < o["pin"]:
            rows.append(dict(N=r["N"], D=r["D"], E=y, name=r["name"], S=S if _ok(S) else r["D"],
                             C=C if _ok(C) else math.nan, S_assumed=not _ok(S)))
    nN, nD = len({r["N"] for r in rows}), len({r["D"] for r in rows})
    if len(rows) < 7 or nN < 3 or nD < 3:  # 5 parameters: at least 2 degrees of freedom, 3 values per axis
        return {"error": f"joint E(N, D): needs >= 7 usable runs spanning >= 3 N and >= 3 D; has {len(rows)} runs "
                         f"with both, not pinned, {nN} N, {nD} D"}
    N, D, y, names = (np.array([r[k] for r in rows]) for k in ("N", "D", "E", "name"))
    held = (N >= _holdout_cut(o["holdout"].get("N"), N)) | (D >= _holdout_cut(o["holdout"].get("D"), D))
    use, F_all = ~held, np.log(np.column_stack([N, D]))
    if use.sum() < 7:
        return {"error": f"joint E(N, D): {use.sum()} runs left after the holdout; need >= 7"}
    F, ly, (mN, mD) = F_all[use], np.log(y[use] / o["scale"]), F_all[use].mean(0)
    # 32 starts: exponents 0.25..2, each term half the mean E, E_inf 1% or 50% of the smallest E
    half = ly.mean() + math.log(0.5)
    starts = [np.array([a * mN + half, a, b * mD + half, b, ly.min() + math.log(e)])
              for a in (0.25, 0.5, 1, 2) for b in (0.25, 0.5, 1, 2) for e in (0.01, 0.5)]
    fit, th = _huber_fit(F, ly, starts)
    boot, ci = _bootstrap(lambda d: _refit_joint(F[d], ly[d], th), len(ly), JOINT, "joint", o)
    log_pred = np.logaddexp.reduce(_log_terms(th, F_all), axis=1)
    pred, res = np.exp(log_pred) * o["scale"], log_pred[use] - ly
    return dict(fit, r2=None if np.ptp(ly) < 1e-12 else float(1 - (res ** 2).sum() / ((ly - ly.mean()) ** 2).sum()),
                rmse=float(np.sqrt((res ** 2).mean())), starts=len(starts), n_points=int(use.sum()),
                compute_optimal=_compute_optimal(fit, boot, rows, o),
                ci=dict(ci, level=o["level"], method=f"bootstrap over runs ({len(boot)} draws)"),
                points=[{"N": float(a), "D": float(b), "y": float(c), "run": str(n), "held_out": bool(h),
                         "predicted": float(q)} for a, b, c, n, h, q in zip(N, D, y, names, held, pred)],
                holdout={"N": N[held].tolist(), "D": D[held].tolist(), "measured": y[held].tolist(),
                         "predicted": pred[held].tolist(), "rel_error": (pred[held] / y[held] - 1).tolist()}
                if held.any() else None)

def _compute_optimal(p, boot, rows, o):
    """N, S (samples seen) and E per FLOP budget (default the biggest run's C, x10, x100) for the fit p and each
    bootstrap refit: the argmin of E_inf + A N^-alpha + B S^-beta subject to C = c0 N^gamma S (closed form)."""
    N, S, C = (np.array([r[k] for r in rows], float) for k in ("N", "S", "C"))
    have = np.isfinite(C)
    if not have.any():
        return {"error": "no run logged its compute ('flops' in metrics.jsonl or a CSV column C)"}
    lN, lf = np.log(N[have]), np.log(C[have] / S[have])
    if len(np.unique(lN)) > 1:
        gamma, lc0 = np.polyfit(lN, lf, 1)
        fps = {"c0": math.exp(lc0), "gamma": float(gamma), "source": f"power fit to C/samples of {have.sum()} runs"}
    else:
        fps = {"c0": math.exp(lf.mean() - lN.mean()), "gamma": 1.0, "source": "one model size: assumed ~ N"}
    P = {k: np.array([q[k] for q in (p, *boot)]) for k in JOINT}  # the fit, then every bootstrap refit
    a, b, g, c0 = P["alpha"], P["beta"], fps["gamma"], fps["c0"]
    valid = (np.minimum.reduce([a, b, P["A"], P["B"]]) > 0) & (g > 0)
    opt = []
    for budget in o["budgets"] or [C[have].max() * m for m in (1, 10, 100)]:
        with np.errstate(all="ignore"):  # extreme bootstrap draws overflow to inf/0: kept as such, not warned about
            n = np.where(valid, (a * P["A"] / (b * g * P["B"]) * (budget / c0) ** b) ** (1 / (a + g * b)), np.nan)
            s = budget / (c0 * n ** g)
            e = P["einf"] + P["A"] / n ** a + P["B"] / s ** b
        opt.append({"C": budget, "N": n[0], "S": s[0], "E": e[0] * o["scale"],
                    "ci": {"N": _percentile_ci(n[1:], o["level"]), "S": _percentile_ci(s[1:], o["level"])}})
    return {"flops_per_sample": fps, "budgets": opt, "N_exponent": p["beta"] / (p["alpha"] + g * p["beta"]),
            "S_exponent": p["alpha"] / (p["alpha"] + g * p["beta"]), "convention": o["convention"],
            "multi_epoch": [f"{r['name']} ({r['S'] / r['D']:.3g} epochs)" for r in rows if r["S"] > r["D"] * 1.01],
            "samples_assumed": [r["name"] for r in rows if r["S_assumed"]]}

def fit_all(points_or_runs, metric="error", holdout=None, n_boot=1000, seed=0, best=False, level=0.95, budgets=None,
            pinned=PINNED, include_unfinished=False):
    """Every axis and the joint law: the object `--json` prints (an unfitted part holds {"error": why}; "ok": anything
    fitted). points_or_runs: run dicts (load_runs), path(s), or {axis: [(x, y in the metric's unit), ...]}."""
    bad_budget = next((str(b) for b in budgets or [] if not _ok(_num(b))), None)
    for wrong, message in (
            (metric not in METRICS, f"metric {metric!r}: use one of {sorted(METRICS)}"),
            (not 0 < level < 1, f"--ci {level}: give a confidence level between 0 and 1, e.g. 0.95"),
            (n_boot < 1, f"--n-boot {n_boot}: need at least 1 bootstrap draw (1000 or more for a 95% interval)"),
            (not pinned > 0, f"--pinned {pinned}: give a word error in percent, e.g. 99.5"),
            (bad_budget is not None, f"--budget {bad_budget}: a FLOP budget must be a positive number, e.g. 1e15")):
        if wrong:
            raise ValueError(message)
    key, src = METRICS[metric], points_or_runs
    if isinstance(src, dict):  # one finished run per point
        runs = [_make_run(f"{ax}={x:g}", {} if ax == "C" else {ax: x}, [{"flops": x if ax == "C" else None, key: y}],
                          True) for ax, pts in src.items() for x, y in pts]
    elif isinstance(src, (str, os.PathLike)) or (isinstance(src, (list, tuple)) and src and isinstance(src[0], str)):
        runs = load_runs(src)
    else:
        runs = list(src)
    scale = 100.0 if metric in ("error", "test") else 1.0
    unfinished = [r["name"] for r in runs if not r["finished"]]
    runs = runs if include_unfinished else [r for r in runs if r["finished"]]
    conventions = {r["config"].get("flops_convention") for r in runs} - {None}
    o = dict(key=key, scale=scale, pin=pinned if scale == 100 else math.inf, best=best, n_boot=int(n_boot),
             level=level, budgets=[_num(b) for b in budgets or []], seed=seed,
             holdout=_holdout_specs(holdout, [ax for ax in AXES if any(_has_axis(r, ax) for r in runs)]),
             convention=" | ".join(sorted(conventions)) or "not recorded (CSV or older runs): C as logged")
    malformed = sum(r["malformed"] for r in runs)
    out = {"metric": metric, "key": key, "unit": "% (fitted as a fraction)" if scale == 100 else "as logged",
           "runs": len(runs), "unfinished": unfinished, "include_unfinished": include_unfinished,
           "notes": [f"skipped {malformed} line(s) of metrics.jsonl that were not a JSON object"] if malformed else [],
           "skipped": [f"{r['name']}: {r['skip']}" for r in runs if r["skip"]]}
    if not runs:
        out["error"] = "no finished runs found (or none match --where)"
    fits = []
    for name, fields, group in _groups([r for r in runs if not r["skip"]]) or [("", {}, [])]:
        fit = {"name": name, "fields": fields, "n_runs": len(group), **{ax: _fit_axis(group, ax, o) for ax in AXES},
               "joint": _fit_joint(group, o)}
        fits.append(dict(fit, ok=any("error" not in fit[part] for part in (*AXES, "joint"))))
    out.update(fits[0] if len(fits) == 1 else {"groups": fits})  # runs of different setups: fitted apart, never pooled
    return dict(out, ok=any(fit["ok"] for fit in fits))

# ----------------------------------------------------------------------------- output
def _ci(c, fmt="{:.4g}"):
    return f"[{fmt.format(c[0])}, {fmt.format(c[1])}]" if c else "[n/a]"

def _r2(v):
    return f"{v:.4f}" if v is not None else "undef"

def format_table(result):
    """A plain-text report of fit_all's result (stdout, and REPORT.md via ocrscale.py)."""
    L = [f"metric: {result['metric']} ({result['key']}, {result['unit']}); {result['runs']} runs"]
    if result["unfinished"]:
        how = ("included" if result["include_unfinished"] else
               "excluded (no result.json; fit them with --include-unfinished)")
        L.append(f"  {len(result['unfinished'])} unfinished run(s) {how}: {', '.join(result['unfinished'])}")
    L += [f"  note: {s}" for s in result["notes"]] + [f"  skipped {s}" for s in result["skipped"]]
    if "error" in result:
        L.append(f"  {result['error']}")
    fits = result.get("groups") or [result]
    if len(fits) > 1:
        L.append(f"\n{len(fits)} fit groups: their runs differ in more than the fitted axes (the fields named below), "
                 f"so each is fitted on its own; fit one with --where FIELD=VALUE")
    for i, fit in enumerate(fits, 1):
        L += [f"\n=== group {i} of {len(fits)}: {fit['name']} ({fit['n_runs']} runs)"] * (len(fits) > 1)
        L += _format_fit(fit, result["metric"])
    return "\n".join(L)

def _format_fit(fit, metric):
    """format_table's lines for one fit group: the per-axis laws, their points and checks, the joint law."""
    u = "%" if metric in ("error", "test") else ""
    axes = [(ax, fit[ax]) for ax in AXES]
    level = next((r["ci"]["level"] for _, r in axes if "ci" in r), 0.95)
    L = [f"\nE = (X_c / X)^alpha, least squares in log-log space; {level:.0%} intervals: t (n-2 dof) below {SMALL_N} "
         f"points or 3 runs, else a bootstrap over runs\n{'axis':<5}{'points':>7}  {'X_c':>11} {'CI':<25}"
         f"{'alpha':>8} {'CI':<20}{'R2(log)':>8}{'RMSE(log)':>10}  interval method"]
    L += [f"{ax:<5}  not fitted: {r['error']}" if "error" in r else
          f"{ax:<5}{r['n_points']:>7}  {r['k']:>11.4g} {_ci(r['ci']['k']):<25}{r['alpha']:>8.4f} "
          f"{_ci(r['ci']['alpha']):<20}{_r2(r['r2']):>8}{r['rmse']:>10.4f}  {r['ci']['method']}"
          for ax, r in axes]
    for ax, r in axes:
        if "error" in r:
            L += [f"  {ax}: skipped {s}" for s in r.get("skipped", [])]
            continue
        at = ", ".join(f"{k}={v}" for k, v in (r["ladder"] or {}).items() if v is not None)
        L.append(f"\n{ax} points" + (f" (ladder at {at})" if at else "") + f": {ax}, {metric}{u}")
        for p in r["points"]:
            n = len(p["runs"])
            who = f"{n} runs {p['spread'][0]:.4g}..{p['spread'][1]:.4g}" if n > 1 else p["runs"][0]
            tag = " PINNED (not fitted)" if p["pinned"] else " HELD OUT" if p["held_out"] else ""
            L.append(f"  {p['x']:>11.4g} {p['y']:>9.4g}  log resid {p['log_residual']:+.4f}  {who}{tag}"
                     + " (unfinished)" * p["unfinished"])
        L += [f"  skipped {s}" for s in r["skipped"]] + [f"  WARNING {w}" for w in r["warnings"]]
        L += [f"  bootstrap dropped {n} draws: {why}" for why, n in r["ci"]["dropped"].items()]
        checks = [("held out (--holdout)", r["holdout"])] * bool(r["holdout"]) + [
            (f"extrapolation: fit on {e['n_fitted']}, without the largest {e['held_out']}", e)
            for e in r["extrapolation"]]
        L += [f"  {what}: {ax}={x:.4g} measured {m:.4g}{u}, predicted {pr:.4g}{u} ({pr - m:+.3g}), {level:.0%} "
              f"prediction interval {_ci([lo, hi])}" for what, h in checks
              for x, m, pr, lo, hi in zip(h["x"], h["measured"], h["predicted"], h["lo"], h["hi"])]
    j = fit["joint"]
    L.append(f"\njoint E = E_inf + A/N^alpha + B/D^beta (summed Huber loss on log E, delta {DELTA:g}, from a grid of "
             f"starts)")
    if "error" in j:
        return L + [f"  not fitted: {j['error']}"]
    L += [f"  {k:<6}{j[k]:>12.5g} {_ci(j['ci'][k])}" for k in JOINT]
    L.append(f"  {j['n_points']} runs, R2(log) {_r2(j['r2'])}, RMSE(log) {j['rmse']:.4f}, loss {j['loss']:.6g}, "
             f"{j['starts_at_best']}/{j['starts']} starts reached the best"
             f"{'' if j['converged'] else ', NOT converged'}; bootstrap: {j['ci']['n_boot']} draws kept" +
             "".join(f", {n} dropped ({why})" for why, n in j["ci"]["dropped"].items()))
    h = j["holdout"] or {}
    L += [f"  held out N={n:.4g}, D={d:.4g}: measured {m:.4g}{u}, predicted {pr:.4g}{u}"
          for n, d, m, pr in zip(*(h.get(k, []) for k in ("N", "D", "measured", "predicted")))]
    co = j["compute_optimal"]
    if "error" in co:
        return L + [f"  compute-optimal: {co['error']}"]
    f = co["flops_per_sample"]
    L.append(f"  compute-optimal N and S = samples seen, for C = c0 N^gamma S with c0 = {f['c0']:.4g}, gamma = "
             f"{f['gamma']:.3f} ({f['source']}):\n    N_opt = [alpha A / (gamma beta B) (C / c0)^beta]^(1/(alpha + "
             f"gamma beta)) ~ C^{co['N_exponent']:.3f}, S_opt = C / (c0 N_opt^gamma) ~ C^{co['S_exponent']:.3f};\n"
             f"    the law is read with D = S (each sample a fresh image)\n    C convention: {co['convention']}")
    L += [f"    {what}: {', '.join(runs)}" for what, runs in (
          ("runs trained for more than one epoch (D is not their samples seen)", co["multi_epoch"]),
          ("no 'samples' logged, one pass assumed (S = D)", co["samples_assumed"])) if runs]
    return L + [f"    C {b['C']:.3g}: N {b['N']:.3g} {_ci(b['ci']['N'], '{:.3g}')}, S {b['S']:.3g} "
                f"{_ci(b['ci']['S'], '{:.3g}')}, predicted {metric} {b['E']:.4g}{u}" for b in co["budgets"]]

def _log_ticks(axis, lo, hi):
    """Readable ticks on a log axis spanning lo..hi: 1-2-5 steps (decades when many, finer when few), at most 6,
    short plain labels and no minor labels (matplotlib's overlap on short ranges: '3x10^4 4x10^4')."""
    from matplotlib import ticker
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    t125, t1, fine = ([m * 10.0 ** e for e in decades for m in steps if lo <= m * 10.0 ** e <= hi]
                      for steps in ((1, 2, 5), (1,), (1, 1.2, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)))
    t = t125 if 3 <= len(t125) <= 6 else t1 if len(t125) > 6 else fine or [lo, hi]
    axis.set_major_locator(ticker.FixedLocator(t[::math.ceil(len(t) / 6)]))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}".replace("e+0", "e").replace("e+", "e")))
    axis.set_minor_formatter(ticker.NullFormatter())

def plot_all(result, out_dir):
    """Log-log PNGs per axis and of the joint law, fit group i of several in out_dir/group{i}; returns their paths."""
    if result.get("groups"):
        return [path for i, fit in enumerate(result["groups"], 1) for path in
                plot_all(dict(fit, metric=result["metric"], key=result["key"]), os.path.join(out_dir, f"group{i}"))]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from e
    os.makedirs(out_dir, exist_ok=True)
    u = "%" if result["metric"] in ("error", "test") else ""
    scale, paths, ylab = 100.0 if u else 1.0, [], f"{result['metric']} ({result['key']}{', ' + u if u else ''})"
    names = {"N": "parameters N", "D": "training images D", "C": "training compute C (FLOPs)", "joint": "parameters N"}
    styles = {(False, False): ("fitted", dict(c="C0", marker="o")),  # by (pinned, held out)
              (False, True): ("held out", dict(c="C3", marker="*", s=120)),
              (True, False): ("pinned: not fitted", dict(c="grey", marker="x"))}
    for ax in [ax for ax in (*AXES, "joint") if "error" not in result[ax]]:
        r, (fig, a) = result[ax], plt.subplots(figsize=(5.5, 4))
        if ax == "joint":  # the points and a curve per D
            Ns = np.geomspace(min(p["N"] for p in r["points"]), max(p["N"] for p in r["points"]), 100)
            for i, D in enumerate(sorted({p["D"] for p in r["points"]})):
                ps = [p for p in r["points"] if p["D"] == D]
                a.scatter([p["N"] for p in ps], [p["y"] for p in ps], c=f"C{i % 10}",
                          marker="*" if any(p["held_out"] for p in ps) else "o")
                a.plot(Ns, (r["einf"] + r["A"] / Ns ** r["alpha"] + r["B"] / D ** r["beta"]) * scale, f"C{i % 10}-",
                       label=f"D={D:.3g}")
        else:  # the points, the fit and its interval band
            for kind, (label, style) in styles.items():
                ps = [p for p in r["points"] if (p["pinned"], p["held_out"]) == kind]
                if ps:
                    a.scatter([p["x"] for p in ps], [p["y"] for p in ps], zorder=3, label=label, **style)
            a.fill_between(r["band"]["x"], r["band"]["lo"], r["band"]["hi"], color="C0", alpha=0.2,
                           label=f"{r['ci']['level']:.0%} CI ({r['ci']['method'].split(' (')[0]})")
            xs = np.geomspace(r["band"]["x"][0], r["band"]["x"][-1], 100)
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # a fit may come out flat or rising
                a.plot(xs, (r["k"] / xs) ** r["alpha"] * scale, "C0-",
                       label=f"({r['k']:.3g}/{ax})^{r['alpha']:.3f}, R2 {_r2(r['r2'])}")
        title = "joint fit E(N, D)" if ax == "joint" else f"{result['metric']} vs {ax}"
        a.set(xscale="log", yscale="log", xlabel=names[ax], ylabel=ylab, title=title)
        _log_ticks(a.xaxis, *a.get_xlim())
        _log_ticks(a.yaxis, *a.get_ylim())
        a.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"fit_{ax}.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths

def main(argv=None):
    p = argparse.ArgumentParser(description="Fit OCR scaling laws to run folders or a CSV of points.")
    add = p.add_argument
    add("paths", nargs="+", help="run folders (searched recursively) and/or CSV files")
    add("--metric", choices=sorted(METRICS), default="error", help="error: val word error (the study's target); "
        "loss: val loss per character; test: test error")
    add("--best", action="store_true", help="use each run's best eval instead of its final one (N, D)")
    add("--where", action="append", default=[], metavar="KEY=VALUE", help="keep runs whose fit group field KEY (arch, "
        "train, val, tokenizer, init, set, img, eval) is VALUE: none for null or empty, paths as given or absolute, "
        "train=PATH any of the training sets, set=FIELD=VALUE any override, img=HxW e.g. 32x128, eval=beam=1; any "
        "other KEY is a config.json key (dotted keys reach into dicts); repeatable")
    add("--holdout", action="append", default=[], metavar="AXIS=largest|largest:K|VALUE", help="fit AXIS without its "
        "largest (K) points or those >= VALUE and predict them (repeatable; a bare VALUE only when one axis is fitted)")
    add("--include-unfinished", action="store_true", help="also fit runs without result.json")
    add("--n-boot", type=int, default=1000, help="bootstrap resamples of every bootstrapped fit")
    add("--ci", type=float, default=0.95, help="confidence level, between 0 and 1")
    add("--seed", type=int, default=0, help="bootstrap seed (each fit derives its own stream from it)")
    add("--budget", action="append", metavar="FLOPS", help="FLOP budget(s) for the compute optimum (default: the "
        "biggest run's C, x10, x100)")
    add("--pinned", type=float, default=PINNED, help="word error %% at which a point counts as pinned")
    add("--json", action="store_true", help="print the result as JSON instead of the table")
    add("--plot", metavar="DIR", help="write log-log PNG plots here (needs matplotlib)")
    args = p.parse_args(argv)
    try:
        result = fit_all(load_runs(args.paths, args.where), metric=args.metric, holdout=args.holdout,
                         n_boot=args.n_boot, seed=args.seed, best=args.best, level=args.ci, budgets=args.budget,
                         pinned=args.pinned, include_unfinished=args.include_unfinished)
        print(json.dumps(json.loads(json.dumps(result), parse_constant=lambda c: None), indent=1) if args.json  # no NaN
              else format_table(result))
        for path in plot_all(result, args.plot) if args.plot else []:
            print(f"wrote {path}", file=sys.stderr)
    except (ValueError, OSError, ImportError) as e:  # bad arguments or input, no matplotlib: one line, exit 2
        print(f"fit.py: {e}", file=sys.stderr)
        return 2
    if not result["ok"]:
        print("fit.py: nothing could be fitted (see the messages above)", file=sys.stderr)
    return 0 if result["ok"] else 1

if __name__ == "__main__":
    sys.exit(main())
