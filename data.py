"""Data for ocrscale: tar shards, a shuffling reader, importers, a word renderer, tokenizers, metrics.

    python data.py synth data/synth --n 100000                    # 'clean' probe images (all cores)
    python data.py synth data/varied --n 100000 --style varied --fonts FONT_DIR --words words.txt
    python data.py import-lmdb data/lmdb/train/real data/real     # scene-text LMDBs (recursive)
    python data.py import-folder images/labels.tsv data/mine      # lines: relative/path<TAB>label (--sep)
    python data.py stats data/real --charset real.txt             # counts, lengths, charset (-> --charset @FILE)
    python data.py spm data/real --vocab 512                      # SentencePiece BPE -> data/real/spm512.model

Shards are tar files of KEY.png|jpg + KEY.txt pairs (WebDataset's layout), each with a sidecar SHARD.tar.idx
(per sample: label, image offset and size, tar header CRC-32), and DIR/index.json (shard counts, charset, drops).
"""
import argparse, base64, contextlib, fcntl, fnmatch, functools, gc, glob, hashlib, http.client, io, json, os, random
import re, resource, signal, sys, tarfile, time, unicodedata, urllib.parse, zlib
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from tqdm import tqdm

CHARSET36 = '0123456789abcdefghijklmnopqrstuvwxyz'
CHARSET94 = CHARSET36 + 'ABCDEFGHIJKLMNOPQRSTUVWXYZ' + '!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~'  # PARSeq's order
IMAGE_EXTS = ('png', 'jpg', 'jpeg', 'webp', 'bmp')
MIX_CHUNK = 4096  # positions over which weighted sources take exactly their share
REMOTE_BLOCK = 64  # consecutive samples a URL source reads with one request (~200-400 KB of word images)
UNFINISHED = 'UNFINISHED'  # a file in a shard folder while synth or an import writes it


def cpu_count():  # os.sched_getaffinity exists on Linux only
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def write_json(obj, path, indent=None):  # a temporary file per process, then a rename: readers never see half a file
    tmp = f'{path}.{os.getpid()}.tmp'
    Path(tmp).write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)

# ----------------------------------------------------------------------------- labels and charsets

def load_charset(spec):
    """'36', '94', the characters themselves, or '@file' (UTF-8: one character per line, or one string)."""
    if spec in ('36', '94'):
        return CHARSET36 if spec == '36' else CHARSET94
    if spec.startswith('@'):
        try:
            spec = ''.join(Path(spec[1:]).read_text(encoding='utf-8-sig').splitlines())  # a byte-order mark: none
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f'cannot read the charset file {spec[1:]!r}: {e}') from None
    # composed as labels are read (NFC: an é typed as e + accent is é); labels never keep whitespace
    chars = ''.join(c for c in dict.fromkeys(unicodedata.normalize('NFC', spec)) if not c.isspace())
    if not chars:
        raise ValueError(f'empty charset {spec!r}: give 36, 94, the characters, or @FILE')
    return chars


def clean_label(label, charset=None, max_len=25, fold=True):
    """Label preprocessing (paper §5) -> (label, None) or (None, drop reason). fold: NFKD->ASCII (else NFC, as
    written); an all-lowercase charset reads 'A' as 'a'; characters outside the charset are removed."""
    label = unicodedata.normalize('NFKD' if fold else 'NFC', ''.join(label.split()))
    if fold:
        label = label.encode('ascii', 'ignore').decode()
    if charset is not None:
        lower = charset == charset.lower()  # then each character lowered by itself: Σ is σ at a word's end too
        label = ''.join(c for c in (''.join(map(str.lower, label)) if lower else label) if c in charset)
    if not label:
        return None, 'empty_label'
    return (None, 'too_long') if max_len is not None and len(label) > max_len else (label, None)

def usable_label(raw, charset, max_len, fold, tokenizer=None):
    """clean_label, with max_len counted in the tokenizer's tokens where there is one: a label as a run reads it."""
    label, reason = clean_label(raw, charset, None if tokenizer else max_len, fold)
    if label is not None and tokenizer is not None and len(tokenizer.ids(label)) > max_len:
        return None, 'too_long'
    return label, reason

# ----------------------------------------------------------------------------- tar shards

def _tar_header(name, size):
    info = tarfile.TarInfo(name)  # a regular file: mode 644, mtime 0, no owner
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT)


def _stamp(path):  # a shard rewritten after its sidecar or cache was made no longer matches
    st = os.stat(path)
    return {'bytes': st.st_size, 'mtime_ns': st.st_mtime_ns}


class ShardWriter:
    """Writes samples into OUT/shard-NNNNNN.tar shards (+ sidecars) of at most shard_size samples / max_bytes
    bytes, each written as .tmp and renamed when full: a crash never leaves a half shard."""

    def __init__(self, out_dir, shard_size=10000, max_bytes=1.5e9, start=0):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_size, self.max_bytes = out_dir, shard_size, max_bytes
        self.index, self.shards, self.charset, self.f = start, {}, set(), None

    def write(self, key, image_bytes, ext, label):
        """Add sample KEY.ext + KEY.txt; keys must be short and contain no dots."""
        if '.' in key or len(key) + len(ext) > 98:
            raise ValueError(f'shard keys must be short and contain no dots: {key!r}')
        if self.f is not None and (len(self.samples) >= self.shard_size or self.f.tell() >= self.max_bytes):
            self._finish()
        if self.f is None:
            self.path = os.path.join(self.out_dir, f'shard-{self.index:06d}.tar')
            self.f, self.samples, self.index = open(self.path + '.tmp', 'wb'), [], self.index + 1
        header, label_bytes = _tar_header(f'{key}.{ext}', len(image_bytes)), label.encode('utf-8')
        self.samples.append([label, self.f.tell() + 512, len(image_bytes), zlib.crc32(header)])
        self.f.write(header + image_bytes + bytes(-len(image_bytes) % 512)  # data fills whole 512-byte blocks
                     + _tar_header(f'{key}.txt', len(label_bytes)) + label_bytes + bytes(-len(label_bytes) % 512))
        self.charset.update(label)

    def _finish(self):
        self.f.write(bytes(1024))  # end-of-archive: two zero blocks
        self.f.close()
        write_json({**_stamp(self.path + '.tmp'), 'samples': self.samples}, self.path + '.idx')
        os.replace(self.path + '.tmp', self.path)  # keeps the size and mtime the sidecar records
        self.shards[os.path.basename(self.path)] = len(self.samples)
        self.f = None

    def close(self):
        if self.f is not None:
            self._finish()
        return self.shards


def scan_tar(path):
    """A shard's samples in order, read with tarfile: [[label or None, image offset or None, image size, CRC-32
    of the image's 512-byte tar header]]. A truncated or corrupt tar gives the complete samples before the damage."""
    samples, key, size = [], None, os.path.getsize(path)
    try:
        with tarfile.open(path, 'r:') as tf, open(path, 'rb') as raw:
            for m in tf:
                if m.offset_data + m.size > size:
                    raise EOFError('truncated tar')
                if not m.isfile():
                    continue
                folder, _, base = m.name.rpartition('/')
                stem, _, ext = base.partition('.')  # WebDataset: the extension starts at the first dot
                if (folder, stem) != key:  # a sample ends when the key changes
                    samples.append([None, None, 0, 0])
                    key = folder, stem
                if ext.lower() == 'txt':
                    samples[-1][0] = tf.extractfile(m).read().decode('utf-8', 'replace')
                elif ext.lower() in IMAGE_EXTS and samples[-1][1] is None:
                    raw.seek(m.offset_data - 512)  # the member's own header (after any long-name headers)
                    samples[-1][1:] = m.offset_data, m.size, zlib.crc32(raw.read(512))
    except (tarfile.TarError, EOFError, OSError):
        if samples and None in samples[-1][:2]:
            samples.pop()  # the sample the damage cut
    return samples


def shard_index(path):
    """scan_tar(path) from the sidecar PATH.idx, or by scanning when there is none or the shard changed after it
    was written (then saved as the sidecar where writable). A remote shard's sidecar is taken as it is."""
    if is_url(path):
        try:
            samples = json.loads(read_url(path + '.idx'))['samples']
        except FileNotFoundError:
            raise FileNotFoundError(f'{path}.idx is missing: read the shard set once from a local copy (python data.py '
                                    'stats DIR writes the sidecars) and upload the .idx files with it') from None
        read_url(path, 0, 1)  # the shard itself is there (else a 404 naming it), and the server answers byte ranges
        return samples
    with contextlib.suppress(OSError, ValueError, KeyError):  # no sidecar, or a damaged or stale one
        idx = json.loads(Path(path + '.idx').read_text())
        if {k: idx[k] for k in ('bytes', 'mtime_ns')} == _stamp(path):
            return idx['samples']
    samples = scan_tar(path)
    with contextlib.suppress(OSError):  # a read-only data folder: scan again next time
        write_json({**_stamp(path), 'samples': samples}, path + '.idx')
    return samples


