"""Tests for data.py on tiny shards written to tmp dirs: python -m pytest tests/test_data.py -q"""
import glob, importlib.util, io, json, os, random, re, shutil, subprocess, sys, tarfile, time, unicodedata, zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from conftest import RangeHandler  # noqa: E402

FONT = '/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf'  # covers Greek and Cyrillic


def png(value=128, size=(12, 6)):
    buf = io.BytesIO()
    Image.new('L', size, value).save(buf, 'PNG')
    return buf.getvalue()


def name(i, prefix='x'):
    return prefix + np.base_repr(i, 36).lower()


def make_shards(d, sizes, prefix='x', start=0):
    """Shards of the given sizes, written in order; sample i has label name(i, prefix) and grey level i % 256."""
    w, i = data.ShardWriter(str(d), shard_size=10**9, start=start), 0
    for n in sizes:
        for _ in range(n):
            w.write(f'{i:09d}', png(i % 256), 'png', name(i, prefix))
            i += 1
        w._finish()
    data.write_index(str(d), w.close(), w.charset, 'test', {})
    return i


def labels_of(batches):
    return [t for _, y, _ in batches for t in y]


def take(it, n):
    return [next(it) for _ in range(n)]


def test_one_global_epoch_covers_the_data_whatever_the_layout(tmp_path):
    make_shards(tmp_path, [20] * 5)  # 100 images in 5 shards, 2 ranks x 2 workers, batches of 5
    seen = []
    for rank in range(2):
        s = data.ShardStream(str(tmp_path), 8, 16, 5, data.CHARSET36, rank=rank, world_size=2, seed=3)
        seen.append(labels_of(take(s.loader(2), 30)))  # 30 batches x 5 x 2 ranks = 3 epochs
    for epoch in range(3):  # positions [100e, 100e + 100): rank 0 holds the even batches of 5, rank 1 the odd
        assert len(set(seen[0][50 * epoch:50 * epoch + 50] + seen[1][50 * epoch:50 * epoch + 50])) == 100
    assert seen[0][:50] != seen[0][50:100]  # a fresh order every epoch


@pytest.mark.parametrize('sizes', [[10] * 7 + [3], [37]])
def test_evaluation_reads_every_sample_once_over_ranks_and_workers(tmp_path, sizes):
    n = make_shards(tmp_path, sizes)
    labels = []
    for rank in range(2):
        s = data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36, rank=rank, world_size=2, loop=False)
        labels += labels_of(s.loader(2))
    assert sorted(labels) == sorted(name(i) for i in range(n))


def test_a_set_smaller_than_the_groups_feeds_every_group(tmp_path):
    make_shards(tmp_path, [3])  # 3 samples, 2 ranks x 2 workers, batches of 2
    for rank in range(2):
        s = data.ShardStream(str(tmp_path), 8, 16, 2, data.CHARSET36, rank=rank, world_size=2)
        assert [len(y) for _, y, _ in take(s.loader(2), 3)] == [2, 2, 2]


def test_batches_mix_a_union_from_the_first_batch(tmp_path):
    make_shards(tmp_path, [250, 250], 'a')  # set A, then set B, in source order (the worst case)
    make_shards(tmp_path, [250, 250], 'b', start=2)
    s = data.ShardStream(str(tmp_path), 8, 16, 64, data.CHARSET36)
    for _, y, _ in take(iter(s), 8):
        assert 0.15 <= sum(t[0] == 'a' for t in y) / 64 <= 0.85


def test_mixing_weights(tmp_path):
    make_shards(tmp_path / 'a', [50] * 4, 'a')
    make_shards(tmp_path / 'b', [50] * 4, 'b')
    s = data.ShardStream(f'{tmp_path / "a"}:3,{tmp_path / "b"}:1', 8, 16, 100, data.CHARSET36)
    labels = labels_of(take(iter(s), 40))
    assert abs(Counter(t[0] for t in labels)['a'] / len(labels) - 0.75) < 0.02


def test_samples_cap_is_uniform_nested_and_proportional(tmp_path):
    make_shards(tmp_path / 'a', [50] * 4, 'a')
    make_shards(tmp_path / 'b', [50] * 4, 'b')
    src = [(str(tmp_path / 'a'), 1), (str(tmp_path / 'b'), 1)]
    sets = []
    for D in (20, 60, 100):
        s = data.ShardStream(src, 8, 16, 7, data.CHARSET36, samples=D, loop=False, seed=D)
        assert s.num_samples == D
        sets.append(set(labels_of(s)))
        assert len(sets[-1]) == D and sum(t[0] == 'a' for t in sets[-1]) == D // 2
    assert sets[0] < sets[1] < sets[2]
    shards_hit = {int(t[1:], 36) // 50 for t in sets[1] if t[0] == 'a'}
    assert len(shards_hit) >= 3  # a random subset, not the first shard
    other = data.ShardStream(src, 8, 16, 7, data.CHARSET36, samples=60, loop=False, data_seed=1)
    assert set(labels_of(other)) != sets[1]
    with pytest.raises(ValueError, match='asks 201'):
        data.ShardStream(src, 8, 16, 4, data.CHARSET36, samples=402)
    weighted = data.ShardStream([(src[0][0], 2), (src[1][0], 1)], 8, 16, 7, data.CHARSET36, samples=100)
    assert weighted.sizes == [67, 33] and weighted.num_samples == 100
    assert data.largest_remainder(10**6, [1, 1, 1]).tolist() == [333334, 333333, 333333]


def test_the_order_depends_on_the_global_position_only(tmp_path):
    make_shards(tmp_path / 'a', [15] * 3, 'a')
    make_shards(tmp_path / 'b', [11] * 2, 'b')
    kw = dict(sources=[(str(tmp_path / 'a'), 2), (str(tmp_path / 'b'), 1)], img_h=8, img_w=16, charset=data.CHARSET36,
              seed=5, augment=True)
    ref = take(data.ShardStream(batch_size=12, **kw).loader(0), 10)  # 120 positions: > one epoch of each source
    ref_labels, ref_images = labels_of(ref), torch.cat([x for x, _, _ in ref])
    # 2 ranks x 3 workers x micro-batches of 2 (rank r's micro-batch j: positions (2j + r) * 2 + [0, 2)),
    # resumed at position 36 (any integer).
    ranks = [data.ShardStream(batch_size=2, rank=r, world_size=2, **kw).loader(3, start=36) for r in range(2)]
    got = [next(ranks[j % 2]) for j in range(42)]
    assert labels_of(got) == ref_labels[36:]
    assert torch.equal(torch.cat([x for x, _, _ in got]), ref_images[36:])  # augmentation drawn per position


def test_keyed_permutations_are_bijections_that_keep_blocks_together():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        for key in ((0,), (5, 1, 2)):
            assert sorted(data.permute(np.arange(n), n, key)) == list(range(n))
    p = data.permute_blocks(np.arange(103), 103, 10, (3,))
    assert sorted(p) == list(range(103)) and p[100:].tolist() == [100, 101, 102]  # the partial block stays last
    assert all(p[b] % 10 == 0 and (p[b:b + 10] == p[b] + np.arange(10)).all() for b in range(0, 100, 10))
    assert p[:100].tolist() != list(range(100))
    assert data.permute_blocks(np.arange(3), 3, 5, (1,)).tolist() == [0, 1, 2]  # fewer numbers than a block


def test_index_is_built_once_and_workers_get_no_tables(tmp_path, monkeypatch):
    import pickle
    make_shards(tmp_path, [500, 500])
    s = data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36)
    next(iter(s))
    assert len(pickle.dumps(s)) < 5000  # what a spawned worker receives: paths and counts, no per-sample table
    monkeypatch.setattr(data, 'shard_index', lambda path: pytest.fail('indexed again'))
    again = data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36)
    assert again.num_samples == 1000
    reads, opens = [], []
    monkeypatch.setattr(os, 'pread', lambda fd, n, off, pread=os.pread: reads.append(n) or pread(fd, n, off))
    monkeypatch.setattr(os, 'open', lambda *a, open_=os.open, **k: opens.append(a[0]) or open_(*a, **k))
    assert len(labels_of(take(again.loader(0), 100))) == 400
    assert 390 <= len(reads) <= 400 and len(opens) == 2  # a read per sample (neighbours: one), each shard opened once


