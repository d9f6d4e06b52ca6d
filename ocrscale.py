"""ocrscale.py: the front door. A scaling study in miniature on a laptop CPU, a planner for the real one, a reader.

    python ocrscale.py demo                     # render data, train N and D ladders, fit, write runs/demo/REPORT.md
    python ocrscale.py demo --arch trocr        # the same for TrOCR
    python ocrscale.py demo --quick             # a smaller version that finishes in about a minute
    python ocrscale.py demo --study all         # also the synthetic:real mix and pretraining: one REPORT.md
    python ocrscale.py sweep --arch parseq --sizes S,B,L,H --samples 1M,3M,10M --gpus 8 --nodes 2 --out sweep.sh
    python ocrscale.py read --ckpt runs/demo/parseq-N-T6-s0/best.pt word1.png word2.png [--json]
    python ocrscale.py eval --ckpt runs/NAME/best.pt --test IIIT5k=data/test/IIIT5k [--benchmarks DIR] [--json]

The demo trains every run as its own `python train.py` process (--jobs at a time, one thread each); re-running it
after a kill (rendering included) skips finished runs and resumes the others; a lock file in --out and --data refuses
a second demo on the same folders. REPORT.md's laws are fitted by fit.py on exactly the runs its tables list.
"""
import argparse, contextlib, fcntl, functools, io, json, math, os, queue, random, shlex, shutil, signal, subprocess
import sys, time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import data, fit, model as modellib, train

HERE = os.path.dirname(os.path.abspath(__file__))


