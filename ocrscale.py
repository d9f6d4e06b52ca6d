"""ocrscale.py: the front door. A scaling study in miniature on a laptop CPU, a planner for the real one, a reader.

    python ocrscale.py demo                     # render data, train N and D ladders, fit, write runs/demo/REPORT.md
    python ocrscale.py demo --arch trocr        # the same for TrOCR
    python ocrscale.py demo --quick             # a smaller version that finishes in about a minute
    python ocrscale.py sweep --arch parseq --sizes S,B,L,H --samples 1M,3M,10M --gpus 8 --nodes 2 --out sweep.sh
    python ocrscale.py read --ckpt runs/demo/parseq-N-T6-s0/best.pt word1.png word2.png [--json]

The demo trains every run as its own `python train.py` process (one per core at a time); re-running it
skips finished runs and resumes unfinished ones. Laws are fitted by fit.py on word error in the 36-char setting.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import data
import fit
import model as modellib
import train

HERE = os.path.dirname(os.path.abspath(__file__))

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
    """Train/val/test shards of the clean synthetic style, each from its own seed; kept if already there."""
    for split, n, seed in (("train", cfg["n_train"], 0), ("val", cfg["n_val"], 1), ("test", cfg["n_test"], 2)):
        out = os.path.join(root, split)
        if os.path.exists(os.path.join(out, "index.json")):
            continue
        print(f"rendering {n:,} {split} images -> {out}", flush=True)
        data.synth(out, n, seed=seed, style="clean", min_len=2, max_len=6, charset=data.CHARSET36, workers=workers)


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


def run_all(runs, jobs):
    """Train the runs `jobs` at a time, each in its own process with its own progress bar line."""
    started, done = time.time(), []
    slots = list(range(jobs))

    def one(item):
        name, tag, argv = item
        slot = slots.pop()
        try:
            proc = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv, "--bar-position", str(slot)],
                                  stdout=subprocess.PIPE, text=True)
        finally:
            slots.append(slot)
        done.append(name)
        summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"\n[{len(done)}/{len(runs)} runs, {time.time() - started:.0f}s] {status}: {summary}", flush=True)
        return proc.returncode

    with ThreadPoolExecutor(jobs) as pool:
        codes = list(pool.map(one, runs))
    return [name for (name, _, _), code in zip(runs, codes) if code != 0]


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
    cfg = dict(QUICK if args.quick else DEMO)
    if args.seeds:
        cfg["seeds"] = [int(x) for x in args.seeds.split(",")]
    t0 = time.time()
    data_root = args.data or os.path.join("data", "demo-quick" if args.quick else "demo")
    render_sets(data_root, cfg, args.jobs)
    runs = demo_runs(args, cfg, data_root)
    print(f"training {len(runs)} runs ({args.jobs} at a time) into {args.out}", flush=True)
    failed = run_all(runs, args.jobs)
    report_lines = [f"# Miniature OCR scaling study ({args.arch})\n",
                    f"Synthetic 36-char word images (16x64), {cfg['n_train']:,} train / {cfg['n_val']:,} val / "
                    f"{cfg['n_test']:,} test. N ladder: sizes {', '.join(cfg['n_sizes'])} at "
                    f"{cfg['n_train_samples']:,} samples each; D ladder: size {cfg['d_size']} on the first "
                    f"{', '.join(f'{d:,}' for d in cfg['d_values'])} images, {cfg['d_train_samples']:,} samples each. "
                    f"Seeds: {cfg['seeds']}. Wall time {time.time() - t0:.0f}s.\n"]
    for axis in ("N", "D"):
        report_lines.append(ladder_table(args.out, [n for n, tag, _ in runs if tag == axis], axis))
    if failed:
        report_lines.append(f"**Failed runs** (see their logs; re-run to resume): {', '.join(failed)}\n")
    # E(N) on the N ladder, E(D) on the D ladder, E(C) and the joint law on every eval of every run.
    metric = cfg["metric"]
    result = fit.fit_all(fit.load_runs([args.out], where={"arch": args.arch}), metric=metric)
    for axis in ("N", "D"):
        result[axis] = fit.fit_all(fit.load_runs([args.out], where={"arch": args.arch, "tag": axis}), metric=metric)[axis]
    table = fit.format_table(result)
    target = "word error as a fraction" if metric == "error" else "val loss per character"
    report_lines.append(f"## Fitted laws\n\nE = (X_c / X)^alpha with E the {target}; reproduce with `python fit.py "
                        f"{args.out} --metric {metric} --where tag=N` (or `tag=D`, or no filter for C and the joint fit)."
                        f"\n\n```\n{table}\n```\n")
    try:
        plots = fit.plot_all(result, args.out)
        report_lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, args.out)})\n" for p in plots]
    except ImportError as e:
        report_lines.append(f"(no plots: {e})\n")
    report = os.path.join(args.out, "REPORT.md")
    with open(report, "w") as f:
        f.write("\n".join(report_lines))
    print(f"\n{table}\nwrote {report} ({time.time() - t0:.0f}s in all)")
    return 1 if failed else 0


def parse_count(text):
    """'1M' -> 1_000_000, '300k' -> 300_000, '2.5e6' -> 2_500_000."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


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
    sizes, samples = args.sizes.split(","), [parse_count(s) for s in args.samples.split(",")]
    rows = plan_sweep(args.arch, sizes, samples, args.gpus, args.nodes, args.mfu, args.gpu, args.epochs)
    world = args.gpus * args.nodes
    train_flags = " ".join(f"--train {t}" for t in args.train) + f" --val {args.val}"
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
              f"{r['gpu_hours']:>9.1f} {r['wall_hours']:>8.2f}")
        lines.append(f"# N={r['N']:,} D={r['D']:,} FLOPs={r['flops']:.3g} GPU-hours={r['gpu_hours']:.1f}\n"
                     f"{launcher} train.py --arch {args.arch} --size {r['size']} --charset 94 --samples {r['D']} "
                     f"--train-samples {r['train_samples']} {train_flags} --name {name}")
    total = sum(r["gpu_hours"] for r in rows)
    print(f"total: {sum(r['flops'] for r in rows):.3g} FLOPs, {total:,.0f} GPU-hours, "
          f"{total / world:,.1f} hours on {world} GPUs run one after another")
    lines.append("python fit.py runs/ --holdout largest --plot runs/plots")
    script = "#!/usr/bin/env bash\nset -e\n" + "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(script)
        os.chmod(args.out, 0o755)
        print(f"wrote {args.out}")
    else:
        print("\n" + script)
    return rows