def test_drops_are_counted_and_D_is_usable_images(tmp_path):
    w = data.ShardWriter(str(tmp_path))
    w.write('000000000', png(), 'png', 'good1')
    w.write('000000001', b'\x89PNG\r\n\x1a\nnot really', 'png', 'corrupt')
    w.write('000000002', png(), 'png', '@#$ %')          # empty after the charset filter
    w.write('000000003', png(), 'png', 'a' * 26)         # over max_len
    w.write('000000004', png(), 'png', ' Good 2 ')       # whitespace dropped, lower-cased
    w.write('000000005', png(), 'png', 'Café')           # NFKD -> 'cafe'
    w.write('000000006', png(), 'png', '')               # empty
    w.close()
    with open(tmp_path / 'shard-000001.tar', 'wb') as f:  # a sample without its label, one without image
        with tarfile.open(fileobj=f, mode='w') as tf:
            for member, payload in (('000000007.png', png()), ('000000008.txt', b'nolabel')):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    s = data.ShardStream(str(tmp_path), 8, 16, 3, data.CHARSET36, loop=False)
    assert s.num_samples == 4 and s.drops == {'empty_label': 2, 'too_long': 1, 'missing_label': 1,
                                              'missing_image': 1}
    batches = list(s)
    assert sorted(labels_of(batches)) == ['cafe', 'good1', 'good2'] and sum(b for _, _, b in batches) == 1
    x, y, bad = next(iter(data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36)))  # one epoch: 4 positions
    assert x.shape == (3, 8, 16, 3) and x.dtype == torch.uint8 and len(y) == 3 and bad == 1  # skipped, counted


def test_long_labels_are_skipped_never_cut(tmp_path):
    w = data.ShardWriter(str(tmp_path))
    for i, label in enumerate(['a' * 30, 'short', 'b' * 41]):
        w.write(f'{i:09d}', png(), 'png', label)
    w.close()
    tok = data.CharTokenizer(data.CHARSET36, max_len=40)
    s = data.ShardStream(str(tmp_path), 8, 16, 3, None, max_len=40, loop=False, tokenizer=tok)
    y = labels_of(s)
    assert sorted(y) == ['a' * 30, 'short'] and s.drops == {'too_long': 1}
    assert tok.encode(y).shape == (2, 32)
    s = data.ShardStream(str(tmp_path), 8, 16, 3, data.CHARSET36, max_len=25, loop=False)
    assert labels_of(s) == ['short'] and s.drops == {'too_long': 2}


def test_truncated_tar_is_counted(tmp_path):
    make_shards(tmp_path, [10, 10])
    p = tmp_path / 'shard-000001.tar'
    p.write_bytes(p.read_bytes()[:5000])  # a few samples, then cut inside a member: the sidecar is stale
    s = data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36, loop=False)
    labels = labels_of(s)
    assert 10 < len(labels) < 20 and s.drops == {'truncated_tar': 20 - len(labels)}
    assert sorted(labels) == sorted(name(i) for i in range(len(labels)))


def test_reads_stay_near_a_mebibyte_however_large_the_batch(tmp_path):
    # 300 noise PNGs of ~30 KB, adjacent in one shard: an evaluation batch of all of them is read in ~1 MiB pieces
    rng, w = np.random.default_rng(0), data.ShardWriter(str(tmp_path))
    for k in range(300):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (60, 160, 3), dtype=np.uint8)).save(buf, 'PNG')
        w.write(f'{k:06d}', buf.getvalue(), 'png', name(k))
    data.write_index(str(tmp_path), w.close(), w.charset, 'test', {})
    s = data.ShardStream(str(tmp_path), 8, 16, 300, data.CHARSET36, loop=False)
    reads, fetch = [], s._fetch
    s._fetch = lambda path, start, length: (reads.append(length), fetch(path, start, length))[1]
    [(_, labels, _)] = list(s)
    assert sorted(labels) == sorted(name(k) for k in range(300))
    assert sum(reads) > 8 * 2**20 and max(reads) < 2**20 + 40_000 and len(reads) < 12, reads


def test_corrupt_header_and_stale_index_are_counted(tmp_path):
    make_shards(tmp_path, [10, 10])
    index = json.loads((tmp_path / 'index.json').read_text())
    index['shards']['shard-000000.tar'] = 12  # a stale index: two samples more than the shard holds
    (tmp_path / 'index.json').write_text(json.dumps(index))
    p = tmp_path / 'shard-000001.tar'
    os.remove(str(p) + '.idx')  # no sidecar: the shard is scanned with tarfile
    raw = bytearray(p.read_bytes())
    raw[512 * 8 + 124:512 * 8 + 136] = b'zz garbage!!'  # a later member's size field is not octal
    p.write_bytes(bytes(raw))
    s = data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36, loop=False)
    labels = labels_of(s)
    assert 10 < len(labels) < 20 and s.drops == {'truncated_tar': 22 - len(labels)}
    assert os.path.exists(str(p) + '.idx')  # the scan was saved as the sidecar