def write_index(out_dir, shards, charset, source, drops, **extra):
    index = dict(shards=dict(sorted(shards.items())), samples=sum(shards.values()),
                 charset=''.join(sorted(charset)), source=source, drops=dict(drops), **extra)
    write_json(index, os.path.join(out_dir, 'index.json'), indent=1)
    Path(out_dir, UNFINISHED).unlink(missing_ok=True)
    return index


def _read_index(pattern):
    """index.json of a shard folder (or of a glob's folder), {} if there is none; a URL's must be there. One that
    does not map shard names to sample counts is a ValueError naming it."""
    if is_url(pattern):
        path = pattern.rstrip('/') + '/index.json'
        text = read_url(path)
    else:
        path = os.path.join(pattern if os.path.isdir(pattern) else os.path.dirname(pattern), 'index.json')
        if not os.path.exists(path):
            return {}
        text = Path(path).read_bytes()
    with contextlib.suppress(ValueError):
        index = json.loads(text)
        if isinstance(index, dict) and isinstance(index.get('shards'), dict) and all(
                type(n) is int for n in index['shards'].values()):
            return index
    raise ValueError(f'{path}: not an index.json of data.py (a "shards" object of shard names and sample counts)')


def find_shards(pattern, index=None):
    """A folder, glob or URL of a folder -> sorted [(path, count)], counts from index.json (or the shard's index).
    A shard that an index.json lists but that is not there is an error naming it."""
    if is_url(pattern):
        index = index or _read_index(pattern)  # usable_index passes the one it read
        return [(f'{pattern.rstrip("/")}/{name}', n) for name, n in sorted(index['shards'].items())]
    if os.path.isdir(pattern):  # a folder (its name as written, brackets included), one shard, or a glob
        paths = glob.glob(os.path.join(glob.escape(pattern), '*.tar'))
    else:
        paths = [pattern] if os.path.isfile(pattern) else glob.glob(pattern)
    paths = sorted(paths)
    if not paths:
        d = pattern if os.path.isdir(pattern) or not glob.has_magic(pattern) else os.path.dirname(pattern) or 'DIR'
        raise FileNotFoundError(
            f'no shards match {pattern!r}: make some with `python data.py synth {d} --n 100000`, '
            f'`python data.py import-lmdb LMDB_DIR {d}` or `python data.py import-folder LABELS_FILE {d}`')
    indexes = {d: _read_index(d) for d in {os.path.dirname(p) for p in paths}}
    for folder, index in indexes.items():
        if os.path.exists(os.path.join(folder, UNFINISHED)):
            raise FileNotFoundError(f'{folder}: an unfinished synth or import (stopped before it wrote index.json): '
                                    'run it again')
        if os.path.isfile(pattern):  # one shard, which is there: its siblings are not asked for
            continue
        listed = fnmatch.filter(index.get('shards', {}), '*' if os.path.isdir(pattern) else os.path.basename(pattern))
        missing = [name for name in listed if not os.path.exists(os.path.join(folder, name))]
        if missing:
            raise FileNotFoundError(f'{folder}/index.json lists {len(missing)} shard(s) that are not there: '
                                    f'{", ".join(missing[:3])}{" ..." if len(missing) > 3 else ""}')
    counts = [indexes[os.path.dirname(p)].get('shards', {}).get(os.path.basename(p)) for p in paths]
    return [(p, len(shard_index(p)) if n is None else n) for p, n in zip(paths, counts)]


def is_url(path):
    return '://' in path


def read_url(url, start=None, length=None, connections=None, redirects=5):
    """The bytes of url, or `length` of them from `start`: http(s) with the standard library (idle connections kept
    per host in the dict `connections`; redirects followed; three tries on a dropped connection or a 5xx/429 answer),
    any other scheme through fsspec (s3://, gs://, ...)."""
    scheme, _, rest = url.partition('://')
    if scheme not in ('http', 'https'):
        try:
            import fsspec
            fs, path = fsspec.core.url_to_fs(url)
            return fs.cat_file(path) if start is None else fs.cat_file(path, start, start + length)
        except ImportError as e:
            raise ValueError(f'reading {scheme}:// needs fsspec and its backend (pip install fsspec s3fs, or gcsfs, '
                             f'...): {e}') from None
    host, _, path = rest.partition('/')
    idle = ({} if connections is None else connections).setdefault((scheme, host), [])  # threads share it
    for attempt in range(3):
        time.sleep(attempt / 2)  # after a dropped connection or a busy or failing server: ask again after a pause
        try:
            conn = idle.pop()
        except IndexError:
            conn = (http.client.HTTPSConnection if scheme == 'https' else http.client.HTTPConnection)(host, timeout=60)
        try:
            ranged = {'Range': f'bytes={start}-{start + length - 1}'} if start is not None else {}
            conn.request('GET', '/' + path, headers=ranged)
            response = conn.getresponse()
            if start is not None and response.status == 200:  # the whole file follows: do not download it
                conn.close()
                raise ValueError(f'{url}: the server ignores byte-range requests')
            body = response.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            idle.clear()  # the server dropped this connection, likely the other idle ones too
            if attempt == 2:
                raise OSError(f'{url}: {e}') from None
            continue
        idle.append(conn)
        if response.status in (301, 302, 303, 307, 308) and redirects:
            return read_url(urllib.parse.urljoin(url, response.headers['Location']), start, length, connections,
                            redirects - 1)
        if response.status < 500 and response.status != 429:
            break
    if response.status == 404:
        raise FileNotFoundError(f'{url}: not found (HTTP 404)')
    if response.status >= 300:
        raise OSError(f'{url}: HTTP {response.status} {response.reason}')
    return body


def parse_sources(spec):
    """'data/real:3,data/synth:1' -> [('data/real', 3.0), ('data/synth', 1.0)]; 'data/x' -> [('data/x', 1.0)]."""
    out = []
    for part in spec.split(','):
        path, _, w = part.rpartition(':')
        host = path.partition('://')[2]  # http://host:8000 names no weight, http://host:8000:2 does
        port = part.startswith(('http://', 'https://')) and not set(host) & {'/', ':'}
        out.append((path, float(w)) if path and w.replace('.', '', 1).isdigit() and not port else (part, 1.0))
    return out

# ----------------------------------------------------------------------------- the usable-sample index

# One row per usable sample: shard number, image offset and size, CRC-32 of its tar header, cleaned label's place.
ROW = np.dtype([('shard', '<i4'), ('offset', '<i8'), ('size', '<i4'), ('crc', '<u4'), ('label', '<i8'),
                ('label_len', '<i4')])


def usable_index(pattern, settings, clean):
    """A source's shard paths, the base path of its usable-sample index (BASE.rows.npy: ROW, BASE.labels.npy: the
    cleaned labels' UTF-8 bytes, BASE.json: counts and drops) and that json. Built once per shard set and settings,
    beside the shards (else in $OCRSCALE_CACHE or ~/.cache/ocrscale), by one process under a file lock."""
    index = _read_index(pattern) if is_url(pattern) else None  # a remote set: indexed anew when its index.json changes
    shards = find_shards(pattern, index)
    paths = [p if is_url(p) else os.path.abspath(p) for p, _ in shards]
    stamps = [[p, n] + ([] if is_url(p) else [*_stamp(p).values()]) for p, (_, n) in zip(paths, shards)]
    folder = os.path.dirname(paths[0])
    if is_url(folder) or not os.access(folder, os.W_OK):
        folder = os.environ.get('OCRSCALE_CACHE') or os.path.expanduser('~/.cache/ocrscale')
        os.makedirs(folder, exist_ok=True)
    key = hashlib.sha1(json.dumps([settings, stamps, index]).encode()).hexdigest()[:16]
    base = os.path.join(folder, '.usable-' + key)
    if not os.path.exists(base + '.json'):
        with open(base + '.lock', 'a') as lock:
            with contextlib.suppress(OSError):  # no locks on this filesystem: processes may build it side by side
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or by the OS if this process dies
            if not os.path.exists(base + '.json'):
                _build_usable_index(base, shards, clean)
    return paths, base, json.loads(Path(base + '.json').read_text())


