"""
ViT, TrOCR and PARSeq in one file, at the sizes of Rang et al. (arXiv 2401.00028).

    python model.py            # size table: layers, widths, parameters (ours vs paper), forward GFLOPs
    python model.py --json     # the same as a JSON list

    from model import make_config, build_model
    cfg = make_config('parseq', 'S', vocab_size=tok.vocab_size, enc_depth=6)   # any field can be overridden
    model = build_model(cfg)
    loss, n = model.loss(images, tok.encode(labels))      # images (B,3,H,W) in [-1,1]; model(...) is the same
    ids, conf = model.decode(images)                      # beam=k (TrOCR), ar=False / refine_iters=k (PARSeq)
    count_params(cfg), forward_flops(cfg), train_flops_per_sample(cfg)   # analytic, no model needed

Token ids (shared with data.py): 0 = EOS, 1..V-3 text tokens, V-2 = BOS, V-1 = PAD. Heads predict V-2 classes.
- TrOCR: ViT encoder (CLS kept in the memory) + causal Transformer decoder with cross-attention and a tied
  output projection; greedy/beam decoding with a KV cache.
- PARSeq: ViT encoder (no CLS) + two-stream decoder trained by permutation language modelling; AR (cached) or
  NAR decoding followed by cloze refinement passes.
Not here: data, tokenizers, training loop, mixed precision (train.py uses autocast; losses are float32 anyway).
All blocks are pre-LN (the original TrOCR decoder is post-LN; the parameter count is the same).
"""
import argparse
import json
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    arch: str = 'parseq'          # 'trocr' | 'parseq'
    img_h: int = 32
    img_w: int = 128
    patch_h: int = 4
    patch_w: int = 8
    in_chans: int = 3
    enc_width: int = 384
    enc_depth: int = 12
    enc_heads: int = 6
    mlp_ratio: float = 4.0
    cls_token: bool = False       # TrOCR keeps CLS in the memory, PARSeq has none
    qkv_bias: bool = True         # encoder only; decoder projections always have biases
    dec_width: int = 384
    dec_depth: int = 1
    dec_heads: int = 12
    dec_mlp_ratio: float = 4.0
    max_len: int = 25             # longest label in tokens (EOS not included)
    vocab_size: int = 97          # tokenizer.vocab_size (94 chars + EOS, BOS, PAD)
    dropout: float = 0.1          # decoder only (PARSeq and TrOCR both train with 0.1 there)
    pos_std: float = 0.02         # init std of learned position embeddings (0.5 helps tiny column-patch models)
    init_std: float = 0.02        # init std of other weights; 0 = 1/sqrt(fan_in) (tiny widths learn far faster)
    perm_num: int = 6             # PARSeq: permutations per batch, mirrors included
    perm_mirrored: bool = True


# ----------------------------------------------------------------------------- building blocks

class Attention(nn.Module):
    """Multi-head attention. kv_dim=None: self-attention with a fused qkv projection (KV cache optional);
    otherwise queries come from x and keys/values from a context of width kv_dim (or precomputed (k, v))."""

    def __init__(self, dim, heads, kv_dim=None, bias=True):
        super().__init__()
        assert dim % heads == 0, f'width {dim} not divisible by {heads} heads'
        self.heads, self.fused = heads, kv_dim is None
        if self.fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        else:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(kv_dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim)

    def split(self, t):  # (B, T, C) -> (B, heads, T, head_dim)
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def project_kv(self, ctx):
        k, v = self.kv(ctx).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def forward(self, x, kv=None, mask=None, causal=False, cache=None):
        # mask: bool, True = may attend, broadcastable to (B, heads, Tq, Tk)
        if self.fused:
            q, k, v = map(self.split, self.qkv(x).chunk(3, dim=-1))
            if cache is not None:                  # incremental decoding: append this step's keys/values
                if cache:
                    k, v = torch.cat([cache['k'], k], 2), torch.cat([cache['v'], v], 2)
                cache['k'], cache['v'] = k, v
        else:
            q = self.split(self.q(x))
            k, v = kv if isinstance(kv, tuple) else self.project_kv(kv)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, heads, Tq, hd)
        return self.proj(y.transpose(1, 2).flatten(2))


class MLP(nn.Sequential):
    def __init__(self, dim, ratio):
        super().__init__(nn.Linear(dim, int(dim * ratio)), nn.GELU(), nn.Linear(int(dim * ratio), dim))