def test_tarfile_archives_with_long_names(tmp_path):
    folder = 'f' * 120
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        d = tmp_path / str(fmt)
        d.mkdir()
        with tarfile.open(d / 'x.tar', 'w', format=fmt) as tf:
            tf.addfile(_dir(folder))
            for i in range(5):
                for ext, payload in (('png', png(i)), ('txt', name(i).encode())):
                    info = tarfile.TarInfo(f'{folder}/{i:03d}.{ext}')
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
        with tarfile.open(d / 'x.tar') as tf:  # the reference: tarfile's own reading
            want = [tf.extractfile(m).read().decode() for m in tf if m.name.endswith('.txt')]
        s = data.ShardStream(str(d), 8, 16, 8, data.CHARSET36, loop=False)
        x, y, _ = next(iter(s))
        assert y == want and x.shape[0] == 5 and s.drops == {}


def test_shard_writer_offsets_and_headers_are_tarfiles(tmp_path):
    make_shards(tmp_path, [3])
    with tarfile.open(tmp_path / 'shard-000000.tar') as tf:  # offsets and headers in the sidecar = tarfile's
        want = [(m.offset_data, m.size, zlib.crc32(m.tobuf(tarfile.USTAR_FORMAT))) for m in tf if m.name.endswith('png')]
    rows = data.shard_index(str(tmp_path / 'shard-000000.tar'))
    assert [tuple(r[1:]) for r in rows] == want and [r[0] for r in rows] == [name(i) for i in range(3)]


def _dir(path):
    info = tarfile.TarInfo(path)
    info.type = tarfile.DIRTYPE
    return info


def test_all_labels_filtered_is_a_one_line_error(tmp_path):
    make_shards(tmp_path, [6])
    with pytest.raises(ValueError, match='no usable sample.*charset'):
        data.ShardStream(str(tmp_path), 8, 16, 4, '@#')


def test_no_shards_error_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing_here.*data.py synth'):
        data.ShardStream(str(tmp_path / 'nothing_here'), 8, 16, 4, data.CHARSET36)


def test_lmdb_round_trip_writes_a_mixed_order(tmp_path):
    lmdb = pytest.importorskip('lmdb')
    want = {}
    parts = (('a/train', ['Hello', 'wor ld', '', 'bad'] + [f'a{i}' for i in range(60)]),
             ('b', ['x9', 'Zz'] + [f'b{i}' for i in range(62)]))
    for part, labels in parts:
        os.makedirs(tmp_path / 'src' / part)
        env = lmdb.open(str(tmp_path / 'src' / part), map_size=1 << 22)
        with env.begin(write=True) as txn:
            for i, label in enumerate(labels, 1):
                txn.put(b'image-%09d' % i, b'garbage' if label == 'bad' else png(i))
                txn.put(b'label-%09d' % i, label.encode())
                if label and label != 'bad':
                    want[label] = i
            txn.put(b'num-samples', str(len(labels)).encode())
        env.close()
    index = data.import_lmdb(str(tmp_path / 'src'), str(tmp_path / 'out'), shard_size=64, workers=1)
    assert index['samples'] == 126 and index['drops'] == {'empty_label': 1, 'bad_image': 1}
    assert index['parts'] == {'a/train': 64, 'b': 64}
    first = data.shard_index(data.find_shards(str(tmp_path / 'out'))[0][0])  # the first shard, in written order
    assert 0.15 <= sum(row[0][0] in 'aHw' for row in first) / len(first) <= 0.85
    got = {}
    for path, _ in data.find_shards(str(tmp_path / 'out')):
        with open(path, 'rb') as f:
            for label, image, size, _ in data.shard_index(path):
                f.seek(image)
                got[label] = np.asarray(Image.open(io.BytesIO(f.read(size))))[0, 0]
    assert got == want
    s = data.ShardStream(str(tmp_path / 'out'), 6, 12, 200, data.CHARSET94, loop=False)
    x, y, _ = next(iter(s))
    assert {'Hello', 'world', 'x9', 'Zz'} <= set(y) and len(y) == 126
    assert x[y.index('x9'), 0, 0].tolist() == [1, 1, 1]  # the image stored with it (grey level 1)


def test_import_folder(tmp_path):
    (tmp_path / 'img').mkdir()
    (tmp_path / 'img' / 'a.png').write_bytes(png())
    (tmp_path / 'img' / 'b.jpg').write_bytes(b'not a jpeg')
    (tmp_path / 'labels.tsv').write_text('img/a.png\tabc\nimg/b.jpg\tdef\nimg/missing.png\tghi\n')
    index = data.import_folder(str(tmp_path / 'labels.tsv'), str(tmp_path / 'out'), workers=1)
    assert index['samples'] == 1 and index['drops'] == {'bad_image': 1, 'missing_image': 1}


def run_cli(argv):
    """data.main(argv) -> its one-line error, or None when it succeeds."""
    try:
        data.main(argv)
    except SystemExit as e:
        return str(e.code)


def test_import_folder_says_what_is_wrong_with_a_label_file(tmp_path, capsys):
    words = ['abc', 'dé', 'ghi', 'jk']
    (tmp_path / 'img').mkdir()
    for i in range(len(words)):
        (tmp_path / 'img' / f'{i}.png').write_bytes(png(40 * i))
    lines = [f'img/{i}.png\t{w}\n' for i, w in enumerate(words)]

    def imported(out):
        return sorted(data._labels(str(tmp_path / out)))

    def cli(name, out, *flags):
        return run_cli(['import-folder', str(tmp_path / name), str(tmp_path / out), '--workers', '1', *flags])

    (tmp_path / 'spaced.txt').write_text(''.join(ln.replace('\t', ' ') for ln in lines), encoding='utf-8')
    err = cli('spaced.txt', 'o1')
    assert err.startswith('data.py import-folder: nothing imported') and 'missing_label 4' in err
    assert re.search(r"spaced.txt line [1-4]: no '\\t' \(--sep\)", err) and '\n' not in err
    assert not glob.glob(str(tmp_path / 'o1' / '*.tar'))
    assert cli('spaced.txt', 'o2', '--sep', ' ') is None and imported('o2') == sorted(words)

    (tmp_path / 'good.tsv').write_text(''.join(lines), encoding='utf-8')
    err = cli('good.tsv', 'o3', '--root', str(tmp_path / 'elsewhere'))
    assert 'missing_image 4' in err and str(tmp_path / 'elsewhere' / 'img') in err

    # a byte-order mark keeps the first line; a tab inside a label is a counted drop
    (tmp_path / 'bom.tsv').write_text(''.join(lines[:3]) + 'img/3.png\tjk\tmore\n', encoding='utf-8-sig')
    assert cli('bom.tsv', 'o4') is None and imported('o4') == sorted(words[:3])
    assert json.loads((tmp_path / 'o4' / 'index.json').read_text())['drops'] == {'tab_in_label': 1}
    assert 'tab_in_label 1 (e.g. ' in capsys.readouterr().out

    (tmp_path / 'latin1.tsv').write_text(''.join(lines), encoding='latin-1')
    err = cli('latin1.tsv', 'o5')
    assert f'latin1.tsv line {words.index("dé") + 1}: not utf-8' in err and '--encoding' in err
    assert cli('latin1.tsv', 'o6', '--encoding', 'latin-1') is None and imported('o6') == sorted(words)

    (tmp_path / 'one').mkdir()
    shutil.copytree(tmp_path / 'img', tmp_path / 'one' / 'img')
    shutil.copy(tmp_path / 'good.tsv', tmp_path / 'one' / 'labels.tsv')
    assert cli('one', 'o7') is None and imported('o7') == sorted(words)
    assert 'labels file: ' + str(tmp_path / 'one' / 'labels.tsv') in capsys.readouterr().out
    err = cli('.', 'o8')  # a folder with several label files
    assert 'is a folder: give its labels file' in err and all(f in err for f in ('bom.tsv', 'good.tsv', 'spaced.txt'))
    assert 'no .tsv or .txt file' in cli('img', 'o9')


