"""Tests for model.py: attention, cached decoding, beam search, PARSeq permutations and refinement, static
padding and torch.compile, sizes, FLOPs, the transformers TrOCR converter, overfitting.

    python -m pytest -q tests/test_model.py
"""
import dataclasses
import itertools
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode

import model as M
from model import (PAPER_PARAMS, SIZES, Attention, ModelConfig, build_model, count_params, forward_flops,
                   make_config, num_orders, order_masks, sample_orders, train_flops_per_sample)

torch.set_num_threads(1)  # tiny models: a second thread only adds sync cost on a shared machine
CHARS = '0123456789abcdefghijklmnopqrstuvwxyz'
V = len(CHARS) + 3                     # ids: 0 = EOS, 1..V-3 chars, V-2 = BOS, V-1 = PAD
EOS, BOS, PAD = 0, V - 2, V - 1


def encode(words):  # local stand-in for data.CharTokenizer.encode
    t = torch.full((len(words), max(map(len, words)) + 2), PAD)
    t[:, 0] = BOS
    for i, w in enumerate(words):
        t[i, 1:len(w) + 1] = torch.tensor([CHARS.index(c) + 1 for c in w])
        t[i, len(w) + 1] = EOS
    return t


def decode_str(ids):
    return [''.join(CHARS[i - 1] for i in row.tolist()[:(row.tolist() + [EOS]).index(EOS)] if 0 < i < BOS)
            for row in ids]


def naive_attention(q, k, v, mask=None):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float('-inf'))
    return s.softmax(-1) @ v


@pytest.mark.parametrize('kind', ['none', 'causal', 'bool'])
@pytest.mark.parametrize('cross', [False, True])
def test_sdpa_matches_naive_attention(kind, cross):
    torch.manual_seed(0)
    d, h, B, T, S = 48, 3, 2, 7, 7 if not cross else 11
    att = Attention(d, h, kv_dim=20 if cross else None).double()
    x = torch.randn(B, T, d, dtype=torch.double)
    ctx = torch.randn(B, S, 20, dtype=torch.double) if cross else None
    mask = None
    if kind == 'causal':
        mask = torch.ones(T, S, dtype=torch.bool).tril()
    elif kind == 'bool':
        mask = torch.rand(B, 1, T, S) < 0.5
        mask[..., 0] = True                        # every query sees at least one key
    if cross:
        q, (k, v) = att.split(att.q(x)), att.project_kv(ctx)
    else:
        q, k, v = map(att.split, att.qkv(x).chunk(3, -1))
    ref = att.proj(naive_attention(q, k, v, mask).transpose(1, 2).flatten(2))
    out = att(x, kv=ctx, mask=mask if kind == 'bool' or cross else None, causal=kind == 'causal' and not cross)
    torch.testing.assert_close(out, ref)


def small(arch, **kw):
    return make_config(arch, 'T3', V, max_len=8, **kw)


SMALL_STYLE = dict(emb_scale=True, emb_norm=False, dec_act='relu')   # trocr-small's decoder variant


def trocr_reference_greedy(m, x, steps):
    """Uncached greedy decoding: the whole prefix re-run at every step."""
    mem_kv, tok, probs = m.memory_kv(x), torch.full((len(x), 1), m.start), []
    for _ in range(steps):
        p, nxt = m.decoder(tok, mem_kv)[:, -1].float().softmax(-1).max(-1, keepdim=True)
        tok, probs = torch.cat([tok, nxt], 1), probs + [p]
    return M.finish(tok[:, 1:], torch.cat(probs, 1), EOS, PAD)


def trocr_reference_beam(m, x, beam, len_norm, steps):
    """Uncached beam search over Python lists, one image at a time, with transformers' rules (no early stop: its
    bound is exact): the best 2*beam continuations; of the first `beam`, those that end (EOS or the last step) are
    finished, scored sum / tokens (len_norm) or sum; the best `beam` that do not end stay live."""
    ids, conf = [], []
    for b in range(len(x)):
        mem = [(k[b:b + 1], v[b:b + 1]) for k, v in m.memory_kv(x)]
        live, done = [(0.0, [])], []                   # (summed log-prob, tokens)
        for t in range(steps):
            tok = torch.tensor([[m.start] + seq for _, seq in live])
            kv = [(k.expand(len(live), -1, -1, -1), v.expand(len(live), -1, -1, -1)) for k, v in mem]
            logp = m.decoder(tok, kv)[:, -1].float().log_softmax(-1).tolist()
            cands = sorted(((s + lp, seq + [c]) for (s, seq), row in zip(live, logp) for c, lp in enumerate(row)),
                           key=lambda h: -h[0])[:2 * beam]
            done += [(s / (t + 1 if len_norm else 1), s, seq) for s, seq in cands[:beam] if seq[-1] == EOS or t == steps - 1]
            live = [h for h in cands if h[1][-1] != EOS][:beam]
        _, s, seq = max(done)
        ids.append(seq)
        conf.append(math.exp(s))
    return ids, torch.tensor(conf)