class UsageError(ValueError):
    """A mistake in the command line or the files it names: main prints it as one line and exits with 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line without the usage block: the message names the argument and what is valid
        self.exit(2, f"{self.prog}: error: {message}\n")


# The miniature study: 16x64 images of random 2-6 character strings over 36 characters. The N ladder trains each
# size on all n_train images, the D ladder one size on nested caps of unique images; *_train_samples: samples seen.
DEMO = dict(n_train=50_000, n_val=1_000, n_test=1_000, n_sizes=["T2", "T3", "T4", "T5", "T6"], n_train_samples=100_000,
            d_size="T5", d_values=[1_500, 3_000, 6_000, 12_000], d_train_samples=100_000, seeds=[0], metric="error")
QUICK = dict(n_train=4_000, n_val=200, n_test=200, n_sizes=["T1", "T2", "T3"], n_train_samples=3_000,
             d_size="T2", d_values=[500, 1_000, 2_000], d_train_samples=3_000, seeds=[0],
             metric="loss")  # too short to leave the 100%-error plateau: fit val loss per character instead
# The mix and pretraining findings. "Real": data.py's 'varied' style in Pillow's built-in font (the same images on
# every machine), scarce, with the test set of every run; "synthetic": the demo's clean style, plentiful.
STUDY = dict(size="T5", train_samples=100_000, n_real=3_000, n_real_val=1_000, n_real_test=1_000, n_shapes=20_000,
             ratios=[1, 3, 10], seeds=[0, 1])
QUICK_STUDY = dict(size="T2", train_samples=3_000, n_real=500, n_real_val=200, n_real_test=200, n_shapes=1_000,
                   ratios=[1, 3, 10], seeds=[0])
# the study's six benchmarks as PARSeq's release names their folders, then Union14M-Benchmark's subsets
BENCHMARKS = ("IC13_857", "IIIT5k", "SVT", "CUTE80", "IC15_1811", "SVTP", "artistic", "contextless", "curve",
              "general", "multi_oriented", "multi_words", "salient")


def render_sets(root, cfg, study_cfg, workers):
    """The clean train/val/test sets and, with study_cfg, the real-style and shapes sets, each from its own seed and
    kept if there. A split renders into SPLIT.partial, renamed when complete: a killed render is redone, never used."""
    sizes = dict(cfg, **(study_cfg or {}))
    splits = [("train", "n_train", "clean", 0), ("val", "n_val", "clean", 1), ("test", "n_test", "clean", 2)]
    if study_cfg:
        splits += [("real-train", "n_real", "varied", 10), ("real-val", "n_real_val", "varied", 11),
                   ("real-test", "n_real_test", "varied", 12), ("shapes-train", "n_shapes", "shapes", 20),
                   ("shapes-val", "n_real_val", "shapes", 21)]
    for name, size, style, seed in splits:
        out, partial, n = os.path.join(root, name), os.path.join(root, name + ".partial"), sizes[size]
        if os.path.exists(os.path.join(out, "index.json")):
            continue
        if os.path.isdir(out) and any(not f.endswith((".tar", ".tmp", ".idx", data.UNFINISHED))
                                      for f in os.listdir(out)):
            raise UsageError(f"--data: {out} holds files but no index.json; move it away or choose another --data")
        for unfinished in (out, partial):  # shards of an unfinished split (no index.json)
            shutil.rmtree(unfinished, ignore_errors=True)
        print(f"rendering {n:,} {style} images -> {out}", flush=True)
        if style == "shapes":
            render_shapes(partial, n, seed)
        else:
            data.synth(partial, n, seed=seed, style=style, min_len=2, max_len=6, charset=data.CHARSET36,
                       workers=workers)
        os.rename(partial, out)


def render_shapes(out_dir, n, seed):
    """The unrelated pretraining task (the miniature's ImageNet): 1-6 ellipses and boxes on a coloured 128x32
    canvas, labelled with how many there are. A label over the same charset, so --init loads without remapping."""
    rng, writer = random.Random(seed), data.ShardWriter(out_dir, shard_size=n)
    for i in range(n):
        img = Image.new("RGB", (128, 32), tuple(rng.randint(0, 255) for _ in range(3)))
        draw, count = ImageDraw.Draw(img), rng.randint(1, 6)
        for j in range(count):  # one shape per column band, so shapes never merge and the count stays right
            x0, y0 = j * 21 + rng.randint(0, 6), rng.randint(0, 14)
            box = (x0, y0, x0 + rng.randint(8, 14), y0 + rng.randint(8, 17))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape(box, fill=tuple(rng.randint(0, 255) for _ in range(3)))
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=1)
        writer.write(f"{i:09d}", buf.getvalue(), "png", str(count))
    return data.write_index(out_dir, writer.close(), writer.charset, f"shapes seed={seed}", {})


def demo_runs(arch, out, cfg, data_root):
    """(name, tag, argv) of every run of the N and D ladders; train_one adds the name and tag to the argv."""
    path = functools.partial(os.path.join, data_root)
    common = ["--arch", arch, "--train", path("train"), "--val", path("val"), "--test", f"synth={path('test')}",
              "--runs", out, "--threads", "1"]
    runs = []
    for seed in cfg["seeds"]:
        runs += [(f"{arch}-N-{size}-s{seed}", "N", common + ["--size", size, "--seed", str(seed),
                  "--train-samples", str(cfg["n_train_samples"])]) for size in cfg["n_sizes"]]
        runs += [(f"{arch}-D-{d}-s{seed}", "D", common + ["--size", cfg["d_size"], "--seed", str(seed), "--samples",
                  str(d), "--train-samples", str(cfg["d_train_samples"])]) for d in cfg["d_values"]]
    return runs


def study_runs(arch, out, cfg, data_root, studies):
    """(name, tag, argv) of the runs `studies` ('mix', 'pretrain') need, in two phases: the fine-tuning runs,
    which start from a pretraining run's best.pt, come second. The synthetic-only arm is that pretraining run."""
    path = functools.partial(os.path.join, data_root)
    common = ["--arch", arch, "--size", cfg["size"], "--train-samples", str(cfg["train_samples"]),
              "--test", f"real={path('real-test')}", "--runs", out, "--threads", "1"]
    real, both = ["--train", path("real-train"), "--val", path("real-val")], {"mix", "pretrain"}
    arms = [("real", real, both), ("synth", ["--train", path("train"), "--val", path("val")], both),
            *((f"mix{r}", ["--train", f"{path('train')}:{r}", "--train", f"{path('real-train')}:1",
                           "--val", path("real-val")], {"mix"}) for r in cfg["ratios"]),  # weights: shares of samples
            ("shapes", ["--train", path("shapes-train"), "--val", path("shapes-val")], {"pretrain"})]
    first, second = [], []
    for seed in cfg["seeds"]:
        first += [(f"{arch}-{arm}-s{seed}", arm, common + argv + ["--seed", str(seed)]) for arm, argv, used in arms
                  if used & set(studies)]
        if "pretrain" in studies:
            second += [(f"{arch}-ft-{pre}-s{seed}", f"ft-{pre}", common + real + ["--seed", str(seed), "--init",
                        os.path.join(out, f"{arch}-{pre}-s{seed}", "best.pt")]) for pre in ("synth", "shapes")]
    return first, second


def lock_folder(folder):
    """Hold FOLDER/.ocrscale.lock (with our PID in it) until the returned file is closed. The lock belongs to the
    open file, which the training processes inherit: the OS drops it when the demo and its runs have all exited."""
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(os.path.join(folder, ".ocrscale.lock"), "a+")
    except OSError as e:
        raise UsageError(f"{folder}: cannot hold run or data folders there ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with f:
            f.seek(0)
            raise UsageError(f"{folder} is in use by another demo (pid {f.read().strip() or '?'}, or the training runs "
                             "it started); wait for it to finish or choose another --out/--data") from None
    f.truncate(0)
    print(os.getpid(), file=f, flush=True)
    return f


class Runner:
    """Runs train.py processes, `jobs` at a time, each in a session of its own. Within `with`, the first SIGTERM,
    SIGINT or SIGHUP (stop) passes one SIGTERM on to each (it saves last.pt and exits) and starts no more; a second
    kills them and exits at once."""

    def __init__(self, jobs, keep_fds):
        self.jobs, self.keep_fds, self.slots, self.procs, self.signal = jobs, keep_fds, queue.Queue(), set(), None
        for slot in range(jobs):  # progress-bar lines
            self.slots.put(slot)

    def __enter__(self):
        self.handlers = {signum: signal.signal(signum, self.stop)
                         for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)

    def stop(self, signum, frame):
        for proc in list(self.procs):
            proc.terminate() if self.signal is None else proc.kill()
        if self.signal is not None:
            print(f"ocrscale.py demo: a second {signal.Signals(signum).name}: runs killed without saving",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signal = signum

    def train_one(self, name, tag, argv):
        slot = self.slots.get()
        try:
            if self.signal is not None:
                return None, "not started"
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv, "--name", name, "--tag",
                                     tag, "--bar-position", str(slot)], stdout=subprocess.PIPE, text=True,
                                    pass_fds=self.keep_fds, start_new_session=True)  # a terminal's ^C: to us only
            self.procs.add(proc)
            if self.signal is not None:  # stop() ran before the process was listed
                proc.terminate()
            summary = (proc.communicate()[0].strip().splitlines() or ["(no output)"])[-1]
            self.procs.discard(proc)
            return proc.returncode, summary
        finally:
            self.slots.put(slot)

    def run_all(self, runs, out):
        """The runs' names that failed or did not run."""
        if not runs or self.signal is not None:
            return [name for name, _, _ in runs]
        print(f"training {len(runs)} runs ({self.jobs} at a time) into {out}", flush=True)
        started, failed = time.time(), set()
        with ThreadPoolExecutor(self.jobs) as pool:
            futures = {pool.submit(self.train_one, name, tag, argv): name for name, tag, argv in runs}
            for done, future in enumerate(as_completed(futures), 1):
                code, summary = future.result()
                status = "ok" if code == 0 else "STOPPED" if self.signal is not None else f"FAILED (exit {code})"
                print(f"\n[{done}/{len(runs)} runs, {time.time() - started:.0f}s] {status}: {summary}", flush=True)
                if code != 0:
                    failed.add(futures[future])
        return [name for name, _, _ in runs if name in failed]


def cmd_demo(args):
    """Train the runs of --study, write OUT/REPORT.md (a sentence per finding, a section per study), return 1 if a run
    failed or was skipped. With all, the ladders train in OUT/laws, the rest in OUT/studies (fit.py pools all runs in
    a folder)."""
    suffix = ("" if args.study == "n" else f"-{args.study}") + ("-trocr" if args.arch == "trocr" else "")
    args.out = args.out or os.path.join("runs", "demo" + suffix + ("-quick" if args.quick else ""))
    args.data = args.data or os.path.join("data", "demo-quick" if args.quick else "demo")
    seeds = {"seeds": args.seeds} if args.seeds else {}
    laws_cfg, cfg = dict(QUICK if args.quick else DEMO, **seeds), dict(QUICK_STUDY if args.quick else STUDY, **seeds)
    studies = ["n", "mix", "pretrain"] if args.study == "all" else [args.study]
    laws_out, study_out = (os.path.join(args.out, f) if args.study == "all" else args.out for f in ("laws", "studies"))
    laws_runs = demo_runs(args.arch, laws_out, laws_cfg, args.data) if "n" in studies else []
    first, second = study_runs(args.arch, study_out, cfg, args.data, studies)
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        lock_fds = tuple(stack.enter_context(lock_folder(f)).fileno()  # inherited by the runs
                         for f in dict.fromkeys(map(os.path.realpath, [args.out, args.data])))
        render_sets(args.data, laws_cfg, None if studies == ["n"] else cfg, args.jobs)
        with Runner(args.jobs, lock_fds) as runner:
            failed = runner.run_all(laws_runs + first, args.out)
            skipped = [name for name, _, argv in second  # fine-tuning runs whose pretraining run did not finish
                       if not os.path.exists(os.path.join(os.path.dirname(argv[argv.index("--init") + 1]),
                                                          "result.json"))]
            if skipped and runner.signal is None:
                print(f"skipping {', '.join(skipped)}: their pretraining did not finish", flush=True)
            failed += runner.run_all([run for run in second if run[0] not in skipped], args.out) + skipped
    if runner.signal is not None:
        print(f"ocrscale.py demo: stopped by {signal.Signals(runner.signal).name}; the runs saved their last.pt: the "
              "same command resumes them", file=sys.stderr)
        return 128 + runner.signal
    sections = [laws_section(args.arch, laws_out, laws_cfg, laws_runs, args.out)] if "n" in studies else []
    if "mix" in studies:
        sections.append(mix_section(args.arch, study_out, cfg, args.out))
    if "pretrain" in studies:
        sections.append(pretrain_section(args.arch, study_out, cfg))
    findings = [finding for _, found in sections for finding in found]
    report = os.path.join(args.out, "REPORT.md")
    quick = "--quick: runs far too short to show the findings; a smoke test of the pipeline.\n\n" if args.quick else ""
    Path(report).write_text(
        f"# The OCR scaling study's findings in miniature ({args.arch}, {time.time() - t0:.0f}s; runs finished by an "
        f"earlier call are not retrained)\n\n{quick}" + "".join(f"- {finding}\n" for finding in findings)
        + (f"\n**Failed runs** (re-run the same command to resume them): {', '.join(failed)}\n" if failed else "")
        + "\n" + "\n".join(text for text, _ in sections))
    print("\n".join(findings) + f"\nwrote {report} ({time.time() - t0:.0f}s in all)")
    return 1 if failed else 0


def markdown_table(header, rows):
    return "\n".join([f"| {' | '.join(header)} |", "|---" * len(header) + "|",
                      *(f"| {' | '.join(row)} |" for row in rows)]) + "\n"


def laws_section(arch, out, cfg, runs, root):
    """(markdown: the ladders' tables, the laws fitted on exactly their runs, plots linked from `root`; findings)."""
    text = [f"## The N, D and C laws\n\nSynthetic 36-char word images (16x64), {cfg['n_train']:,} train / "
            f"{cfg['n_val']:,} val / {cfg['n_test']:,} test. N ladder: sizes {', '.join(cfg['n_sizes'])} at "
            f"{cfg['n_train_samples']:,} samples each; D ladder: size {cfg['d_size']} on the first "
            f"{', '.join(f'{d:,}' for d in cfg['d_values'])} images, {cfg['d_train_samples']:,} samples each. "
            f"Seeds: {', '.join(map(str, cfg['seeds']))}.\n"]
    folders = {}
    for axis in ("N", "D"):
        names = [name for name, tag, _ in runs if tag == axis]
        folders[axis] = [os.path.join(out, n) for n in names if os.path.isdir(os.path.join(out, n))]
        rows = []
        for name in names:
            path = os.path.join(out, name, "result.json")
            if not os.path.exists(path):
                rows.append([name, "(not finished)"])
                continue
            r = json.loads(Path(path).read_text())
            rows.append([name, f"{r['N']:,}", f"{r['D']:,}", f"{r['samples']:,}", f"{r['val_error']:.2f}",
                         "None" if r.get("test_error") is None else f"{r['test_error']:.2f}", f"{r['wall_s']:.0f}"])
        text.append(f"### {axis} ladder\n\n" + markdown_table(
            ["run", "N (params)", "D (unique images)", "samples seen", "val word error %", "test word error %",
             "train s"], rows))
    # E(N) on the N ladder, E(D) on the D ladder, E(C) and the joint law on both: never other runs in `out`.
    metric, ladders = cfg["metric"], {axis: fit.load_runs(folders[axis]) for axis in folders}
    result = fit.fit_all(ladders["N"] + ladders["D"], metric=metric)
    for axis in ("N", "D"):  # a ladder of runs of different settings (e.g. some from an older train.py) is not pooled
        result[axis] = fit.fit_all(ladders[axis], metric=metric).get(axis) or \
            {"error": f"its runs differ in their settings: fit.py fits them apart ({out})"}
    target = "word error" if metric == "error" else "val loss per character"
    commands = "\n".join(f"python fit.py {' '.join(paths)} --metric {metric}    # {axis}" for axis, paths in
                         (("N", folders["N"]), ("D", folders["D"]), ("C and joint", folders["N"] + folders["D"])))
    text.append(f"### Fitted laws\n\nE = (X_c / X)^alpha with E the "
                f"{'word error as a fraction' if metric == 'error' else target}, fitted on exactly the runs in the "
                f"tables above (N on the N ladder, D on the D ladder, C and the joint law on both). Reproduce with:\n\n"
                f"```\n{commands}\n```\n\n```\n{fit.format_table(result)}\n```\n")
    try:
        text += [f"![{os.path.basename(p)}]({os.path.relpath(p, root)})\n" for p in fit.plot_all(result, out)]
    except ImportError as e:
        text.append(f"(no plots: {e})\n")
    findings = []  # one sentence each on the N and D laws, from the fit the report shows
    for axis, what, study in (("N", "model size N", "0.223 for TrOCR, 0.018 for PARSeq"),
                              ("D", "training images D", "0.327 for TrOCR")):
        r = result[axis]
        if "error" in r:
            findings.append(f"The {axis} law: not fitted ({r['error']}).")
            continue
        r2 = "undefined: flat or non-monotone" if r["r2"] is None else format(r["r2"], ".3f")
        findings.append(f"The {axis} law: the miniature {'reproduced' if r['alpha'] > 0 else 'did not reproduce'} "
                        f"the study's direction: {target} {'falls' if r['alpha'] > 0 else 'does not fall'} with "
                        f"{what}: power-law alpha {r['alpha']:.3f} (R² {r2}; the study: {study}).")
    return "\n".join(text), findings


def arm_result(runs_dir, arch, arm, cfg):
    """([real-style test word error % per finished seed], their mean or None, table cells) of one arm's runs."""
    paths = [os.path.join(runs_dir, f"{arch}-{arm}-s{seed}", "result.json") for seed in cfg["seeds"]]
    errors = [json.loads(Path(p).read_text())["tests"]["real"]["error"] for p in paths if os.path.exists(p)]
    if not errors:
        return errors, None, ["(not finished)"]
    mean = sum(errors) / len(errors)
    spread = f" (seeds {min(errors):.1f}-{max(errors):.1f})" if len(errors) > 1 else ""
    return errors, mean, [", ".join(f"{e:.1f}" for e in errors), f"{mean:.1f}{spread}"]


def than(x, y):
    """'12.3 points better than' for error x against error y."""
    level = round(x, 1) == round(y, 1)
    return "level with" if level else f"{abs(x - y):.1f} points {'better' if x < y else 'worse'} than"


def mix_section(arch, out, cfg, root):
    """(markdown: the table, the plot linked from `root`; [whether the study's mix finding reproduced])."""
    rows, means, per_seed = [], {}, {}
    for arm, label, ratio in [("real", "0 (real only)", 0), *((f"mix{r}", f"{r}:1", r) for r in cfg["ratios"]),
                              ("synth", "synthetic only", None)]:
        per_seed[ratio], means[ratio], cells = arm_result(out, arch, arm, cfg)
        rows.append([label, *cells])
    text = (f"## The synthetic:real mix\n\n{arch}-{cfg['size']}, {cfg['train_samples']:,} samples per run, drawn "
            f"from {cfg['n_real']:,} real-style training images and the synthetic set at each ratio; word error "
            f"on {cfg['n_real_test']:,} real-style test images; seeds {cfg['seeds']}.\n\n"
            + markdown_table(["synthetic:real", "word error % per seed", "mean %"], rows))
    mixed = {r: m for r, m in means.items() if r and m is not None}  # not 0 (real only), not None (synthetic only)
    if not mixed or means[0] is None or means[None] is None:
        return text, ["The synthetic:real mix: runs unfinished, no verdict."]
    best, alone = min(mixed, key=mixed.get), min(means[0], means[None])
    finding = (f"The synthetic:real mix: the miniature {'reproduced' if mixed[best] < alone else 'did not reproduce'} "
               f"the study's direction: the best mix ({best}:1; the study's best is about 3:1) has {mixed[best]:.1f}% "
               f"word error against {means[0]:.1f}% for real only and {means[None]:.1f}% for synthetic only, "
               f"{than(mixed[best], alone)} the better single source")
    runner = min((r for r in mixed if r != best), key=mixed.get, default=None)
    if runner and min(per_seed[runner]) <= max(per_seed[best]):  # noise: say so
        finding += (f"; the runner-up ({runner}:1, {mixed[runner]:.1f}%) overlaps it within the seed spread: "
                    f"the two are not told apart at this scale")
    most = max(mixed)
    if mixed[most] > mixed[best]:  # the study: more synthetic than about 3:1 hurts
        finding += (f"; the most synthetic mix ({most}:1, {mixed[most]:.1f}%) is {mixed[most] - mixed[best]:.1f} "
                    f"points worse than the best, as in the study")
    try:
        text += f"\n![mix]({os.path.relpath(plot_mix(out, means, per_seed, sorted(mixed)), root)})\n"
    except ImportError:
        text += "\n(no plot: plots need matplotlib: pip install matplotlib)\n"
    return text, [finding + "."]


def plot_mix(out_dir, means, per_seed, ratios):
    from matplotlib.figure import Figure  # optional; a Figure without pyplot needs no GUI backend and no closing
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(ratios, [means[r] for r in ratios], "o-", label="real + synthetic")
    ax.plot([r for r in ratios for _ in per_seed[r]], [e for r in ratios for e in per_seed[r]], ".", color="C0",
            alpha=0.4, label="one seed")
    ax.axhline(means[0], color="C1", ls="--", label="real only")
    ax.axhline(means[None], color="C2", ls=":", label="synthetic only")
    ax.set(xscale="log", xlim=(min(ratios) / 1.6, max(ratios) * 1.6), xlabel="synthetic : real images sampled",
           ylabel="word error on the real-style test set (%)")
    ax.set_xticks(ratios, [f"{r}:1" for r in ratios])
    ax.minorticks_off()  # no minor tick labels to overlap
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "mix.png"), dpi=120)
    return os.path.join(out_dir, "mix.png")