class Block(nn.Module):
    """Pre-LN ViT block."""

    def __init__(self, dim, heads, mlp_ratio, qkv_bias):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, bias=qkv_bias)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Conv patch embedding, learned absolute positions, optional CLS, pre-LN blocks, final LayerNorm."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.img_h % cfg.patch_h == 0 and cfg.img_w % cfg.patch_w == 0, 'image size must be a multiple of the patch'
        d = cfg.enc_width
        self.patch = nn.Conv2d(cfg.in_chans, d, (cfg.patch_h, cfg.patch_w), (cfg.patch_h, cfg.patch_w))
        self.cls = nn.Parameter(torch.zeros(1, 1, d)) if cfg.cls_token else None
        self.pos = nn.Parameter(torch.zeros(1, num_patches(cfg) + cfg.cls_token, d))
        self.blocks = nn.ModuleList(Block(d, cfg.enc_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, T_e, d)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1)
        x = x + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def num_patches(cfg):
    return (cfg.img_h // cfg.patch_h) * (cfg.img_w // cfg.patch_w)


def init_weights(model, cfg):
    for name, p in model.named_parameters():
        if name.endswith('bias') or 'norm' in name:
            nn.init.ones_(p) if ('norm' in name and name.endswith('weight')) else nn.init.zeros_(p)
        else:  # positions, linear, conv, token embeddings, CLS
            std = cfg.pos_std if (name.endswith('pos') or 'pos_' in name) else cfg.init_std or p[0].numel() ** -0.5
            nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)


def finish(ids, probs, eos=0, pad=-1):
    """Cut each row after its first EOS (PAD after it); conf = product of kept probabilities (incl. EOS)."""
    after = (ids == eos).int().cumsum(1) - (ids == eos).int() > 0    # strictly after the first EOS
    ids = ids.masked_fill(after, pad)
    conf = probs.masked_fill(after, 1.0).prod(1)
    t = int((~after).sum(1).max()) if len(ids) else 0
    return ids[:, :t], conf