@pytest.mark.parametrize('dec_depth,style', [(1, {}), (2, {}), (2, SMALL_STYLE)])
def test_trocr_decode_equals_uncached_reference(dec_depth, style):
    torch.manual_seed(1)
    m = build_model(small('trocr', dec_depth=dec_depth, **style)).double().eval()
    x = torch.randn(16, 3, 16, 64, dtype=torch.double)
    with torch.no_grad():
        (a, ca), (b, cb) = m.decode(x), trocr_reference_greedy(m, x, 9)
        assert torch.equal(a, b) and a.shape[1] > 1
        torch.testing.assert_close(ca, cb)
        for beam, len_norm in ((3, True), (3, False), (5, True)):
            ids, conf = m.decode(x, beam=beam, len_norm=len_norm)
            ref, ref_conf = trocr_reference_beam(m, x, beam, len_norm, 9)
            assert [[t for t in row if t != PAD] for row in ids.tolist()] == ref
            torch.testing.assert_close(conf, ref_conf)
            assert ((conf > 0) & (conf <= 1)).all()


def parseq_reference_ar(m, x):
    """Uncached AR decoding without refinement: the whole context re-run under a causal mask at every step."""
    T = m.cfg.max_len + 1
    mem_kv, q = m.memory_kv(x), m.pos_queries[:, :T].expand(len(x), -1, -1)
    ctx, logits = torch.full((len(x), 1), BOS), []
    for i in range(T):
        causal = torch.ones(i + 1, i + 1, dtype=torch.bool).tril()
        logits.append(m.run(m.embed(ctx), q[:, :i + 1], mem_kv, causal, causal)[:, -1:])
        ctx = torch.cat([ctx, logits[-1].argmax(-1)], 1)
        if (ctx == EOS).any(1).all():
            break
    probs, ids = torch.cat(logits, 1).float().softmax(-1).max(-1)
    return M.finish(ids, probs, EOS, PAD)


@pytest.mark.parametrize('dec_depth', [1, 2])
def test_parseq_cached_ar_equals_uncached(dec_depth):
    torch.manual_seed(2)
    m = build_model(small('parseq', dec_depth=dec_depth)).double().eval()
    x = torch.randn(16, 3, 16, 64, dtype=torch.double)
    with torch.no_grad():
        (a, ca), (b, cb) = m.decode(x, refine_iters=0), parseq_reference_ar(m, x)
    assert torch.equal(a, b)
    torch.testing.assert_close(ca, cb)
    ids, conf = m.decode(x, ar=False, refine_iters=2)
    assert ids.shape[0] == 16 and ((conf > 0) & (conf <= 1)).all()


def test_decode_output_format():
    torch.manual_seed(3)
    for arch in ('trocr', 'parseq'):
        m = build_model(small(arch)).eval()
        with torch.no_grad():
            ids, conf = m.decode(torch.randn(8, 3, 16, 64), max_len=5)
        assert ids.dtype == torch.long and conf.shape == (8,) and ids.shape[1] <= 6
        for row in ids.tolist():                    # no BOS; after the first EOS only PAD
            assert BOS not in row
            if EOS in row:
                assert all(t == PAD for t in row[row.index(EOS) + 1:])


def test_permutation_masks():
    torch.manual_seed(0)
    cfg = small('parseq')
    for L in range(1, 9):                          # order counts as the original's gen_tgt_perms
        assert num_orders(cfg, L) == {1: 1, 2: 2}.get(L, 6)
        assert num_orders(dataclasses.replace(cfg, perm_mirrored=False), L) == {1: 1, 2: 2}.get(L, 6)
        orders = sample_orders(L, num_orders(cfg, L), key_len=8)
        assert len(orders) == num_orders(cfg, L)
        qmask, cmask = order_masks(orders[0])      # forward order: plain causal masks
        assert torch.equal(qmask, torch.ones(L + 1, L + 1, dtype=torch.bool).tril())
        assert torch.equal(cmask, qmask)
        for k, order in enumerate(orders):
            assert order[0] == 0 and sorted(order.tolist()) == list(range(L + 2))
            qmask, cmask = order_masks(order)
            assert qmask[:, 0].all()                                     # every query sees [B]
            assert not qmask[torch.arange(L), torch.arange(1, L + 1)].any()  # never its own slot
            assert cmask.diagonal().all()
            if k >= 2:                             # random orders come with their mirrors; EOS stays last
                assert order[-1] == L + 1
                if k % 2 == 1:
                    assert torch.equal(order[1:-1], orders[k - 1][1:-1].flip(0))
        if L > 1:                                  # second order: EOS first, from [B] alone, then reversed
            assert orders[1].tolist() == [0, L + 1] + list(range(L, 0, -1))
            qmask, _ = order_masks(orders[1])
            assert qmask[L].tolist() == [True] + [False] * L


def test_plm_orders_distinct_for_short_labels():
    """L < 5: random orders drawn without replacement (one of each mirror pair), as the original's; for L = 3 the six
    orders are all 3! orders of the characters."""
    for L in (3, 4):
        for mirrored in (True, False):
            for seed in range(20):
                torch.manual_seed(seed)
                orders = sample_orders(L, 6, mirrored, key_len=8).tolist()
                assert len(set(map(tuple, orders))) == 6, (L, mirrored, orders)
                if L == 3 and mirrored:
                    chars = {tuple(p for p in order if 0 < p <= L) for order in orders}
                    assert chars == set(itertools.permutations(range(1, 4)))