def _build_usable_index(base, shards, clean):
    tables, labels, drops, cleaned = [], [], Counter(), {}
    for s, (path, listed) in enumerate(shards):
        samples, rows = shard_index(path), []
        drops['truncated_tar'] += max(0, listed - len(samples))
        for label, offset, size, crc in samples:
            if label not in cleaned:  # computed once per distinct raw label
                cleaned[label] = (None, 'missing_label') if label is None else clean(label)
            text, reason = cleaned[label]
            if reason or offset is None:
                drops[reason or 'missing_image'] += 1
                continue
            labels.append(text.encode('utf-8'))
            rows.append((s, offset, size, crc, 0, len(labels[-1])))
        tables.append(np.array(rows, dtype=ROW))  # 32 bytes a row; a list of tuples holds ~10x that
    rows = np.concatenate(tables)
    rows['label'] = np.cumsum(rows['label_len']) - rows['label_len']
    for suffix, array in (('.rows.npy', rows), ('.labels.npy', np.frombuffer(b''.join(labels) or b'\0', np.uint8))):
        tmp = f'{base}.{os.getpid()}.tmp{suffix}'
        np.save(tmp, array)
        os.replace(tmp, base + suffix)
    write_json({'samples': len(rows), 'drops': {k: v for k, v in drops.items() if v}}, base + '.json')  # written last


def largest_remainder(total, weights):
    """Integers proportional to weights that add up to total exactly (Hamilton's method)."""
    exact = total * np.asarray(weights, dtype=np.float64) / np.sum(weights)
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(out - exact, kind='stable')[:total - out.sum()]] += 1
    return out