class Recognizer(nn.Module):
    """What TrOCR and PARSeq share: the ViT encoder, token ids, cross-attention keys/values, forward = loss."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, V = cfg, cfg.vocab_size
        self.eos, self.bos, self.pad = 0, V - 2, V - 1
        self.encoder = ViT(cfg)

    def memory_kv(self, images):  # cross-attention keys/values of every layer: computed once per image
        memory = self.encoder(images)
        return [layer.cross_attn.project_kv(memory) for layer in self.layers]

    def forward(self, images, tokens):  # so that DDP/compile wrappers can call model(images, tokens)
        return self.loss(images, tokens)


# ----------------------------------------------------------------------------- TrOCR

class TrOCRLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.dec_width
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d, eps=1e-6) for _ in range(3))
        self.self_attn = Attention(d, cfg.dec_heads)
        self.cross_attn = Attention(d, cfg.dec_heads, kv_dim=cfg.enc_width)
        self.mlp = MLP(d, cfg.dec_mlp_ratio)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mem_kv, cache=None):
        x = x + self.drop(self.self_attn(self.norm1(x), causal=cache is None, cache=cache))
        x = x + self.drop(self.cross_attn(self.norm2(x), kv=mem_kv))
        return x + self.drop(self.mlp(self.norm3(x)))


class TrOCR(Recognizer):
    def __init__(self, cfg):
        super().__init__(cfg)
        d, V = cfg.dec_width, cfg.vocab_size
        self.tok_emb = nn.Embedding(V, d)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.max_len + 1, d))  # inputs: BOS + up to max_len tokens
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TrOCRLayer(cfg) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        init_weights(self, cfg)

    def decoder(self, tokens, mem_kv, start=0, caches=None):
        x = self.drop(self.tok_emb(tokens) + self.pos_emb[:, start:start + tokens.shape[1]])
        for layer, kv, cache in zip(self.layers, mem_kv, caches or [None] * len(self.layers)):
            x = layer(x, kv, cache)
        return F.linear(self.norm(x), self.tok_emb.weight[:self.pad - 1])  # tied; BOS/PAD never predicted

    def loss(self, images, tokens):
        logits = self.decoder(tokens[:, :-1], self.memory_kv(images)).float()
        tgt = tokens[:, 1:]
        n = (tgt != self.pad).sum()
        return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=self.pad), n

    @torch.no_grad()
    def decode(self, images, max_len=None, beam=1, ar=True, refine_iters=1, use_cache=True):
        """Beam search (beam=1: greedy). Finished hypotheses keep their score and repeat EOS at no cost;
        no length penalty, so conf = product of the chosen tokens' probabilities, as for greedy."""
        steps = min(max_len or self.cfg.max_len, self.cfg.max_len) + 1
        mem_kv = self.memory_kv(images)
        B, C = len(images), self.pad - 1
        if beam > 1:
            mem_kv = [(k.repeat_interleave(beam, 0), v.repeat_interleave(beam, 0)) for k, v in mem_kv]
        seqs = torch.full((B * beam, 1), self.bos, dtype=torch.long, device=images.device)
        scores = torch.full((B, beam), float('-inf'), device=images.device)
        scores[:, 0] = 0                                    # all beams start identical: expand only one
        done = torch.zeros(B * beam, dtype=torch.bool, device=images.device)
        eos_only = torch.full((C,), float('-inf'), device=images.device)
        eos_only[self.eos] = 0
        caches = [{} for _ in self.layers] if use_cache else None
        for t in range(steps):
            if use_cache:
                logits = self.decoder(seqs[:, -1:], mem_kv, start=t, caches=caches)
            else:
                logits = self.decoder(seqs, mem_kv)
            logp = logits[:, -1].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
            logp = torch.where(done[:, None], eos_only, logp)
            cand = (scores.view(-1, 1) + logp).view(B, beam * C)
            scores, idx = cand.topk(beam, dim=1)                                  # (B, beam)
            src = (idx // C + torch.arange(B, device=idx.device)[:, None] * beam).view(-1)
            tok = (idx % C).view(-1, 1)
            seqs, done = torch.cat([seqs[src], tok], 1), done[src] | (tok[:, 0] == self.eos)
            if use_cache and beam > 1:
                for c in caches:
                    c['k'], c['v'] = c['k'][src], c['v'][src]
            if done.all():
                break
        best = scores.argmax(1)
        ids = seqs[torch.arange(B, device=best.device) * beam + best, 1:]
        conf = scores.gather(1, best[:, None])[:, 0].exp()
        ids, _ = finish(ids, torch.ones(ids.shape, device=ids.device), self.eos, self.pad)
        return ids, conf


# ----------------------------------------------------------------------------- PARSeq

def sample_orders(L, k, mirrored=True):
    """PLM orders over sequence positions 0..L+1 (0 = [B], always first; L+1 = EOS position) for a batch whose
    longest label has L tokens: the forward order, then (mirrored) the EOS-first reverse order, then random
    orders each followed by its mirror; fewer when L is short. Uses torch's global RNG."""
    n = k // 2 if mirrored and L > 1 else k
    n = min(n, math.factorial(L) // (2 if mirrored and L > 1 else 1))
    perms = [torch.arange(L)]
    while len(perms) < n:
        p = torch.randperm(L)
        if not any(torch.equal(p, q) or (mirrored and torch.equal(p, q.flip(0))) for q in perms):
            perms.append(p)
    if mirrored and L > 1:
        perms = [r for p in perms for r in (p, p.flip(0))]
    orders = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), p + 1, torch.tensor([L + 1])]) for p in perms])
    if len(orders) > 1:                      # paper §4: the reverse order predicts EOS first, from [B] alone
        orders[1, 1:] = torch.arange(L + 1, 0, -1)
    return orders