def test_parseq_eos_rule_and_token_sums():
    torch.manual_seed(0)
    m = build_model(small('parseq', dropout=0.0))
    words = ['abcde', 'xy', 'q1z9']
    tok, x = encode(words), torch.randn(3, 3, 16, 64)
    chars = sum(map(len, words))
    total, n = m.loss(x, tok)                       # L=5: 6 orders, EOS a target in the first two only
    assert int(n) == 2 * (chars + 3) + 4 * chars and total.dtype == torch.float32 and total.dim() == 0
    # the sum over orders of per-order summed cross-entropies, recomputed with the same orders
    torch.manual_seed(1)
    orders = sample_orders(5, 6, key_len=8)
    torch.manual_seed(1)
    total, n = m.loss(x, tok)
    mem_kv = m.memory_kv(x)
    ctx, tgt = m.embed(tok[:, :-1]), tok[:, 1:]
    keep = ((tok[:, :-1] != PAD) & (tok[:, :-1] != EOS))[:, None, None, :]
    q = m.pos_queries[:, :6].expand(3, -1, -1)
    ref, count = 0.0, 0
    for i, order in enumerate(orders):
        qm, cm = order_masks(order)
        t = tgt if i < 2 else tgt.masked_fill(tgt == EOS, PAD)
        logits = m.run(ctx, q, mem_kv, qm & keep, cm & keep)
        ref += F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=PAD, reduction='sum')
        count += int((t != PAD).sum())
    assert count == int(n)
    torch.testing.assert_close(total, ref)


@pytest.mark.parametrize('arch', ['trocr', 'parseq'])
def test_loss_identical_with_static_padding(arch):
    m = build_model(small(arch, dropout=0.0))      # max_len 8
    x, tok = torch.randn(3, 3, 16, 64), encode(['abc', 'xyz12', 'q'])
    padded = F.pad(tok, (0, 8 + 2 - tok.shape[1]), value=PAD)
    for training in (False, True):
        m.train(training)
        torch.manual_seed(5)
        total, n = m.loss(x, tok)
        torch.manual_seed(5)
        total_p, n_p = m.loss(x, padded)
        torch.testing.assert_close(total, total_p)
        assert int(n) == int(n_p) > 0