def permute_blocks(i, n, block, key):
    """permute() of the blocks of `block` (<= n) consecutive numbers in [0, n): a bijection of [0, n) that keeps each
    block's numbers together and in order (a last, partial block stays last)."""
    i, full = np.asarray(i, dtype=np.int64), n // block * block
    if full == 0:  # fewer numbers than a block: nothing to permute
        return i
    return np.where(i < full, permute(np.minimum(i, full - 1) // block, n // block, key) * block + i % block, i)


def permute(x, n, key):
    """A keyed bijection of [0, n) applied to the integers x (key: non-negative integers): a 4-round Feistel network
    on the smallest even number of bits covering n, walked round its cycles until it lands back in [0, n)."""
    half = max(1, (int(n) - 1).bit_length() + 1 >> 1)
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    keys = np.random.SeedSequence([int(k) for k in key]).generate_state(4, np.uint64)
    x = np.array(x, dtype=np.uint64)
    todo = np.arange(len(x))
    while len(todo):
        left, right = x[todo] >> shift, x[todo] & mask
        for k in keys:
            z = (right ^ k) * np.uint64(0xbf58476d1ce4e5b9)  # splitmix64's finaliser as the round function
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94d049bb133111eb)
            left, right = right, left ^ ((z ^ (z >> np.uint64(31))) & mask)
        x[todo] = (left << shift) | right
        todo = todo[x[todo] >= n]
    return x.astype(np.int64)

# ----------------------------------------------------------------------------- decoding

def rgb(img):
    """A PIL image as it looks, in RGB: transparency over white (not the colour stored under it), 16-bit samples
    scaled to 8 bits (not clipped to white)."""
    if img.mode.startswith('I'):  # I;16*: 16-bit; I: 32-bit, read as 16-bit where a sample needs more than 8
        samples = np.asarray(img, dtype=np.int64)
        wide = img.mode != 'I' or samples.max() > 255
        img = Image.fromarray(np.clip(samples >> 8 if wide else samples, 0, 255).astype(np.uint8))
    if img.has_transparency_data:
        img = Image.alpha_composite(Image.new('RGBA', img.size, 'white'), img.convert('RGBA'))
    return img.convert('RGB')


def decode_image(data, img_h, img_w, rng=None):
    """Encoded image bytes -> uint8 array (img_h, img_w, 3): RGB, bicubic stretch. With rng (random.Random): light
    augmentation, a few geometric and photometric ops at low magnitude, each with probability 1/4."""
    img = Image.open(io.BytesIO(data))
    if rng is None:
        if img.format == 'JPEG':
            img.draft('RGB', (img_w, img_h))  # decode JPEGs at a reduced scale that still covers the target
        return np.asarray(rgb(img).resize((img_w, img_h), Image.BICUBIC))
    img = rgb(img)
    if rng.random() < 0.25:  # slight rotation, corners filled with the top-left colour
        img = img.rotate(rng.uniform(-4, 4), Image.BILINEAR, expand=True, fillcolor=img.getpixel((0, 0)))
    if rng.random() < 0.25:  # crop up to 6% of each side
        w, h = img.size
        l, r, t, b = (int(rng.uniform(0, 0.06) * s) for s in (w, w, h, h))
        img = img.crop((l, t, max(l + 1, w - r), max(t + 1, h - b)))
    for enhance, low, high in ((ImageEnhance.Contrast, 0.6, 1.4), (ImageEnhance.Brightness, 0.7, 1.3)):
        if rng.random() < 0.25:
            img = enhance(img).enhance(rng.uniform(low, high))
    if rng.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return np.asarray(img.resize((img_w, img_h), Image.BICUBIC))


def normalize(images):
    """uint8 (B, H, W, 3), as batches leave the loader (4x smaller than float32) -> float (B, 3, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1

# ----------------------------------------------------------------------------- the reader

class DataError(RuntimeError):
    """Data that cannot be trained on; the message is one line for the user."""


def _worker_init(_):
    # a full collection in the worker would write to every object inherited from its parent (torch's thousands of
    # modules and functions), copying their pages; frozen objects are never examined (58.9 -> 29.6 MiB a worker)
    gc.freeze()
    torch.set_num_threads(1)  # the workers decode with PIL; torch threads would only fight over the cores
    for signum in (signal.SIGINT, signal.SIGTERM):  # a signal to the process group: the training process stops them
        signal.signal(signum, signal.SIG_IGN)


class ShardStream(torch.utils.data.IterableDataset):
    """Per-rank batches (uint8 images (B, H, W, 3), labels, unreadable samples skipped) from weighted shard sets.
    Micro-batch j of rank r holds global positions start + (j * world_size + r) * batch_size + [0, batch_size), so a
    step trains the same positions in any layout and a resume needs only the position. Each MIX_CHUNK positions hold
    each source's share by weight; draw k of a source is image k mod n of its epoch k // n, a keyed permutation of
    its n images. samples: D images split over the sources by weight, each share a keyed subset (a smaller D: a
    subset of a larger). block: consecutive stored samples kept together and read at once (1 locally, REMOTE_BLOCK
    for URLs). A sample whose tar header no longer matches the index, or whose image does not decode, is skipped
    and counted."""

    def __init__(self, sources, img_h, img_w, batch_size, charset, max_len=25, rank=0, world_size=1, seed=0,
                 samples=None, augment=False, loop=True, fold=None, tokenizer=None, data_seed=0, block=None):
        sources = parse_sources(sources) if isinstance(sources, str) else [(s, float(w)) for s, w in sources]
        weights = [w for _, w in sources]
        if min(seed, data_seed) < 0 or min(weights) <= 0:
            raise ValueError(f'weights are positive numbers and seeds non-negative integers, got seed={seed}, '
                             f'data_seed={data_seed}, sources={sources}')
        if charset is None and tokenizer is not None:  # the tokenizer's own rules, unless given
            charset = getattr(tokenizer, 'charset', None)
        fold = (tokenizer.fold if tokenizer else True) if fold is None else fold
        self.img_h, self.img_w, self.batch_size, self.charset, self.fold = img_h, img_w, batch_size, charset, fold
        self.max_len = max_len if tokenizer is None else min(max_len, tokenizer.max_len)
        self.rank, self.world_size, self.seed, self.augment, self.loop = rank, world_size, seed, augment, loop
        self.tokenizer, self.data_seed, self.names = tokenizer, data_seed, [s for s, _ in sources]
        settings = dict(charset=charset, fold=fold, max_len=self.max_len,
                        tokenizer=hashlib.sha1(json.dumps(tokenizer.spec).encode()).hexdigest() if tokenizer else None)
        self.paths, self.bases, metas = zip(*(usable_index(pattern, settings, self._clean) for pattern in self.names))
        self.usable, self.drops = [m['samples'] for m in metas], Counter()
        self.sizes = list(self.usable) if samples is None else largest_remainder(samples, weights).tolist()
        for pattern, meta, want in zip(self.names, metas, self.sizes):
            if meta['samples'] == 0:
                raise ValueError(f'no usable sample in {pattern} (drops: {meta["drops"]}): check the '
                                 f'charset (fold={fold}) and max_len={self.max_len}')
            if not 0 < want <= meta['samples']:
                raise ValueError(f'samples={samples} asks {want} usable images from {pattern}, which holds only '
                                 f'{meta["samples"]}')
            self.drops.update(meta['drops'])
        self.num_samples = sum(self.sizes)
        # at most 1/16 of a source, so that its order still changes every epoch
        self.blocks = [max(1, min(block or (REMOTE_BLOCK if is_url(name) else 1), n // 16))
                       for name, n in zip(self.names, self.sizes)]
        self.quota = largest_remainder(MIX_CHUNK, weights)  # slots per MIX_CHUNK positions, per source
        if self.loop and not self.quota.all():
            raise ValueError(f'the weight of {self.names[int(np.argmin(self.quota))]} is under 1/{MIX_CHUNK} of the '
                             'sum: it would never be read')
        self.start, self._tables = 0, None  # tables are opened in the process that reads: a worker is sent none

    def _clean(self, raw):
        return usable_label(raw, self.charset, self.max_len, self.fold, self.tokenizer)

    def __getstate__(self):
        return {**self.__dict__, '_tables': None, '_files': {}, '_connections': {}, '_requests': None}

    def loader(self, num_workers=0, start=0, pin_memory=False):
        """This rank's batches from global position `start` (the position after the last optimizer step)."""
        self.start = start
        # where workers start from a forkserver (Python 3.14's default on Linux) they share its import of torch; this
        # module is imported in each worker, under this process's sys.path (Python 3.11's server ignores it)
        torch.multiprocessing.set_forkserver_preload(['torch'])
        # its own generator: a DataLoader draws a base seed, which would shift the global RNG on resume
        for batch in torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                                 worker_init_fn=_worker_init if num_workers else None,
                                                 generator=torch.Generator()):
            if isinstance(batch, str):  # a worker's one-line error
                raise DataError(batch)
            yield batch

    def _locate(self, positions):
        """(source, row of its usable-sample index) of each global position."""
        if self.loop:
            chunk, slot = np.divmod(positions, MIX_CHUNK)
            src, draw = np.empty_like(positions), np.empty_like(positions)
            for c in np.unique(chunk).tolist():  # chunk c holds the sources' quotas in a keyed order
                order = permute(np.arange(MIX_CHUNK), MIX_CHUNK, (self.seed, 1, c))
                mix = np.searchsorted(np.cumsum(self.quota), order, side='right')
                mix_draw = np.empty(MIX_CHUNK, np.int64)
                for s, q in enumerate(self.quota.tolist()):  # a source's draws follow its positions: epochs are runs
                    mix_draw[mix == s] = c * q + np.arange(q)
                at = chunk == c
                src[at], draw[at] = mix[slot[at]], mix_draw[slot[at]]
            epoch, i = np.divmod(draw, np.asarray(self.sizes)[src])
            for s, e in set(zip(src.tolist(), epoch.tolist())):
                at = (src == s) & (epoch == e)
                i[at] = permute_blocks(i[at], self.sizes[s], self.blocks[s], (self.seed, 2, s, e))
        else:  # evaluation: every image once, sources one after another in stored order
            ends = np.cumsum(self.sizes)
            src = np.searchsorted(ends, positions, side='right')
            i = positions - (ends - self.sizes)[src]
        for s in np.unique(src).tolist():  # image number in the source's D subset -> row of its index
            if self.sizes[s] < self.usable[s]:
                at = src == s
                i[at] = permute_blocks(i[at], self.usable[s], self.blocks[s], (self.data_seed, 3, s))
        return src, i

    def _open(self):
        self._tables = [(np.load(b + '.rows.npy', mmap_mode='r'), np.load(b + '.labels.npy', mmap_mode='r'))
                        for b in self.bases]
        self._files, self._connections = {}, {}  # shard path -> descriptor; host -> idle HTTP connections
        self._requests = ThreadPoolExecutor(16) if any(map(is_url, self.names)) else None
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        with contextlib.suppress(ValueError, OSError):  # every shard of a large set open at once: no open per read
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        self._max_files = min(soft if soft > 0 else 1 << 16, 1 << 16) // 2  # RLIM_INFINITY is negative
        self._recent = [deque(maxlen=1000) for _ in self.bases]  # per source: was each of its last reads unusable
        self._warned_at, self._unreported, self._pid = time.monotonic() - 60, 0, os.getpid()

    def _fetch(self, path, start, length):
        """`length` bytes of a shard from `start` (a short read where the shard is shorter), or why not."""
        try:
            if is_url(path):
                return read_url(path, start, length, self._connections)
            if path not in self._files:
                if len(self._files) >= self._max_files:
                    os.close(self._files.pop(next(iter(self._files))))
                self._files[path] = os.open(path, os.O_RDONLY)
            return os.pread(self._files[path], length, start)
        except (OSError, ValueError) as e:  # the message names the file or URL
            return str(e)

    def _read_batch(self, src, rows, positions):
        """[(image array, label) or why not] at each position. Rows of one shard that follow each other in the index
        are read together: one read per MiB of a shard, covering their tar headers and images and gaps under 64 KiB."""
        out, runs = [None] * len(rows), []
        for s in np.unique(src).tolist():
            at = np.flatnonzero(src == s)
            at = at[np.argsort(rows[at], kind='stable')]  # this source's positions, in file order
            recs = self._tables[s][0][rows[at]]
            ends = np.flatnonzero((np.diff(rows[at]) > 1) | (np.diff(recs['shard']) != 0)  # a new read: another shard,
                                  | (np.diff(recs['offset'] >> 20) != 0)  # another MiB of it (reads stay near 1 MiB)
                                  | (np.diff(recs['offset']) - recs['size'][:-1] >= 1 << 16)) + 1  # or a gap
            for ks, run in zip(np.split(at, ends), np.split(recs, ends)):
                base = int(run['offset'][0]) - 512
                runs.append((s, ks, run, self.paths[s][int(run['shard'][0])], base,
                             int(run['offset'][-1] + run['size'][-1]) - base))
        # requests to a URL source wait mostly on the network: a batch's requests go out together
        fetched = [self._requests.submit(self._fetch, *run[3:]) if is_url(run[3]) else self._fetch(*run[3:])
                   for run in runs]
        for (s, ks, recs, path, base, _), data in zip(runs, fetched):
            data = data if isinstance(data, (bytes, str)) else data.result()
            for k, row in zip(ks.tolist(), recs):
                if isinstance(data, str):  # the read failed: why
                    out[k] = data
                    continue
                start, size, label = int(row['offset']) - 512 - base, int(row['size']), int(row['label'])
                chunk = data[start:start + 512 + size]  # the member's tar header and its image
                if len(chunk) != 512 + size or zlib.crc32(chunk[:512]) != row['crc']:
                    out[k] = f'{path} changed after it was indexed (' + (
                        f'delete {self.bases[s]}.* to index it again)' if is_url(path) else 're-run to index it again)')
                    continue
                rng = random.Random(f'{self.seed}:{positions[k]}') if self.augment else None  # the same in any layout
                try:
                    out[k] = decode_image(chunk[512:], self.img_h, self.img_w, rng), bytes(
                        self._tables[s][1][label:label + int(row['label_len'])]).decode('utf-8')
                except Exception:  # PIL raises many types on corrupt or truncated bytes
                    out[k] = f'an undecodable image in {path}'
        return out

    def __iter__(self):
        info, B = torch.utils.data.get_worker_info(), self.batch_size
        if self._tables is None or self._pid != os.getpid():  # a forked worker opens its own files and connections
            self._open()
        try:  # this worker's micro-batches (the DataLoader asks workers in turn)
            for j in count(info.id if info else 0, info.num_workers if info else 1):
                first = self.start + (j * self.world_size + self.rank) * B
                if not self.loop and first >= self.num_samples:
                    return
                positions = np.arange(first, first + B if self.loop else min(first + B, self.num_samples))
                images, labels, bad = [], [], 0
                src, rows = self._locate(positions)
                for s, got in zip(src.tolist(), self._read_batch(src, rows, positions.tolist())):
                    self._recent[s].append(isinstance(got, str))
                    if not isinstance(got, str):
                        images.append(got[0])
                        labels.append(got[1])
                        continue
                    bad, self._unreported = bad + 1, self._unreported + 1
                    if time.monotonic() - self._warned_at >= 60:  # a line a minute at most
                        print(f'data.py: warning: {self._unreported} unreadable sample(s) skipped and counted '
                              f'(latest: {got})', file=sys.stderr)
                        self._warned_at, self._unreported = time.monotonic(), 0
                    if sum(self._recent[s]) > 500:  # from the start, or later: a server or filesystem gone
                        yield f'{self.names[s]}: over half of 1,000 consecutive reads are unreadable (latest: {got})'
                        return
                stacked = np.stack(images) if images else np.zeros((0, self.img_h, self.img_w, 3), np.uint8)
                yield torch.from_numpy(stacked), labels, bad
        finally:  # the last batch, the end of an evaluation pass, or a closed loader
            for fd in self._files.values():
                os.close(fd)
            if self._requests:
                self._requests.shutdown()
            self._tables = None