def pretrain_section(arch, out, cfg):
    """(markdown: the table; [whether the study's pretraining finding reproduced])."""
    rows, means = [], {}
    for arm, label, pre, ft in (("real", "from scratch", "none", "real-style"),
                                ("ft-synth", "synthetic, then real", "synthetic", "real-style"),
                                ("ft-shapes", "unrelated, then real", "counting shapes", "real-style"),
                                ("synth", "synthetic, not fine-tuned", "synthetic", "none"),
                                ("shapes", "unrelated, not fine-tuned", "counting shapes", "none")):
        _, means[arm], cells = arm_result(out, arch, arm, cfg)
        rows.append([label, pre, ft, *cells])
    n = f"{cfg['train_samples']:,}"
    text = (f"## Pretraining, then fine-tuning on real\n\n{arch}-{cfg['size']}: {n} samples on the synthetic set "
            f"or on an unrelated task (counting 1-6 coloured shapes), then {n} samples on the {cfg['n_real']:,} "
            f"real-style images from that checkpoint (`train.py --init`); from scratch = the same {n} samples on real "
            f"only. The last two rows are the pretrained checkpoints before fine-tuning. Word error on the "
            f"real-style test set; seeds {cfg['seeds']}.\n\n"
            + markdown_table(["arm", "pretraining", "fine-tuning", "word error % per seed", "mean %"], rows))
    scratch, task, other = means["real"], means["ft-synth"], means["ft-shapes"]
    if None in (scratch, task, other):
        return text, ["Pretraining: runs unfinished, no verdict."]
    return text, [f"Pretraining: the miniature {'reproduced' if task < min(scratch, other) else 'did not reproduce'} "
                  f"the study's direction: synthetic pretraining then fine-tuning gives {task:.1f}% word error, "
                  f"{than(task, scratch)} from scratch ({scratch:.1f}%) and {than(task, other)} after the unrelated "
                  f"pretraining ({other:.1f}%), which itself is {than(other, scratch)} from scratch (the study found "
                  f"unrelated ImageNet pretraining worse than scratch)."]