def order_masks(order):
    """Attention masks (True = may attend) for one order over positions 0..L+1.
    query mask (L+1, L+1): query i predicts position i+1, keys are context slots 0..L; it sees the slots that
    come strictly before position i+1 in the order (so never its own slot, always [B]).
    content mask (L+1, L+1): slot i sees itself and the slots before it in the order."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    qmask = rank[None, :-1] < rank[1:, None]
    cmask = rank[None, :-1] <= rank[:-1, None]
    return qmask, cmask


class PARSeqLayer(nn.Module):
    """Two-stream decoder layer: queries (positions) attend to the content stream, then to the image, then MLP."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.dec_width
        self.norm_q, self.norm_c, self.norm1, self.norm2 = (nn.LayerNorm(d, eps=1e-6) for _ in range(4))
        self.self_attn = Attention(d, cfg.dec_heads, kv_dim=d)
        self.cross_attn = Attention(d, cfg.dec_heads, kv_dim=cfg.enc_width)
        self.mlp = MLP(d, cfg.dec_mlp_ratio)
        self.drop = nn.Dropout(cfg.dropout)

    def stream(self, x, x_norm, ctx_kv, mem_kv, mask=None):
        x = x + self.drop(self.self_attn(x_norm, kv=ctx_kv, mask=mask))
        x = x + self.drop(self.cross_attn(self.norm1(x), kv=mem_kv))
        return x + self.drop(self.mlp(self.norm2(x)))

    def forward(self, q, c, mem_kv, qmask, cmask, update_content):
        c_norm = self.norm_c(c)
        ctx_kv = self.self_attn.project_kv(c_norm)  # shared by both streams
        q = self.stream(q, self.norm_q(q), ctx_kv, mem_kv, qmask)
        if update_content:
            c = self.stream(c, c_norm, ctx_kv, mem_kv, cmask)
        return q, c


class PARSeq(Recognizer):
    def __init__(self, cfg):
        super().__init__(cfg)
        d, V = cfg.dec_width, cfg.vocab_size
        self.text_emb = nn.Embedding(V, d)
        self.pos_queries = nn.Parameter(torch.zeros(1, cfg.max_len + 1, d))
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(PARSeqLayer(cfg) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, V - 2)
        init_weights(self, cfg)

    def embed(self, tokens, start=0):
        """Context slots: slot 0 = sqrt(d)*emb([B]) without position, slot j>=1 = sqrt(d)*emb(tok) + pos_queries[j-1]."""
        x = self.text_emb(tokens) * math.sqrt(self.cfg.dec_width)
        pos = torch.cat([torch.zeros_like(self.pos_queries[:, :1]), self.pos_queries], 1)
        return x + pos[:, start:start + tokens.shape[1]]

    def run(self, ctx, queries, mem_kv, qmask=None, cmask=None):
        for i, layer in enumerate(self.layers):
            queries, ctx = layer(queries, ctx, mem_kv[i], qmask, cmask, update_content=i < len(self.layers) - 1)
        return self.head(self.norm(queries))

    def loss(self, images, tokens):
        """PLM loss: token-weighted mean cross-entropy over K orders; EOS is a target in the first two only."""
        mem_kv = self.memory_kv(images)
        ctx_tok, tgt = tokens[:, :-1], tokens[:, 1:]                       # (B, L+1) each
        L = tokens.shape[1] - 2
        ctx = self.drop(self.embed(ctx_tok))
        queries = self.drop(self.pos_queries[:, :L + 1].expand(len(tokens), -1, -1))  # a dropout mask per sample
        keep = ((ctx_tok != self.pad) & (ctx_tok != self.eos))[:, None, None, :]  # padded context is never seen
        total, n = 0.0, 0
        k = self.cfg.perm_num if self.training else 2  # eval: the two fixed orders, so val loss uses no RNG
        for i, order in enumerate(sample_orders(L, k, self.cfg.perm_mirrored)):
            qmask, cmask = (m.to(tokens.device) for m in order_masks(order))
            if i == 2:
                tgt = tgt.masked_fill(tgt == self.eos, self.pad)
            logits = self.run(ctx, queries, mem_kv, qmask & keep, cmask & keep).float()
            total = total + F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=self.pad, reduction='sum')
            n = n + (tgt != self.pad).sum()
        return total / n, n

    @torch.no_grad()
    def decode(self, images, max_len=None, beam=1, ar=True, refine_iters=1, use_cache=True):
        """AR (greedy; cached context keys/values) or NAR decoding, then refine_iters cloze passes.
        beam is ignored (PARSeq decodes greedily)."""
        T = min(max_len or self.cfg.max_len, self.cfg.max_len) + 1
        B, dev = len(images), images.device
        mem_kv = self.memory_kv(images)
        queries = self.pos_queries[:, :T].expand(B, -1, -1)
        bos = torch.full((B, 1), self.bos, dtype=torch.long, device=dev)
        if ar:
            ctx_tok, logits = bos, []
            caches = [[] for _ in self.layers]
            for i in range(T):
                if use_cache:
                    logits.append(self.step(ctx_tok[:, -1:], i, queries[:, i:i + 1], mem_kv, caches))
                else:
                    causal = torch.ones(i + 1, i + 1, dtype=torch.bool, device=dev).tril()
                    out = self.run(self.embed(ctx_tok), queries[:, :i + 1], mem_kv, causal, causal)
                    logits.append(out[:, -1:])
                ctx_tok = torch.cat([ctx_tok, logits[-1].argmax(-1)], 1)
                if (ctx_tok == self.eos).any(1).all():
                    break
            logits = torch.cat(logits, 1)
        else:                                                  # NAR: every query sees only [B]
            logits = self.run(self.embed(bos), queries, mem_kv)
        Tq = logits.shape[1]
        for _ in range(refine_iters):                          # cloze: every slot but one's own, cut after EOS
            ctx_tok = torch.cat([bos, logits[:, :-1].argmax(-1)], 1)
            keep = ((ctx_tok == self.eos).int().cumsum(1) == 0)[:, None, None, :]
            causal = torch.ones(Tq, Tq, dtype=torch.bool, device=dev).tril()
            cloze = ~torch.ones(Tq, Tq, dtype=torch.bool, device=dev).triu(1).tril(1)  # all but own slot i+1
            logits = self.run(self.embed(ctx_tok), queries[:, :Tq], mem_kv, cloze & keep, causal & keep)
        probs, ids = logits.float().softmax(-1).max(-1)
        return finish(ids, probs, self.eos, self.pad)

    def step(self, tok, i, query, mem_kv, caches):
        """Cached AR step i: add context slot i (token tok), then run query i against slots 0..i."""
        c = self.embed(tok, start=i)
        for l, layer in enumerate(self.layers):                # extend every layer's content keys/values
            c_norm = layer.norm_c(c)
            k, v = layer.self_attn.project_kv(c_norm)
            if caches[l]:
                k, v = torch.cat([caches[l][0], k], 2), torch.cat([caches[l][1], v], 2)
            caches[l] = (k, v)
            if l < len(self.layers) - 1:
                c = layer.stream(c, c_norm, caches[l], mem_kv[l])
        q = query
        for l, layer in enumerate(self.layers):
            q = layer.stream(q, layer.norm_q(q), caches[l], mem_kv[l])
        return self.head(self.norm(q))


