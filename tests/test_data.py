"""Tests for data.py on tiny shards written to tmp dirs: python -m pytest tests/test_data.py -q"""
import io, json, os, random, sys, tarfile, types
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def png(value=128, size=(12, 6)):
    buf = io.BytesIO()
    Image.new('L', size, value).save(buf, 'PNG')
    return buf.getvalue()


def make_shards(d, sizes, prefix='x'):
    """Shards of the given sizes; sample i has label PREFIX + base-36 digits of i and a grey level i % 256."""
    w, i = data.ShardWriter(str(d), shard_size=10**9), 0
    for n in sizes:
        for _ in range(n):
            w.write(f'{i:09d}', png(i % 256), 'png', prefix + np.base_repr(i, 36).lower())
            i += 1
        w._finish()
    data.write_index(str(d), w.close(), w.charset, 'test', {})
    return i


def group_batches(stream, worker_id, num_workers, limit=None):
    """Iterate one DataLoader worker's share in this process (get_worker_info faked)."""
    orig = torch.utils.data.get_worker_info
    torch.utils.data.get_worker_info = lambda: types.SimpleNamespace(id=worker_id, num_workers=num_workers)
    try:
        stream._workers = num_workers
        out = []
        for b in stream:
            out.append(b)
            if limit and len(out) == limit:
                break
        return out
    finally:
        torch.utils.data.get_worker_info = orig


@pytest.mark.parametrize('sizes', [[10] * 7 + [3], [37], [5, 9]])
def test_split_covers_every_sample_once(tmp_path, sizes):
    n = make_shards(tmp_path, sizes)
    labels = []
    for rank in range(2):
        s = data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36, rank=rank, world_size=2, seed=3,
                             shuffle_buffer=5, loop=False)
        for w in range(2):
            labels += [t for _, y in group_batches(s, w, 2) for t in y]
    assert sorted(labels) == sorted('x' + np.base_repr(i, 36).lower() for i in range(n))


def test_loop_groups_never_run_dry(tmp_path):
    make_shards(tmp_path, [3])  # 3 samples, 4 groups: one group's slice is empty in every epoch but loops on
    s = data.ShardStream(str(tmp_path), 8, 16, 2, data.CHARSET36, rank=1, world_size=2, loop=True)
    for w in range(2):
        assert len(group_batches(s, w, 2, limit=3)) == 3


def test_one_proc_two_workers_equals_two_procs_one_worker(tmp_path):
    make_shards(tmp_path, [20] * 3)
    kw = dict(img_h=8, img_w=16, batch_size=4, charset=data.CHARSET36, seed=1, shuffle_buffer=7)
    one = data.ShardStream(str(tmp_path), world_size=1, **kw).loader(num_workers=2)
    a = [next(one) for _ in range(12)]
    ranks = [data.ShardStream(str(tmp_path), rank=r, world_size=2, **kw).loader(0) for r in range(2)]
    b = [next(ranks[i % 2]) for i in range(12)]  # 1x2 alternates groups 0,1 like the two ranks together
    for (xa, ya), (xb, yb) in zip(a, b):
        assert ya == yb and torch.equal(xa, xb)


def test_resume_yields_exactly_the_remaining_batches(tmp_path):
    make_shards(tmp_path / 'a', [15] * 3, 'a')
    make_shards(tmp_path / 'b', [11] * 2, 'b')
    kw = dict(sources=[(str(tmp_path / 'a'), 2), (str(tmp_path / 'b'), 1)], img_h=8, img_w=16, batch_size=4,
              charset=data.CHARSET36, seed=5, shuffle_buffer=6, augment=True)
    full = data.ShardStream(**kw).loader(2)
    ref = [next(full) for _ in range(20)]  # > one epoch of each source
    for stop in (5, 8):
        s = data.ShardStream(**kw)
        it = s.loader(2)
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(s.state_dict()))
        r = data.ShardStream(**kw)
        r.load_state_dict(state)
        it = r.loader(2)
        rest = [next(it) for _ in range(20 - stop)]
        assert [y for _, y in rest] == [y for _, y in ref[stop:]]
        assert all(torch.equal(x, xr) for (x, _), (xr, _) in zip(rest, ref[stop:]))
        assert r.state_dict()['batches'] == 20


def test_mixing_weights(tmp_path):
    make_shards(tmp_path / 'a', [50] * 4, 'a')
    make_shards(tmp_path / 'b', [50] * 4, 'b')
    s = data.ShardStream(f'{tmp_path / "a"}:3,{tmp_path / "b"}:1', 8, 16, 100, data.CHARSET36, shuffle_buffer=1)
    it = iter(s)
    labels = [t for _ in range(40) for t in next(it)[1]]
    frac = Counter(t[0] for t in labels)['a'] / len(labels)
    assert abs(frac - 0.75) < 0.02, frac


