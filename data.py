"""Data for ocrscale: tar shards, a streaming reader, importers, a word renderer, tokenizers, metrics.

    python data.py synth data/synth --n 100000                    # 'clean' probe images (all cores)
    python data.py synth data/varied --n 100000 --style varied --fonts FONT_DIR --words words.txt
    python data.py import-lmdb data/lmdb/train/real data/real     # scene-text LMDBs (recursive)
    python data.py import-folder images/labels.tsv data/mine      # lines: relative/path<TAB>label
    python data.py stats data/real                                # counts, lengths, charset, drops
    python data.py spm data/real --vocab 512                      # SentencePiece BPE -> data/real/spm512.model

Shards are tar files of KEY.png|jpg + KEY.txt pairs (WebDataset convention: dot-free keys, sorted) plus
DIR/index.json = {"shards": {name: count}, "samples", "charset", "source", "drops"}.

ShardStream is an IterableDataset of whole batches (images (B,3,H,W) in [-1,1], labels). Group g =
rank*num_workers + worker_id of G = world_size*num_workers reads units[g::G] of the shards permuted by (seed,
epoch), a unit being a shard (or, with fewer shards than groups, one of k interleaved slices of one). Batch j
of group g is raw samples [j*B, (j+1)*B) of its block-shuffled stream, so resuming needs only the number of
batches handed out. With loop=True a sample dropped at decode is replaced by a copy of another in its batch
(batches stay full, resume stays exact); with loop=False (evaluation) it is left out.
Not here: on-the-fly rendering during training, non-Latin label rules.
"""
import argparse, base64, glob, io, json, os, random, sys, time, unicodedata
from collections import Counter
from itertools import islice, repeat
from multiprocessing import Pool

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from tqdm import tqdm

CHARSET36 = '0123456789abcdefghijklmnopqrstuvwxyz'
CHARSET94 = CHARSET36 + 'ABCDEFGHIJKLMNOPQRSTUVWXYZ' + '!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~'  # PARSeq's order
DROP_REASONS = ('bad_image', 'missing_image', 'missing_label', 'empty_label', 'too_long', 'truncated_tar')
IMAGE_EXTS = ('png', 'jpg', 'jpeg', 'webp', 'bmp')
MIX_CHUNK = 4096  # source choices for weighted mixing are drawn in seeded chunks of this size

# ----------------------------------------------------------------------------- labels

def clean_label(label, charset=None, max_len=25, nfkd=True):
    """Label preprocessing of paper §5 -> (label, None) or (None, drop reason)."""
    label = ''.join(label.split())  # drop all whitespace
    if nfkd:
        label = unicodedata.normalize('NFKD', label).encode('ascii', 'ignore').decode()
    if len(label) > max_len:
        return None, 'too_long'
    if charset is not None:
        if charset == charset.lower():  # a lowercase charset reads 'A' as 'a' rather than dropping it
            label = label.lower()
        label = ''.join(c for c in label if c in charset)
    return (label, None) if label else (None, 'empty_label')

# ----------------------------------------------------------------------------- tar shards

def _padded(size):
    return (size + 511) // 512 * 512  # tar data is stored in 512-byte blocks


def _tar_member(f):
    """Next regular file header of an open tar -> (name, size) or None at the end-of-archive block.
    Raises EOFError when the file stops before the end-of-archive block (a truncated tar)."""
    name = None
    while True:
        hdr = f.read(512)
        if len(hdr) < 512:
            raise EOFError('truncated tar (no end-of-archive block)')
        if hdr.count(0) == 512:
            return None
        size = int(hdr[124:136].rstrip(b'\0 ').strip() or b'0', 8)
        kind = hdr[156:157]
        if kind in (b'L', b'x'):  # GNU long name / PAX header: the real name is in this member's data
            data = f.read(_padded(size))[:size]
            if len(data) < size:
                raise EOFError('truncated tar')
            if kind == b'L':
                name = data.rstrip(b'\0').decode()
            else:
                for rec in data.split(b'\n'):
                    if b' path=' in rec:
                        name = rec.split(b' path=', 1)[1].decode()
            continue
        if kind not in (b'0', b'\0', b'7'):  # directories, links, ...: skip
            f.seek(_padded(size), 1)
            continue
        if name is None:
            name, prefix = hdr[:100].rstrip(b'\0').decode(), hdr[345:500].rstrip(b'\0').decode()
            name = prefix + '/' + name if prefix and hdr[257:262] == b'ustar' else name
        return name, size


def _split_name(name):
    """'dir/KEY.a.b' -> ('dir/KEY', 'a.b'), the WebDataset rule (the extension starts at the first dot)."""
    d, _, base = name.rpartition('/')
    key, _, ext = base.partition('.')
    return (d + '/' + key if d else key), ext.lower()


def _members(f):
    """Yield (key, ext, size) of each regular file of an open tar with f at its data, which the caller may read."""
    while (m := _tar_member(f)) is not None:
        start = f.tell()
        yield *_split_name(m[0]), m[1]
        f.seek(start + _padded(m[1]))


