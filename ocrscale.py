"""ocrscale.py: the front door. A scaling study in miniature on a laptop CPU, a planner for the real one, a reader.

    python ocrscale.py demo                     # render data, train N and D ladders, fit, write runs/demo/REPORT.md
    python ocrscale.py demo --arch trocr        # the same for TrOCR
    python ocrscale.py demo --quick             # a smaller version that finishes in about a minute
    python ocrscale.py sweep --arch parseq --sizes S,B,L,H --samples 1M,3M,10M --gpus 8 --nodes 2 --out sweep.sh
    python ocrscale.py read --ckpt runs/demo/parseq-N-T6-s0/best.pt word1.png word2.png [--json]

The demo trains every run as its own `python train.py` process (--jobs at a time, default 2, one thread each);
re-running it after a kill (rendering included) skips finished runs and resumes the others. A lock file in --out
and --data refuses a second demo on the same folders. REPORT.md's laws are fitted by fit.py on exactly the runs its
tables list (word error in the 36-char setting; val loss per character for --quick).
"""
import argparse
import contextlib
import functools
import json
import math
import os
import pickle
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch

import data
import fit
import model as modellib
import train

HERE = os.path.dirname(os.path.abspath(__file__))


class UsageError(ValueError):
    """A mistake in the command line or the files it names: main prints it as one line and exits with 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line without the usage block: the message names the argument and what is valid
        self.exit(2, f"{self.prog}: error: {message}\n")


# The miniature study (design notes: 16x64 images, column patches, random 2-6 char strings over 36 chars).
DEMO = dict(n_train=50_000, n_val=1_000, n_test=1_000,
            n_sizes=["T2", "T3", "T4", "T5", "T6"],      # N ladder, all on the full D
            n_train_samples=100_000,                      # samples seen by every N-ladder run
            d_size="T5", d_values=[1_500, 3_000, 6_000, 12_000],  # D ladder: unique-image caps, nested
            d_train_samples=100_000, seeds=[0], metric="error")
QUICK = dict(n_train=4_000, n_val=200, n_test=200, n_sizes=["T1", "T2", "T3"], n_train_samples=3_000,
             d_size="T2", d_values=[500, 1_000, 2_000], d_train_samples=3_000, seeds=[0],
             metric="loss")  # too short to leave the 100%-error plateau: fit val loss per character instead


def render_sets(root, cfg, workers):
    """Train/val/test shards of the clean synthetic style, each from its own seed. A split is rendered into a
    sibling SPLIT.partial folder and renamed when complete, so a killed render is redone, never half-used."""
    for split, n, seed in (("train", cfg["n_train"], 0), ("val", cfg["n_val"], 1), ("test", cfg["n_test"], 2)):
        out = os.path.join(root, split)
        if os.path.exists(os.path.join(out, "index.json")):
            continue
        if os.path.isdir(out):  # no index.json: a half-written split (older versions rendered in place)
            if any(not f.endswith((".tar", ".tmp")) for f in os.listdir(out)):
                raise UsageError(f"--data: {out} holds files but no index.json; move it away or choose another --data")
            shutil.rmtree(out)
        partial = out + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        print(f"rendering {n:,} {split} images -> {out}", flush=True)
        data.synth(partial, n, seed=seed, style="clean", min_len=2, max_len=6, charset=data.CHARSET36, workers=workers)
        os.rename(partial, out)


def demo_runs(args, cfg, data_root):
    """The command line of every run of the study: (name, tag, argv)."""
    common = ["--arch", args.arch, "--train", os.path.join(data_root, "train"), "--val", os.path.join(data_root, "val"),
              "--test", f"synth={os.path.join(data_root, 'test')}", "--runs", args.out, "--threads", "1"]
    runs = []
    for seed in cfg["seeds"]:
        for size in cfg["n_sizes"]:
            runs.append((f"{args.arch}-N-{size}-s{seed}", "N", ["--size", size, "--seed", str(seed),
                         "--train-samples", str(cfg["n_train_samples"])]))
        for d in cfg["d_values"]:
            runs.append((f"{args.arch}-D-{d}-s{seed}", "D", ["--size", cfg["d_size"], "--seed", str(seed), "--samples", str(d),
                         "--train-samples", str(cfg["d_train_samples"])]))
    return [(name, tag, common + argv + ["--name", name, "--tag", tag]) for name, tag, argv in runs]


def lock_folder(folder):
    """Hold FOLDER/.ocrscale.lock (with our PID in it) until the returned file is closed. The lock belongs to the
    open file, which the training processes inherit: the OS drops it when the demo and its runs have all exited."""
    import fcntl  # Unix only: imported here so that sweep and read work anywhere
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, ".ocrscale.lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise UsageError(f"{folder} is in use by another demo (pid {pid}, or the training runs it started); "
                         f"wait for it to finish or choose another --out/--data") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def train_one(item, slots, keep_fds):
    """One run as its own train.py process, on a free progress-bar line taken from the `slots` queue."""
    _, _, argv = item
    slot = slots.get()
    try:
        return subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv, "--bar-position", str(slot)],
                              stdout=subprocess.PIPE, text=True, pass_fds=keep_fds)
    finally:
        slots.put(slot)


def run_all(runs, jobs, keep_fds=()):
    """Train the runs `jobs` at a time; returns the names of those that failed."""
    started, failed, slots = time.time(), set(), queue.Queue()
    for slot in range(jobs):
        slots.put(slot)
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(train_one, item, slots, keep_fds): item[0] for item in runs}
        for done, future in enumerate(as_completed(futures), 1):
            proc = future.result()
            summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
            status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"\n[{done}/{len(runs)} runs, {time.time() - started:.0f}s] {status}: {summary}", flush=True)
            if proc.returncode:
                failed.add(futures[future])
    return [name for name, _, _ in runs if name in failed]


def ladder_table(runs_dir, names, axis):
    rows = [f"| run | N (params) | D (unique images) | samples seen | val word error % | test word error % | train s |",
            "|---|---|---|---|---|---|---|"]
    for name in names:
        path = os.path.join(runs_dir, name, "result.json")
        if not os.path.exists(path):
            rows.append(f"| {name} | (not finished) | | | | | |")
            continue
        with open(path) as f:
            r = json.load(f)
        rows.append(f"| {name} | {r['N']:,} | {r['D']:,} | {r['samples']:,} | {r['val_error']:.2f} | "
                    f"{r['test_error'] if r.get('test_error') is None else format(r['test_error'], '.2f')} | {r['wall_s']:.0f} |")
    return f"### {axis} ladder\n\n" + "\n".join(rows) + "\n"


def cmd_demo(args):
    cfg = dict(QUICK if args.quick else DEMO, **({"seeds": args.seeds} if args.seeds else {}))
    t0 = time.time()
    data_root = args.data or os.path.join("data", "demo-quick" if args.quick else "demo")
    with contextlib.ExitStack() as stack:
        folders = dict.fromkeys(map(os.path.realpath, [args.out, data_root]))  # one lock per distinct folder
        locks = [stack.enter_context(lock_folder(folder)) for folder in folders]
        render_sets(data_root, cfg, args.jobs)
        runs = demo_runs(args, cfg, data_root)
        print(f"training {len(runs)} runs ({args.jobs} at a time) into {args.out}", flush=True)
        failed = run_all(runs, args.jobs, keep_fds=tuple(f.fileno() for f in locks))
        write_report(args, cfg, runs, failed, time.time() - t0)
    return 1 if failed else 0


def write_report(args, cfg, runs, failed, seconds):
    """REPORT.md: the two ladders' tables and the laws fitted on exactly the run folders those tables list."""
    lines = [f"# Miniature OCR scaling study ({args.arch})\n",
             f"Synthetic 36-char word images (16x64), {cfg['n_train']:,} train / {cfg['n_val']:,} val / "
             f"{cfg['n_test']:,} test. N ladder: sizes {', '.join(cfg['n_sizes'])} at {cfg['n_train_samples']:,} "
             f"samples each; D ladder: size {cfg['d_size']} on the first "
             f"{', '.join(f'{d:,}' for d in cfg['d_values'])} images, "
             f"{cfg['d_train_samples']:,} samples each. Seeds: {', '.join(map(str, cfg['seeds']))}. This call took "
             f"{seconds:.0f}s (runs finished by an earlier call are not retrained).\n"]
    folders = {}
    for axis in ("N", "D"):
        names = [name for name, tag, _ in runs if tag == axis]
        lines.append(ladder_table(args.out, names, axis))
        folders[axis] = [os.path.join(args.out, n) for n in names if os.path.isdir(os.path.join(args.out, n))]
    if failed:
        lines.append(f"**Failed runs** (re-run the same command to resume them): {', '.join(failed)}\n")
    # E(N) on the N ladder, E(D) on the D ladder, E(C) and the joint law on both: never other runs in --out.
    metric, ladders = cfg["metric"], {axis: fit.load_runs(folders[axis]) for axis in folders}
    result = fit.fit_all(ladders["N"] + ladders["D"], metric=metric)
    for axis in ("N", "D"):
        result[axis] = fit.fit_all(ladders[axis], metric=metric)[axis]
    table = fit.format_table(result)
    target = "word error as a fraction" if metric == "error" else "val loss per character"
    commands = "\n".join(f"python fit.py {' '.join(paths)} --metric {metric}    # {axis}"
                         for axis, paths in (("N", folders["N"]), ("D", folders["D"]),
                                             ("C and joint", folders["N"] + folders["D"])))
    lines.append(f"## Fitted laws\n\nE = (X_c / X)^alpha with E the {target}, fitted on exactly the runs in the tables "
                 f"above (N on the N ladder, D on the D ladder, C and the joint law on both). Reproduce with:\n\n"
                 f"```\n{commands}\n```\n\n```\n{table}\n```\n")
    try:
        plots = fit.plot_all(result, args.out)
        lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, args.out)})\n" for p in plots]
    except ImportError as e:
        lines.append(f"(no plots: {e})\n")
    report = os.path.join(args.out, "REPORT.md")
    with open(report, "w") as f:
        f.write("\n".join(lines))
    print(f"\n{table}\nwrote {report}")