def test_stats_writes_the_charset_for_training(tmp_path, capsys):
    labels = [unicodedata.normalize('NFD', 'Αθήνα'), 'книга', 'a b', 'Zz9']
    w = data.ShardWriter(str(tmp_path / 's'))
    for i, label in enumerate(labels):
        w.write(f'{i:09d}', png(), 'png', label)
    data.write_index(str(tmp_path / 's'), w.close(), w.charset, 'test', {})
    assert run_cli(['stats', str(tmp_path / 's'), '--charset', str(tmp_path / 'cs.txt')]) is None
    assert f'--charset @{tmp_path / "cs.txt"}' in capsys.readouterr().out
    want = sorted(set(unicodedata.normalize('NFC', ''.join(labels)).replace(' ', '')))  # 'ή' composed, no space
    assert (tmp_path / 'cs.txt').read_text(encoding='utf-8').splitlines() == want
    tok = data.load_tokenizer(f'@{tmp_path / "cs.txt"}')
    assert sorted(tok.charset) == want and not tok.fold
    cleaned = [data.clean_label(t, tok.charset, fold=tok.fold)[0] for t in labels]
    assert tok.decode(tok.encode(cleaned)) == cleaned == ['Αθήνα', 'книга', 'ab', 'Zz9']


@pytest.mark.skipif(not os.path.exists(FONT), reason=f'needs {FONT}')
def test_synth_skips_fonts_without_the_glyphs(tmp_path, capsys):
    subset = pytest.importorskip('fontTools.subset')
    from fontTools.ttLib import TTFont
    fonts = tmp_path / 'fonts'
    fonts.mkdir()
    shutil.copy(FONT, fonts / 'full.ttf')
    for name, box in (('latin_box.ttf', True), ('latin_blank.ttf', False)):  # .notdef drawn as a box / as nothing
        font, options = TTFont(FONT), subset.Options()
        options.notdef_outline = box
        subsetter = subset.Subsetter(options)
        subsetter.populate(unicodes=range(0x20, 0x7f))
        subsetter.subset(font)
        font.save(fonts / name)
    text = ''.join(map(chr, [*range(0x21, 0x7f), *range(0xc0, 0x180), *range(0x370, 0x3d0), *range(0x400, 0x460),
                             *range(0x590, 0x5f0), *range(0x4e00, 0x4e10), 0x301, 0x308]))  # Hebrew marks, CJK
    for path in fonts.iterdir():  # what the font maps, read from its cmap table
        cmap = TTFont(path).getBestCmap()
        assert data.missing_glyphs(str(path), text) == ''.join(sorted(c for c in text if ord(c) not in cmap))
    (fonts / 'broken.ttf').write_bytes(b'not a font')
    (tmp_path / 'ru.txt').write_text('мир\nкнига\nabc\n', encoding='utf-8')
    argv = ['synth', str(tmp_path / 'out'), '--n', '8', '--style', 'varied', '--fonts', str(fonts), '--workers', '1']
    assert run_cli(argv + ['--words', str(tmp_path / 'ru.txt')]) is None
    index = json.loads((tmp_path / 'out' / 'index.json').read_text())
    assert (index['samples'], index['fonts'], index['fonts_skipped']) == (8, 1, 3)
    skipped = [ln for ln in capsys.readouterr().err.splitlines() if 'skipped' in ln]
    assert len(skipped) == 1 and all(f in skipped[0] for f in ('3 of 4', 'latin_box', 'latin_blank', 'broken'))
    (tmp_path / 'cjk.txt').write_text('漢字\n', encoding='utf-8')
    argv[1] = str(tmp_path / 'out2')
    err = run_cli(argv + ['--words', str(tmp_path / 'cjk.txt')])
    assert err.startswith('data.py synth: no .ttf/.otf font draws every character') and '\n' not in err
    (tmp_path / 'empty').mkdir()
    for extra, message in ((['--fonts', str(tmp_path / 'empty')], f'no .ttf or .otf files in {tmp_path / "empty"}'),
                           (['--style', 'clean'], "fonts are for style 'varied'")):
        argv[1] = str(tmp_path / f'out{len(message)}')
        assert run_cli(argv + extra).startswith(f'data.py synth: {message}')


def test_load_charset(tmp_path):
    assert data.load_charset('36') == data.CHARSET36 and data.load_charset('94') == data.CHARSET94
    assert data.load_charset('αβγα') == 'αβγ'
    (tmp_path / 'lines.txt').write_text('я\nж\n漢\n', encoding='utf-8')
    (tmp_path / 'one.txt').write_text('αβγ\n', encoding='utf-8')
    assert data.load_charset(f'@{tmp_path / "lines.txt"}') == 'яж漢'
    assert data.load_charset(f'@{tmp_path / "one.txt"}') == 'αβγ'
    for bad in (f'@{tmp_path / "missing.txt"}', ' \n'):
        with pytest.raises(ValueError, match='charset'):
            data.load_charset(bad)
    assert data.CharTokenizer(data.CHARSET94).fold and not data.CharTokenizer('αβγ').fold