# ----------------------------------------------------------------------------- sizes

_TROCR = dict(arch='trocr', img_h=384, img_w=384, patch_h=16, patch_w=16, cls_token=True, qkv_bias=False,
              dec_width=1024, dec_depth=12, dec_heads=16)
_PARSEQ = dict(arch='parseq', img_h=32, img_w=128, patch_h=4, patch_w=8, cls_token=False, qkv_bias=True)
_TINY = dict(img_h=16, img_w=64, patch_h=16, patch_w=4, dropout=0.0, pos_std=0.5, init_std=0, dec_depth=1)


def _tiny(arch, i):
    w, depth = (16, 24, 32, 48, 64, 96, 128)[i], (1, 2, 2, 2, 3, 3, 4)[i]   # design notes' CPU ladder
    h = max(1, w // 32)
    return dict(arch=arch, cls_token=arch == 'trocr', qkv_bias=True, **_TINY,
                enc_width=w, enc_depth=depth, enc_heads=h, dec_width=w, dec_heads=h)


SIZES = {
    'trocr': {
        # S: DeiT-S/16 encoder (qkv bias) + a MiniLM-width decoder (384, heads of 64); the study's 43.09M leaves
        # ~21M for the decoder, i.e. 9 layers (the original TrOCR-S decoder, 6 x 256, would total only 28M).
        'S': dict(_TROCR, enc_width=384, enc_depth=12, enc_heads=6, qkv_bias=True,
                  dec_width=384, dec_depth=9, dec_heads=6),
        # B, L: original TrOCR-Base/Large (ViT-B/16, ViT-L/16 at 384 + 12x1024 decoder) with a char vocabulary
        'B': dict(_TROCR, enc_width=768, enc_depth=12, enc_heads=12),
        'L': dict(_TROCR, enc_width=1024, enc_depth=24, enc_heads=16),
        # H: unpublished recipe; ViT-H/16 encoder (1280 x 32) and the decoder doubled to 24 layers hits 1.037B
        'H': dict(_TROCR, enc_width=1280, enc_depth=32, enc_heads=16, dec_depth=24),
    },
    'parseq': {
        # S: original PARSeq-S encoder (384 x 12); a 256-wide decoder accounts for the study's 22.51M
        # (the original 384-wide decoder gives 23.83M).  Decoder heads = width/32 as in PARSeq.
        'S': dict(_PARSEQ, enc_width=384, enc_depth=12, enc_heads=6, dec_width=256, dec_depth=1, dec_heads=8),
        # B, H: ViT-B / ViT-H encoders at 32x128; two decoder layers make up the published ~104M / 682M.
        'B': dict(_PARSEQ, enc_width=768, enc_depth=12, enc_heads=12, dec_width=768, dec_depth=2, dec_heads=24),
        # L (unpublished): the ViT-L encoder, as TrOCR-L; ~336M sits near the geometric mean of B and H (266M),
        # so the four sizes are roughly evenly spaced in log N for the size law.
        'L': dict(_PARSEQ, enc_width=1024, enc_depth=24, enc_heads=16, dec_width=1024, dec_depth=2, dec_heads=32),
        'H': dict(_PARSEQ, enc_width=1280, enc_depth=32, enc_heads=16, dec_width=1280, dec_depth=2, dec_heads=40),
    },
}
for _arch in SIZES:
    SIZES[_arch].update({f'T{i + 1}': _tiny(_arch, i) for i in range(7)})

PAPER_PARAMS = {  # paper §3: (text) quoted, (fig) read off figures
    'trocr': {'S': 43.09e6, 'B': 282.5e6, 'L': 505.6e6, 'H': 1.037e9},
    'parseq': {'S': 22.51e6, 'B': 104e6, 'L': None, 'H': 682e6},
}


def make_config(arch, size, vocab_size, **overrides):
    if arch not in SIZES or size not in SIZES[arch]:
        raise KeyError(f'unknown model {arch}-{size}; choose arch from {list(SIZES)} and size from {list(SIZES["trocr"])}')
    names = {f.name for f in fields(ModelConfig)}
    bad = set(overrides) - names
    if bad:
        raise TypeError(f'unknown config field(s) {sorted(bad)}; valid: {sorted(names)}')
    return ModelConfig(**{**SIZES[arch][size], 'vocab_size': vocab_size, **overrides})


def build_model(cfg):
    return {'trocr': TrOCR, 'parseq': PARSeq}[cfg.arch](cfg)


# ----------------------------------------------------------------------------- parameters and FLOPs

def _lin(i, o, bias=True):
    return i * o + o * bias


def _attn(d, kv_dim=None, bias=True):  # fused qkv or q + kv, then the output projection (always biased)
    return _lin(d, d, bias) + _lin(kv_dim or d, 2 * d, bias) + _lin(d, d)


def _mlp(d, ratio):
    return _lin(d, int(d * ratio)) + _lin(int(d * ratio), d)


def count_params(cfg):
    """(total, non_embedding) computed from the config; equals sum(p.numel()) of build_model(cfg).
    non_embedding leaves out the token embedding and every position embedding (the head is counted)."""
    d, e, V = cfg.dec_width, cfg.enc_width, cfg.vocab_size
    T_e = num_patches(cfg) + cfg.cls_token
    enc = (_lin(cfg.in_chans * cfg.patch_h * cfg.patch_w, e) + e * cfg.cls_token + T_e * e + 2 * e
           + cfg.enc_depth * (4 * e + _attn(e, bias=cfg.qkv_bias) + _mlp(e, cfg.mlp_ratio)))
    emb = V * d + (cfg.max_len + 1) * d + T_e * e
    if cfg.arch == 'trocr':   # 3 norms, self-attn, cross-attn, MLP per layer; tied head
        layer = 6 * d + _attn(d) + _attn(d, e) + _mlp(d, cfg.dec_mlp_ratio)
        dec = V * d + (cfg.max_len + 1) * d + cfg.dec_depth * layer + 2 * d
    else:                     # 4 norms, two attentions, MLP per layer; untied head over V-2 classes
        layer = 8 * d + _attn(d, d) + _attn(d, e) + _mlp(d, cfg.dec_mlp_ratio)
        dec = V * d + (cfg.max_len + 1) * d + cfg.dec_depth * layer + 2 * d + _lin(d, V - 2)
    return enc + dec, enc + dec - emb


def _flops_parts(cfg, dec_len=None):
    """(encoder, per-image decoder, per-order decoder) forward FLOPs per image, 2 per multiply-add, matmuls only
    (linear layers, attention scores and weighted sums, head); norms, softmax, GELU, adds are left out."""
    d, e, C = cfg.dec_width, cfg.enc_width, cfg.vocab_size - 2
    T_e = num_patches(cfg) + cfg.cls_token
    T_d = (dec_len or cfg.max_len) + 1
    h_e, h_d = int(e * cfg.mlp_ratio), int(d * cfg.dec_mlp_ratio)
    enc = 2 * num_patches(cfg) * cfg.in_chans * cfg.patch_h * cfg.patch_w * e
    enc += cfg.enc_depth * (2 * T_e * (4 * e * e + 2 * e * h_e) + 4 * e * T_e * T_e)
    xkv = cfg.dec_depth * 2 * T_e * 2 * e * d     # cross-attention K/V of the image tokens, once per image
    kv = 2 * T_d * 2 * d * d                      # self-attention K/V of the T_d decoder inputs
    stream = 2 * T_d * (4 * d * d + 2 * d * h_d) + 4 * d * T_d * (T_d + T_e)  # q,o (self, cross), MLP, scores
    if cfg.arch == 'trocr':
        dec = cfg.dec_depth * (kv + stream)
    else:  # query stream every layer, content stream every layer but the last
        dec = cfg.dec_depth * (kv + stream) + (cfg.dec_depth - 1) * stream
    return enc, xkv, dec + 2 * d * C * T_d


def forward_flops(cfg, dec_len=None):
    """Forward FLOPs per image: encoder + one teacher-forced decoder pass (PARSeq: one order) over
    dec_len (default max_len) tokens + EOS."""
    return float(sum(_flops_parts(cfg, dec_len)))


def train_flops_per_sample(cfg, dec_len=None):
    """Forward + backward (= 3x forward) FLOPs per training image; PARSeq runs the decoder once per order
    (perm_num of them) against cross-attention keys/values computed once."""
    enc, xkv, dec = _flops_parts(cfg, dec_len)
    return 3.0 * (enc + xkv + dec * (cfg.perm_num if cfg.arch == 'parseq' else 1))


# ----------------------------------------------------------------------------- size table

def table(vocab_size=97):
    rows = []
    for arch in SIZES:
        for size in SIZES[arch]:
            cfg = make_config(arch, size, vocab_size)
            paper = PAPER_PARAMS[arch].get(size)
            rows.append(dict(arch=arch, size=size, enc_layers=cfg.enc_depth, enc_width=cfg.enc_width,
                             enc_heads=cfg.enc_heads, dec_layers=cfg.dec_depth, dec_width=cfg.dec_width,
                             dec_heads=cfg.dec_heads, image=f'{cfg.img_h}x{cfg.img_w}',
                             patch=f'{cfg.patch_h}x{cfg.patch_w}', params=count_params(cfg)[0],
                             paper_params=None if paper is None else int(paper),
                             gflops=float(f'{forward_flops(cfg) / 1e9:.4g}')))
    return rows


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description='Print the size table (parameters at a 97-id char vocabulary).')
    ap.add_argument('--json', action='store_true', help='print a JSON list instead of a table')
    ap.add_argument('--vocab', type=int, default=97, help='tokenizer vocab size (94 chars + EOS/BOS/PAD)')
    args = ap.parse_args()
    rows = table(args.vocab)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f'{"arch":7}{"size":5}{"enc L/d/h":>14}{"dec L/d/h":>13}{"image/patch":>15}{"params":>11}'
              f'{"paper":>10}{"diff":>7}{"GFLOPs":>10}')
        for r in rows:
            p, fmt = r['paper_params'], (lambda n: f'{n / 1e3:.1f}k' if n < 1e6 else f'{n / 1e6:.2f}M' if n < 1e9 else f'{n / 1e9:.3f}B')
            enc = f"{r['enc_layers']}/{r['enc_width']}/{r['enc_heads']}"
            dec = f"{r['dec_layers']}/{r['dec_width']}/{r['dec_heads']}"
            diff = f"{100 * (r['params'] / p - 1):+.1f}%" if p else ''
            print(f"{r['arch']:7}{r['size']:5}{enc:>14}{dec:>13}{r['image'] + '/' + r['patch']:>15}"
                  f"{fmt(r['params']):>11}{fmt(p) if p else '-':>10}{diff:>7}{r['gflops']:>10.4g}")