def count_list(text):
    """'300k,1M,2.5e6' -> [300_000, 1_000_000, 2_500_000]."""
    counts = []
    for item in text.split(","):
        scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(item[-1:].lower(), 1)
        try:
            value = float(item[:-1] if scale != 1 else item) * scale
        except ValueError:
            value = 0.0
        if not 1 <= value < 1e15:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"{text!r}: give positive counts separated by commas, e.g. 300k,1M,2.5e6")
        counts.append(int(value))
    return counts


def size_list(text):
    sizes, valid = text.split(","), list(modellib.SIZES["parseq"])
    wrong = [s for s in sizes if s not in valid]
    if wrong:
        raise argparse.ArgumentTypeError(f"{wrong[0]!r} is not a model size; give some of {','.join(valid)} "
                                         f"separated by commas, no spaces")
    return sizes


def seed_list(text):
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct non-negative integers separated by commas, "
                                         f"e.g. 0,1,2")
    return seeds


def bounded(kind, low, high, text):
    """An int or float from the command line, within [low, high] (nan refused)."""
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        what = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r}: give {what} " + (f"of at least {low:g}" if high == math.inf
                                                                         else f"from {low:g} to {high:g}"))
    return value


at_least_one = functools.partial(bounded, int, 1, math.inf)


