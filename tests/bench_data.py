"""Benchmark data.py: renderer images/s, and shard-reader images/s against the `webdataset` package.

    python tests/bench_data.py                    # 20k 'varied' images, 1 and 2 DataLoader workers
    python tests/bench_data.py --n 50000 --keep data/bench
    python tests/bench_data.py --scale 1000000 --copies 4 --keep /tmp/bench_scale   # index build, memory at 4M images
    python tests/bench_data.py --syscalls         # system calls per sample, ours and webdataset's (needs strace)
    python tests/bench_data.py --latency 0,1,5    # both readers over HTTP, each request answered after 0, 1, 5 ms

Both readers read the same shards with the same work per image (tar read, label cleaning, PIL decode to
RGB, bicubic stretch to 32x128, batch of uint8 tensors): webdataset streams the shards in order
through a 1000-sample shuffle buffer; ours reads one epoch in its training order (a fresh uniform permutation,
each sample read by offset: the cost of the true shuffle) and, for reference, once in stored order (loop=False,
as in evaluation). Each configuration is timed --reps times, alternating the readers, and the best pass is
kept (the machine may be shared). Needs `pip install webdataset` for the comparison; skips it otherwise.

--scale N: N 'clean' images in KEEP/clean (rendered once), each shard symlinked --copies times into KEEP/scaled
(remade each run, so its usable-sample index is built afresh): times that first build, a stream's construction in a
fresh process (wall time; peak RSS above the RSS before it, from VmHWM), then each DataLoader worker's private memory
(smaps_rollup) under forkserver, through a plain DataLoader and through ShardStream.loader. --syscalls: one epoch with
0 workers under `strace -f`, counting the calls between two getppid() markers around it, on --n 'clean' images in
8 shards and in 100. --latency: the shards served by a local HTTP server that waits the given milliseconds before
answering each request (an object store's first-byte latency); ours reads the URL source (blocks of
data.REMOTE_BLOCK consecutive samples, one ranged request each, a batch's requests at once), webdataset streams each
shard with one request (curl).
"""
import argparse, contextlib, functools, glob, http.server, importlib.util, json, os, re, resource, shutil, subprocess
import sys, tempfile, threading, time
from collections import Counter
from itertools import islice

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's files
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


def render(shard_dir, n, workers, shard_size):
    """n 'clean' images in shard_dir, unless it already holds a complete set (its index.json)."""
    if not os.path.exists(os.path.join(shard_dir, 'index.json')):
        data.synth(shard_dir, n, style='clean', workers=workers, shard_size=max(1, shard_size))
    return shard_dir


def kib(key, pid='self', name='status'):
    """A field of /proc/PID/status (VmRSS, VmHWM) or of /proc/PID/smaps_rollup (Private_Dirty, ...), in KiB."""
    with open(f'/proc/{pid}/{name}') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ':'))


def measure(what, fn):
    """fn(), printing its wall time and its peak RSS above the RSS right before it."""
    try:  # '5' resets VmHWM (the peak RSS) to the current RSS
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        how = 'VmHWM after a reset by /proc/self/clear_refs'
    except OSError:
        how = 'ru_maxrss, the peak since the process started: an upper bound'
    base, t0 = kib('VmRSS'), time.time()
    out = fn()
    dt = time.time() - t0
    peak = kib('VmHWM') if how.startswith('VmHWM') else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f'{what}: {dt:.3f} s, peak RSS {(peak - base) / 1024:.1f} MiB above the RSS before it ({how})')
    return out


def construct_probe(shard_dir):
    """Run in a fresh process: build a stream over an indexed set, then read its first batch."""
    s = measure('construction in a fresh process, index built (targets <= 2 s, <= 200 MiB)',
                lambda: data.ShardStream(shard_dir, 32, 128, 256, data.CHARSET36))
    measure('its first batch (maps the index, 256 reads)', lambda: next(iter(s)))


def children(pid):
    """PIDs whose parent is pid (the 4th field of each /proc/P/stat; this kernel has no /proc/P/task/T/children)."""
    def parent(stat):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            return int(open(stat).read().rpartition(')')[2].split()[1])
    return [int(stat.split('/')[2]) for stat in glob.glob('/proc/[0-9]*/stat') if parent(stat) == pid]