def count_list(text):
    """'300k,1M,2.5e6' -> [300_000, 1_000_000, 2_500_000]."""
    scales = {"k": 1e3, "m": 1e6, "b": 1e9}
    try:
        counts = [float(c[:-1]) * scales[c[-1].lower()] if c[-1:].lower() in scales else float(c)
                  for c in text.split(",")]
    except ValueError:
        counts = [0]
    # whole to float rounding (4.1M is 4099999.9999999995); nan and inf are out of range
    whole = all(1 <= c < 1e15 and abs(c - round(c)) < 1e-6 * c for c in counts)
    if not whole or len(set(map(round, counts))) < len(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct whole counts separated by commas, e.g. "
                                         "300k,1M,2.5e6")
    return [round(c) for c in counts]


def size_list(text):
    sizes = text.split(",")
    if not set(sizes) <= set(modellib.SIZES["parseq"]) or len(set(sizes)) < len(sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct sizes of {','.join(modellib.SIZES['parseq'])}, "
                                         "no spaces")
    return text.split(",")


def seed_list(text):
    seeds = text.split(",")
    if not all(s.isdecimal() for s in seeds) or len(set(map(int, seeds))) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct non-negative integers, e.g. 0,1,2")
    return [int(s) for s in seeds]


def bounded(kind, low, high=math.inf):
    """An argparse type: an int or float within [low, high] (nan refused)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:
            what = "a whole number" if kind is int else "a number"
            limits = f"of at least {low:g}" if high == math.inf else f"from {low:g} to {high:g}"
            raise argparse.ArgumentTypeError(f"{text!r}: give {what} {limits}")
        return value
    return parse


def check_samples(sources, samples):
    """Refuse a --samples value that the --train data cannot hold: train.py splits D over the sources by weight and
    stops when a share is above its source's images (shard counts here; fewer may be usable after label filtering)."""
    try:
        if any(data.is_url(path) for path, _ in sources):
            raise OSError("URL sources are not counted")
        counts = [sum(n for _, n in data.find_shards(path)) for path, _ in sources]
    except (OSError, ValueError) as e:
        print(f"note: --samples not checked against the --train data: {e}", file=sys.stderr)
        return
    for d in samples:
        for (path, _), want, have in zip(sources, data.largest_remainder(d, [w for _, w in sources]), counts):
            if want > have:
                raise UsageError(f"argument --samples: {d:,} needs {want:,} images from --train {path}, "
                                 f"which holds {have:,}")