def plan_sweep(arch, sizes, samples, gpus, nodes, mfu, gpu, epochs, charset=data.CHARSET94):
    """One row per (size, D): the run's training FLOPs and GPU-hours at the given MFU."""
    vocab = data.CharTokenizer(charset).vocab_size
    peak = train.PEAK_FLOPS[gpu]
    rows = []
    for size in sizes:
        cfg = modellib.make_config(arch, size, vocab)
        for d in samples:
            seen = int(epochs * d)
            flops = modellib.train_flops_per_sample(cfg) * seen
            gpu_hours = flops / (peak * mfu) / 3600
            rows.append(dict(arch=arch, size=size, N=modellib.count_params(cfg)[0], D=d, train_samples=seen,
                             flops=flops, gpu_hours=gpu_hours, wall_hours=gpu_hours / (gpus * nodes)))
    return rows


def cmd_sweep(args):
    rows = plan_sweep(args.arch, args.sizes, args.samples, args.gpus, args.nodes, args.mfu, args.gpu, args.epochs)
    world = args.gpus * args.nodes
    train_flags = " ".join([*(f"--train {t}" for t in args.train), f"--val {args.val}",
                            *(f"--test {t}" for t in args.test)])
    lines = [f"# {args.arch} sweep: {len(rows)} runs on {args.nodes}x{args.gpus} {args.gpu} at MFU {args.mfu:.0%}"]
    print(f"{'size':>5} {'N':>12} {'D':>12} {'samples':>13} {'FLOPs':>10} {'GPU-h':>9} {'wall h':>8}")
    for r in rows:
        name = f"{args.arch}-{r['size']}-d{r['D']}"
        launcher = f"torchrun --nproc_per_node={args.gpus}"
        if args.nodes > 1:  # a rendezvous id per run, so back-to-back runs never join a stale one
            launcher += f" --nnodes={args.nodes} --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:29500 --rdzv-id={name}"
        batch = train.RECIPES.get((args.arch, r["size"]), train.DEFAULTS)["batch"]
        if batch % world:
            print(f"warning: {name}: the recipe's batch {batch} does not split over {world} GPUs; add --batch to its command")
        print(f"{r['size']:>5} {r['N']:>12,} {r['D']:>12,} {r['train_samples']:>13,} {r['flops']:>10.3g} "
              f"{r['gpu_hours']:>9.4g} {r['wall_hours']:>8.3g}")
        lines.append(f"# N={r['N']:,} D={r['D']:,} FLOPs={r['flops']:.4g} GPU-hours={r['gpu_hours']:.4g}\n"
                     f"{launcher} train.py --arch {args.arch} --size {r['size']} --charset 94 --samples {r['D']} "
                     f"--train-samples {r['train_samples']} {train_flags} --name {name}")
    total = sum(r["gpu_hours"] for r in rows)
    print(f"total: {sum(r['flops'] for r in rows):.3g} FLOPs, {total:,.0f} GPU-hours, "
          f"{total / world:,.1f} hours on {world} GPUs run one after another")
    # the study's number: word error averaged over the --test sets, weighted by their sizes (train.py's test_error)
    lines.append(f"python fit.py runs/ --where arch={args.arch} --metric {'test' if args.test else 'error'} "
                 f"--holdout largest --plot runs/plots")
    script = "#!/usr/bin/env bash\nset -e\n" + "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(script)
        os.chmod(args.out, 0o755)
        print(f"wrote {args.out}")
    else:
        print("\n" + script)
    return rows