def read_tar(path, select=None, limit=None):
    """Yield (j, key, {ext: bytes}) for sample j < limit of a shard where select(j) is true; the data of other
    samples is seeked over, not read. Raises EOFError (after the complete samples) if the tar is truncated."""
    with open(path, 'rb') as f:
        j, key, files = -1, None, None
        for k, ext, size in _members(f):
            if k != key:  # a sample ends when the key changes
                if files is not None:
                    yield j, key, files
                j, key = j + 1, k
                if limit is not None and j >= limit:
                    return
                files = {} if select is None or select(j) else None
            if files is not None:
                files[ext] = f.read(size)
                if len(files[ext]) < size:
                    raise EOFError('truncated tar')
        if files is not None:
            yield j, key, files


def count_samples(path):
    """Number of samples in a shard from its headers alone (for shards that index.json does not list)."""
    n, key = 0, None
    with open(path, 'rb') as f:
        try:
            for k, _, _ in _members(f):
                n, key = n + (k != key), k
        except EOFError:
            pass
    return n


def _tar_header(name, size):
    """A ustar header for a regular file (mode 644, mtime 0, no owner): cheaper than tarfile's, same bytes."""
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:136] = b'0000644\x000000000\x000000000\x00' + b'%011o\x00' % size
    h[136:157] = b'00000000000\x00' + b' ' * 8 + b'0'
    h[257:265] = b'ustar\x0000'
    h[148:156] = b'%06o\x00 ' % sum(h)
    return bytes(h)


class ShardWriter:
    """Writes samples into OUT/PREFIX-NNNNNN.tar shards of at most shard_size samples / max_bytes bytes.
    Shards are written as .tmp and renamed when full, so a crash never leaves a half shard matching *.tar."""

    def __init__(self, out_dir, shard_size=10000, max_bytes=1.5e9, prefix='shard', start=0):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_size, self.max_bytes, self.prefix = out_dir, shard_size, max_bytes, prefix
        self.index, self.shards, self.charset = start, {}, set()
        self.f, self.count, self.bytes = None, 0, 0

    def write(self, key, image_bytes, ext, label):
        """Add sample KEY.ext + KEY.txt; keys must not contain dots and must come in sorted order."""
        if '.' in key or len(key) + len(ext) > 98:
            raise ValueError(f'shard keys must be short and contain no dots: {key!r}')
        if self.f is not None and (self.count >= self.shard_size or self.bytes >= self.max_bytes):
            self._finish()
        if self.f is None:
            self.name = f'{self.prefix}-{self.index:06d}.tar'
            self.f = open(os.path.join(self.out_dir, self.name + '.tmp'), 'wb')
            self.index += 1
        for data, e in ((image_bytes, ext), (label.encode('utf-8'), 'txt')):
            self.f.write(_tar_header(f'{key}.{e}', len(data)) + data + bytes(-len(data) % 512))
            self.bytes += len(data) + 1024
        self.count += 1
        self.charset.update(label)

    def _finish(self):
        self.f.write(bytes(1024))  # end-of-archive: two zero blocks
        self.f.close()
        os.replace(os.path.join(self.out_dir, self.name + '.tmp'), os.path.join(self.out_dir, self.name))
        self.shards[self.name] = self.count
        self.f, self.count, self.bytes = None, 0, 0

    def close(self):
        if self.f is not None:
            self._finish()
        return self.shards


def write_index(out_dir, shards, charset, source, drops, **extra):
    index = dict(shards=dict(sorted(shards.items())), samples=sum(shards.values()),
                 charset=''.join(sorted(charset)), source=source, drops=dict(drops), **extra)
    with open(os.path.join(out_dir, 'index.json.tmp'), 'w') as f:
        json.dump(index, f, indent=1)
    os.replace(os.path.join(out_dir, 'index.json.tmp'), os.path.join(out_dir, 'index.json'))
    return index


def _read_index(pattern):
    """index.json of a shard folder (or of a glob's folder), {} if there is none."""
    path = os.path.join(pattern if os.path.isdir(pattern) else os.path.dirname(pattern), 'index.json')
    return json.load(open(path)) if os.path.exists(path) else {}


def find_shards(pattern):
    """A dir or glob -> sorted [(path, count)], counts from each folder's index.json (or the tar headers)."""
    paths = sorted(glob.glob(os.path.join(pattern, '*.tar') if os.path.isdir(pattern) else pattern))
    if not paths:
        d = pattern if not glob.has_magic(pattern) else os.path.dirname(pattern) or 'DIR'
        raise FileNotFoundError(
            f'no shards match {pattern!r}: make some with `python data.py synth {d} --n 100000`, '
            f'`python data.py import-lmdb LMDB_DIR {d}` or `python data.py import-folder LABELS_FILE {d}`')
    indexes, out = {}, []
    for p in paths:
        d = os.path.dirname(p)
        if d not in indexes:
            indexes[d] = _read_index(d)
        n = indexes[d].get('shards', {}).get(os.path.basename(p))
        out.append((p, n if n is not None else count_samples(p)))
    return out


def parse_sources(spec):
    """'data/real:3,data/synth:1' -> [('data/real', 3.0), ('data/synth', 1.0)]; 'data/x' -> [('data/x', 1.0)]."""
    out = []
    for part in spec.split(','):
        path, _, w = part.rpartition(':')
        ok = path and w.replace('.', '', 1).isdigit()
        out.append((path, float(w)) if ok else (part, 1.0))
    return out