@torch.no_grad()
def read_images(ckpt_path, paths, beam=1, refine_iters=1):
    """[(path, text, confidence)] for image files, with the checkpoint's own model and tokenizer."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    cfg = modellib.ModelConfig(**ckpt["model_config"])
    net = modellib.build_model(cfg)
    net.load_state_dict(ckpt["model"])
    net.eval()
    tok = data.load_tokenizer(ckpt["tokenizer"])
    arrays = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                arrays.append(data.decode_image(f.read(), cfg.img_h, cfg.img_w))
        except Exception as e:  # PIL raises several kinds for bad files
            sys.exit(f"cannot read image {p}: {e}")
    ids, conf = net.decode(data.to_tensor(arrays), beam=beam, refine_iters=refine_iters)
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="the miniature scaling study on synthetic data (CPU, minutes)")
    d.add_argument("--arch", choices=["parseq", "trocr"], default="parseq")
    d.add_argument("--quick", action="store_true", help="tiny ladder and data (about a minute), for a smoke test")
    d.add_argument("--out", default=None, help="run folder root (default runs/demo[-trocr][-quick])")
    d.add_argument("--data", default=None, help="where the rendered shards go (default data/demo[-quick])")
    d.add_argument("--seeds", default=None, help="e.g. 0,1,2: several seeds per point; fit.py fits the median per size")
    d.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="runs trained at once")
    s = sub.add_parser("sweep", help="plan an N x D grid for a GPU cluster: commands, FLOPs, GPU-hours")
    s.add_argument("--arch", choices=["parseq", "trocr"], default="parseq")
    s.add_argument("--sizes", default="S,B,L,H")
    s.add_argument("--samples", default="1M,3M,10M", help="D values (unique training images)")
    s.add_argument("--epochs", type=float, default=20, help="passes over D per run (PARSeq's recipe: 20)")
    s.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpu", choices=sorted(train.PEAK_FLOPS), default="H100", help="for the bf16 peak FLOP/s")
    s.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    s.add_argument("--train", action="append", default=None, help="training shards DIR[:WEIGHT] for the commands")
    s.add_argument("--val", default="data/val")
    s.add_argument("--out", default=None, help="write the commands as a shell script")
    r = sub.add_parser("read", help="recognise the text in image files with a trained checkpoint")
    r.add_argument("--ckpt", required=True)
    r.add_argument("images", nargs="+")
    r.add_argument("--beam", type=int, default=1)
    r.add_argument("--refine-iters", type=int, default=1)
    r.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        args.out = args.out or os.path.join("runs", "demo" + ("-trocr" if args.arch == "trocr" else "") + ("-quick" if args.quick else ""))
        return cmd_demo(args)
    if args.cmd == "sweep":
        args.train = args.train or ["data/train"]
        cmd_sweep(args)
        return 0
    cmd_read(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