def test_parseq_compiles_once_for_padded_batches():
    """Under torch.compile (labels padded to max_len) the PLM loss is one graph: no breaks, no recompiles."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = build_model(small('parseq', dropout=0.1, perm_num=4)).train()   # fwd, reverse, one random pair
    compiled = torch.compile(m, backend='eager', dynamic=False)
    x = torch.randn(2, 3, 16, 64)
    for words in (['ab', 'c'], ['abcdefgh', 'xy'], ['q1z', 'hello']):
        tok = F.pad(encode(words), (0, 10 - len(max(words, key=len)) - 2), value=PAD)
        torch.manual_seed(1)
        total, n = compiled(x, tok)
        total.backward()
        torch.manual_seed(1)
        ref, ref_n = m(x, tok)
        torch.testing.assert_close(total, ref)
        assert int(n) == int(ref_n)
    assert counters['stats']['unique_graphs'] == 1, dict(counters['stats'])
    assert not counters['graph_break'], dict(counters['graph_break'])
    torch._dynamo.reset()


def test_parseq_refinement_runs_all_queries_after_early_eos(monkeypatch):
    """AR forced to stop at position 2; refinement (as the original) runs all max_len+1 queries over the AR output."""
    torch.manual_seed(4)
    m = build_model(small('parseq', dec_depth=2)).double().eval()
    x = torch.randn(8, 3, 16, 64, dtype=torch.double)
    stop, T, step = 2, 9, m.step

    def force_eos(logits, i):                      # EOS exactly at position `stop`
        logits[..., EOS] = 1e4 if i == stop else -1e4
        return logits

    monkeypatch.setattr(m, 'step', lambda tok, i, *a: force_eos(step(tok, i, *a), i))
    ids, conf = m.decode(x)
    with torch.no_grad():                          # reference: uncached AR, then one cloze pass written out
        mem_kv, q = m.memory_kv(x), m.pos_queries[:, :T].expand(8, -1, -1)
        ctx = torch.full((8, 1), BOS)
        for i in range(stop + 1):
            causal = torch.ones(i + 1, i + 1, dtype=torch.bool).tril()
            out = force_eos(m.run(m.embed(ctx), q[:, :i + 1], mem_kv, causal, causal)[:, -1:], i)
            ctx = torch.cat([ctx, out.argmax(-1)], 1)
        ctx = ctx[:, :-1]                          # [B] + positions 0..stop-1
        S = ctx.shape[1]
        cloze = torch.ones(T, S, dtype=torch.bool)
        cloze[torch.arange(S - 1), torch.arange(1, S)] = False   # query i never sees slot i+1 (its own)
        logits = m.run(m.embed(ctx), q, mem_kv, cloze, torch.ones(S, S, dtype=torch.bool).tril())
        probs, ref = logits.float().softmax(-1).max(-1)
        ref, ref_conf = M.finish(ref, probs, EOS, PAD)
    assert torch.equal(ids, ref)
    torch.testing.assert_close(conf, ref_conf)
    assert ids.shape[1] > stop + 1                 # texts run past the AR stop (the old code cut them there)


def test_beam_len_norm_matches_exhaustive_search():
    """beam = C^3 never prunes with max_len 2 (every candidate ranks within the first `beam`), so beam search must
    return the best of all sequences, by score / tokens incl. EOS (len_norm) or by score."""
    chars = 'abc'
    torch.manual_seed(6)
    m = build_model(make_config('trocr', 'T2', len(chars) + 3, max_len=2)).double().eval()
    C, x = len(chars) + 1, torch.randn(4, 3, 16, 64, dtype=torch.double)
    seqs = torch.cartesian_prod(*[torch.arange(C)] * 3)                        # (C^3, 3)
    with torch.no_grad():
        logp = torch.stack([m.decoder(torch.cat([torch.full((len(seqs), 1), m.start), seqs[:, :2]], 1),
                                      [(k[b:b + 1].expand(len(seqs), -1, -1, -1), v[b:b + 1].expand(len(seqs), -1, -1, -1))
                                       for k, v in m.memory_kv(x)]).log_softmax(-1) for b in range(len(x))])
    tok_lp = logp.gather(-1, seqs[None, :, :, None].expand(len(x), -1, -1, 1))[..., 0]  # (B, C^3, 3)
    alive = (seqs != EOS).int().cumprod(1)
    kept = torch.cat([torch.ones(len(seqs), 1, dtype=torch.int), alive[:, :-1]], 1)     # up to and incl. first EOS
    score, length = (tok_lp * kept).sum(-1), kept.sum(1)
    for len_norm in (False, True):
        best = (score / length if len_norm else score).argmax(1)
        ids, conf = m.decode(x, beam=C ** 3, len_norm=len_norm)
        ref = seqs[best].masked_fill(kept[best] == 0, m.pad)
        assert ids.tolist() == [r[:ids.shape[1]] for r in ref.tolist()]
        torch.testing.assert_close(conf, score.gather(1, best[:, None])[:, 0].exp(), check_dtype=False)


def test_init_as_the_originals_and_the_cpu_ladder():
    """Study sizes: std 0.02 uncut (timm, transformers, strhub); PARSeq's decoder q/kv Xavier-uniform over the stacked
    3d x d in-projection and its patch convolution at PyTorch's default (kaiming-uniform, a = sqrt(5)), as strhub
    leaves them; TrOCR's PAD embedding zero. Tiny sizes: std 1/sqrt(fan_in) and pos_std 0.5, cut at 2 std."""
    torch.manual_seed(0)
    p = dict(build_model(make_config('parseq', 'S', 97)).named_parameters())
    for name in ('encoder.blocks.0.attn.qkv.weight', 'layers.0.mlp.0.weight', 'head.weight', 'text_emb.weight',
                 'pos_queries', 'encoder.pos'):
        assert abs(p[name].std().item() - 0.02) < 6e-4 and p[name].abs().max() > 0.08, name   # > 4 std: not cut at 2
    bound = math.sqrt(6 / (384 + 3 * 384))
    for name in ('layers.0.self_attn.q.weight', 'layers.0.cross_attn.kv.weight'):
        assert bound * 0.99 < p[name].abs().max() <= bound and abs(p[name].std() - bound / math.sqrt(3)) < 1e-3
    fan_in = 3 * 4 * 8
    assert p['encoder.patch.weight'].abs().max() <= fan_in ** -0.5 and p['encoder.patch.bias'].abs().max() > 0
    m = build_model(make_config('trocr', 'S', 97))
    assert not m.tok_emb.weight[-1].any() and abs(m.tok_emb.weight[:-1].std().item() - 0.02) < 6e-4
    t = dict(build_model(make_config('parseq', 'T7', 97)).named_parameters())
    std = 128 ** -0.5 * 0.8796        # a normal cut at 2 std keeps 0.8796 of its std
    assert abs(t['layers.0.mlp.0.weight'].std().item() - std) < 0.03 * std
    assert t['layers.0.mlp.0.weight'].abs().max() <= 2 * 128 ** -0.5 and t['pos_queries'].abs().max() <= 1.0
    assert not t['layers.0.mlp.0.bias'].any() and torch.equal(t['norm.weight'], torch.ones(128))


@pytest.mark.parametrize('arch', ['trocr', 'parseq'])
def test_count_params_matches_modules(arch):
    variants = [dict(size='T1'), dict(size='T4'), dict(size='T7'),
                dict(size='T2', cls_token=2, tie_head=True, **SMALL_STYLE),
                dict(size='T3', cls_token=not (arch == 'trocr'), qkv_bias=False, dec_depth=2),
                dict(size='T2', dec_width=40, dec_heads=2, mlp_ratio=2.0, dec_mlp_ratio=3.0, max_len=12),
                dict(size='S', enc_width=64, enc_depth=1, enc_heads=2, dec_width=32, dec_heads=1, dec_depth=2)]
    for v in variants:
        cfg = make_config(arch, v.pop('size'), V, **v)
        m = build_model(cfg)
        total, non_emb = count_params(cfg)
        assert total == sum(p.numel() for p in m.parameters()), cfg
        emb = sum(p.numel() for n, p in m.named_parameters() if 'pos' in n or n.endswith('_emb.weight'))
        assert non_emb == total - emb