# ----------------------------------------------------------------------------- tokenizers

class _Tokenizer:
    """Ids: 0 = EOS, 1..V-3 = the text tokens self.tokens, V-2 = BOS, V-1 = PAD (as model.py expects)."""
    eos_id = 0

    def __init__(self, tokens, max_len):
        self.tokens, self.max_len = list(tokens), max_len
        self.vocab_size = len(self.tokens) + 3
        self.bos_id, self.pad_id = self.vocab_size - 2, self.vocab_size - 1

    def encode(self, labels, length=None):
        """list[str] -> LongTensor (B, L+2) rows [BOS, t1..tn, EOS, PAD...], L = longest label in tokens (or
        `length`). Never truncates: a label longer than max_len (or length) tokens is a ValueError."""
        rows = [self.ids(t) for t in labels]
        L, limit = max(map(len, rows), default=0), self.max_len if length is None else min(length, self.max_len)
        if L > limit:
            longest = next(label for label, r in zip(labels, rows) if len(r) == L)
            raise ValueError(f'label {longest!r} has {L} tokens, more than max_len={limit} (labels are never cut)')
        L = L if length is None else length
        return torch.tensor([[self.bos_id] + r + [self.eos_id] + [self.pad_id] * (L - len(r)) for r in rows],
                            dtype=torch.long).view(len(rows), L + 2)

    def decode(self, ids):
        """LongTensor (B, T) -> list[str]: each row up to its first EOS, BOS/PAD ignored."""
        rows = [row[:row.index(self.eos_id)] if self.eos_id in row else row for row in ids.tolist()]
        return [self.text([t for t in row if 0 < t < self.bos_id]) for row in rows]

    def text(self, ids):
        return ''.join(self.tokens[t - 1] for t in ids)


class CharTokenizer(_Tokenizer):
    """One id per character of the charset; characters outside it are skipped."""

    def __init__(self, charset=CHARSET36, max_len=25):
        super().__init__(charset, max_len)
        self.charset, self.fold = charset, charset.isascii()  # an ASCII charset reads 'é' as 'e' (NFKD->ASCII)
        self._id = {c: i for i, c in enumerate(charset, 1)}
        self.spec = {'type': 'char', 'charset': charset, 'max_len': max_len}

    def ids(self, text):
        return [self._id[c] for c in text if c in self._id]


class SPTokenizer(_Tokenizer):
    """SentencePiece BPE; piece p (0 = <unk>) is text token p + 1. The model bytes travel inside the spec."""
    fold = True

    def __init__(self, model, max_len=25):
        import sentencepiece as spm
        self.model = open(model, 'rb').read() if isinstance(model, str) else bytes(model)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model)
        except RuntimeError:
            raise ValueError(f'{model if isinstance(model, str) else "the spec"}: not a SentencePiece model') from None
        super().__init__([self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())], max_len)
        self.spec = {'type': 'spm', 'model': base64.b64encode(self.model).decode(), 'max_len': max_len}

    def ids(self, text):
        return [p + 1 for p in self.sp.encode(text)]

    def text(self, ids):
        return self.sp.decode([t - 1 for t in ids])


_PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes -> characters table
_BYTE_CHAR = {b: chr(b) for b in _PRINTABLE} | {b: chr(256 + n) for n, b in
                                                enumerate(b for b in range(256) if b not in _PRINTABLE)}
_CHAR_BYTE = {c: b for b, c in _BYTE_CHAR.items()}
_GPT2_SPLIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+", re.ASCII)
_SPACES = '\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000' + ''.join(map(chr, range(0x2000, 0x200b)))


def _gpt2_words(text):
    r"""GPT-2's split 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ with `re` (no \p):
    matched on a copy where each non-ASCII character stands as an ASCII one of its class (letter, number, space)."""
    shadow = ''.join(c if c.isascii() else 'a' if (k := unicodedata.category(c)[0]) == 'L' else '0' if k == 'N'
                     else '\t' if c in _SPACES else '!' for c in text)
    return [text[m.start():m.end()] for m in _GPT2_SPLIT.finditer(shadow)]


def _normalize(spec, text):
    """A tokenizer.json normalizer; Precompiled (SentencePiece's character map) is read as NFKC."""
    kind = spec['type'] if spec else None
    if kind == 'Sequence':
        return functools.reduce(lambda t, s: _normalize(s, t), spec['normalizers'], text)
    if kind in ('NFC', 'NFD', 'NFKC', 'NFKD', 'Precompiled'):
        return unicodedata.normalize('NFKC' if kind == 'Precompiled' else kind, text)
    if kind == 'Replace':
        p = spec['pattern']
        return (re.sub(p['Regex'].replace(r'\z', r'\Z'), lambda _: spec['content'], text) if 'Regex' in p
                else text.replace(p['String'], spec['content']))
    if kind == 'Strip':
        text = text.lstrip(_SPACES) if spec['strip_left'] else text
        return text.rstrip(_SPACES) if spec['strip_right'] else text
    if kind == 'Lowercase':
        return ''.join(map(str.lower, text))  # character by character, as tokenizers (no final sigma)
    if kind == 'Prepend':
        return spec['prepend'] + text if text else text
    if kind is None:
        return text
    raise ValueError(f'tokenizer.json: normalizer {kind} is not supported')


def _pre_tokenize(spec, words):
    """A tokenizer.json pre-tokenizer (Sequence, WhitespaceSplit, Metaspace, ByteLevel): words -> words."""
    kind, words = spec['type'] if spec else None, [w for w in words if w]
    if kind == 'Sequence':
        return functools.reduce(lambda ws, s: _pre_tokenize(s, ws), spec['pretokenizers'], words)
    if kind == 'WhitespaceSplit':
        return [p for w in words for p in re.split(f'[{_SPACES}]+', w) if p]
    if kind == 'Metaspace':
        r, e = spec['replacement'], re.escape(spec['replacement'])
        scheme = spec.get('prepend_scheme', 'always' if spec.get('add_prefix_space', True) else 'never')
        words = [w.replace(' ', r) for w in words]
        words = [r + w if (scheme == 'always' or scheme == 'first' and k == 0) and not w.startswith(r) else w
                 for k, w in enumerate(words)]  # 'first': the first word (tokenizers: the one at the text's start)
        return [p for w in words for p in re.findall(f'{e}[^{e}]*|[^{e}]+', w)] if spec.get('split', True) else words
    if kind == 'ByteLevel':
        words = [' ' + w if spec.get('add_prefix_space') and not w.startswith(' ') else w for w in words]
        return [''.join(_BYTE_CHAR[b] for b in p.encode()) for w in words
                for p in (_gpt2_words(w) if spec.get('use_regex', True) else [w])]
    if kind is None:
        return words
    raise ValueError(f'tokenizer.json: pre-tokenizer {kind} is not supported')