# ----------------------------------------------------------------------------- decoding

def augment_image(img, rng):
    """A few geometric and photometric PIL ops at low magnitude, each applied with probability 1/4."""
    if rng.random() < 0.25:  # slight rotation, corners filled with the top-left colour
        img = img.rotate(rng.uniform(-4, 4), Image.BILINEAR, expand=True, fillcolor=img.getpixel((0, 0)))
    if rng.random() < 0.25:  # crop up to 6% of each side
        w, h = img.size
        l, r, t, b = (int(rng.uniform(0, 0.06) * s) for s in (w, w, h, h))
        img = img.crop((l, t, max(l + 1, w - r), max(t + 1, h - b)))
    if rng.random() < 0.25:
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.25:
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return img


def decode_image(data, img_h, img_w, rng=None):
    """Encoded image bytes -> uint8 array (img_h, img_w, 3): RGB, bicubic stretch, optional augmentation."""
    img = Image.open(io.BytesIO(data))
    if rng is None and img.format == 'JPEG':
        img.draft('RGB', (img_w, img_h))  # decode JPEGs at a reduced scale that still covers the target
    img = img.convert('RGB')
    if rng is not None:
        img = augment_image(img, rng)
    return np.asarray(img.resize((img_w, img_h), Image.BICUBIC))


def to_tensor(arrays):
    """list of uint8 (H, W, 3) -> FloatTensor (B, 3, H, W) in [-1, 1]."""
    x = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32)  # numpy: no thread-pool start-up per batch
    return torch.from_numpy(x * np.float32(1 / 127.5) - np.float32(1.0))

# ----------------------------------------------------------------------------- streaming reader

def _worker_init(_):
    torch.set_num_threads(1)  # the workers decode with PIL; torch threads would only fight over the cores