def test_study_sizes_match_paper():
    assert abs(count_params(make_config('parseq', 'S', 97))[0] / 23.83e6 - 1) < 0.005   # the original PARSeq-S
    for arch in ('trocr', 'parseq'):
        for size in 'SBLH':
            n, paper = count_params(make_config(arch, size, 97))[0], PAPER_PARAMS[arch][size]
            if paper is not None and (arch, size) != ('parseq', 'S'):
                assert abs(n / paper - 1) < 0.02, (arch, size, n, paper)
    p = {s: count_params(make_config('parseq', s, 97))[0] for s in 'BLH'}
    assert p['B'] < p['L'] < p['H']
    for arch in ('trocr', 'parseq'):               # the CPU ladder
        tiny = [count_params(make_config(arch, f'T{i}', V))[0] for i in range(1, 8)]
        assert tiny == sorted(tiny) and tiny[0] < 0.2e6 and tiny[-1] / tiny[0] >= 30
        assert len([s for s in SIZES[arch] if s.startswith('T')]) >= 5


def test_config_overrides_and_round_trip():
    cfg = make_config('parseq', 'B', 50, enc_depth=3, img_w=64, patch_w=4)
    assert cfg.enc_depth == 3 and cfg.img_w == 64 and cfg.enc_width == 768 and cfg.vocab_size == 50
    assert ModelConfig(**dataclasses.asdict(cfg)) == cfg
    with pytest.raises(TypeError):
        make_config('trocr', 'S', 50, widht=3)
    with pytest.raises(KeyError):
        make_config('trocr', 'XL', 50)


@pytest.mark.parametrize('arch', ['trocr', 'parseq'])
def test_flops_against_flop_counter(arch, monkeypatch):
    torch.manual_seed(0)
    cfg = make_config(arch, 'T5', V, max_len=10, dec_depth=2, dropout=0.0)
    m = build_model(cfg)
    x, tok = torch.randn(4, 3, 16, 64), encode([''.join(random.Random(i).choices(CHARS, k=10)) for i in range(4)])
    per_pass = train_flops_per_sample(cfg) / 3     # PARSeq: num_orders(cfg, 10) = 6 orders
    assert train_flops_per_sample(cfg, dec_len=1) == 3 * forward_flops(cfg, dec_len=1)  # 1-token labels: one order
    if arch == 'trocr':
        assert per_pass == forward_flops(cfg)
    with FlopCounterMode(display=False) as fc:
        m.loss(x, tok)
    # FlopCounterMode does not count the CPU SDPA kernel; norms, softmax, GELU are not counted by either
    assert 0.85 < fc.get_total_flops() / 4 / per_pass < 1.0
    # with attention written as plain matmuls, the count should agree closely
    monkeypatch.setattr(F, 'scaled_dot_product_attention',
                        lambda q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0: naive_attention(
                            q, k, v, torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril() if is_causal
                            else attn_mask))
    with FlopCounterMode(display=False) as fc:
        m.loss(x, tok)
    assert abs(fc.get_total_flops() / 4 / per_pass - 1) < 0.03


def render(word):
    font = ImageFont.load_default(size=12)
    left, top, right, bottom = font.getbbox(word)
    im = Image.new('L', (right - left + 4, bottom - top + 4), 255)
    ImageDraw.Draw(im).text((2 - left, 2 - top), word, font=font, fill=0)
    x = torch.frombuffer(bytearray(im.resize((64, 16), Image.BICUBIC).tobytes()), dtype=torch.uint8)
    return (x.float().view(1, 16, 64) / 127.5 - 1).expand(3, -1, -1)


@pytest.mark.parametrize('arch', ['trocr', 'parseq'])
def test_tiny_model_overfits_32_words(arch):
    rng = random.Random(0)
    words = [''.join(rng.choice(CHARS) for _ in range(rng.randint(3, 6))) for _ in range(32)]
    x, tok = torch.stack([render(w) for w in words]), encode(words)
    torch.manual_seed(0)
    m = build_model(make_config(arch, 'T5', V, max_len=8))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0)
    acc = 0.0
    for step in range(1, 401):
        m.train()
        total, n = m.loss(x, tok)
        loss = total / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            m.eval()
            with torch.no_grad():
                acc = sum(p == w for p, w in zip(decode_str(m.decode(x)[0]), words)) / len(words)
            if acc == 1.0:
                break
    assert acc == 1.0, f'{arch}: word accuracy {acc:.2f} after {step} steps (loss {loss.item():.3f})'


# ----------------------------------------------------------------------------- transformers TrOCR converter

HF_STYLES = {  # ViT + TrOCR-Small-style decoder (ReLU, scaled embeddings, untied head, cross_attention_hidden_size);
               # DeiT + TrOCR-Base-style decoder (GELU, embedding LayerNorm, tied head, an enc_to_dec_proj to fold)
    'vit': dict(activation_function='relu', scale_embedding=True, layernorm_embedding=False, tie_word_embeddings=False,
                cross_attention_hidden_size=32),
    'deit': dict(activation_function='gelu', scale_embedding=False, layernorm_embedding=True, tie_word_embeddings=True),
    'sinusoidal': dict(activation_function='gelu', scale_embedding=True, layernorm_embedding=True,   # trocr-large-printed,
                       tie_word_embeddings=False, use_learned_position_embeddings=False),          # *-stage1
}
HF_VOCAB = ['<s>', '<pad>', '</s>', '<unk>', 'a', 'Ġb', 'cd', 'Ġ', 'ĠĠx', 'yz', 'Ã©', '9']   # byte-level BPE pieces