class HFTokenizer(_Tokenizer):
    """A transformers folder's own tokenizer (model.py convert-trocr): spec {'type': 'hf', 'files': {name: text, or
    base64 for *.model}, 'ids': transformers' id of each of our ids, 'max_len'}. Encodes to transformers' ids (no
    special tokens; '<mask>' in text is plain text) and decodes to its text (special tokens skipped, stripped) with
    tokenizer.json (Unigram, byte-level BPE), else an XLMRobertaTokenizer *.model, else vocab.json + merges.txt."""
    fold = False

    def __init__(self, spec):
        files, self.spec, self._sp, self._norm, self._pre = spec['files'], spec, None, None, None
        config = json.loads(files.get('tokenizer_config.json', '{}'))
        named = {**json.loads(files.get('special_tokens_map.json', '{}')), **config}
        special = {'<s>', '</s>', '<unk>', '<pad>', '<mask>'} | {t['content'] for t in config.get(
            'added_tokens_decoder', {}).values() if t.get('special')} | {
            v['content'] if isinstance(v, dict) else v for k, v in named.items() if k.endswith('_token') and v}
        added, spm_file = [], next((n for n in sorted(files) if n.endswith('.model')), None)
        if 'tokenizer.json' in files:
            j = json.loads(files['tokenizer.json'])
            m, self._norm, self._pre = j['model'], j.get('normalizer'), j.get('pre_tokenizer')
            added = j.get('added_tokens', [])
            special |= {t['content'] for t in added if t.get('special')}
        elif spm_file:
            if config.get('tokenizer_class', 'XLMRobertaTokenizer').removesuffix('Fast') != 'XLMRobertaTokenizer':
                raise ValueError(f"{spm_file}: tokenizer_class {config['tokenizer_class']} is not supported (only "
                                 "XLMRobertaTokenizer's id layout: <s> <pad> </s> <unk>, SentencePiece id + 1, <mask>)")
            import sentencepiece as spm
            self._sp = spm.SentencePieceProcessor(model_proto=base64.b64decode(files[spm_file]))
            pieces = ['<s>', '<pad>', '</s>', '<unk>', *map(self._sp.id_to_piece, range(3, self._sp.get_piece_size()))]
            m = {'type': 'spm', 'vocab': {p: i for i, p in enumerate(pieces + ['<mask>'])}}
        elif 'vocab.json' in files and 'merges.txt' in files:
            m = {'type': 'BPE', 'vocab': json.loads(files['vocab.json']),
                 'merges': [x for x in files['merges.txt'].splitlines() if x and not x.startswith('#version')]}
            self._pre = {'type': 'ByteLevel', 'add_prefix_space': config.get('add_prefix_space', False)}
        else:
            raise ValueError(f"a tokenizer of type 'hf' needs tokenizer.json, a SentencePiece *.model or vocab.json + "
                             f"merges.txt among its files; it has {', '.join(sorted(files)) or 'none'}")
        self._kind, vocab = m['type'], m['vocab']
        if self._kind == 'Unigram':
            self._score, self._unk = [s for _, s in vocab], m.get('unk_id')
            vocab = {p: i for i, (p, _) in enumerate(vocab)}
            self._unk_score, self._longest = min(self._score, default=0) - 10, max(map(len, vocab), default=1)
        elif self._kind == 'BPE' and 'ByteLevel' in json.dumps(self._pre):
            self._ranks = {tuple(x.split(' ') if isinstance(x, str) else x): r for r, x in enumerate(m['merges'])}
            self._whole = m.get('ignore_merges', False)
        elif self._kind != 'spm':
            what = 'a BPE model without a byte-level pre-tokenizer' if self._kind == 'BPE' else f'a {self._kind} model'
            raise ValueError(f'tokenizer.json: {what} is not supported (Unigram, byte-level BPE)')
        _pre_tokenize(self._pre, [_normalize(self._norm, 'a')])  # an unsupported step fails now, not at a label
        self._vocab, self._cache = vocab, {}
        self._piece = {i: p for p, i in vocab.items()} | {t['id']: t['content'] for t in added}
        self._special = {i for i, p in self._piece.items() if p in special}
        self._clean = config.get('clean_up_tokenization_spaces') and self._kind != 'BPE'
        self._ours = {h: i for i, h in enumerate(spec['ids'][1:-2], 1)}  # text tokens only
        super().__init__([self._piece.get(h, '') for h in spec['ids'][1:-2]], spec.get('max_len', 25))

    def _unigram(self, w):
        """transformers' ids of one pre-tokenized word: the best-scoring split (Viterbi), unknown runs fused."""
        best = [(0.0, 0, None)] + [None] * len(w)  # (score, start, id) of the best path ending here
        for s in range(len(w)):
            for e in range(s + 1, min(len(w), s + self._longest) + 1):
                i = self._vocab.get(w[s:e])  # a character outside the vocabulary: unk, at unk_score
                score = self._score[i] if i is not None else self._unk_score if e == s + 1 else None
                if score is not None and (best[e] is None or best[s][0] + score > best[e][0]):
                    best[e] = (best[s][0] + score, s, self._unk if i is None else i)
        out, e = [], len(w)
        while e:
            out.insert(0, best[e][2])
            e = best[e][1]
        return [i for k, i in enumerate(out) if i is not None and not (i == self._unk and out[k - 1:k] == [i])]

    def _bpe(self, w):
        """transformers' ids of one pre-tokenized word: the best-ranked adjacent pair merged (the leftmost of equals,
        as tokenizers' priority queue), until none is."""
        if self._whole and w in self._vocab:
            return [self._vocab[w]]
        parts = list(w)
        while len(parts) > 1:
            rank, k = min((self._ranks.get(pair, float('inf')), k) for k, pair in enumerate(zip(parts, parts[1:])))
            if rank == float('inf'):
                break
            parts[k:k + 2] = [parts[k] + parts[k + 1]]
        return [self._vocab[p] for p in parts if p in self._vocab]

    def ids(self, text):
        if (out := self._cache.get(text)) is None:
            if self._sp:
                hf = [p + 1 if p >= 3 else 3 for p in self._sp.encode(text)]  # fairseq: <unk> = 3, piece id + 1
            else:
                word = self._unigram if self._kind == 'Unigram' else self._bpe
                hf = [i for w in _pre_tokenize(self._pre, [_normalize(self._norm, text)]) for i in word(w)]
            out = [self._ours[h] for h in hf if h in self._ours]
            if len(self._cache) < 100_000:  # labels repeat: ~50 us a word in Python
                self._cache[text] = out
        return list(out)

    def text(self, ids):
        pieces = [self._piece.get(h, '') for h in map(self.spec['ids'].__getitem__, ids) if h not in self._special]
        if self._kind == 'BPE':  # byte-level: a piece outside the table stands for its own UTF-8 bytes
            text = b''.join(bytes(map(_CHAR_BYTE.get, p)) if set(p) <= _CHAR_BYTE.keys() else p.encode()
                            for p in pieces).decode('utf-8', 'replace')
        else:
            text = ''.join(pieces).replace('\u2581', ' ')
        if self._clean:  # transformers' clean_up_tokenization
            for a, b in ((' .', '.'), (' ?', '?'), (' !', '!'), (' ,', ','), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text.strip()


def load_tokenizer(spec):
    """A tokenizer from its spec dict, or a CharTokenizer from a load_charset spec."""
    if isinstance(spec, str):
        return SPTokenizer(spec) if spec.endswith('.model') else CharTokenizer(load_charset(spec))
    if spec['type'] == 'hf':
        return HFTokenizer(spec)
    max_len = spec.get('max_len', 25)
    return CharTokenizer(spec['charset'], max_len) if spec['type'] == 'char' else SPTokenizer(
        base64.b64decode(spec['model']), max_len)

# ----------------------------------------------------------------------------- metrics (paper §5)

def edit_distance(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def score(preds, gts, charset=None, cased=False, punctuation=False):
    """-> dict(n, correct, ned_sum, error %, ned % (= 1-NED)), NED = edit distance / max(len(pred), len(gt)), both
    in scoring_form; a label of which the study's protocol keeps nothing (Greek under a tokenizer without a charset)
    is compared as written (NFC). An empty prediction reads nothing: never right for a non-empty label."""
    correct, ned_sum = 0, 0.0
    for pred, gt in zip(preds, gts, strict=True):
        p, g = (scoring_form(t, charset, cased, punctuation) for t in (pred, gt))
        if gt.strip() and not g:
            p, g = (unicodedata.normalize('NFC', t) for t in (pred, gt))
        if pred or not gt:
            correct += p == g
            ned_sum += 1.0 - (edit_distance(p, g) / max(len(p), len(g)) if p or g else 0.0)
    n = len(gts)
    return {'n': n, 'correct': correct, 'ned_sum': ned_sum, 'error': 100 * (1 - correct / n) if n else float('nan'),
            'ned': 100 * ned_sum / n if n else float('nan')}


def scoring_form(text, charset=None, cased=False, punctuation=False):
    """The study's protocol for no charset or an ASCII one that holds 0-9a-z (36 or 94 characters, in any order):
    accents folded (NFKD to ASCII), lower-cased, then only 0-9a-z kept (PARSeq's test.py; cased: upper case kept
    too, punctuation: its 32 symbols). Otherwise the text as written (NFC), lower-cased character by character when
    the charset has no upper-case letter (as clean_label reads labels): a charset of symbols is scored on them too."""
    if charset is None or charset.isascii() and set(CHARSET36) <= set(charset.lower()):
        keep = CHARSET36 + CHARSET94[36:62] * cased + CHARSET94[62:] * punctuation
        text = unicodedata.normalize('NFKD', text).encode('ascii', 'ignore').decode()
        return ''.join(c for c in (text if cased else text.lower()) if c in keep)
    text = unicodedata.normalize('NFC', text)
    return ''.join(map(str.lower, text)) if charset == charset.lower() else text


def weighted_average(results, key='error'):
    """The study's average over test sets: results[name][key] weighted by the set's size results[name]['n']."""
    return sum(r[key] * r['n'] for r in results.values()) / sum(r['n'] for r in results.values())

# ----------------------------------------------------------------------------- word renderer

@functools.cache
def _font(path, size):
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)


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


def missing_glyphs(font_path, text):
    """The characters of text the font lacks (not whitespace or format characters; all if the font is unreadable):
    drawn unshaped after an 'o' (which keeps a zero-width mark in the picture) they draw what U+FFFF draws (no font
    maps it: the .notdef box), or nothing."""
    try:  # font_path None: Pillow's built-in font
        font = (ImageFont.load_default(24) if font_path is None else ImageFont.truetype(font_path, 24)).font_variant(
            layout_engine=ImageFont.Layout.BASIC)
    except OSError:
        return ''.join(sorted(set(text)))
    drawings = {}
    for c in sorted(set(text)) + ['\uffff', '']:
        img = Image.new('L', font.getbbox('o' + c)[2:])
        ImageDraw.Draw(img).text((0, 0), 'o' + c, font=font, fill=255)
        drawings[c] = img.size, img.tobytes()
    return ''.join(c for c in sorted(set(text)) if not (c.isspace() or unicodedata.category(c) == 'Cf')
                   and drawings[c] in (drawings['\uffff'], drawings['']))


_SYNTH = {}  # a pool worker's synth settings, sent once per worker: a word list can be millions of words


def _synth_init(cfg):
    _SYNTH.update(cfg)


def _synth_shard(job):
    """Render and write shard i (samples start..start+count) -> (shards, charset)."""
    (i, start, count), c = job, _SYNTH
    rng, writer = random.Random(c['seed'] * 1000003 + i), ShardWriter(c['out_dir'], shard_size=count, start=i)
    clean = c['style'] == 'clean'
    fmt, ext, opts = ('PNG', 'png', {'compress_level': 1}) if clean else ('JPEG', 'jpg', {'quality': 90})
    for t in range(count):
        text = rng.choice(c['words']) if c['words'] else ''.join(
            rng.choice(c['charset']) for _ in range(rng.randint(c['min_len'], c['max_len'])))
        buf = io.BytesIO()
        render_word(text, rng, c['style'], c['fonts']).save(buf, fmt, **opts)
        writer.write(f'{start + t:09d}', buf.getvalue(), ext, text)
    return writer.close(), writer.charset


def _start_set(out_dir):
    """The open, locked UNFINISHED file of out_dir, there until write_index (find_shards refuses the folder): the
    shards of an unfinished set (its file unlocked: its writer is gone) are removed, a finished set is refused."""
    folder, marker = glob.escape(out_dir), os.path.join(out_dir, UNFINISHED)
    if glob.glob(os.path.join(folder, '*.tar')) and not os.path.exists(marker):
        raise FileExistsError(f'{out_dir} already holds shards: remove them or choose another folder')
    os.makedirs(out_dir, exist_ok=True)
    lock = open(marker, 'a')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise FileExistsError(f'{out_dir}: another synth or import is writing it') from None
    for path in glob.glob(os.path.join(folder, 'shard-*.tar*')):
        os.remove(path)
    return lock


def synth(out_dir, n, seed=0, style='clean', min_len=2, max_len=6, charset=CHARSET36, words=None, workers=None,
          shard_size=10000, fonts=None):
    """Render n word images into shards in out_dir on all cores; returns the index. words: list of str (else
    random strings of min_len..max_len chars over charset); fonts: list of font paths or a folder of them."""
    if fonts is not None and style == 'clean':
        raise ValueError("fonts are for style 'varied'; 'clean' draws with Pillow's built-in font")
    if isinstance(fonts, str):
        folder, fonts = fonts, sorted(p for p in glob.glob(os.path.join(fonts, '**', '*'), recursive=True)
                                      if p.lower().endswith(('.ttf', '.otf')))
        if not fonts:
            raise ValueError(f'no .ttf or .otf files in {folder} (or its sub-folders)')
    if not (n >= 1 and shard_size >= 1 and 1 <= min_len <= max_len) or words is not None and not words:
        raise ValueError(f'nothing to render: n={n}, shard_size={shard_size}, min_len={min_len}, max_len={max_len}, '
                         f'{"no words" if words is not None and not words else f"{len(words or [])} words"}')
    text = ''.join(words) if words else charset  # a font lacking a glyph draws a box or nothing: a wrong label
    lacking = {f: missing_glyphs(f, text) for f in fonts or [None]}
    if fonts is None and lacking[None]:
        raise ValueError(f"Pillow's built-in font lacks {lacking[None][:10]!r}: give --style varied --fonts DIR with "
                         'fonts that draw them')
    skipped = [f'{os.path.basename(f)} ({m[:10]!r})' for f, m in lacking.items() if m]
    if fonts is not None:
        fonts = [f for f in fonts if not lacking[f]]
        if not fonts:
            raise ValueError('no .ttf/.otf font draws every character of the text' + ': ' * bool(skipped)
                             + ', '.join(skipped[:5]))
    if skipped:
        print(f'data.py synth: skipped {len(skipped)} of {len(lacking)} fonts lacking glyphs: {", ".join(skipped[:5])}',
              file=sys.stderr)
    cfg = dict(out_dir=out_dir, seed=seed, style=style, min_len=min_len, max_len=max_len, charset=charset,
               words=words, fonts=fonts)
    jobs = [(i, s, min(shard_size, n - s)) for i, s in enumerate(range(0, n, shard_size))]
    shards, chars = {}, set()
    with _start_set(out_dir), Pool(workers or cpu_count(), initializer=_synth_init, initargs=(cfg,)) as pool:
        for sh, cs in tqdm(pool.imap_unordered(_synth_shard, jobs), total=len(jobs), desc='synth', unit='shard'):
            shards.update(sh)
            chars |= cs
        return write_index(out_dir, shards, chars, f'synth style={style} seed={seed}', {},
                           words=len(words) if words else None, fonts=len(fonts) if fonts else 'pillow-default',
                           fonts_skipped=len(skipped))

# ----------------------------------------------------------------------------- importers

def _check_sample(rec):
    """(where, image bytes or path, label) -> (bytes, ext, label) once the image decodes, or (None, reason, where)."""
    where, data, label = rec
    with contextlib.suppress(UnicodeDecodeError):  # LMDB labels are bytes
        label = label.decode('utf-8') if isinstance(label, bytes) else label
    reason = ('missing_label' if label is None else 'label_not_utf8' if isinstance(label, bytes) else
              'empty_label' if not label.strip() else
              'tab_in_label' if '\t' in label else  # a label file's further column, not a word
              'missing_image' if data is None or isinstance(data, str) and not os.path.isfile(data) else None)
    if reason:
        return None, reason, where
    data = Path(data).read_bytes() if isinstance(data, str) else data
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:
        return None, 'bad_image', where
    if img.format in ('PNG', 'JPEG'):
        return data, 'png' if img.format == 'PNG' else 'jpg', label
    buf = io.BytesIO()  # other formats are stored as PNG
    rgb(img).save(buf, 'PNG')
    return buf.getvalue(), 'png', label


def _import(records, out_dir, source, shard_size, workers, total=None, **extra):
    """Check records (where, image, label) on all cores and write the good ones to shards, in order. Nothing
    imported is an error naming the drop reasons and a record of each."""
    writer, drops, example, n = ShardWriter(out_dir, shard_size=shard_size), Counter(), {}, 0
    with _start_set(out_dir):
        with Pool(workers or cpu_count()) as pool:
            for r in tqdm(pool.imap(_check_sample, records, chunksize=64), total=total, desc='import', unit='img'):
                if r[0] is None:
                    drops[r[1]] += 1
                    example.setdefault(r[1], r[2])
                else:
                    writer.write(f'{n:09d}', *r)
                    n += 1
        dropped = ', '.join(f'{k} {v} (e.g. {example[k]})' for k, v in drops.most_common())
        if n == 0:
            raise ValueError(f'nothing imported from {source}: dropped {dropped or "nothing: no records"}')
        index = write_index(out_dir, writer.close(), writer.charset, source, drops, **extra)
    print(f'{out_dir}: {index["samples"]} samples in {len(index["shards"])} shards, dropped {dropped or 0}')
    return index


def import_lmdb(src, out_dir, shard_size=10000, workers=None, seed=0):
    """Scene-text LMDBs (num-samples, image-%09d, label-%09d, 1-based) under src, recursively -> one shard set,
    written in a seeded random order (so every shard mixes the sets)."""
    try:
        import lmdb
    except ImportError:
        sys.exit('import-lmdb needs the lmdb package: pip install lmdb')
    found = {}  # folders reached through symbolic links too, each once (a link cycle ends there)
    for root, dirs, files in os.walk(src, followlinks=True):
        if os.path.realpath(root) in found:
            dirs.clear()
            continue
        found[os.path.realpath(root)] = root if 'data.mdb' in files else None
    dbs = sorted(root for root in found.values() if root)
    if not dbs:
        raise FileNotFoundError(f'no data.mdb in {src} or its sub-folders')
    with contextlib.ExitStack() as stack:  # closes the environments
        txns, counts = {}, {}
        for db in dbs:
            try:
                env = stack.enter_context(lmdb.open(db, readonly=True, lock=False, readahead=False, meminit=False))
                txns[db] = env.begin()
                counts[db] = int(txns[db].get(b'num-samples', b'none'))
            except (lmdb.Error, ValueError) as e:
                raise ValueError(f"{db}: not a scene-text LMDB (with a 'num-samples' count): {e}") from None
        refs = [(db, i) for db, n in counts.items() for i in range(1, n + 1)]
        random.Random(seed).shuffle(refs)
        records = ((f'{db} sample {i}', txns[db].get(b'image-%09d' % i), txns[db].get(b'label-%09d' % i))
                   for db, i in refs)
        return _import(records, out_dir, os.path.abspath(src), shard_size, workers, len(refs),
                       parts={os.path.relpath(db, src): n for db, n in counts.items()})


def label_file_lines(labels_file, sep='\t', encoding='utf-8'):
    """[(line number, path, whether the line has sep, label)] of a label file's non-empty lines. A byte-order mark is
    skipped; a file that does not decode is a ValueError naming the line."""
    raw = Path(labels_file).read_bytes()
    try:
        text = raw.decode(encoding).removeprefix('\ufeff')  # a byte-order mark is no part of the first path
    except LookupError:
        raise ValueError(f'unknown encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)') from None
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b'\n') + 1
        raise ValueError(f'{labels_file} line {line}: not {encoding} ({e.reason}): give the file\'s --encoding '
                         '(e.g. latin-1)') from None
    return [(n, *ln.rstrip('\r').partition(sep)) for n, ln in enumerate(text.split('\n'), 1) if ln.strip()]