def test_clean_label():
    assert data.clean_label(' Ab c\t', data.CHARSET36) == ('abc', None)
    assert data.clean_label('Ab', data.CHARSET94) == ('Ab', None)
    assert data.clean_label('naïve', data.CHARSET94) == ('naive', None)
    assert data.clean_label('Straße', data.CHARSET94) == ('Strae', None)
    assert data.clean_label('!!', data.CHARSET36) == (None, 'empty_label')
    assert data.clean_label('a' * 26, data.CHARSET36) == (None, 'too_long')
    greek = 'αβγδεζηθικλμνξοπρστυφχψωάέήίόύώ'
    decomposed = unicodedata.normalize('NFD', 'Αθήνα')
    assert data.clean_label(decomposed, greek, fold=False) == ('αθήνα', None)  # as written, NFC, lower-cased
    assert data.clean_label('Straße', 'Straße', fold=False) == ('Straße', None)
    assert data.clean_label('東京タワー', '東京', fold=False) == ('東京', None)


def test_char_tokenizer():
    tok = data.CharTokenizer(data.CHARSET36)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id, tok.fold) == (39, 0, 37, 38, True)
    ids = tok.encode(['ab', 'z', ''])
    assert ids.tolist() == [[37, 11, 12, 0], [37, 36, 0, 38], [37, 0, 38, 38]]
    assert tok.decode(ids) == ['ab', 'z', '']
    assert tok.decode(torch.tensor([[11, 0, 12], [38, 12, 37]])) == ['a', 'b']
    assert tok.encode(['ab'], length=25).shape == (1, 27) and tok.tokens == list(data.CHARSET36)
    with pytest.raises(ValueError, match='never cut'):
        tok.encode(['a' * 26])
    assert data.load_tokenizer(json.loads(json.dumps(tok.spec))).spec == tok.spec
    assert data.load_tokenizer('94').vocab_size == 97
    cjk = data.load_tokenizer('東京大阪')
    assert not cjk.fold and cjk.decode(cjk.encode(['大阪東京'])) == ['大阪東京']


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
    assert tok.decode(ids) == ['thereworld', 'law'] and tok.fold
    assert tok.tokens[:1] == [tok.sp.id_to_piece(0)] and len(tok.tokens) == tok.vocab_size - 3


def test_metrics():
    assert data.edit_distance('abc', 'abd') == 1 and data.edit_distance('', 'abc') == 3
    assert data.edit_distance('kitten', 'sitting') == 3
    assert data.scoring_form('Hello, World-9!') == 'helloworld9'
    assert data.scoring_form('Hello, World-9!', cased=True) == 'HelloWorld9'
    assert data.scoring_form('Hello, World-9!', punctuation=True) == 'hello,world-9!'
    assert data.scoring_form('Hello, World-9!', data.CHARSET94, True, True) == 'Hello,World-9!'  # the space: not in 94
    r = data.score(['ABC', 'abd', '', 'x'], ['abc', 'abc', '', 'xyz'])
    assert r['n'] == 4 and r['correct'] == 2 and r['error'] == 50.0
    assert r['ned_sum'] == pytest.approx(1 + 2 / 3 + 1 + 1 / 3) and r['ned'] == pytest.approx(75)
    r = data.score(['ABC', 'αβδ', 'мир'], ['abc', 'αβγ', 'мир'], 'ABCαβγδмир')  # as written
    assert r['correct'] == 1 and r['ned_sum'] == pytest.approx(0 + 2 / 3 + 1)
    res = {'IC13': {'error': 10.0, 'n': 857}, 'IIIT5k': {'error': 20.0, 'n': 3000}}
    assert data.weighted_average(res) == pytest.approx((857 * 10 + 3000 * 20) / 3857)
    assert data.weighted_average({'SVT': {'n': 4, 'ned': 87.5}, 'IC13': {'n': 1, 'ned': 50.0}}, 'ned') == 80.0


def test_charset_files_and_labels_compose_as_written_and_scripts_without_the_protocol_score_as_written(tmp_path):
    (tmp_path / 'fr.txt').write_text(unicodedata.normalize('NFD', 'aeiouc\néèçü'), encoding='utf-8')
    (tmp_path / 'bom.txt').write_bytes('\ufeff'.encode() + data.CHARSET36.encode())
    assert data.load_charset(f'@{tmp_path / "fr.txt"}') == 'aeioucéèçü'  # composed, as labels are read
    assert data.load_charset(f'@{tmp_path / "bom.txt"}') == data.CHARSET36
    greek = 'αβγδεζηθικλμνξοπρστυφχψω'
    assert data.clean_label('ΟΔΟΣ', greek, fold=False) == ('οδοσ', None)  # a capital sigma is σ at a word's end too
    # no charset (a converted tokenizer): Greek kept whole, Latin in the study's protocol (accents folded)
    r = data.score(['привет', 'αβγ', 'cafe', 'Hello'], ['αβγ', 'αβγ', 'café', 'hello'])
    assert r['correct'] == 3 and r['ned_sum'] == pytest.approx(0 + 1 + 1 + 1)


def test_folding_and_case_follow_the_charset_content():
    shuffled = ''.join(random.Random(0).sample(data.CHARSET94, 94))  # the study's 94 characters in another order
    assert data.CharTokenizer(shuffled).fold and data.CharTokenizer('abc').fold
    assert not data.CharTokenizer('αβγ').fold and not data.CharTokenizer('abcé').fold
    assert data.clean_label('Éa', shuffled, fold=data.CharTokenizer(shuffled).fold) == ('Ea', None)

    def expected(pairs, form):  # an independent count: exact matches and 1 - NED of the compared forms
        # a label of which the form keeps nothing is compared as written (NFC)
        forms = [(form(p), form(g)) if form(g) or not g.strip() else (p, g) for p, g in pairs]
        done = [f if p or not g else None for (p, g), f in zip(pairs, forms)]
        return (sum(d is not None and d[0] == d[1] for d in done),
                sum(0 if d is None else 1 - data.edit_distance(*d) / max(1, *map(len, d)) for d in done))

    latin = [('HeLLo!', 'hello'), ('', '!!'), ('wor1d', 'World'), ('', ''), ('-', '!!')]
    for charset in (None, data.CHARSET36, data.CHARSET94, shuffled):  # the study's protocol
        r = data.score(*zip(*latin), charset)
        assert (r['correct'], r['ned_sum']) == pytest.approx(expected(latin, data.scoring_form))
        assert r['correct'] == 2  # not '' nor '-' for '!!', of which the protocol keeps nothing
    greek = [('αθηνα', 'Αθηνα'), (unicodedata.normalize('NFD', 'λόγος'), 'λόγος'), ('', 'μ'), ('ΣΟΦΙΑ', 'σοφια')]
    lower = 'αβγδεζηθικλμνξοπρστυφχψωόςΣ'.lower()
    r = data.score(*zip(*greek), lower)  # no upper-case letter: case-insensitive, NFC
    assert (r['correct'], r['ned_sum']) == pytest.approx(expected(greek, lambda t: unicodedata.normalize(
        'NFC', t).lower())) and r['correct'] == 3
    r = data.score(*zip(*greek), lower + 'ΑΣΟΦΙ')  # upper-case letters: as written
    assert r['correct'] == 1 and r['ned_sum'] == pytest.approx(4 / 5 + 1 + 0 + 0)
    assert data.score(['мир'], ['мор'], 'мирор')['correct'] == 0
    assert data.score(['!#', '0!'], ['#$', '0!'], '!#$%0123')['correct'] == 1  # no letters: symbols count too