def worker_probe(shard_dir, batches, own_loader):
    """Run in a fresh process: read batches with 2 workers started from a forkserver, then print each worker's
    private memory. own_loader: through ShardStream.loader (which preloads torch in the forkserver), else through a
    plain DataLoader (Python's default preload)."""
    torch.multiprocessing.set_start_method('forkserver')
    stream = data.ShardStream(shard_dir, 32, 128, 256, data.CHARSET36)
    stream.start = 0
    it = iter(stream.loader(2) if own_loader else torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=2, worker_init_fn=data._worker_init))
    t0 = time.time()
    got = sum(len(y) for _, y, _ in islice(it, 2))  # a batch from each worker: they have started
    t1 = time.time()
    got = sum(len(y) for _, y, _ in islice(it, batches - 2))
    how = 'forkserver, ShardStream.loader' if own_loader else 'forkserver, a plain DataLoader'
    print(f'{how}, 2 workers: first 2 batches after {t1 - t0:.1f} s, then {got / (time.time() - t1):.0f} images/s '
          f'over {batches - 2} batches')
    for pid in [w for c in children(os.getpid()) for w in children(c)]:  # the forkserver's children
        private = sum(kib(k, pid, 'smaps_rollup') for k in ('Private_Clean', 'Private_Dirty')) / 1024
        print(f'{how}: worker {pid} {private:.1f} MiB private (Private_Clean + Private_Dirty of smaps_rollup; Rss '
              f'{kib("Rss", pid, "smaps_rollup") / 1024:.0f} MiB) (target <= 50 MiB)')


def probe(call, *wrapper):
    """Run bench_data.CALL in a fresh Python process (under the wrapper command, if any); returns its stdout."""
    return subprocess.run([*wrapper, sys.executable, '-c', f'import bench_data; bench_data.{call}'], check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True).stdout


def scale(args):
    clean = render(os.path.join(args.keep, 'clean'), args.scale, args.workers, 10000)
    scaled = os.path.join(args.keep, 'scaled')
    shutil.rmtree(scaled, ignore_errors=True)  # with its usable-sample index: the build below is the first
    os.makedirs(scaled)
    index, shards = json.load(open(os.path.join(clean, 'index.json'))), {}
    for c in range(args.copies):
        for name, count in index['shards'].items():
            new = name.replace('shard-', f'shard-c{c}-', 1)
            os.symlink(f'../clean/{name}', os.path.join(scaled, new))
            os.symlink(f'../clean/{name}.idx', os.path.join(scaled, new + '.idx'))
            shards[new] = count
    data.write_index(scaled, shards, index['charset'], f'{args.copies} symlinked copies of {clean}', {})
    measure(f'first index build, {sum(shards.values())} images in {len(shards)} shards (target <= 2 s)',
            lambda: data.ShardStream(scaled, 32, 128, 256, data.CHARSET36))
    print(probe(f'construct_probe({scaled!r})'), end='')
    for own_loader in (False, True):
        print(probe(f'worker_probe({scaled!r}, {args.batches}, {own_loader})'), end='')


def strace_epoch(reader, shard_dir, batch):
    """Run under strace: one epoch with 0 workers between two getppid() markers; prints the samples read."""
    torch.set_num_threads(1)
    batches = (ours_shuffled if reader == 'ours' else theirs)(shard_dir, 0, batch)
    os.getppid()
    n = sum(len(y) + (b[0] if b else 0) for _, y, *b in batches)  # ours also counts the unreadable samples
    os.getppid()
    print(n)