def import_folder(labels_file, out_dir, root=None, shard_size=10000, workers=None, seed=0, sep='\t',
                  encoding='utf-8'):
    """A label file of lines 'relative/path<sep>label' (paths relative to root, default: the file's folder; a
    folder: its one .tsv/.txt file), written in a seeded random order."""
    if os.path.isdir(labels_file):
        found = sorted(p for p in os.listdir(labels_file) if p.endswith(('.tsv', '.txt')))
        if len(found) != 1:
            raise FileNotFoundError(f'{labels_file} is a folder: give its labels file (lines relative/path{sep!r}'
                                    f'label), it holds {", ".join(found[:5]) if found else "no .tsv or .txt file"}')
        labels_file = os.path.join(labels_file, found[0])
        print(f'labels file: {labels_file}')
    root = os.path.dirname(os.path.abspath(labels_file)) if root is None else root
    lines = label_file_lines(labels_file, sep, encoding)
    random.Random(seed).shuffle(lines)
    records = ((f'{labels_file} line {n}: ' + (os.path.join(root, path) if has_sep else f'no {sep!r} (--sep)'),
                os.path.join(root, path), label if has_sep else None) for n, path, has_sep, label in lines)
    return _import(records, out_dir, os.path.abspath(labels_file), shard_size, workers, len(lines))