class ShardStream(torch.utils.data.IterableDataset):
    """Per-rank batches (images (B,3,H,W) in [-1,1], labels) from one or more weighted shard sets (see top)."""

    def __init__(self, sources, img_h, img_w, batch_size, charset, max_len=25, rank=0, world_size=1, seed=0,
                 samples=None, shuffle_buffer=1000, augment=False, loop=True, nfkd=True, data_seed=0):
        if isinstance(sources, str):
            sources = parse_sources(sources)
        sources = [(s, 1.0) if isinstance(s, str) else (s[0], float(s[1])) for s in sources]
        self.img_h, self.img_w, self.batch_size, self.charset, self.max_len = img_h, img_w, batch_size, charset, max_len
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, max(1, shuffle_buffer)
        self.augment, self.loop, self.nfkd = augment, loop, nfkd
        self.names = [s for s, _ in sources]
        w = np.array([w for _, w in sources], dtype=np.float64)
        self.weights = w / w.sum()
        self.shards = []  # per source: [(path, number of samples used from the start of that shard)]
        for s, (pattern, _) in enumerate(sources):
            found = find_shards(pattern)
            total = sum(n for _, n in found)
            want = total if samples is None else int(round(samples * self.weights[s]))
            if want > total:
                raise ValueError(f'samples={samples} asks {want} from {pattern}, which holds only {total}')
            # the first `want` samples of a fixed seeded shard order, so smaller caps are subsets of larger ones
            capped = []
            for i in np.random.default_rng([data_seed, s]).permutation(len(found)):
                if want <= 0:
                    break
                capped.append((found[i][0], min(found[i][1], want)))
                want -= capped[-1][1]
            if not capped:
                raise ValueError(f'no samples from {pattern} (samples={samples})')
            self.shards.append(capped)
        self.num_samples = sum(n for sh in self.shards for _, n in sh)
        self._batches = self._start = 0  # batches handed out (by loader), and the count a new iterator starts at
        self._workers = 1  # the num_workers those batches were handed out with
        self._drop_counts = torch.zeros(1, len(DROP_REASONS), dtype=torch.int64)
        self._drops_before = Counter()

    # --- state ---
    @property
    def drops(self):
        now = Counter(dict(zip(DROP_REASONS, self._drop_counts.sum(0).tolist())))
        return dict(self._drops_before + now)  # Counter's + keeps the positive counts only

    def state_dict(self):
        return {'batches': self._batches, 'num_workers': self._workers, 'world_size': self.world_size,
                'seed': self.seed, 'batch_size': self.batch_size}

    def load_state_dict(self, d):
        was = (d.get('world_size', self.world_size), d.get('batch_size', self.batch_size))
        if was != (self.world_size, self.batch_size):
            print(f'data.py: warning: stream state saved with (world_size, batch_size) = {was}, resumed with '
                  f'{(self.world_size, self.batch_size)}: not an exact continuation', file=sys.stderr)
        self._batches = self._start = int(d['batches'])
        self._workers = int(d['num_workers'])

    def loader(self, num_workers=0, pin_memory=False):
        """Iterator over this rank's batches; counts them so state_dict() can resume after the last one."""
        W = max(1, num_workers)
        if self._batches and W != self._workers:
            raise ValueError(f'this stream has handed out {self._batches} batches with num_workers={self._workers}; '
                             f'resume with the same num_workers (got {num_workers})')
        self._workers = W
        self._drops_before.update(self.drops)
        self._drop_counts = torch.zeros(W, len(DROP_REASONS), dtype=torch.int64).share_memory_()
        self._start = self._batches
        # its own generator: a DataLoader draws a base seed, which would shift the global RNG on resume
        dl = torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                         worker_init_fn=_worker_init if num_workers else None,
                                         generator=torch.Generator())
        for batch in dl:
            self._batches += 1
            yield batch

    # --- the stream ---
    def _units(self, s, epoch, g, G):
        """Group g's reading units for one epoch: [(path, first samples used, slice, slices)]."""
        shards = self.shards[s]
        k = -(-G // len(shards))  # with fewer shards than groups, each shard is read as k interleaved slices
        units = [(path, n, sub, k) for path, n in shards for sub in range(k)]
        units = [units[i] for i in np.random.default_rng([self.seed, s, epoch]).permutation(len(units))][g::G]
        return units, [len(range(sub, n, k)) for _, n, sub, k in units]

    def _read_units(self, units, lens, skip):
        """Raw items of consecutive units from raw position `skip` on: (shard, key, files), or (shard, None,
        None) for each sample a truncated tar did not deliver (so positions stay aligned with the index)."""
        for (path, n, sub, k), m in zip(units, lens):
            if skip >= m:
                skip -= m
                continue
            shard, got = os.path.basename(path), 0
            try:
                for _, key, files in read_tar(path, select=lambda j: j % k == sub, limit=n):
                    got += 1
                    if got > skip:
                        yield shard, key, files
            except (EOFError, OSError, ValueError):  # truncated or corrupt headers
                pass
            if got < m:  # fewer samples than the index says: count them, keep positions (and resume) aligned
                self._drop('truncated_tar', shard, m - got)
                for _ in range(max(got, skip), m):
                    yield shard, None, None
            skip = 0

    def _source(self, s, g, G, skip):
        """Group g's raw items of source s, from raw position `skip` on, block-shuffled within each epoch."""
        K, epoch, empty = self.shuffle_buffer, 0, 0
        while True:
            units, lens = self._units(s, epoch, g, G)
            n = sum(lens)
            empty = empty + 1 if n == 0 else 0
            if empty > 1000:
                raise RuntimeError(f'{self.names[s]} has too few samples to give each of {G} groups some')
            if skip >= n:
                skip -= n
            else:
                b, off, skip = skip // K, skip % K, 0
                items = self._read_units(units, lens, b * K)
                while True:
                    block = list(islice(items, K))
                    if not block:
                        break
                    if K > 1:  # block shuffle: resume needs only the block index and the offset in it
                        order = np.random.default_rng([self.seed, s, epoch, g, b]).permutation(len(block))
                        block = [block[o] for o in order]
                    yield from block[off:]
                    off, b = 0, b + 1
                self._warn(g)
            if not self.loop:
                return
            epoch += 1

    def _mix(self, g, start):
        """Source index of each of group g's raw positions from `start` on, and the counts before `start`."""
        S, (first, off) = len(self.shards), divmod(start, MIX_CHUNK)
        def chunk(i):
            return np.random.default_rng([self.seed, 99, g, i]).choice(S, MIX_CHUNK, p=self.weights)
        counts = np.bincount(chunk(first)[:off], minlength=S)
        for i in range(first):
            counts += np.bincount(chunk(i), minlength=S)
        def gen(i, off):
            while True:
                yield from chunk(i)[off:].tolist()
                i, off = i + 1, 0
        return gen(first, off), counts.tolist()

    def _drop(self, reason, shard, n=1):
        self._drop_counts[self._row, DROP_REASONS.index(reason)] += n
        self._shard_drops[(reason, shard)] += n

    def _warn(self, g):
        if self._shard_drops:
            msg = ', '.join(f'{r} {n} ({sh})' for (r, sh), n in sorted(self._shard_drops.items()))
            print(f'data.py: warning: group {g} skipped samples: {msg}', file=sys.stderr)
            self._shard_drops.clear()

    def _prepare(self, item, rng):
        shard, key, files = item
        if files is None:
            return None  # counted as truncated_tar already
        if 'txt' not in files:
            return self._drop('missing_label', shard)
        label, reason = clean_label(files['txt'].decode('utf-8', 'replace'), self.charset, self.max_len, self.nfkd)
        if label is None:
            return self._drop(reason, shard)
        data = next((files[e] for e in IMAGE_EXTS if e in files), None)
        if data is None:
            return self._drop('missing_image', shard)
        try:
            return decode_image(data, self.img_h, self.img_w, rng), label
        except Exception:  # PIL raises many types on corrupt or truncated bytes
            return self._drop('bad_image', shard)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        i, W = (info.id, info.num_workers) if info else (0, 1)
        start = self._start
        if start and W != self._workers:
            raise ValueError(f'resume needs num_workers={self._workers} (this iterator has {W})')
        l = (i + start) % W  # the DataLoader asks worker 0 first; rotate so batch number `start` comes next
        g, G, B = self.rank * W + l, self.world_size * W, self.batch_size
        self._row, self._shard_drops = (i if self._drop_counts.shape[0] == W else 0), Counter()
        j = (start + W - 1 - l) // W  # batches this group has already handed out
        mix, pos = self._mix(g, j * B) if len(self.shards) > 1 else (repeat(0), [j * B])
        sources = [self._source(s, g, G, p) for s, p in enumerate(pos)]
        alive, last, dry = [True] * len(sources), None, 0
        while True:
            rng = random.Random((self.seed * 1000003 + g) * 1000003 + j) if self.augment else None
            good, taken = [], 0
            while taken < B:
                s = next(mix)
                if not alive[s]:  # loop=False only: an exhausted source hands its turn to the next live one
                    s = next((t % len(alive) for t in range(s, s + len(alive)) if alive[t % len(alive)]), None)
                    if s is None:
                        break
                item = next(sources[s], None)
                if item is None:
                    alive[s] = False
                    continue
                taken += 1
                out = self._prepare(item, rng)
                if out is not None:
                    good.append(out)
            if taken == 0:
                break
            dry = dry + 1 if not good and last is None else 0
            if self.loop and dry * B > self.num_samples + B:  # a whole epoch without one usable sample
                raise RuntimeError(f'no usable sample in {", ".join(self.names)}: all were dropped '
                                   f'({self.drops}); check the charset and max_len')
            j += 1
            if self.loop and (good or last):  # keep batches full (positions = batches * B): refill drops
                kept = good or [last]
                good = [kept[t % len(kept)] for t in range(B)]
            if good:
                last = good[-1]
                yield to_tensor([a for a, _ in good]), [t for _, t in good]
        self._warn(g)

# ----------------------------------------------------------------------------- tokenizers

class _Tokenizer:
    """Ids: 0 = EOS, 1..V-3 = text tokens, V-2 = BOS, V-1 = PAD (the seams' convention)."""
    eos_id = 0

    def encode(self, labels):
        """list[str] -> LongTensor (B, L+2) rows [BOS, t1..tn, EOS, PAD...], L = longest label in tokens."""
        rows = [self._ids(t)[:self.max_len] for t in labels]
        L = max((len(r) for r in rows), default=0)
        return torch.tensor([[self.bos_id] + r + [self.eos_id] + [self.pad_id] * (L - len(r)) for r in rows],
                            dtype=torch.long).view(len(rows), L + 2)

    def decode(self, ids):
        """LongTensor (B, T) -> list[str]: each row up to its first EOS, BOS/PAD ignored."""
        out = []
        for row in ids.tolist():
            row = row[:row.index(self.eos_id)] if self.eos_id in row else row
            out.append(self._text([t for t in row if 0 < t < self.bos_id]))
        return out


class CharTokenizer(_Tokenizer):
    def __init__(self, charset=CHARSET36, max_len=25):
        self.charset, self.max_len = charset, max_len
        self._id = {c: i + 1 for i, c in enumerate(charset)}
        self.vocab_size = len(charset) + 3
        self.bos_id, self.pad_id = self.vocab_size - 2, self.vocab_size - 1

    def _ids(self, text):
        return [self._id[c] for c in text if c in self._id]  # chars outside the charset are skipped

    def _text(self, ids):
        return ''.join(self.charset[t - 1] for t in ids)

    @property
    def spec(self):
        return {'type': 'char', 'charset': self.charset, 'max_len': self.max_len}


class SPTokenizer(_Tokenizer):
    """SentencePiece BPE; piece p (0 = <unk>) is text token p + 1. The model bytes travel inside the spec."""

    def __init__(self, model, max_len=25):
        import sentencepiece as spm
        self.model = open(model, 'rb').read() if isinstance(model, str) else bytes(model)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model)
        self.max_len, self._b64 = max_len, base64.b64encode(self.model).decode()
        self.vocab_size = self.sp.get_piece_size() + 3
        self.bos_id, self.pad_id = self.vocab_size - 2, self.vocab_size - 1

    def _ids(self, text):
        return [p + 1 for p in self.sp.encode(text)]

    def _text(self, ids):
        return self.sp.decode([t - 1 for t in ids])

    @property
    def spec(self):
        return {'type': 'spm', 'model': self._b64, 'max_len': self.max_len}