def cmd_sweep(args):
    """Print the plan of every (size, D) point and write its script: a command per run (a failed one is reported and
    the next one runs), the fit, and the runs left without a result."""
    try:
        vocab = data.CharTokenizer(data.load_charset(args.charset)).vocab_size
    except ValueError as e:
        raise UsageError(f"argument --charset: {e}") from None
    folder = os.path.dirname(os.path.abspath(args.out or "."))
    if args.out and (os.path.isdir(args.out) or not os.access(folder, os.W_OK)):
        raise UsageError(f"argument --out: {args.out}: " + ("a folder" if os.path.isdir(args.out) else
                                                              f"cannot write in {folder}"))
    world = args.gpus * args.nodes
    args.train = args.train or ["data/train"]  # not the parser's default: a default list would be appended to
    sources = data.parse_sources(",".join(args.train))
    if min(w for _, w in sources) <= 0:
        raise UsageError(f"argument --train: {args.train}: a weight (DIR:WEIGHT) is a positive number")
    try:
        train.test_sets(args.test)
    except ValueError as e:
        raise UsageError(f"argument {e}") from None
    data_args = [*(a for t in args.train for a in ("--train", t)), "--val", args.val,
                 *(a for t in args.test for a in ("--test", t))]
    names, lines, refused, total_flops, total = [], [], [], 0, 0
    table = [f"{'size':>5} {'N':>12} {'D':>12} {'samples':>13} {'FLOPs':>10} {'GPU-h':>9} {'wall h':>8}"]
    for size in args.sizes:
        cfg = modellib.make_config(args.arch, size, vocab)
        batch = train.RECIPES.get((args.arch, size), train.DEFAULTS)["batch"]
        if batch % world:  # train.py would stop at its start: each process takes batch // processes
            refused.append(f"{args.arch}-{size} (batch {batch})")
            continue
        n = modellib.count_params(cfg)[0]
        for d in args.samples:
            name, seen = f"{args.arch}-{size}-d{d}", int(args.epochs * d)
            if seen < 1:
                raise UsageError(f"argument --epochs: {args.epochs:g} passes over D={d:,} are under one sample")
            flops = modellib.train_flops_per_sample(cfg) * seen
            gpu_hours = flops / (train.PEAK_FLOPS[args.gpu] * args.mfu) / 3600
            names.append(name)
            total_flops, total = total_flops + flops, total + gpu_hours
            table.append(f"{size:>5} {n:>12,} {d:>12,} {seen:>13,} {flops:>10.3g} {gpu_hours:>9.4g} "
                         f"{gpu_hours / world:>8.3g}")
            nodes = (f" --nnodes={args.nodes} --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 --rdzv-id={name}"
                     if args.nodes > 1 else "")  # a rendezvous id per run, so back-to-back runs never join a stale one
            command = shlex.join(["train.py", "--arch", args.arch, "--size", size, "--charset", args.charset,
                                  "--samples", str(d), "--train-samples", str(seen), *data_args, "--name", name])
            lines.append(f"# N={n:,} D={d:,} FLOPs={flops:.4g} GPU-hours={gpu_hours:.4g}\ntorchrun "
                         f'--nproc_per_node={args.gpus}{nodes} {command} || echo "sweep: {name} failed (exit $?)" >&2')
    refusal = f"{', '.join(refused)}: the recipe's batch does not split over {world} GPUs (train.py would stop)"
    if not names:
        raise UsageError(f"no run to write: {refusal}")
    check_samples(sources, args.samples)
    if refused:
        print(f"refused {refusal}; their runs are not in the script", file=sys.stderr)
    print("\n".join(table) + f"\ntotal: {total_flops:.3g} FLOPs, {total:,.0f} GPU-hours, {total / world:,.1f} hours "
          f"on {world} GPUs run one after another")
    script = "\n".join([
        f"#!/usr/bin/env bash\n# {args.arch} sweep: {len(names)} runs on {args.nodes}x{args.gpus} {args.gpu} at MFU "
        f"{args.mfu:.0%}; a failed run is reported on stderr and the sweep goes on to the next", *lines,
        # the study's number: word error averaged over the --test sets, weighted by their sizes (train.py's test_error)
        f"python fit.py runs/ --where arch={args.arch} --metric {'test' if args.test else 'error'} "
        f"--holdout largest --plot runs/plots",
        f'missing=""; for run in {" ".join(names)}; do [ -f "runs/$run/result.json" ] || missing="$missing $run"; done',
        'if [ -n "$missing" ]; then echo "sweep: not in the fit (no result.json):$missing" >&2; exit 1; fi']) + "\n"
    if not args.out:
        print("\n" + script)
        return
    Path(args.out).write_text(script)
    os.chmod(args.out, 0o755)
    print(f"wrote {args.out}")