# ----------------------------------------------------------------------------- stats, spm, command line

def _labels(pattern):
    for path, _ in find_shards(pattern):
        yield from (row[0] for row in shard_index(path) if row[0] is not None)


def stats(pattern, charset_file=None):
    """Print a shard set's counts, label lengths, charset (labels in NFC, as training reads them) and drops."""
    shards, index, lengths, chars = find_shards(pattern), _read_index(pattern), Counter(), Counter()
    for label in tqdm(_labels(pattern), total=sum(n for _, n in shards), desc='labels', leave=False):
        lengths[len(label)] += 1
        chars.update(unicodedata.normalize('NFC', label))
    print(f'{pattern}: {sum(lengths.values())} samples in {len(shards)} shards (index: {index.get("samples")}), '
          f'source: {index.get("source")}')
    print('label length histogram:')
    for k in sorted(lengths):
        print(f'  {k:3d} {lengths[k]:9d} {"#" * max(1, round(50 * lengths[k] / max(lengths.values())))}')
    print(f'charset ({len(chars)}): {"".join(sorted(chars))}')
    print(f'import drops: {index.get("drops", {})}')
    if charset_file:
        charset = [c for c in sorted(chars) if not c.isspace()]  # labels never keep whitespace
        Path(charset_file).write_text(''.join(c + '\n' for c in charset), encoding='utf-8')
        print(f'wrote {charset_file}: {len(charset)} characters, one a line (train with --charset @{charset_file})')


def train_spm(pattern, vocab, out=None):
    """Train a SentencePiece BPE model on the shard labels (cleaned as in paper §5, no charset filter)."""
    import sentencepiece as spm
    out = out or os.path.join(pattern if os.path.isdir(pattern) else os.path.dirname(pattern), f'spm{vocab}.model')
    labels = (lab for lab, _ in map(clean_label, _labels(pattern)) if lab)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=labels, model_writer=buf, vocab_size=vocab, model_type='bpe',
                                   character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                                   add_dummy_prefix=False, normalization_rule_name='identity',
                                   hard_vocab_limit=False, input_sentence_size=2_000_000,
                                   shuffle_input_sentence=True, minloglevel=2)
    Path(out).write_bytes(buf.getvalue())
    print(f'wrote {out} ({SPTokenizer(out).vocab_size} ids incl. EOS/BOS/PAD)')
    return out


def _whole(text):  # an argparse type: a whole number of at least 1
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: give a whole number of at least 1')
    return int(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    a = sub.add_parser('synth', help='render word images into shards')
    a.add_argument('--n', type=_whole, required=True, help='number of images')
    a.add_argument('--style', choices=['clean', 'varied'], default='clean', help='clean = the CPU probe task')
    a.add_argument('--seed', type=int, default=0)
    a.add_argument('--min-len', type=_whole, default=2, help='random strings: shortest length')
    a.add_argument('--max-len', type=_whole, default=6, help='random strings: longest length')
    a.add_argument('--charset', default='36', help='characters of random strings: 36, 94, the characters, @FILE')
    a.add_argument('--words', help='word list file (one per line) instead of random strings')
    a.add_argument('--fonts', help='folder of .ttf/.otf fonts (default: Pillow built-in)')
    writers = [a, sub.add_parser('import-lmdb', help='import scene-text LMDBs (in a seeded random order)'),
               sub.add_parser('import-folder', help='import a label file (in a seeded random order)')]
    writers[1].add_argument('src', help='folder holding scene-text LMDBs (searched recursively)')
    writers[2].add_argument('labels_file', metavar='src', help='label file: lines relative/path<TAB>label')
    for a in writers:
        a.add_argument('out_dir', metavar='out', help='output folder')
        a.add_argument('--shard-size', type=_whole, default=10000, help='samples per shard')
        a.add_argument('--workers', type=int, default=None, help='processes (default: all cores)')
    writers[2].add_argument('--root', help="folder the image paths are relative to (default: the label file's)")
    writers[2].add_argument('--sep', default='\t', help='what separates path and label (default: a tab)')
    writers[2].add_argument('--encoding', default='utf-8', help='of the label file (default utf-8; BOM skipped)')
    a = sub.add_parser('stats', help='counts, label lengths, charset and drops of a shard set')
    a.add_argument('pattern', metavar='dir', help='shard folder or glob')
    a.add_argument('--charset', dest='charset_file', metavar='FILE', help="write the charset, for --charset @FILE")
    a = sub.add_parser('spm', help='train a SentencePiece BPE tokenizer on shard labels')
    a.add_argument('pattern', metavar='dir', help='shard folder or glob')
    a.add_argument('--vocab', type=_whole, required=True, help='SentencePiece pieces (ids = pieces + 3)')
    a.add_argument('--out', help='model path (default DIR/spmN.model)')
    args = vars(p.parse_args(argv))  # argument names are the functions' parameter names
    cmd = args.pop('cmd')
    try:
        if cmd == 'synth':
            args['charset'] = load_charset(args['charset'])
            if args['words']:
                try:
                    args['words'] = [w.strip() for w in open(args['words'], encoding='utf-8') if w.strip()]
                except UnicodeDecodeError as e:
                    raise ValueError(f'{args["words"]}: not UTF-8 ({e.reason})') from None
        index = {'synth': synth, 'import-lmdb': import_lmdb, 'import-folder': import_folder, 'stats': stats,
                 'spm': train_spm}[cmd](**args)
        if cmd == 'synth':
            print(f'{args["out_dir"]}: {index["samples"]} images in {len(index["shards"])} shards')
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: spm
        sys.exit(f'data.py {cmd}: {e}')


if __name__ == '__main__':
    main()