def test_cpu_count_without_sched_getaffinity(monkeypatch):
    monkeypatch.delattr(os, 'sched_getaffinity', raising=False)
    assert data.cpu_count() == os.cpu_count()


def test_synth_and_render(tmp_path):
    rng = random.Random(0)
    img = data.render_word('abc', rng, 'clean')
    arr = np.asarray(img)
    assert arr.min() < 100 and arr[0].min() == 255 and 9 < img.size[1] < 25  # dark ink, white margin
    index = data.synth(str(tmp_path / 's'), 30, seed=1, workers=1, shard_size=16)
    assert index['samples'] == 30 and len(index['shards']) == 2
    data.synth(str(tmp_path / 'v'), 10, style='varied', words=['Hello', 'World'], workers=1)
    y = labels_of(data.ShardStream(str(tmp_path / 'v'), 8, 32, 4, data.CHARSET94, loop=False))
    assert sorted(set(y)) <= ['Hello', 'World'] and len(y) == 10


@pytest.mark.skipif(not os.path.exists(FONT), reason=f'needs a font covering Greek and Cyrillic: {FONT}')
def test_non_latin_set_end_to_end(tmp_path):
    words = ['Αθήνα', 'λόγος', 'Москва', 'книга', 'ΣΟΦΙΑ']
    charset = data.load_charset(''.join(sorted(set(''.join(w.lower() for w in words)))))
    (tmp_path / 'img').mkdir()
    rng = random.Random(0)
    with open(tmp_path / 'labels.tsv', 'w', encoding='utf-8') as f:
        for i, word in enumerate(words * 4):
            data.render_word(word, rng, 'varied', [FONT]).save(tmp_path / 'img' / f'{i}.png')
            f.write(f'img/{i}.png\t{word}\n')
    index = data.import_folder(str(tmp_path / 'labels.tsv'), str(tmp_path / 'out'), workers=1)
    assert index['samples'] == 20 and index['drops'] == {}
    tok = data.CharTokenizer(charset)
    s = data.ShardStream(str(tmp_path / 'out'), 16, 64, 8, charset, loop=False, fold=tok.fold, tokenizer=tok)
    batches = list(s)
    y = labels_of(batches)
    assert s.num_samples == 20 and Counter(y) == Counter(w.lower() for w in words * 4)
    assert data.normalize(batches[0][0]).std() > 0.05  # the words were drawn
    decoded = tok.decode(tok.encode(y))
    assert decoded == y and data.score(decoded, y, tok.charset)['error'] == 0
    assert data.score(['αθηνα'], ['αθήνα'], tok.charset)['correct'] == 0


def test_a_listed_shard_that_is_missing_is_named(tmp_path):
    make_shards(tmp_path, [5, 5, 5])
    os.remove(tmp_path / 'shard-000001.tar')
    with pytest.raises(FileNotFoundError, match='lists 1 shard.*shard-000001.tar'):
        data.ShardStream(str(tmp_path), 8, 16, 4, data.CHARSET36)


def test_a_shard_rewritten_after_its_sidecar_is_indexed_again(tmp_path):
    make_shards(tmp_path / 'a', [6, 6], 'x')
    assert set(labels_of(data.ShardStream(str(tmp_path / 'a'), 8, 16, 4, data.CHARSET36, loop=False))) == {
        name(i, 'x') for i in range(12)}
    make_shards(tmp_path / 'b', [6], 'y')  # same keys, sizes and label lengths: only the labels differ
    old, new = tmp_path / 'a' / 'shard-000000.tar', tmp_path / 'b' / 'shard-000000.tar'
    assert old.stat().st_size == new.stat().st_size
    old.write_bytes(new.read_bytes())  # the old sidecar stays beside it
    labels = labels_of(data.ShardStream(str(tmp_path / 'a'), 8, 16, 4, data.CHARSET36, loop=False))
    assert sorted(labels) == sorted([name(i, 'y') for i in range(6)] + [name(i, 'x') for i in range(6, 12)])


def test_a_shard_changed_while_read_is_skipped_never_mislabelled(tmp_path):
    make_shards(tmp_path, [8, 8, 8])
    s = data.ShardStream(str(tmp_path), 8, 16, 5, data.CHARSET36, loop=False)  # indexed now
    w = data.ShardWriter(str(tmp_path / 'other'))  # the same layout, other keys: only the tar headers tell
    for i in range(8):
        w.write(f'{i + 1000:09d}', png(i), 'png', name(i + 1000))
    w.close()
    (tmp_path / 'shard-000000.tar').write_bytes((tmp_path / 'other' / 'shard-000000.tar').read_bytes())
    cut = tmp_path / 'shard-000001.tar'
    cut.write_bytes(cut.read_bytes()[:4 * 2048 + 520])  # 2,048 bytes a sample: cut inside the fifth image
    batches = list(s)
    got = [pair for images, labels, _ in batches for pair in zip(images[:, 0, 0, 0].tolist(), labels)]
    assert sorted(label for _, label in got) == sorted(name(i) for i in [*range(8, 12), *range(16, 24)])
    assert all(name(grey) == label for grey, label in got)  # every label with its own image
    assert sum(bad for _, _, bad in batches) == 8 + 4


@pytest.mark.parametrize('workers', [0, 1])
def test_a_mostly_unreadable_source_stops_with_one_line(tmp_path, workers):
    w = data.ShardWriter(str(tmp_path))
    for i in range(30):
        w.write(f'{i:09d}', png() if i % 5 == 0 else b'\x89PNG\r\n\x1a\nbroken', 'png', name(i))
    w.close()
    # a process of its own, whose stderr its workers share (a forkserver's workers: the stderr of the process that
    # started the server), in a folder holding a data/ folder, which a forkserver must not take for data.py
    os.makedirs(tmp_path / 'data')
    code = (f'import sys\nsys.path.insert(0, {os.path.dirname(data.__file__)!r})  # as a script in that folder\n'
            f'import data\ntry:\n    for _ in data.ShardStream({str(tmp_path)!r}, 8, 16, 16, data.CHARSET36)'
            f'.loader({workers}): pass\nexcept data.DataError as e:\n    sys.exit(f"DataError: {{e}}")')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    warning, error = out.stderr.strip().splitlines()  # one warning line a minute, with its count; the error
    assert warning.startswith('data.py: warning: ') and 'unreadable sample(s) skipped and counted' in warning
    assert re.match(r'DataError: \S+: over half of 1,000 consecutive reads are unreadable', error), error