def load_checkpoint(path):
    """(model in eval mode, tokenizer), loaded weights-only; an --ema run's last.pt gives the averaged weights."""
    if not os.path.isfile(path):
        raise UsageError(f"argument --ckpt: {path}: no such file (give a run's best.pt, e.g. "
                         f"runs/demo/parseq-N-T6-s0/best.pt)")
    try:
        ckpt, cfg, tok = train.read_checkpoint(path)
        net = modellib.build_model(cfg)
        net.load_state_dict(ckpt.get("ema") or ckpt["model"])
    except (ValueError, RuntimeError) as e:  # RuntimeError: weights that do not fit their own config
        raise UsageError(f"argument --ckpt: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    return net.eval(), tok


def decode_options(arch, beam, refine_iters, len_norm, ckpt_path):
    """The decode() keywords a command's flags set; a flag of the other architecture is a usage error."""
    for flag, value, owner in (("--beam", beam, "trocr"), ("--beam-len-norm", len_norm, "trocr"),
                               ("--refine-iters", refine_iters, "parseq")):
        if value is not None and arch != owner:
            raise UsageError(f"argument {flag}: applies to {owner} checkpoints only; {ckpt_path} is {arch}")
    options = {"beam": beam, "len_norm": len_norm} if arch == "trocr" else {"refine_iters": refine_iters}
    return {k: v for k, v in options.items() if v is not None}


@torch.no_grad()
def cmd_eval(args):
    """Score a checkpoint on test sets as train.py scores a run at its end; the size-weighted average over the sets."""
    net, tok = load_checkpoint(args.ckpt)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda: this torch sees no CUDA device")
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    options = decode_options(net.cfg.arch, args.beam, args.refine_iters, args.beam_len_norm, args.ckpt)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    found = [b for b in BENCHMARKS if args.benchmarks and os.path.isdir(os.path.join(args.benchmarks, b))]
    if args.benchmarks and not found:
        raise UsageError(f"argument --benchmarks: {args.benchmarks} holds none of {', '.join(BENCHMARKS)} "
                         "(shard folders: python data.py import-lmdb .../test/IC13_857 DIR/IC13_857)")
    try:  # the benchmarks first, so that a --test set named like one is the repeated name
        sets = train.test_sets([f"{b}={os.path.join(args.benchmarks, b)}" for b in found] + args.test)
    except ValueError as e:
        raise UsageError(f"argument {e}") from None
    if not sets:
        raise UsageError("give --test NAME=DIR (any number) or --benchmarks DIR")
    results = {}
    for name, path in sets.items():
        try:
            stream = data.ShardStream(path, net.cfg.img_h, net.cfg.img_w, args.batch, None, max_len=net.cfg.max_len,
                                      loop=False, tokenizer=tok)
            r = train.evaluate(net, tok, stream, options, args.workers, device, autocast, args.cased, args.punctuation)
        except (ValueError, OSError, data.DataError) as e:  # no usable label, no shards, nothing readable
            flag = "--benchmarks" if name in found and path == os.path.join(args.benchmarks, name) else "--test"
            raise UsageError(f"argument {flag} {name}={path}: {e}") from None
        results[name] = dict(n=r["n"], accuracy=100 - r["error"], ned=r["ned"], confidence=r["confidence"],
                             label_length=r["label_length"],
                             drops={k: v for k, v in dict(stream.drops, unreadable=r["unreadable"]).items() if v})
    out = dict(sets=results, weighted_accuracy=data.weighted_average(results, "accuracy"),
               weighted_ned=data.weighted_average(results, "ned"))
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{'set':<16}{'n':>7}{'accuracy':>10}{'1-NED':>8}{'confidence':>12}{'length':>8}  drops")
    for name, r in results.items():
        print(f"{name:<16}{r['n']:>7}{r['accuracy']:>10.2f}{r['ned']:>8.2f}{r['confidence']:>12.2f}"
              f"{r['label_length']:>8.2f}  {', '.join(f'{k} {v}' for k, v in r['drops'].items()) or 'none'}")
    print(f"{'weighted (by n)':<16}{sum(r['n'] for r in results.values()):>7}{out['weighted_accuracy']:>10.2f}"
          f"{out['weighted_ned']:>8.2f}")


@torch.no_grad()
def read_images(ckpt_path, paths, beam=None, refine_iters=None, len_norm=None, batch=64, max_len=None):
    """([(path, text, confidence)] of the readable images, the checkpoint's tokenizer), decoding at most max_len
    tokens (default: the tokenizer's). An unreadable file is reported in one line on stderr and left out."""
    net, tok = load_checkpoint(ckpt_path)
    options = decode_options(net.cfg.arch, beam, refine_iters, len_norm, ckpt_path)
    results = []
    for start in range(0, len(paths), batch):
        images, readable = [], []
        for path in paths[start:start + batch]:
            try:
                images.append(torch.tensor(data.decode_image(Path(path).read_bytes(), net.cfg.img_h, net.cfg.img_w)))
                readable.append(path)
            except Exception as e:  # OSError and PIL's several kinds for files that are no image
                why = getattr(e, "strerror", None) or "not an image Pillow can decode"
                print(f"ocrscale.py read: cannot read {path} ({why}); skipped", file=sys.stderr)
        if images:
            ids, conf = net.decode(data.normalize(torch.stack(images)), max_len=max_len or tok.max_len, **options)
            results += zip(readable, tok.decode(ids), conf.tolist())
    return results, tok


def cmd_read(args):
    """Each image's text and confidence (and the accuracy on labelled ones); exit code 1 if one was unreadable."""
    items = []  # (image path, label or None) from image files, folders and label files (path<TAB>label, relative to it)
    for path in args.images:
        if os.path.isdir(path):
            items += [(os.path.join(path, f), None) for f in sorted(os.listdir(path))
                      if f.lower().endswith(tuple("." + e for e in data.IMAGE_EXTS))]
        elif path.lower().endswith((".tsv", ".txt")):
            try:
                lines = data.label_file_lines(path, encoding=args.encoding)
            except (OSError, ValueError) as e:
                raise UsageError(f"argument images: cannot read the label file: {e}") from None
            items += [(os.path.join(os.path.dirname(path), image), label if has_tab else None)
                      for _, image, has_tab, label in lines]
        else:
            items.append((path, None))
    if not items:
        raise UsageError("argument images: no image files in " + " ".join(args.images))
    results, tok = read_images(args.ckpt, [p for p, _ in items], args.beam, args.refine_iters, args.beam_len_norm,
                               args.batch, args.max_len)
    readable = {p for p, _, _ in results}
    labels = [label for p, label in items if p in readable]  # one per result, in order
    # scored as eval scores: labels read as a run reads them; one eval would drop (empty, too long) is not
    charset = getattr(tok, "charset", None)
    cleaned = [label and data.usable_label(label, charset, tok.max_len, tok.fold, tok)[0] for label in labels]
    scored = [(t, c) for (_, t, _), c in zip(results, cleaned) if c]
    s = data.score(*zip(*scored), charset) if scored else None
    if args.json:
        images = [dict(image=p, text=t, confidence=c, **({"label": label} if label is not None else {}))
                  for (p, t, c), label in zip(results, labels)]
        score = dict(n=s["n"], accuracy=100 - s["error"], ned=s["ned"]) if s else {}
        print(json.dumps(dict(images=images, **score), indent=1))
    else:
        for p, t, c in results:
            print(f"{p}\t{t}\t{c:.4f}")
        if s:
            unscored = sum(label is not None for label in labels) - s["n"]
            note = f" ({unscored} labels not scored: empty or too long once cleaned, as eval drops them)"
            print(f"word accuracy {100 - s['error']:.2f}%, 1-NED {s['ned']:.2f}% on {s['n']} labelled images"
                  + note * bool(unscored))
    return int(len(results) < len(items))


def main(argv=None):
    p = Parser(prog="ocrscale.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the miniature scaling study on synthetic data (CPU, minutes)")
    d.add_argument("--arch", choices=["parseq", "trocr"], default="parseq")
    d.add_argument("--quick", action="store_true", help="tiny ladder and data (about a minute), for a smoke test")
    d.add_argument("--out", help="run folder root (default runs/demo[-STUDY][-trocr][-quick])")
    d.add_argument("--data", help="where the rendered shards go (default data/demo[-quick])")
    d.add_argument("--seeds", type=seed_list, help="e.g. 0,1,2: fit.py fits the median per size")
    d.add_argument("--jobs", type=bounded(int, 1), default=min(2, os.cpu_count() or 1),
                   help="runs at once (default 2, 1 on one core)")
    d.add_argument("--study", choices=["n", "mix", "pretrain", "all"], default="n", help="n: the N, D and C laws; "
                   "mix: synthetic:real ratios; pretrain: pretrain then fine-tune; all: each")
    s = sub.add_parser("sweep", help="plan an N x D grid for a GPU cluster: commands, FLOPs, GPU-hours")
    s.add_argument("--arch", choices=["parseq", "trocr"], default="parseq")
    s.add_argument("--sizes", type=size_list, default="S,B,L,H", help="model sizes, comma-separated")
    s.add_argument("--samples", type=count_list, default="1M,3M,10M", help="D values (unique training images)")
    s.add_argument("--epochs", type=bounded(float, 1e-3, 1e6), default=20, help="passes over D per run (PARSeq's: 20)")
    s.add_argument("--gpus", type=bounded(int, 1), default=8, help="GPUs per node")
    s.add_argument("--nodes", type=bounded(int, 1), default=1)
    s.add_argument("--charset", default="94", help="as train.py's: 36, 94, the characters or @FILE")
    s.add_argument("--gpu", choices=sorted(train.PEAK_FLOPS), default="H100", help="for the bf16 peak FLOP/s")
    s.add_argument("--mfu", type=bounded(float, 0.01, 1), default=0.4, help="assumed MFU")
    s.add_argument("--train", action="append", help="training shards DIR[:WEIGHT] for the commands")
    s.add_argument("--val", default="data/val", help="validation shards for the commands")
    s.add_argument("--test", action="append", default=[], metavar="NAME=DIR", help="test sets (fit: weighted mean)")
    s.add_argument("--out", help="write the commands as a shell script")
    e = sub.add_parser("eval", help="score a checkpoint on test sets (word accuracy, 1-NED, confidence), no training")
    e.add_argument("--test", action="append", default=[], metavar="NAME=DIR", help="a test set (shard folder or URL)")
    e.add_argument("--benchmarks", metavar="DIR", help="a folder holding some of: " + ", ".join(BENCHMARKS))
    e.add_argument("--cased", action="store_true", help="the study's setting, case kept (PARSeq's test.py --cased)")
    e.add_argument("--punctuation", action="store_true", help="the study's setting, punctuation kept")
    e.add_argument("--batch", type=bounded(int, 1), default=256, help="images per batch")
    e.add_argument("--workers", type=bounded(int, 0, 64), default=0, help="loader processes")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    r = sub.add_parser("read", help="recognise the text in image files with a trained checkpoint")
    r.add_argument("images", nargs="+", help="image files, folders of them, or label files (path<TAB>label lines)")
    r.add_argument("--batch", type=bounded(int, 1), default=64, help="images per batch")
    r.add_argument("--encoding", default="utf-8", help="of label files (a byte-order mark is skipped)")
    r.add_argument("--max-len", type=bounded(int, 1), help="tokens to decode at most (default: the model's)")
    for a in (e, r):
        a.add_argument("--ckpt", required=True, help="a run's best.pt or last.pt, or model.py convert-* output")
        a.add_argument("--beam", type=bounded(int, 1, 64), help="TrOCR beam width")
        a.add_argument("--beam-len-norm", action=argparse.BooleanOptionalAction,
                       help="rank TrOCR's final beam by score / length (default: on, as fairseq)")
        a.add_argument("--refine-iters", type=bounded(int, 0, 16), help="PARSeq cloze refinement passes")
        a.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        return dict(demo=cmd_demo, sweep=cmd_sweep, eval=cmd_eval, read=cmd_read)[args.cmd](args) or 0
    except UsageError as e:
        p.exit(2, f"ocrscale.py {args.cmd}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
