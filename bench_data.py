"""Benchmark data.py: renderer images/s, and shard-reader images/s against the `webdataset` package.

    python bench_data.py                    # 20k 'varied' images, 1 and 2 DataLoader workers
    python bench_data.py --n 50000 --keep data/bench

Both readers read the same shards with the same work per image (tar read, label cleaning, PIL decode to
RGB, bicubic stretch to 32x128, batch of uint8 tensors): webdataset streams the shards in order
through a 1000-sample shuffle buffer; ours reads one epoch in its training order (a fresh uniform permutation,
each sample read by offset: the cost of the true shuffle) and, for reference, once in stored order (loop=False,
as in evaluation). Each configuration is timed --reps times, alternating the readers, and the best pass is
kept (the machine may be shared). Needs `pip install webdataset` for the comparison; skips it otherwise.
"""
import argparse, os, shutil, tempfile, time
from itertools import islice

import numpy as np
import torch

import data


def time_pass(batches):
    t0, n = time.time(), 0
    for x, y, *_ in batches:
        n += len(y)
    return n, time.time() - t0


def ours_shuffled(shard_dir, workers, batch):
    s = data.ShardStream(shard_dir, 32, 128, batch, data.CHARSET94)
    return islice(s.loader(workers), s.num_samples // batch)  # one epoch in training order


def ours_stored_order(shard_dir, workers, batch):
    return data.ShardStream(shard_dir, 32, 128, batch, data.CHARSET94, loop=False).loader(workers)


def theirs(shard_dir, workers, batch):
    import webdataset as wds

    def decode(sample):
        img, txt = sample
        label, _ = data.clean_label(txt.decode('utf-8'), data.CHARSET94)
        return data.decode_image(img, 32, 128), label

    def collate(samples):
        samples = [s for s in samples if s[1] is not None]
        return torch.from_numpy(np.stack([a for a, _ in samples])), [t for _, t in samples]
    urls = [p for p, _ in data.find_shards(shard_dir)]
    ds = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(1000)
          .to_tuple('jpg;png', 'txt').map(decode).batched(batch, collation_fn=collate))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                       worker_init_fn=data._worker_init if workers else None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--n', type=int, default=20000, help='images to render and read')
    p.add_argument('--style', default='varied', choices=['clean', 'varied'], help='renderer style of the shards')
    p.add_argument('--workers', type=int, default=2, help='renderer processes')
    p.add_argument('--batch', type=int, default=256, help='reader batch size')
    p.add_argument('--reps', type=int, default=2, help='timed passes per reader and worker count')
    p.add_argument('--keep', help='write the shards here and keep them (default: a temporary folder)')
    args = p.parse_args()
    torch.set_num_threads(1)
    out = args.keep or tempfile.mkdtemp(prefix='bench_data_')
    shard_dir = os.path.join(out, args.style)
    t0 = time.time()
    data.synth(shard_dir, args.n, style=args.style, workers=args.workers, shard_size=max(1, args.n // 8))
    dt = time.time() - t0
    size = sum(os.path.getsize(p) for p, _ in data.find_shards(shard_dir)) / args.n
    print(f'renderer ({args.style}, {args.workers} processes): {args.n / dt:.0f} images/s '
          f'({args.n} in {dt:.1f} s, {size:.0f} bytes/image on disk)')
    try:
        import webdataset  # noqa: F401
        readers = {'ours': ours_shuffled, 'ours, stored order': ours_stored_order, 'webdataset': theirs}
    except ImportError:
        print('webdataset not installed: pip install webdataset (our reader timed alone)')
        readers = {'ours': ours_shuffled, 'ours, stored order': ours_stored_order}
    for workers in (1, 2):
        best = {}
        for _ in range(args.reps):
            for name, make in readers.items():
                n, dt = time_pass(make(shard_dir, workers, args.batch))
                assert n >= args.n - args.batch, (name, n)
                best[name] = max(best.get(name, 0), n / dt)
        line = ', '.join(f'{k} {v:.0f} images/s' for k, v in best.items())
        ratio = f', ratio ours/webdataset {best["ours"] / best["webdataset"]:.2f}' if 'webdataset' in best else ''
        print(f'reader, {workers} worker{"s" if workers > 1 else ""}, decode + resize to 32x128: {line}{ratio}')
    if not args.keep:
        shutil.rmtree(out)


if __name__ == '__main__':
    main()