def test_url_sources_read_what_local_shards_read_in_few_requests(tmp_path, http_server, monkeypatch):
    url, served, server = http_server
    make_shards(served / 'set', [300, 212])  # 512 samples: blocks of 32 (a source holds 16 blocks at least)
    monkeypatch.setenv('OCRSCALE_CACHE', str(tmp_path / 'cache'))
    local, remote = str(served / 'set'), f'{url}/set'
    assert labels_of(data.ShardStream(remote, 8, 16, 8, data.CHARSET36, loop=False)) == labels_of(
        data.ShardStream(local, 8, 16, 8, data.CHARSET36, loop=False))
    kw = dict(img_h=8, img_w=16, batch_size=8, charset=data.CHARSET36, seed=4, augment=True)
    want = take(data.ShardStream(local, block=data.REMOTE_BLOCK, **kw).loader(0), 10)
    stream = data.ShardStream(remote, **kw)
    server.requests = 0
    got = take(stream.loader(1), 10)
    assert labels_of(got) == labels_of(want) and all(torch.equal(a[0], b[0]) for a, b in zip(got, want))
    # 8 consecutive draws of a source lie in one block of 32 samples, or two, or across the shards' boundary
    assert server.requests <= 3 * 10
    with pytest.raises(FileNotFoundError, match='nowhere/index.json: not found'):
        data.ShardStream(f'{url}/nowhere', 8, 16, 8, data.CHARSET36)
    moved = data.ShardStream(f'{url}/moved/set', **kw)  # redirects followed
    assert labels_of(take(moved.loader(0), 3)) == labels_of(want[:3])
    monkeypatch.setattr(RangeHandler, 'timeout', 0.2)  # the server drops connections idle for 0.2 s
    connections = {}
    with ThreadPoolExecutor(4) as pool:  # four requests at once: four idle connections afterwards
        list(pool.map(lambda _: data.read_url(f'{remote}/index.json', 0, 10, connections), range(4)))
    time.sleep(0.4)  # e.g. while the model is evaluated: every idle connection is dropped
    assert data.read_url(f'{remote}/index.json', 0, 10, connections) == (served / 'set' / 'index.json').read_bytes()[:10]
    server.ranges = False
    with pytest.raises(data.DataError, match='ignores byte-range requests'):
        for _ in data.ShardStream(remote, 8, 16, 64, data.CHARSET36).loader(0):
            pass


def test_fsspec_sources(tmp_path, monkeypatch):
    fsspec = pytest.importorskip('fsspec')
    make_shards(tmp_path / 'set', [9, 4])
    memory = fsspec.filesystem('memory')
    for path in (tmp_path / 'set').iterdir():
        memory.pipe(f'/set/{path.name}', path.read_bytes())
    monkeypatch.setenv('OCRSCALE_CACHE', str(tmp_path / 'cache'))
    remote = data.ShardStream('memory://set', 8, 16, 5, data.CHARSET36, loop=False)
    assert labels_of(remote) == labels_of(data.ShardStream(str(tmp_path / 'set'), 8, 16, 5, data.CHARSET36, loop=False))
    if importlib.util.find_spec('s3fs') is None:  # the backend is named, not a traceback
        with pytest.raises(ValueError, match='s3:// needs fsspec and its backend.*s3fs'):
            data.ShardStream('s3://bucket/set', 8, 16, 5, data.CHARSET36)


def test_weights_that_starve_a_source_or_are_zero_and_open_files(tmp_path):
    make_shards(tmp_path / 'a', [50], 'a')
    make_shards(tmp_path / 'b', [50, 50], 'b')
    with pytest.raises(ValueError, match='weight of .*a is under 1/4096 of the sum: it would never be read'):
        data.ShardStream(f'{tmp_path / "a"}:1,{tmp_path / "b"}:10000', 8, 16, 4, data.CHARSET36)
    with pytest.raises(ValueError, match='weights are positive numbers'):  # a lone :0 would divide by zero
        data.ShardStream(f'{tmp_path / "a"}:0', 8, 16, 4, data.CHARSET36)
    before = len(os.listdir('/proc/self/fd'))
    for _ in range(3):  # evaluation passes, each with a new stream, as train.py runs them
        assert len(labels_of(data.ShardStream(str(tmp_path / 'b'), 8, 16, 8, data.CHARSET36, loop=False))) == 100
    assert len(os.listdir('/proc/self/fd')) == before  # every shard file closed at the end of a pass


def test_a_folder_named_with_brackets_is_read_as_written_and_never_written_over(tmp_path):
    out = str(tmp_path / 'x[1]')
    data.synth(out, 30, workers=1, shard_size=10)
    with pytest.raises(FileExistsError, match=r'already holds shards'):
        data.synth(out, 5, workers=1)
    assert [n for _, n in data.find_shards(out)] == [10, 10, 10]
    os.remove(os.path.join(out, 'shard-000001.tar'))  # one named shard needs only itself
    assert data.find_shards(os.path.join(out, 'shard-000000.tar')) == [(os.path.join(out, 'shard-000000.tar'), 10)]
    with pytest.raises(FileNotFoundError, match=r'lists 1 shard\(s\) that are not there: shard-000001.tar'):
        data.find_shards(out)