def load_tokenizer(spec):
    """A tokenizer from its spec dict, or from a string: '36', '94', a charset, or a SentencePiece .model path."""
    if isinstance(spec, str):
        if spec.endswith('.model'):
            return SPTokenizer(spec)
        return CharTokenizer({'36': CHARSET36, '94': CHARSET94}.get(spec, spec))
    if spec['type'] == 'char':
        return CharTokenizer(spec['charset'], spec.get('max_len', 25))
    return SPTokenizer(base64.b64decode(spec['model']), spec.get('max_len', 25))

# ----------------------------------------------------------------------------- metrics (paper §5)

BENCHMARK_SIZES = {'IC13': 857, 'IIIT5k': 3000, 'SVT': 647, 'CUTE80': 288, 'IC15': 1811, 'SVTP': 645}  # 7,248


def normalize36(s):
    """Lowercase and delete everything outside 0-9a-z (the evaluation protocol of the study)."""
    return ''.join(c for c in s.lower() if c in CHARSET36)


def edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def score(preds, gts):
    """-> dict(n, correct, ned_sum): exact matches and the sum of 1 - NED after 36-char normalisation,
    NED = edit distance / max(len(pred), len(gt))."""
    correct, ned_sum = 0, 0.0
    for p, g in zip(preds, gts, strict=True):
        p, g = normalize36(p), normalize36(g)
        correct += p == g
        ned_sum += 1.0 - (edit_distance(p, g) / max(len(p), len(g)) if p or g else 0.0)
    return {'n': len(gts), 'correct': correct, 'ned_sum': ned_sum}