def test_samples_cap_is_nested(tmp_path):
    make_shards(tmp_path, [10] * 6)
    sets = []
    for D in (7, 25, 60):
        s = data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36, samples=D, loop=False, seed=D)
        assert s.num_samples == D
        sets.append({t for _, y in s for t in y})
        assert len(sets[-1]) == D
    assert sets[0] < sets[1] < sets[2]
    with pytest.raises(ValueError):
        data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36, samples=61)


def test_bad_samples_are_counted_not_fatal(tmp_path):
    w = data.ShardWriter(str(tmp_path))
    w.write('000000000', png(), 'png', 'good1')
    w.write('000000001', b'\x89PNG\r\n\x1a\nnot really', 'png', 'corrupt')
    w.write('000000002', png()[:40], 'png', 'truncated')
    w.write('000000003', png(), 'png', '@#$ %')          # empty after the charset filter
    w.write('000000004', png(), 'png', 'a' * 26)         # over max_len
    w.write('000000005', png(), 'png', ' Good 2 ')       # whitespace dropped, lower-cased
    w.write('000000006', png(), 'png', 'Café')           # NFKD -> 'cafe'
    w.close()
    with open(tmp_path / 'shard-000001.tar', 'wb') as f:  # a sample without its label, one without image
        with tarfile.open(fileobj=f, mode='w') as tf:
            for name, payload in (('000000007.png', png()), ('000000008.txt', b'nolabel')):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    s = data.ShardStream(str(tmp_path), 8, 16, 3, data.CHARSET36, loop=False)
    labels = [t for _, y in s for t in y]
    assert sorted(labels) == ['cafe', 'good1', 'good2']
    assert s.drops == {'bad_image': 2, 'empty_label': 1, 'too_long': 1, 'missing_label': 1, 'missing_image': 1}
    x, y = next(iter(data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36, loop=True)))
    assert x.shape == (4, 3, 8, 16) and len(y) == 4  # training batches stay full


def test_truncated_tar(tmp_path):
    make_shards(tmp_path, [10, 10])
    p = tmp_path / 'shard-000001.tar'
    p.write_bytes(p.read_bytes()[:3000])  # a few samples, then cut inside a member
    s = data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36, loop=False)
    labels = [t for _, y in s for t in y]
    assert 10 < len(labels) < 20 and s.drops['truncated_tar'] == 20 - len(labels)


def test_short_shard_and_corrupt_header_are_counted(tmp_path):
    make_shards(tmp_path, [10, 10])
    index = json.loads((tmp_path / 'index.json').read_text())
    index['shards']['shard-000000.tar'] = 12  # a stale index: two samples more than the shard holds
    (tmp_path / 'index.json').write_text(json.dumps(index))
    p = tmp_path / 'shard-000001.tar'
    raw = bytearray(p.read_bytes())
    raw[512 * 8 + 124:512 * 8 + 136] = b'zz garbage!!'  # a later member's size field is not octal
    p.write_bytes(bytes(raw))
    s = data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36, loop=False)
    labels = [t for _, y in s for t in y]
    assert len(labels) < 20 and s.drops['truncated_tar'] == 22 - len(labels)


def test_all_labels_filtered_is_an_error_not_a_hang(tmp_path):
    make_shards(tmp_path, [6])
    s = data.ShardStream(str(tmp_path), 8, 16, 4, '@#', loop=True)  # no label survives this charset
    with pytest.raises(RuntimeError, match='no usable sample.*charset'):
        next(iter(s))


def test_no_shards_error_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing_here.*data.py synth'):
        data.ShardStream(str(tmp_path / 'nothing_here'), 8, 16, 4, data.CHARSET36)


def test_lmdb_round_trip(tmp_path):
    lmdb = pytest.importorskip('lmdb')
    want = []
    for part, labels in (('a/train', ['Hello', 'wor ld', '', 'bad']), ('b', ['x9', 'Zz'])):
        os.makedirs(tmp_path / 'src' / part)
        env = lmdb.open(str(tmp_path / 'src' / part), map_size=1 << 22)
        with env.begin(write=True) as txn:
            for i, label in enumerate(labels, 1):
                img = b'garbage' if label == 'bad' else png(10 * i)
                txn.put(b'image-%09d' % i, img)
                txn.put(b'label-%09d' % i, label.encode())
                if label and label != 'bad':
                    want.append((label, 10 * i))
            txn.put(b'num-samples', str(len(labels)).encode())
        env.close()
    index = data.import_lmdb(str(tmp_path / 'src'), str(tmp_path / 'out'), shard_size=2, workers=1)
    assert index['samples'] == 4 and index['drops'] == {'empty_label': 1, 'bad_image': 1}
    assert index['parts'] == {'a/train': 4, 'b': 2}
    got = [files for p, _ in data.find_shards(str(tmp_path / 'out')) for _, _, files in data.read_tar(p)]
    assert [f['txt'].decode() for f in got] == [w for w, _ in want]
    assert [np.asarray(Image.open(io.BytesIO(f['png'])))[0, 0] for f in got] == [v for _, v in want]
    s = data.ShardStream(str(tmp_path / 'out'), 6, 12, 8, data.CHARSET94, loop=False)
    x, y = next(iter(s))
    assert sorted(y) == sorted(['Hello', 'world', 'x9', 'Zz'])
    assert torch.allclose(x[y.index('x9'), :, 0, 0], torch.full((3,), 10 / 127.5 - 1))