def test_an_interrupted_synth_is_refused_by_readers_and_done_again(tmp_path, monkeypatch):
    out, write_index = str(tmp_path / 's'), data.write_index
    monkeypatch.setattr(data, 'write_index', lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # stopped after its shards, before index.json
        data.synth(out, 30, workers=1, shard_size=10)
    assert len(glob.glob(os.path.join(out, '*.tar'))) == 3
    with pytest.raises(FileNotFoundError, match=r's: an unfinished synth or import .* run it again'):
        data.find_shards(out)
    monkeypatch.setattr(data, 'write_index', write_index)
    with data._start_set(out):  # a writer at work (the stale shards removed): another is refused, its shard kept
        writer = data.ShardWriter(out)
        writer.write('000000000', png(), 'png', 'a')
        writer.close()
        with pytest.raises(FileExistsError, match=r's: another synth or import is writing it'):
            data.synth(out, 12, workers=1, shard_size=10)
        assert sorted(os.listdir(out)) == sorted([data.UNFINISHED, 'shard-000000.tar', 'shard-000000.tar.idx'])
    assert data.synth(out, 12, workers=1, shard_size=10)['samples'] == 12  # its old shards removed
    assert [n for _, n in data.find_shards(out)] == [10, 2] and not os.path.exists(os.path.join(out, data.UNFINISHED))


def test_synth_refuses_what_its_font_cannot_draw_and_sizes_that_render_nothing(tmp_path):
    for kw, why in ((dict(charset='αβγ'), r"built-in font lacks 'αβγ'"), (dict(words=['café']), r"lacks 'é'"),
                    (dict(words=[]), 'no words'), (dict(n=0), 'n=0'), (dict(min_len=5, max_len=3), 'min_len=5')):
        with pytest.raises(ValueError, match=why):
            data.synth(str(tmp_path / 'out'), **{'n': 10, 'workers': 1, **kw})
    for flag, value in (('--n', '-5'), ('--shard-size', '0')):
        with pytest.raises(SystemExit, match='2'):
            data.main(['synth', str(tmp_path / 'cli'), '--n', '10', flag, value])


def test_a_url_port_is_no_weight():
    assert data.parse_sources('http://127.0.0.1:8703,https://host:443/,s3://b/set:3,http://h:80/set:2,d/x:0.5,'
                              's3://bucket:2,http://host:8000:2') == [
        ('http://127.0.0.1:8703', 1.0), ('https://host:443/', 1.0), ('s3://b/set', 3.0), ('http://h:80/set', 2.0),
        ('d/x', 0.5), ('s3://bucket', 2.0), ('http://host:8000', 2.0)]


def test_a_damaged_index_json_is_one_line_naming_it(tmp_path):
    make_shards(tmp_path, [5])
    for text in ('[]', '{"shards": []}', '{"shards": {"shard-000000.tar": "5"}}', 'not json', '{"foo": 1}'):
        (tmp_path / 'index.json').write_text(text)
        with pytest.raises(ValueError, match=re.escape(f'{tmp_path / "index.json"}: not an index.json of data.py')):
            data.find_shards(str(tmp_path))


def test_a_remote_shard_that_is_gone_stops_before_reading(tmp_path, http_server, monkeypatch):
    url, served, _ = http_server
    monkeypatch.setenv('OCRSCALE_CACHE', str(tmp_path / 'cache'))
    make_shards(served / 'set', [20, 20])
    data.shard_index(str(served / 'set' / 'shard-000001.tar'))  # its sidecar stays, the shard goes
    os.remove(served / 'set' / 'shard-000001.tar')
    with pytest.raises(FileNotFoundError, match=re.escape(f'{url}/set/shard-000001.tar: not found (HTTP 404)')):
        data.ShardStream(f'{url}/set', 8, 16, 4, data.CHARSET36)


def test_lmdb_import_follows_links_and_refuses_undecodable_labels_and_databases(tmp_path):
    lmdb = pytest.importorskip('lmdb')
    for part, labels in (('elsewhere/a', [b'one', b'caf\xe9', b'two']), ('src/b', [b'three'])):
        os.makedirs(tmp_path / part)
        env = lmdb.open(str(tmp_path / part), map_size=1 << 20)
        with env.begin(write=True) as txn:
            for i, label in enumerate(labels, 1):
                txn.put(b'image-%09d' % i, png(i))
                txn.put(b'label-%09d' % i, label)
            txn.put(b'num-samples', str(len(labels)).encode())
        env.close()
    os.symlink(tmp_path / 'elsewhere' / 'a', tmp_path / 'src' / 'a')
    os.symlink(tmp_path / 'src', tmp_path / 'src' / 'b' / 'loop')  # a cycle: walked once
    index = data.import_lmdb(str(tmp_path / 'src'), str(tmp_path / 'out'), workers=1)
    assert index['parts'] == {'a': 3, 'b': 1} and index['drops'] == {'label_not_utf8': 1}
    assert sorted(row[0] for path, _ in data.find_shards(str(tmp_path / 'out')) for row in data.shard_index(path)) == \
        ['one', 'three', 'two']
    os.makedirs(tmp_path / 'bad' / 'x')
    (tmp_path / 'bad' / 'x' / 'data.mdb').write_bytes(os.urandom(10000))
    with pytest.raises(ValueError, match=r"bad/x: not a scene-text LMDB \(with a 'num-samples' count\)"):
        data.import_lmdb(str(tmp_path / 'bad'), str(tmp_path / 'out2'), workers=1)


def test_a_file_that_is_no_sentencepiece_model_is_one_line(tmp_path):
    (tmp_path / 'bad.model').write_text('junk')
    with pytest.raises(ValueError, match=r'bad.model: not a SentencePiece model'):
        data.SPTokenizer(str(tmp_path / 'bad.model'))


def test_16_bit_and_transparent_images_decode_as_they_look(tmp_path):
    gradient = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))  # 16 x 64, dark to light
    def encoded(img, fmt='PNG'):
        buf = io.BytesIO()
        img.save(buf, fmt)
        return buf.getvalue()
    want = data.decode_image(encoded(Image.fromarray(gradient)), 16, 64).astype(int)
    wide = Image.fromarray(gradient.astype(np.uint16) * 257)  # the same picture in 16-bit samples
    assert wide.mode.startswith('I') and np.abs(data.decode_image(encoded(wide), 16, 64) - want).max() <= 1
    ink = np.zeros((16, 64, 4), np.uint8)  # black ink (alpha = the gradient) over transparent black
    ink[..., 3] = 255 - gradient
    over_white = data.decode_image(encoded(Image.fromarray(ink, 'RGBA')), 16, 64).astype(int)
    assert np.abs(over_white - want).max() <= 1  # ink of opacity a over white: 255 (1 - a)


def test_a_remote_set_is_indexed_anew_when_its_index_json_changes(tmp_path, http_server, monkeypatch):
    url, served, _ = http_server
    monkeypatch.setenv('OCRSCALE_CACHE', str(tmp_path / 'cache'))
    make_shards(served / 'set', [20])
    first = data.ShardStream(f'{url}/set', 8, 16, 4, data.CHARSET36).bases
    assert data.ShardStream(f'{url}/set', 8, 16, 4, data.CHARSET36).bases == first  # read once
    index = json.loads((served / 'set' / 'index.json').read_text())
    (served / 'set' / 'index.json').write_text(json.dumps({**index, 'source': 'relabelled'}))  # uploaded again
    assert data.ShardStream(f'{url}/set', 8, 16, 4, data.CHARSET36).bases != first