def load_checkpoint(path):
    """(model in eval mode, tokenizer) from a checkpoint as the seams define it; weights_only: never runs its code."""
    if not os.path.isfile(path):
        raise UsageError(f"argument --ckpt: {path}: no such file (give a run's best.pt, e.g. "
                         f"runs/demo/parseq-N-T6-s0/best.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or {"model", "model_config", "tokenizer"} - ckpt.keys():
            raise ValueError("no model, model_config and tokenizer entries")
        cfg = modellib.ModelConfig(**ckpt["model_config"])
        net = modellib.build_model(cfg)
        net.load_state_dict(ckpt["model"])
        tok = data.load_tokenizer(ckpt["tokenizer"])
    except Exception as e:  # torch, pickle and the model raise many kinds for a file that is no checkpoint
        why = ("torch.load(weights_only=True) cannot read it" if isinstance(e, pickle.UnpicklingError)
               else (str(e).strip().splitlines() or [type(e).__name__])[0])
        raise UsageError(f"argument --ckpt: {path} is not a checkpoint (train.py's best.pt/last.pt or model.py "
                         f"convert-trocr's output): {why}") from None
    return net.eval(), tok


@torch.no_grad()
def read_images(ckpt_path, paths, beam=None, refine_iters=None):
    """[(path, text, confidence)] for image files, with the checkpoint's own model and tokenizer. beam applies to
    TrOCR, refine_iters to PARSeq; None leaves the model's default."""
    net, tok = load_checkpoint(ckpt_path)
    arch = net.cfg.arch
    for flag, value, owner in (("--beam", beam, "trocr"), ("--refine-iters", refine_iters, "parseq")):
        if value is not None and arch != owner:
            raise UsageError(f"argument {flag}: applies to {owner} checkpoints only; {ckpt_path} is {arch}")
    options = {"beam": beam} if arch == "trocr" else {"refine_iters": refine_iters}
    arrays = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                arrays.append(data.decode_image(f.read(), net.cfg.img_h, net.cfg.img_w))
        except Exception as e:  # OSError and PIL's several kinds for files that are no image
            raise UsageError(f"argument images: cannot read {p} as an image: {e}") from None
    ids, conf = net.decode(data.to_tensor(arrays), **{k: v for k, v in options.items() if v is not None})
    return list(zip(paths, tok.decode(ids), conf.tolist()))


def cmd_read(args):
    results = read_images(args.ckpt, args.images, args.beam, args.refine_iters)
    if args.json:
        print(json.dumps([dict(image=p, text=t, confidence=c) for p, t, c in results], indent=1))
    else:
        for p, t, c in results:
            print(f"{p}\t{t}\t{c:.4f}")
    return results


def main(argv=None):
    p = Parser(prog="ocrscale.py", description=__doc__.split("\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the miniature scaling study on synthetic data (CPU, minutes)")
    d.add_argument("--arch", choices=["parseq", "trocr"], default="parseq")
    d.add_argument("--quick", action="store_true", help="tiny ladder and data (about a minute), for a smoke test")
    d.add_argument("--out", default=None, help="run folder root (default runs/demo[-trocr][-quick])")
    d.add_argument("--data", default=None, help="where the rendered shards go (default data/demo[-quick])")
    d.add_argument("--seeds", type=seed_list, default=None,
                   help="e.g. 0,1,2: several seeds per point; fit.py fits the median per size")
    d.add_argument("--jobs", type=at_least_one, default=max(1, min(2, os.cpu_count() or 1)),
                   help="runs trained at once, one thread each (default: 2, or 1 on a 1-core machine)")
    s = sub.add_parser("sweep", help="plan an N x D grid for a GPU cluster: commands, FLOPs, GPU-hours")
    s.add_argument("--arch", choices=["parseq", "trocr"], default="parseq")
    s.add_argument("--sizes", type=size_list, default="S,B,L,H", help="model sizes, comma-separated")
    s.add_argument("--samples", type=count_list, default="1M,3M,10M", help="D values (unique training images)")
    s.add_argument("--epochs", type=functools.partial(bounded, float, 1e-3, 1e6), default=20,
                   help="passes over D per run (PARSeq's recipe: 20)")
    s.add_argument("--gpus", type=at_least_one, default=8, help="GPUs per node")
    s.add_argument("--nodes", type=at_least_one, default=1)
    s.add_argument("--gpu", choices=sorted(train.PEAK_FLOPS), default="H100", help="for the bf16 peak FLOP/s")
    s.add_argument("--mfu", type=functools.partial(bounded, float, 0.01, 1), default=0.4,
                   help="assumed model FLOPs utilisation")
    s.add_argument("--train", action="append", default=None, help="training shards DIR[:WEIGHT] for the commands")
    s.add_argument("--val", default="data/val", help="validation shards for the commands")
    s.add_argument("--test", action="append", default=[], metavar="NAME=DIR",
                   help="test sets for the commands (the six benchmarks: IC13=DIR, IIIT5k=DIR, ...); the fit "
                        "uses their size-weighted average")
    s.add_argument("--out", default=None, help="write the commands as a shell script")
    r = sub.add_parser("read", help="recognise the text in image files with a trained checkpoint")
    r.add_argument("--ckpt", required=True, help="a run's best.pt (or last.pt, or model.py convert-trocr's output)")
    r.add_argument("images", nargs="+")
    r.add_argument("--beam", type=functools.partial(bounded, int, 1, 64), default=None, help="TrOCR beam width")
    r.add_argument("--refine-iters", type=functools.partial(bounded, int, 0, 16), default=None,
                   help="PARSeq cloze refinement passes")
    r.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.cmd == "demo":
            args.out = args.out or os.path.join("runs", "demo" + ("-trocr" if args.arch == "trocr" else "")
                                                + ("-quick" if args.quick else ""))
            return cmd_demo(args)
        if args.cmd == "sweep":
            args.train = args.train or ["data/train"]
            cmd_sweep(args)
        else:
            cmd_read(args)
    except UsageError as e:
        p.exit(2, f"ocrscale.py {args.cmd}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
