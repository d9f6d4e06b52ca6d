"""Training throughput of train.py: samples/s and the share of step time spent waiting for data.

    python bench_train.py                         # CPU: tiny sizes, 0 and 1 loader workers
    python bench_train.py --sizes S,B --workers 6 --samples 20000 --compile   # on a GPU

Renders a synthetic shard set (or reads --data), runs train.py in-process for each (arch, size, workers) and reads
samples_per_s, data_wait and MFU (GPU only) from the run's metrics.jsonl. On a GPU, --compile and bf16 apply.
"""
import argparse
import json
import os
import tempfile

import data
import train


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", default="parseq,trocr")
    p.add_argument("--sizes", default="T4,T6")
    p.add_argument("--workers", default="0,1", help="loader workers to compare")
    p.add_argument("--samples", type=int, default=6400, help="training samples per measurement")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--data", default=None, help="shard folder (default: render 5000 clean images)")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    shards, val = args.data or os.path.join(tmp, "train"), os.path.join(tmp, "val")
    if not args.data:
        data.synth(shards, 5000, seed=0, style="clean")
    data.synth(val, 200, seed=1, style="clean")
    print(f"{'arch':7} {'size':5} {'params':>9} {'workers':>7} {'samples/s':>10} {'data wait':>9} {'MFU':>6}")
    for arch in args.archs.split(","):
        for size in args.sizes.split(","):
            for workers in args.workers.split(","):
                name = f"{arch}-{size}-w{workers}"
                argv = ["--arch", arch, "--size", size, "--train", shards, "--val", val, "--runs", tmp,
                        "--name", name, "--train-samples", str(args.samples), "--batch", str(args.batch),
                        "--eval-every", str(args.samples), "--workers", workers, "--quiet"]
                result = train.main(argv + (["--compile"] if args.compile else []))
                with open(os.path.join(tmp, name, "metrics.jsonl")) as f:
                    row = json.loads(f.readlines()[-1])
                mfu = f"{row['mfu']:.1%}" if row["mfu"] else "-"
                print(f"{arch:7} {size:5} {result['N']:>9,} {workers:>7} {row['samples_per_s']:>10.0f} "
                      f"{row['data_wait']:>9.1%} {mfu:>6}", flush=True)


if __name__ == "__main__":
    main()