def weighted_average(results, key='error'):
    """Average of results[name][key] over sets, weighted by set size (results[name]['n'], else
    BENCHMARK_SIZES[name]). Entries may be score() dicts: key 'error' / 'accuracy' / 'ned' (1-NED) in percent."""
    total = wsum = 0.0
    for name, r in results.items():
        n = r.get('n') or BENCHMARK_SIZES[name]
        if key not in r and 'correct' in r:
            v = {'error': 100 * (1 - r['correct'] / n), 'accuracy': 100 * r['correct'] / n,
                 'ned': 100 * r['ned_sum'] / n}[key]
        else:
            v = r[key]
        total, wsum = total + n * v, wsum + n
    return total / wsum

# ----------------------------------------------------------------------------- word renderer

_FONT_CACHE = {}


def _font(path, size):
    if (path, size) not in _FONT_CACHE:
        _FONT_CACHE[path, size] = ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)
    return _FONT_CACHE[path, size]


def render_word(text, rng, style='clean', fonts=None):
    """Render one word -> PIL image. rng: random.Random. 'clean' (the CPU probe task): Pillow's built-in
    font at 11-13 px, dark on white, tight crop with a 1-4 px margin. 'varied': a random font from `fonts`
    (list of .ttf/.otf paths; Pillow's built-in if None), size, colours, background, slight rotation/blur/noise."""
    if style == 'clean':
        font = _font(None, rng.randint(11, 13))
        l, t, r, b = font.getbbox(text)
        ml, mt, mr, mb = (rng.randint(1, 4) for _ in range(4))
        img = Image.new('L', (r - l + ml + mr, b - t + mt + mb), 255)
        ImageDraw.Draw(img).text((ml - l, mt - t), text, fill=rng.randint(0, 80), font=font)
        return img
    font = _font(rng.choice(fonts) if fonts else None, rng.randint(16, 40))
    bg = [rng.randint(0, 255) for _ in range(3)]
    dark = sum(bg) > 384  # ink on the other side of mid-grey, so the word stays readable
    fg = tuple(rng.randint(0, 90) if dark else rng.randint(165, 255) for _ in range(3))
    l, t, r, b = font.getbbox(text)
    pad = [rng.randint(1, max(2, (b - t) // 3)) for _ in range(4)]
    w, h = r - l + pad[0] + pad[2], b - t + pad[1] + pad[3]
    img = Image.new('RGB', (w, h), tuple(bg))
    if rng.random() < 0.4:  # a gradient towards a second background colour, across or along the word
        bg2 = Image.new('RGB', (w, h), tuple(min(255, max(0, c + rng.randint(-60, 60))) for c in bg))
        ramp = np.linspace(0, 255, w if rng.random() < 0.5 else h, dtype=np.uint8)
        mask = np.broadcast_to(ramp if len(ramp) == w else ramp[:, None], (h, w))
        img = Image.composite(bg2, img, Image.fromarray(np.ascontiguousarray(mask)))
    ImageDraw.Draw(img).text((pad[0] - l, pad[1] - t), text, fill=fg, font=font)
    if rng.random() < 0.5:
        img = img.rotate(rng.uniform(-3, 3), Image.BILINEAR, expand=True, fillcolor=tuple(bg))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    if rng.random() < 0.3:
        a = np.asarray(img, dtype=np.int16)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(3, 12), a.shape)
        img = Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8))
    return img


def _synth_init(cfg):
    global _SYNTH
    _SYNTH = cfg


def _synth_shard(job):
    """Render and write shard i (samples start..start+count) -> (shards, charset)."""
    i, start, count = job
    c = _SYNTH
    rng = random.Random(c['seed'] * 1000003 + i)
    writer = ShardWriter(c['out_dir'], shard_size=count, start=i)
    for t in range(count):
        if c['words']:
            text = rng.choice(c['words'])
        else:
            text = ''.join(rng.choice(c['charset']) for _ in range(rng.randint(c['min_len'], c['max_len'])))
        img, buf = render_word(text, rng, c['style'], c['fonts']), io.BytesIO()
        if c['style'] == 'clean':
            img.save(buf, 'PNG', compress_level=1)
        else:
            img.save(buf, 'JPEG', quality=90)
        writer.write(f'{start + t:09d}', buf.getvalue(), 'png' if c['style'] == 'clean' else 'jpg', text)
    return writer.close(), writer.charset


def _check_empty(out_dir):
    if glob.glob(os.path.join(out_dir, '*.tar')):
        raise FileExistsError(f'{out_dir} already holds shards: remove them or choose another folder')