@pytest.fixture(scope='module', params=sorted(HF_STYLES))
def hf_trocr(request, tmp_path_factory):
    """A random transformers VisionEncoderDecoderModel saved with save_pretrained (+ a byte-level BPE tokenizer's
    vocab.json and merges.txt), and its conversion."""
    tf = pytest.importorskip('transformers')
    torch.manual_seed(0)
    enc_config = (tf.DeiTConfig if request.param == 'deit' else tf.ViTConfig)(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    dec_config = tf.TrOCRConfig(vocab_size=len(HF_VOCAB), d_model=24, decoder_layers=2, decoder_attention_heads=2,
                                decoder_ffn_dim=40, max_position_embeddings=10, **HF_STYLES[request.param])
    hf = tf.VisionEncoderDecoderModel(tf.VisionEncoderDecoderConfig(encoder=enc_config.to_dict(),
                                                                    decoder=dec_config.to_dict())).eval()
    with torch.no_grad():
        for p in hf.parameters():                  # no zero biases or unit norms that could hide a mix-up
            p.normal_(0, 0.3)
    folder, out = tmp_path_factory.mktemp('hf'), tmp_path_factory.mktemp('ckpt') / 'trocr.pt'
    hf.save_pretrained(folder)
    (folder / 'vocab.json').write_text(json.dumps({p: i for i, p in enumerate(HF_VOCAB)}))
    (folder / 'merges.txt').write_text('#version: 0.2\nc d\ny z\nĠ b\n')
    with pytest.raises(SystemExit) as exit_info:
        M.convert_main(['convert-trocr', str(folder), str(out), '--check'])
    assert exit_info.value.code == 0               # --check passed: logits within 1e-4 of transformers'
    return hf, torch.load(out, weights_only=True)


def test_converted_trocr_matches_transformers(hf_trocr):
    hf, ckpt = hf_trocr
    m = build_model(ModelConfig(**ckpt['model_config']))
    m.load_state_dict(ckpt['model'])
    m.eval()
    hf_id = [2] + list(range(3, len(HF_VOCAB))) + [0, 1]    # ours -> transformers: EOS, text, BOS (<s>), PAD
    assert ckpt['tokenizer']['ids'] == hf_id and set(ckpt['tokenizer']['files']) == {'vocab.json', 'merges.txt'}
    torch.manual_seed(1)
    x, tok = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randint(0, len(HF_VOCAB) - 2, (3, 7))
    tok[:, 0] = EOS                                # the original decoder starts from EOS
    with torch.no_grad():
        ours = m.decoder(tok, m.memory_kv(x))
        theirs = hf(pixel_values=x, decoder_input_ids=torch.tensor(hf_id)[tok]).logits[..., hf_id[:-2]]
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
        ids, _ = m.decode(x, max_len=6)            # greedy decoding agrees with transformers' generate
        gen = hf.generate(pixel_values=x, max_new_tokens=7, do_sample=False, num_beams=1, decoder_start_token_id=2,
                          eos_token_id=2, pad_token_id=1, suppress_tokens=[0, 1])   # ours never predicts <s>, <pad>
    ours_of = {h: i for i, h in enumerate(hf_id)}
    ref = [[ours_of[t] for t in row[1:]] for row in gen.tolist()]
    assert [row + [m.pad] * (len(ref[0]) - len(row)) for row in ids.tolist()] == ref


def test_converted_tokenizer_loads_in_data_py(hf_trocr):
    import data
    tok = data.load_tokenizer(hf_trocr[1]['tokenizer'])
    assert tok.vocab_size == len(HF_VOCAB) and tok.decode(tok.encode(['a9cd'])) == ['a9cd']


def test_convert_trocr_bad_folder_is_one_line_error(tmp_path, hf_trocr):
    with pytest.raises(SystemExit, match='not a VisionEncoderDecoderModel folder'):
        M.convert_main(['convert-trocr', str(tmp_path), str(tmp_path / 'out.pt')])
    (tmp_path / 'config.json').write_text(json.dumps({'encoder': {'model_type': 'beit', 'hidden_act': 'gelu'},
                                                      'decoder': {'model_type': 'trocr'}}))
    with pytest.raises(SystemExit, match='a beit .gelu. encoder with a trocr decoder: only ViT or DeiT'):
        M.convert_main(['convert-trocr', str(tmp_path), str(tmp_path / 'out.pt')])
    hf, _ = hf_trocr                   # weights under other names than the config's model has
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    sd = load_file(tmp_path / 'model.safetensors')
    save_file({k.replace('layernorm_before', 'ln_1'): v for k, v in sd.items()}, tmp_path / 'model.safetensors')
    with pytest.raises(SystemExit, match=r"weights do not fit the inferred trocr model \(missing \['encoder.blocks.0.norm1"):
        M.convert_main(['convert-trocr', str(tmp_path), str(tmp_path / 'out.pt')])
    save_file(sd, tmp_path / 'model.safetensors')
    (tmp_path / 'vocab.json').write_text(json.dumps({p: i for i, p in enumerate(HF_VOCAB)}))   # merges.txt missing
    with pytest.raises(SystemExit, match='no tokenizer.json, vocab.json . merges.txt or SentencePiece .model'):
        M.convert_main(['convert-trocr', str(tmp_path), str(tmp_path / 'out.pt')])
    (tmp_path / 'merges.txt').write_text('#version: 0.2\n')
    (tmp_path / 'vocab.json').write_text('{"a": 0,')   # cut
    with pytest.raises(SystemExit, match=r'vocab.json is not JSON \(Expecting property name'):
        M.convert_main(['convert-trocr', str(tmp_path), str(tmp_path / 'out.pt')])
    (tmp_path / 'vocab.json').write_text(json.dumps({p: i for i, p in enumerate(HF_VOCAB)}))
    with pytest.raises(SystemExit, match=r'model.py convert-trocr: cannot write .*nope/out.pt'):
        M.convert_main(['convert-trocr', str(tmp_path), str(tmp_path / 'nope' / 'out.pt')])


def test_size_table_refuses_a_vocabulary_without_text_tokens():
    out = subprocess.run([sys.executable, M.__file__, '--vocab', '3'], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.splitlines()[-1] == (
        'model.py: error: argument --vocab: 3: a vocabulary holds a text token besides EOS, BOS and PAD (>= 4)')


# ----------------------------------------------------------------------------- released PARSeq checkpoints

def strhub_names(state):
    """Our PARSeq state_dict under the names of strhub's PARSeq (baudm/parseq): timm's ViT encoder, nn.MultiheadAttention
    (q, k, v stacked in in_proj), linear1/linear2, decoder.norm, text_embed.embedding."""
    out = {}
    for key, value in state.items():
        if key.startswith('encoder.'):
            key = key.replace('encoder.pos', 'encoder.pos_embed').replace('encoder.patch.', 'encoder.patch_embed.proj.')
            key = key.replace('.mlp.0.', '.mlp.fc1.').replace('.mlp.2.', '.mlp.fc2.')
        else:
            key = {'norm.weight': 'decoder.norm.weight', 'norm.bias': 'decoder.norm.bias'}.get(key, key)
            key = key.replace('layers.', 'decoder.layers.').replace('.mlp.0.', '.linear1.').replace('.mlp.2.', '.linear2.')
            key = key.replace('attn.proj.', 'attn.out_proj.').replace('text_emb.', 'text_embed.embedding.')
        if '_attn.kv.' in key:
            continue
        if '_attn.q.' in key:
            kind = key.rsplit('.', 1)[1]
            out[key.replace(f'q.{kind}', f'in_proj_{kind}')] = torch.cat([value, state[key.replace('decoder.', '').replace(
                '.q.', '.kv.')]])
        else:
            out[key] = value
    return out


class HyperParameters(dict):       # stands for Lightning's AttributeDict: a class torch.load(weights_only) refuses
    pass


class RunsCode:                    # a pickle that would create a folder if the loader ran what files name
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_convert_parseq_reads_every_released_format(tmp_path):
    assert len(strhub_names(build_model(make_config('parseq', 'S', 97)).state_dict())) == 175   # strhub's PARSeq-S
    cfg = make_config('parseq', 'S', 97, enc_width=64, enc_depth=2, enc_heads=1, dec_width=64, dec_heads=2)
    torch.manual_seed(0)
    ours = build_model(cfg).state_dict()
    theirs = strhub_names(ours)
    marker, charset = tmp_path / 'ran', M.STRHUB_CHARSET[::-1]
    files = {'hub_2022.pt': theirs, 'hub_2024.pt': {'model.' + k: v for k, v in theirs.items()},
             'lightning.ckpt': {'state_dict': {'model.' + k: v for k, v in theirs.items()}, 'epoch': 3,
                                'hyper_parameters': HyperParameters(charset_train=charset, img_size=[32, 128]),
                                'callbacks': {'ModelCheckpoint': RunsCode(str(marker))}}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        M.convert_main(['convert-parseq', str(tmp_path / name), str(tmp_path / 'out.pt')])
        ckpt = torch.load(tmp_path / 'out.pt', weights_only=True)
        assert ckpt['model_config'] == dataclasses.asdict(cfg), name
        assert ckpt['model'].keys() == ours.keys() and all(torch.equal(ckpt['model'][k], v) for k, v in ours.items())
        want = charset if name == 'lightning.ckpt' else M.STRHUB_CHARSET   # the hub files: strhub's 94 characters
        assert ckpt['tokenizer'] == {'type': 'char', 'charset': want, 'max_len': 25}
    assert not marker.exists()     # the Lightning file's objects were rebuilt as data, never called
    theirs['text_embed.embedding.weight'] = theirs['text_embed.embedding.weight'][:40]
    torch.save(theirs, tmp_path / 'other_charset.pt')
    with pytest.raises(SystemExit, match='37 characters and no charset_train'):
        M.convert_main(['convert-parseq', str(tmp_path / 'other_charset.pt'), str(tmp_path / 'out.pt')])
    for hp, why in ((HyperParameters(charset_train=1234567890), '37 characters and no charset_train'),  # YAML's int
                    (HyperParameters(charset_train=charset[:37], enc_num_heads=5), 'config cannot be built .width 64')):
        torch.save({'state_dict': {'model.' + k: v for k, v in theirs.items()}, 'hyper_parameters': hp},
                   tmp_path / 'odd.ckpt')
        with pytest.raises(SystemExit, match=why):
            M.convert_main(['convert-parseq', str(tmp_path / 'odd.ckpt'), str(tmp_path / 'out.pt')])
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match='cannot read it as a torch checkpoint'):
        M.convert_main(['convert-parseq', str(tmp_path / 'junk.pt'), str(tmp_path / 'out.pt')])


def strhub_parseq_s():
    system = pytest.importorskip('strhub.models.parseq.system')
    return system.PARSeq(M.STRHUB_CHARSET, M.STRHUB_CHARSET, 25, 384, 7e-4, 0.075, 0.0, [32, 128], [4, 8], 384, 6, 4,
                         12, 12, 4, 1, 6, True, True, True, 1, 0.1)


def test_plm_orders_of_short_labels_are_strhubs():
    """Over many batches, the orders of a batch whose longest label has L < 5 characters: the same first two, the
    same count, distinct, and together the same set as strhub's gen_tgt_perms draws."""
    ref = strhub_parseq_s()
    for L in (2, 3, 4):
        theirs, ours = set(), set()
        for _ in range(300):
            a = ref.gen_tgt_perms(torch.zeros(2, L + 2, dtype=torch.long)).tolist()
            b = sample_orders(L, num_orders(make_config('parseq', 'S', 97), L)).tolist()
            assert a[:2] == b[:2] and len(a) == len(b) == len(set(map(tuple, b)))
            theirs.update(map(tuple, a))
            ours.update(map(tuple, b))
        assert ours == theirs, L


def test_convert_parseq_matches_strhub(tmp_path):
    """strhub's own PARSeq-S with random weights: --check compares teacher-forced logits and decoded strings."""
    torch.manual_seed(0)
    ref = strhub_parseq_s()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({'model.' + k: v for k, v in ref.state_dict().items()}, tmp_path / 'parseq.pt')
    with pytest.raises(SystemExit) as exit_info:
        M.convert_main(['convert-parseq', str(tmp_path / 'parseq.pt'), str(tmp_path / 'out.pt'), '--check'])
    assert exit_info.value.code == 0


def trocr_with_eos_ramp(tf, folder, eos_scale):
    """A random ViT + TrOCR-Small-style transformers model whose EOS logit grows with the position at a rate set by
    eos_scale, so that rows end at varied lengths: positions ramp along a direction u, the EOS output row is
    eos_scale * u, and the decoder layers' self-attention and MLP outputs are damped so the ramp reaches the head."""
    torch.manual_seed(0)
    enc = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8)
    dec = tf.TrOCRConfig(vocab_size=14, d_model=24, decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=40,
                         max_position_embeddings=10, **HF_STYLES['vit'])
    hf = tf.VisionEncoderDecoderModel(tf.VisionEncoderDecoderConfig(encoder=enc.to_dict(), decoder=dec.to_dict()))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if 'norm' in name:
                p.copy_(torch.randn_like(p) * 0.1 + name.endswith('weight'))
            elif p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5 * (0.3 if 'self_attn.out_proj' in name or 'fc2' in name else 1))
            else:
                p.normal_(0, 0.1)
        u = F.normalize(torch.randn(24), dim=0)
        pos = hf.decoder.model.decoder.embed_positions.weight
        pos += 0.5 * torch.arange(len(pos))[:, None] * u
        hf.decoder.output_projection.weight[2] = eos_scale * u          # transformers' </s> = our EOS
    hf.save_pretrained(folder)
    (folder / 'vocab.json').write_text(json.dumps({f'<{i}>': i for i in range(14)}))   # the converter needs a tokenizer
    (folder / 'merges.txt').write_text('#version: 0.2\n')
    m, spec, _ = M.trocr_from_transformers(folder)
    return hf.eval(), m, spec['ids']