def syscalls(args):
    out = args.keep or tempfile.mkdtemp(prefix='bench_data_')
    log = os.path.join(out, 'strace.log')
    print('system calls per sample: `strace -f` of a fresh process (every thread), counting the calls between two '
          'getppid() markers right before and after one epoch with 0 workers (Python start-up and the stream\'s '
          'construction excluded; opening the index and the shards included)')
    for shards in (8, 100):
        shard_dir = render(os.path.join(out, f'clean-{shards}'), args.n, args.workers, args.n // shards)
        for reader in ('ours', 'webdataset') if importlib.util.find_spec('webdataset') else ('ours',):
            n = int(probe(f'strace_epoch({reader!r}, {shard_dir!r}, {args.batch})', 'strace', '-f', '-qq', '-o', log))
            calls = [m.group(1) for m in map(re.compile(r'\d+\s+(\w+)\(').match, open(log)) if m]
            marks = [i for i, c in enumerate(calls) if c == 'getppid']
            kinds = Counter(calls[marks[0] + 1:marks[-1]])
            by_kind = ', '.join(f'{k} {v / n:.3f}' for k, v in kinds.most_common()
                                if v / n >= 0.001 or k in ('pread64', 'openat', 'read', 'lseek'))
            total = kinds.total() / n
            target = f' (target <= 2: {"met" if total <= 2 else "missed"})' if reader == 'ours' else ''
            print(f'system calls per sample, {reader}, {n} images in {shards} shards: {total:.3f}{target}; {by_kind}')
    if not args.keep:
        shutil.rmtree(out)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with byte ranges (Python's own handler ignores Range), each answered after the server's `delay`
    seconds, as an object store's first-byte latency."""
    protocol_version = 'HTTP/1.1'  # keep-alive, as object stores serve

    def do_GET(self):
        time.sleep(self.server.delay)
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        asked = re.fullmatch(r'bytes=(\d+)-(\d+)', self.headers.get('Range', ''))
        with open(path, 'rb') as f:
            f.seek(int(asked[1]) if asked else 0)
            body = f.read(int(asked[2]) + 1 - int(asked[1]) if asked else -1)
        self.send_response(206 if asked else 200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def latency(args):
    out = args.keep or tempfile.mkdtemp(prefix='bench_data_')
    shard_dir = render(os.path.join(out, 'clean'), args.n, args.workers, args.n // 8)
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(RangeHandler, directory=out))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f'http://127.0.0.1:{server.server_address[1]}/clean'
    os.environ['OCRSCALE_CACHE'] = os.path.join(out, 'cache')
    readers = {'ours': ours_shuffled, 'webdataset': theirs}
    for ms in map(float, args.latency.split(',')):
        server.delay, best = ms / 1000, {}
        for _ in range(args.reps):
            for name, make in readers.items():
                n, dt = time_pass(make(url, 2, args.batch))
                best[name] = max(best.get(name, 0), n / dt)
        print(f'over HTTP, {ms:g} ms before each answer, 2 workers, {n} images: ' + ', '.join(
            f'{k} {v:.0f} images/s' for k, v in best.items()) + f', ratio ours/webdataset {best["ours"] / best["webdataset"]:.2f}')
    server.shutdown()
    if not args.keep:
        shutil.rmtree(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--n', type=int, default=20000, help='images to render and read')
    p.add_argument('--style', default='varied', choices=['clean', 'varied'], help='renderer style of the shards')
    p.add_argument('--workers', type=int, default=2, help='renderer processes')
    p.add_argument('--batch', type=int, default=256, help='reader batch size')
    p.add_argument('--reps', type=int, default=2, help='timed passes per reader and worker count')
    p.add_argument('--keep', help='write the shards here and keep them (default: a temporary folder)')
    p.add_argument('--scale', type=int, help="instead: index-build time and memory at --copies x this many 'clean' "
                   'images (needs --keep; KEEP/clean is rendered once and reused)')
    p.add_argument('--copies', type=int, default=4, help='--scale: symlinked copies of each shard')
    p.add_argument('--batches', type=int, default=48, help='--scale: batches read by the forkserver workers')
    p.add_argument('--latency', help="instead: both readers over HTTP with these delays per request (ms, e.g. 0,1,5), "
                   "on --n 'clean' images (needs webdataset and curl)")
    p.add_argument('--syscalls', action='store_true',
                   help="instead: system calls per sample under strace, ours and webdataset's, on --n 'clean' images")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.scale:
        return scale(args) if args.keep else p.error('--scale needs --keep DIR')
    if args.syscalls:
        return syscalls(args)
    if args.latency:
        return latency(args)
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