def synth(out_dir, n, seed=0, style='clean', min_len=2, max_len=6, charset=CHARSET36, words=None, workers=None,
          shard_size=10000, fonts=None):
    """Render n word images into shards in out_dir on all cores; returns the index. words: list of str (else
    random strings of min_len..max_len chars over charset); fonts: list of font paths or a folder of them."""
    _check_empty(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(fonts, str):
        fonts = sorted(p for p in glob.glob(os.path.join(fonts, '**', '*'), recursive=True)
                       if p.lower().endswith(('.ttf', '.otf')))
        if not fonts:
            raise FileNotFoundError('no .ttf/.otf fonts in the fonts folder')
    cfg = dict(out_dir=out_dir, seed=seed, style=style, min_len=min_len, max_len=max_len, charset=charset,
               words=words, fonts=fonts)
    jobs = [(i, s, min(shard_size, n - s)) for i, s in enumerate(range(0, n, shard_size))]
    shards, chars = {}, set()
    with Pool(workers or len(os.sched_getaffinity(0)), initializer=_synth_init, initargs=(cfg,)) as pool:
        for sh, cs in tqdm(pool.imap_unordered(_synth_shard, jobs), total=len(jobs), desc='synth', unit='shard'):
            shards.update(sh)
            chars |= cs
    return write_index(out_dir, shards, chars, f'synth style={style} seed={seed}', {},
                       words=len(words) if words else None, fonts=len(fonts) if fonts else 'pillow-default')

# ----------------------------------------------------------------------------- importers

def _check_sample(rec):
    """(image bytes, label) -> (bytes, ext, label) with the image decoded once to check it, or (None, reason)."""
    data, label = rec
    if label is None:
        return None, 'missing_label'
    if not label.strip():
        return None, 'empty_label'
    if data is None:
        return None, 'missing_image'
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()
    except Exception:
        return None, 'bad_image'
    if fmt not in ('PNG', 'JPEG'):  # other formats are stored as PNG
        buf = io.BytesIO()
        img.convert('RGB').save(buf, 'PNG')
        return buf.getvalue(), 'png', label
    return data, 'png' if fmt == 'PNG' else 'jpg', label


def _import(records, out_dir, source, shard_size, workers, total=None, **extra):
    """Check records (image bytes, label) on all cores and write the good ones to shards, in order."""
    writer, drops = ShardWriter(out_dir, shard_size=shard_size), Counter()
    with Pool(workers or len(os.sched_getaffinity(0))) as pool:
        for r in tqdm(pool.imap(_check_sample, records, chunksize=64), total=total, desc='import', unit='img'):
            if r[0] is None:
                drops[r[1]] += 1
            else:
                writer.write(f'{sum(writer.shards.values()) + writer.count:09d}', *r)
    index = write_index(out_dir, writer.close(), writer.charset, source, drops, **extra)
    print(f'{out_dir}: {index["samples"]} samples in {len(index["shards"])} shards, dropped {dict(drops)}')
    return index


def import_lmdb(src, out_dir, shard_size=10000, workers=None):
    """Scene-text LMDBs (num-samples, image-%09d, label-%09d, 1-based) under src, recursively -> one shard set."""
    try:
        import lmdb
    except ImportError:
        sys.exit('import-lmdb needs the lmdb package: pip install lmdb')
    dbs = sorted(root for root, _, files in os.walk(src) if 'data.mdb' in files)
    if not dbs:
        raise FileNotFoundError(f'no data.mdb in {src} or its sub-folders')
    _check_empty(out_dir)
    def open_db(db):
        return lmdb.open(db, readonly=True, lock=False, readahead=False, meminit=False)

    counts = {}
    for db in dbs:
        with open_db(db) as env, env.begin() as txn:
            count = txn.get(b'num-samples')
        if count is None:
            raise ValueError(f"{db}: no 'num-samples' key; not a scene-text LMDB")
        counts[db] = int(count)

    def records():
        for db, count in counts.items():
            with open_db(db) as env, env.begin() as txn:
                for i in range(1, count + 1):
                    label = txn.get(b'label-%09d' % i)
                    yield txn.get(b'image-%09d' % i), None if label is None else label.decode('utf-8', 'replace')
    parts = {os.path.relpath(db, src): n for db, n in counts.items()}
    return _import(records(), out_dir, os.path.abspath(src), shard_size, workers, sum(counts.values()), parts=parts)


def import_folder(labels_file, out_dir, root=None, shard_size=10000, workers=None):
    """A label file of lines 'relative/path<TAB>label' (paths relative to root, default: the file's folder)."""
    root = root if root is not None else os.path.dirname(os.path.abspath(labels_file))
    _check_empty(out_dir)
    lines = [ln.rstrip('\r\n') for ln in open(labels_file, encoding='utf-8') if ln.strip()]

    def records():
        for ln in lines:
            path, tab, label = ln.partition('\t')
            try:
                data = open(os.path.join(root, path), 'rb').read()
            except OSError:
                data = None
            yield data, label if tab else None
    return _import(records(), out_dir, os.path.abspath(labels_file), shard_size, workers, len(lines))

# ----------------------------------------------------------------------------- stats, spm, command line

def _labels(pattern):
    for path, n in find_shards(pattern):
        try:
            for _, _, files in read_tar(path, limit=n):
                if 'txt' in files:
                    yield files['txt'].decode('utf-8', 'replace')
        except EOFError:
            print(f'warning: {path} is truncated', file=sys.stderr)


def stats(pattern):
    shards = find_shards(pattern)
    index = _read_index(pattern)
    lengths, chars = Counter(), Counter()
    for label in tqdm(_labels(pattern), total=sum(n for _, n in shards), desc='labels', leave=False):
        lengths[len(label)] += 1
        chars.update(label)
    n = sum(lengths.values())
    print(f'{pattern}: {n} samples in {len(shards)} shards (index: {index.get("samples")}), '
          f'source: {index.get("source")}')
    print('label length histogram:')
    for k in sorted(lengths):
        print(f'  {k:3d} {lengths[k]:9d} {"#" * max(1, round(50 * lengths[k] / max(lengths.values())))}')
    print(f'charset ({len(chars)}): {"".join(sorted(chars))}')
    outside = sum(v for c, v in chars.items() if c.lower() not in CHARSET36)
    print(f'characters outside CHARSET36 after lower-casing: {outside}')
    print(f'import drops: {index.get("drops", {})}')


def train_spm(pattern, vocab, out=None, max_len=25):
    """Train a SentencePiece BPE model on the shard labels (cleaned as in paper §5, no charset filter)."""
    import sentencepiece as spm
    out = out or os.path.join(pattern if os.path.isdir(pattern) else os.path.dirname(pattern), f'spm{vocab}.model')
    cleaned = (clean_label(t, None, max_len)[0] for t in _labels(pattern))
    labels = (lab for lab in cleaned if lab)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=labels, model_writer=buf, vocab_size=vocab, model_type='bpe',
                                   character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                                   add_dummy_prefix=False, normalization_rule_name='identity',
                                   hard_vocab_limit=False, input_sentence_size=2_000_000,
                                   shuffle_input_sentence=True, minloglevel=2)
    with open(out, 'wb') as f:
        f.write(buf.getvalue())
    print(f'wrote {out} ({SPTokenizer(out).vocab_size} ids incl. EOS/BOS/PAD)')
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    a = sub.add_parser('synth', help='render word images into shards')
    a.add_argument('out', help='output folder')
    a.add_argument('--n', type=int, required=True, help='number of images')
    a.add_argument('--style', choices=['clean', 'varied'], default='clean', help='clean = the CPU probe task')
    a.add_argument('--seed', type=int, default=0, help='integer seed')
    a.add_argument('--min-len', type=int, default=2, help='random strings: shortest length')
    a.add_argument('--max-len', type=int, default=6, help='random strings: longest length')
    a.add_argument('--charset', default=CHARSET36, help='characters of the random strings')
    a.add_argument('--words', help='word list file (one per line) instead of random strings')
    a.add_argument('--fonts', help='folder of .ttf/.otf fonts (default: Pillow built-in)')
    a.add_argument('--workers', type=int, default=None, help='processes (default: all cores)')
    a.add_argument('--shard-size', type=int, default=10000, help='samples per shard')
    for name, src_help in (('import-lmdb', 'folder holding scene-text LMDBs (searched recursively)'),
                           ('import-folder', 'label file: lines relative/path<TAB>label')):
        a = sub.add_parser(name, help=f'import {src_help}')
        a.add_argument('src', help=src_help)
        a.add_argument('out', help='output folder')
        a.add_argument('--shard-size', type=int, default=10000, help='samples per shard')
        a.add_argument('--workers', type=int, default=None, help='processes checking images (default: all cores)')
        if name == 'import-folder':
            a.add_argument('--root', help='folder the image paths are relative to (default: the label file\'s)')
    a = sub.add_parser('stats', help='counts, label lengths, charset and drops of a shard set')
    a.add_argument('dir', help='shard folder or glob')
    a = sub.add_parser('spm', help='train a SentencePiece BPE tokenizer on shard labels')
    a.add_argument('dir', help='shard folder or glob')
    a.add_argument('--vocab', type=int, required=True, help='SentencePiece pieces (ids = pieces + 3)')
    a.add_argument('--out', help='model path (default DIR/spmN.model)')
    args, t0 = p.parse_args(argv), time.time()
    try:
        if args.cmd == 'synth':
            words = [w.strip() for w in open(args.words, encoding='utf-8') if w.strip()] if args.words else None
            index = synth(args.out, args.n, args.seed, args.style, args.min_len, args.max_len, args.charset, words,
                          args.workers, args.shard_size, args.fonts)
            dt = time.time() - t0
            print(f'{args.out}: {index["samples"]} images in {len(index["shards"])} shards, {dt:.1f} s '
                  f'({index["samples"] / dt:.0f} images/s)')
        elif args.cmd == 'import-lmdb':
            import_lmdb(args.src, args.out, args.shard_size, args.workers)
        elif args.cmd == 'import-folder':
            import_folder(args.src, args.out, args.root, args.shard_size, args.workers)
        elif args.cmd == 'stats':
            stats(args.dir)
        elif args.cmd == 'spm':
            train_spm(args.dir, args.vocab, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f'data.py {args.cmd}: {e}')


if __name__ == '__main__':
    main()