def test_import_folder(tmp_path):
    (tmp_path / 'img').mkdir()
    (tmp_path / 'img' / 'a.png').write_bytes(png())
    (tmp_path / 'img' / 'b.jpg').write_bytes(b'not a jpeg')
    (tmp_path / 'labels.tsv').write_text('img/a.png\tabc\nimg/b.jpg\tdef\nimg/missing.png\tghi\n')
    index = data.import_folder(str(tmp_path / 'labels.tsv'), str(tmp_path / 'out'), workers=1)
    assert index['samples'] == 1 and index['drops'] == {'bad_image': 1, 'missing_image': 1}


def test_clean_label():
    assert data.clean_label(' Ab c\t', data.CHARSET36) == ('abc', None)
    assert data.clean_label('Ab', data.CHARSET94) == ('Ab', None)
    assert data.clean_label('naïve', data.CHARSET94) == ('naive', None)
    assert data.clean_label('!!', data.CHARSET36) == (None, 'empty_label')
    assert data.clean_label('a' * 26, data.CHARSET36) == (None, 'too_long')


def test_metrics():
    assert data.edit_distance('abc', 'abd') == 1 and data.edit_distance('', 'abc') == 3
    assert data.edit_distance('kitten', 'sitting') == 3
    assert data.normalize36('Hello, World-9!') == 'helloworld9'
    r = data.score(['ABC', 'abd', '', 'x'], ['abc', 'abc', '', 'xyz'])
    assert r['n'] == 4 and r['correct'] == 2
    assert r['ned_sum'] == pytest.approx(1 + 2 / 3 + 1 + 1 / 3)
    assert sum(data.BENCHMARK_SIZES.values()) == 7248
    res = {'IC13': {'error': 10.0, 'n': 857}, 'IIIT5k': {'error': 20.0, 'n': 3000}}
    assert data.weighted_average(res) == pytest.approx((857 * 10 + 3000 * 20) / 3857)
    assert data.weighted_average({'SVT': {'n': 4, 'correct': 3, 'ned_sum': 3.5}}, 'ned') == pytest.approx(87.5)


def test_char_tokenizer():
    tok = data.CharTokenizer(data.CHARSET36)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (39, 0, 37, 38)
    ids = tok.encode(['ab', 'z', ''])
    assert ids.tolist() == [[37, 11, 12, 0], [37, 36, 0, 38], [37, 0, 38, 38]]
    assert tok.decode(ids) == ['ab', 'z', '']
    assert tok.decode(torch.tensor([[11, 0, 12], [38, 12, 37]])) == ['a', 'b']
    assert data.load_tokenizer(json.loads(json.dumps(tok.spec))).spec == tok.spec
    assert data.load_tokenizer('94').vocab_size == 97


def test_spm_tokenizer(tmp_path):
    rng = random.Random(0)
    words = ['the', 'then', 'there', 'hello', 'help', 'world', 'word', 'scaling', 'law']
    w = data.ShardWriter(str(tmp_path))
    for i in range(300):
        w.write(f'{i:09d}', b'', 'png', rng.choice(words) + rng.choice(words))
    w.close()
    path = data.train_spm(str(tmp_path), 40)
    tok = data.load_tokenizer(json.loads(json.dumps(data.SPTokenizer(path).spec)))
    ids = tok.encode(['thereworld', 'law'])
    assert ids[0, 0] == tok.bos_id and (ids[:, 1:] < tok.bos_id).logical_or(ids[:, 1:] == tok.pad_id).all()
    assert tok.decode(ids) == ['thereworld', 'law']


def test_synth_and_render(tmp_path):
    rng = random.Random(0)
    img = data.render_word('abc', rng, 'clean')
    arr = np.asarray(img)
    assert arr.min() < 100 and arr[0].min() == 255 and 9 < img.size[1] < 25  # dark ink, white margin
    index = data.synth(str(tmp_path / 's'), 30, seed=1, workers=1, shard_size=16)
    assert index['samples'] == 30 and len(index['shards']) == 2
    data.synth(str(tmp_path / 'v'), 10, style='varied', words=['Hello', 'World'], workers=1)
    y = [t for _, ys in data.ShardStream(str(tmp_path / 'v'), 8, 32, 4, data.CHARSET94, loop=False) for t in ys]
    assert sorted(set(y)) <= ['Hello', 'World'] and len(y) == 10