@pytest.mark.parametrize('eos_scale', [0.5, 1.0, 2.0])
def test_beam_search_matches_transformers(eos_scale, tmp_path):
    """Same sequences as transformers' generate(num_beams=4, early_stopping="never") with length_penalty 1 (len_norm)
    and 0. transformers' log-softmax runs over the whole vocabulary before suppress_tokens, so its <s> and <pad>
    logits are set to -inf (our head has no such classes) for the scores to be the same."""
    tf = pytest.importorskip('transformers')
    hf, m, hf_id = trocr_with_eos_ramp(tf, tmp_path, eos_scale)
    hf.decoder.output_projection.register_forward_hook(lambda mod, args, out: out.index_fill(-1, torch.tensor([0, 1]),
                                                                                                  float('-inf')))
    ours_of = {h: i for i, h in enumerate(hf_id)}
    lengths = set()
    for seed, len_norm in ((1, True), (2, True), (3, False)):
        torch.manual_seed(seed)
        x = torch.rand(32, 3, 32, 32) * 2 - 1
        with torch.no_grad():
            ids, _ = m.decode(x, beam=4, len_norm=len_norm)
            gen = hf.generate(pixel_values=x, max_new_tokens=10, num_beams=4, length_penalty=float(len_norm),
                              early_stopping='never', do_sample=False, decoder_start_token_id=2, eos_token_id=2,
                              pad_token_id=1, suppress_tokens=[0, 1])
        ref = [[ours_of[t] for t in row[1:] if t != 1] for row in gen.tolist()]
        assert [[t for t in row if t != m.pad] for row in ids.tolist()] == ref
        lengths |= {len(row) - (row[-1] == EOS) for row in ref}
    assert len(lengths) >= 3                       # some rows end early, some run to max length
