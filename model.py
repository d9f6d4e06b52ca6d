"""
ViT, TrOCR and PARSeq in one file, at the sizes of Rang et al. (arXiv 2401.00028), and converters from released weights.

    python model.py                                          # size table: parameters (ours, the study's), GFLOPs
    python model.py convert-trocr HF_DIR OUT.pt [--check]   # a transformers TrOCR folder -> our checkpoint
    python model.py convert-parseq CKPT OUT.pt [--check]     # a released PARSeq .pt / .ckpt -> our checkpoint

    model = build_model(make_config('parseq', 'S', vocab_size=tok.vocab_size, enc_depth=6))   # any field overridden
    total, n = model.loss(images, tok.encode(labels))  # SUM of token losses and token count; model(...) is the same
    ids, conf = model.decode(images)                   # TrOCR: beam=k, len_norm; PARSeq: ar=False, refine_iters=k

Token ids (shared with data.py): 0 = EOS, 1..V-3 text tokens, V-2 = BOS, V-1 = PAD. Heads predict V-2 classes.
TrOCR: ViT encoder (CLS; DeiT's distillation token too) + the original post-LN decoder, started from EOS; greedy or
beam decoding with a KV cache. PARSeq: ViT encoder (no CLS) + a two-stream decoder trained by permutation language
modelling; AR (cached) or NAR decoding, then cloze refinement passes over all position queries.
"""
import argparse, base64, itertools, json, math, os, pickle, string, sys
from dataclasses import asdict, dataclass, fields
from functools import cache, partial
from types import SimpleNamespace

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
    cls_token: int = 0            # tokens before the patches: 0 (PARSeq), 1 (ViT CLS), 2 (DeiT CLS + distillation)
    qkv_bias: bool = True         # encoder only; decoder projections always have biases
    dec_width: int = 384
    dec_depth: int = 1
    dec_heads: int = 12
    dec_mlp_ratio: float = 4.0
    max_len: int = 25             # longest label in tokens (EOS not included)
    vocab_size: int = 97          # tokenizer.vocab_size (94 chars + EOS, BOS, PAD)
    dropout: float = 0.1          # decoder only (PARSeq and TrOCR both train with 0.1 there)
    attn_dropout: float = 0.0     # decoder attention probabilities (PARSeq: 0.1)
    act_dropout: float = 0.0      # decoder MLP hidden layer (PARSeq: 0.1)
    enc_eps: float = 1e-6         # LayerNorm epsilons (transformers' ViT: 1e-12; PARSeq and TrOCR decoders: 1e-5)
    dec_eps: float = 1e-6
    pos_std: float = 0.02         # init std of learned position embeddings (0.5 helps tiny column-patch models)
    init_std: float = 0.02        # init std of other weights; 0 = 1/sqrt(fan_in) (tiny widths learn far faster)
    perm_num: int = 6             # PARSeq: permutations per batch, mirrors included
    perm_mirrored: bool = True
    emb_scale: bool = False       # token embeddings times sqrt(dec_width) (these four: where released TrOCRs differ)
    emb_norm: bool = True         # LayerNorm on the embeddings (after adding positions)
    dec_act: str = 'gelu'         # 'gelu' | 'relu' (decoder MLP; both archs)
    tie_head: bool = False        # output projection = token embedding


# ----------------------------------------------------------------------------- building blocks

class Attention(nn.Module):
    """Multi-head attention. kv_dim=None: self-attention with a fused qkv projection (KV cache optional);
    otherwise queries come from x and keys/values from a context of width kv_dim (or precomputed (k, v))."""

    def __init__(self, dim, heads, kv_dim=None, bias=True, dropout=0.0):
        super().__init__()
        assert dim % heads == 0, f'width {dim} not divisible by {heads} heads'
        self.heads, self.fused, self.dropout = heads, kv_dim is None, dropout
        if self.fused:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        else:
            self.q, self.kv = nn.Linear(dim, dim, bias=bias), nn.Linear(kv_dim, 2 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim)

    def split(self, t):  # (B, T, C) -> (B, heads, T, head_dim)
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def project_kv(self, ctx):
        return tuple(map(self.split, self.kv(ctx).chunk(2, dim=-1)))

    def forward(self, x, kv=None, mask=None, causal=False, cache=None):  # mask: True = may attend, (B, h, Tq, Tk)
        if self.fused:
            q, k, v = map(self.split, self.qkv(x).chunk(3, dim=-1))
            if cache is not None:
                k, v = extend_cache(cache, k, v)
        else:
            q = self.split(self.q(x))
            k, v = kv if isinstance(kv, tuple) else self.project_kv(kv)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).flatten(2))


def extend_cache(cache, k, v):
    """Incremental decoding: append this step's keys/values (B, heads, T, hd) to the cache; return all of them."""
    if cache:
        k, v = torch.cat([cache['k'], k], 2), torch.cat([cache['v'], v], 2)
    cache['k'], cache['v'] = k, v
    return k, v


class MLP(nn.Sequential):
    def __init__(self, dim, ratio, act='gelu', dropout=0.0):   # activation + dropout share slot 1: keys mlp.0, mlp.2
        act = nn.Sequential({'gelu': nn.GELU(), 'relu': nn.ReLU()}[act], nn.Dropout(dropout))
        super().__init__(nn.Linear(dim, int(dim * ratio)), act, nn.Linear(int(dim * ratio), dim))


class Block(nn.Module):  # pre-LN ViT block
    def __init__(self, dim, heads, mlp_ratio, qkv_bias, eps):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn, self.mlp = Attention(dim, heads, bias=qkv_bias), MLP(dim, mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Conv patch embedding, learned absolute positions, optional CLS (+distillation), pre-LN blocks, final norm."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.img_h % cfg.patch_h == 0 and cfg.img_w % cfg.patch_w == 0, 'image size must be a multiple of the patch'
        d = cfg.enc_width
        self.patch = nn.Conv2d(cfg.in_chans, d, (cfg.patch_h, cfg.patch_w), (cfg.patch_h, cfg.patch_w))
        self.cls = nn.Parameter(torch.zeros(1, int(cfg.cls_token), d)) if cfg.cls_token else None
        self.pos = nn.Parameter(torch.zeros(1, num_patches(cfg) + cfg.cls_token, d))
        self.blocks = nn.Sequential(*(Block(d, cfg.enc_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.enc_eps)
                                      for _ in range(cfg.enc_depth)))
        self.norm = nn.LayerNorm(d, eps=cfg.enc_eps)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, T_e, d)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1)
        return self.norm(self.blocks(x + self.pos))


def num_patches(cfg):
    return (cfg.img_h // cfg.patch_h) * (cfg.img_w // cfg.patch_w)


def init_weights(model, cfg):
    """Biases 0, LayerNorms 1, the rest truncated normal: tiny sizes (init_std 0) std 1/sqrt(fan_in) cut at 2 std, as
    the CPU ladder learns fastest; study sizes std init_std cut at +-2 (in effect uncut), as the originals."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm) or name == 'bias':
                nn.init.constant_(p, float(isinstance(module, nn.LayerNorm) and name == 'weight'))
            else:
                std = cfg.pos_std if name in ('pos', 'pos_emb', 'pos_queries') else cfg.init_std or p[0].numel() ** -0.5
                cut = 2 * std if cfg.init_std == 0 else 2
                nn.init.trunc_normal_(p, std=std, a=-cut, b=cut)


def finish(ids, probs, eos=0, pad=-1):
    """Cut each row after its first EOS (PAD after it); conf = product of kept probabilities (incl. EOS)."""
    after = (ids == eos).int().cumsum(1) - (ids == eos).int() > 0    # strictly after the first EOS
    t = int((~after).sum(1).max()) if len(ids) else 0
    return ids.masked_fill(after, pad)[:, :t], probs.masked_fill(after, 1.0).prod(1)


class Recognizer(nn.Module):
    """What TrOCR and PARSeq share: the ViT encoder, token ids, cross-attention keys/values, the summed loss."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, V = cfg, cfg.vocab_size
        self.eos, self.bos, self.pad = 0, V - 2, V - 1
        self.encoder = ViT(cfg)

    def memory_kv(self, images):  # cross-attention keys/values of every layer: computed once per image
        memory = self.encoder(images)
        return [layer.cross_attn.project_kv(memory) for layer in self.layers]

    def token_loss(self, logits, tgt):  # (summed cross-entropy, token count); PAD is never a target
        total = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=self.pad, reduction='sum')
        return total, (tgt != self.pad).sum()

    def forward(self, images, tokens):  # so that DDP/compile wrappers can call model(images, tokens)
        return self.loss(images, tokens)


# ----------------------------------------------------------------------------- TrOCR

class TrOCRLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.dec_width
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d, eps=cfg.dec_eps) for _ in range(3))
        self.self_attn = Attention(d, cfg.dec_heads, dropout=cfg.attn_dropout)
        self.cross_attn = Attention(d, cfg.dec_heads, kv_dim=cfg.enc_width, dropout=cfg.attn_dropout)
        self.mlp = MLP(d, cfg.dec_mlp_ratio, cfg.dec_act, cfg.act_dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def residual(self, x, norm, fn):  # post-LN, as the original
        return norm(x + self.drop(fn(x)))

    def forward(self, x, mem_kv, cache=None):
        x = self.residual(x, self.norm1, lambda h: self.self_attn(h, causal=cache is None, cache=cache))
        x = self.residual(x, self.norm2, lambda h: self.cross_attn(h, kv=mem_kv))
        return self.residual(x, self.norm3, self.mlp)


class TrOCR(Recognizer):
    def __init__(self, cfg):
        super().__init__(cfg)
        d, V = cfg.dec_width, cfg.vocab_size
        self.start = self.eos   # the decoder's first input, as transformers' decoder_start_token_id
        self.tok_emb = nn.Embedding(V, d)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.max_len + 1, d))  # inputs: start + up to max_len tokens
        self.emb_norm = nn.LayerNorm(d, eps=cfg.dec_eps) if cfg.emb_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TrOCRLayer(cfg) for _ in range(cfg.dec_depth))
        self.head = None if cfg.tie_head else nn.Linear(d, V - 2, bias=False)
        init_weights(self, cfg)
        if cfg.init_std:   # transformers' TrOCR: the embedding of its padding token is zero
            nn.init.zeros_(self.tok_emb.weight[self.pad])

    def decoder(self, tokens, mem_kv, start=0, caches=None):
        x = self.tok_emb(tokens) * (self.cfg.dec_width ** 0.5 if self.cfg.emb_scale else 1.0)
        x = self.drop(self.emb_norm(x + self.pos_emb[:, start:start + tokens.shape[1]]))
        for layer, kv, cache in zip(self.layers, mem_kv, caches or [None] * len(self.layers)):
            x = layer(x, kv, cache)
        head = self.tok_emb.weight[:self.pad - 1] if self.head is None else self.head.weight  # BOS/PAD never predicted
        return F.linear(x, head)

    def loss(self, images, tokens):
        inputs = F.pad(tokens[:, 1:-1], (1, 0), value=self.start)
        return self.token_loss(self.decoder(inputs, self.memory_kv(images)), tokens[:, 1:])

    @torch.no_grad()
    def decode(self, images, max_len=None, beam=1, len_norm=True):
        """Greedy (beam=1) or beam search with a KV cache, scored in float32; conf = product of token probabilities."""
        steps, mem_kv = min(max_len or self.cfg.max_len, self.cfg.max_len) + 1, self.memory_kv(images)
        tok = torch.full((len(images), 1), self.start, dtype=torch.long, device=images.device)
        if beam > 1:
            return self.beam_search(tok, mem_kv, steps, beam, len_norm)
        ids, probs, caches = tok[:, :0], [], [{} for _ in self.layers]   # greedy: until every row has an EOS
        for t in range(steps):
            p, tok = self.decoder(tok, mem_kv, start=t, caches=caches)[:, -1].float().softmax(-1).max(-1, keepdim=True)
            ids, probs = torch.cat([ids, tok], 1), probs + [p]
            if (ids == self.eos).any(1).all():
                break
        return finish(ids, torch.cat(probs, 1), self.eos, self.pad)

    def beam_search(self, tok, mem_kv, steps, beam, len_norm):
        """transformers' generate(num_beams=beam, early_stopping="never", length_penalty=float(len_norm)): of the best
        2*beam continuations, those among the first `beam` that end (EOS or the last step) join the `beam` best finished
        ones, ranked by log-prob sum / tokens incl. EOS (len_norm) or the sum; the best `beam` others stay live. Stops
        once no row's best live sum (/ steps with len_norm) beats its worst finished score (exact: sums only fall)."""
        (B, _), C, dev, inf = tok.shape, self.pad - 1, tok.device, float('inf')
        mem_kv = [(k.repeat_interleave(beam, 0), v.repeat_interleave(beam, 0)) for k, v in mem_kv]
        tok, caches = tok.repeat_interleave(beam, 0), [{} for _ in self.layers]
        live = torch.tensor([0.0] + [-inf] * (beam - 1), device=dev).repeat(B, 1)  # identical starts: expand one
        live_ids = fin_ids = torch.full((B, beam, steps), self.pad, device=dev)
        fin_rank, fin_sum = torch.full_like(live, -inf), torch.full_like(live, -inf)
        for t in range(steps):
            logp = self.decoder(tok, mem_kv, start=t, caches=caches)[:, -1].float().log_softmax(-1)
            cand, idx = (live[..., None] + logp.view(B, beam, C)).view(B, beam * C).topk(2 * beam, 1)  # sorted
            parent, new = idx // C, idx % C
            hyps = live_ids.take_along_dim(parent[..., None], 1)
            hyps[..., t] = new
            ends = (new == self.eos) | (t == steps - 1)
            rank = (cand[:, :beam] / (t + 1 if len_norm else 1)).masked_fill(~ends[:, :beam], -inf)
            fin_rank, top = torch.cat([fin_rank, rank], 1).topk(beam, 1)
            fin_sum = torch.cat([fin_sum, cand[:, :beam]], 1).gather(1, top)
            fin_ids = torch.cat([fin_ids, hyps[:, :beam]], 1).take_along_dim(top[..., None], 1)
            live, keep = cand.masked_fill(ends, -inf).topk(beam, 1)
            live_ids, tok = hyps.take_along_dim(keep[..., None], 1), new.gather(1, keep).view(-1, 1)
            src = (parent.gather(1, keep) + torch.arange(0, B * beam, beam, device=dev)[:, None]).view(-1)
            caches = [{'k': c['k'][src], 'v': c['v'][src]} for c in caches]
            if (live[:, 0] / (steps if len_norm else 1) <= fin_rank[:, -1]).all():
                break
        ids, _ = finish(fin_ids[:, 0], torch.ones(B, steps, device=dev), self.eos, self.pad)   # cut to the longest
        return ids, fin_sum[:, 0].exp()


# ----------------------------------------------------------------------------- PARSeq

def num_orders(cfg, L):
    """PLM orders PARSeq trains on for a batch padded to L label tokens (counted as the original does: perm_num,
    fewer when L! is smaller, mirrors included; L = 1: the forward order alone); 1 for TrOCR."""
    if cfg.arch != 'parseq' or L <= 1:
        return 1
    k = 1 + cfg.perm_mirrored   # orders come in mirror pairs
    return k * max(1, min(cfg.perm_num // k, math.factorial(L) // k))


@cache  # made on the device once: a host-to-device copy at every step would wait for the GPU
def _permutation_pool(L, mirrored, device):  # lexicographic, the forward order (the first) left out
    pool = [p for p in itertools.permutations(range(1, L + 1)) if p[0] < p[-1] or not mirrored][1:]
    return torch.tensor(pool, dtype=torch.long, device=device)


def sample_orders(L, n, mirrored=True, key_len=None, device=None):
    """n PLM orders (n, L+2) over positions 0..L+1 (0 = [B] first, L+1 = EOS), made on `device` without host syncs:
    the forward order, the reverse one with EOS first (paper §4), then random orders (each followed by its mirror)
    ending in EOS. For L < 5, as the original, these are drawn without replacement from the permutations (one of each
    mirror pair), so no order repeats; else each ranks key_len >= L uniform draws and keeps the first L, so padding
    keeps the order of the real positions. (Under train.py --compile labels pad to max_len, so L = max_len takes the
    second path and orders may repeat over a short label's real positions.)"""
    fwd = torch.arange(L + 2, device=device)
    orders, k = [fwd[None], torch.cat([fwd[:1], fwd[1:].flip(0)])[None]][:n], (n - 2) // (1 + mirrored)
    if k > 0:
        if L < 5:
            pool = _permutation_pool(L, mirrored, torch.device(device or 'cpu'))
            perms = pool[torch.randperm(len(pool), device=device)[:k]]
        else:
            perms = torch.rand(k, max(key_len or L, L), device=device)[:, :L].argsort(-1) + 1
        if mirrored:
            perms = torch.stack([perms, perms.flip(-1)], 1).flatten(0, 1)
        orders.append(torch.cat([fwd[:1].expand(len(perms), 1), perms, fwd[-1:].expand(len(perms), 1)], 1))
    return torch.cat(orders)


def order_masks(orders):
    """(query, content) masks (..., L+1, L+1), True = may attend, for orders (..., L+2). Query i predicts position i+1
    from the context slots 0..L strictly before it in the order ([B] always); content slot i sees itself and those."""
    rank = orders.argsort(-1)                                  # rank[p] = step at which position p is predicted
    return rank[..., None, :-1] < rank[..., 1:, None], rank[..., None, :-1] <= rank[..., :-1, None]


class PARSeqLayer(nn.Module):  # two streams: position queries and content attend to the content, the image, MLP
    def __init__(self, cfg):
        super().__init__()
        d = cfg.dec_width
        self.norm_q, self.norm_c, self.norm1, self.norm2 = (nn.LayerNorm(d, eps=cfg.dec_eps) for _ in range(4))
        self.self_attn = Attention(d, cfg.dec_heads, kv_dim=d, dropout=cfg.attn_dropout)
        self.cross_attn = Attention(d, cfg.dec_heads, kv_dim=cfg.enc_width, dropout=cfg.attn_dropout)
        self.mlp = MLP(d, cfg.dec_mlp_ratio, cfg.dec_act, cfg.act_dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def stream(self, x, x_norm, ctx_kv, mem_kv, mask=None):
        x = x + self.drop(self.self_attn(x_norm, kv=ctx_kv, mask=mask))
        x = x + self.drop(self.cross_attn(self.norm1(x), kv=mem_kv))
        return x + self.drop(self.mlp(self.norm2(x)))

    def forward(self, q, c, mem_kv, qmask, cmask, update_content, cache=None):
        c_norm = self.norm_c(c)
        ctx_kv = self.self_attn.project_kv(c_norm)  # shared by both streams
        if cache is not None:                       # cached AR step: c is the newest slot and sees all before it
            ctx_kv = extend_cache(cache, *ctx_kv)
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
        self.norm, self.head = nn.LayerNorm(d, eps=cfg.dec_eps), nn.Linear(d, V - 2)
        init_weights(self, cfg)
        if cfg.init_std:   # strhub: nn.MultiheadAttention's init for the stacked q, k, v (Xavier-uniform over 3d x d)
            for layer in self.layers:
                for proj in (layer.self_attn.q, layer.self_attn.kv, layer.cross_attn.q, layer.cross_attn.kv):
                    nn.init.uniform_(proj.weight, -math.sqrt(1.5 / d), math.sqrt(1.5 / d))
            self.encoder.patch.reset_parameters()   # and PyTorch's default for the patch convolution

    def embed(self, tokens, start=0):
        """Context slots: slot 0 = sqrt(d)*emb([B]) (no position), slot j >= 1: sqrt(d)*emb(tok) + pos_queries[j-1]."""
        x = self.text_emb(tokens) * math.sqrt(self.cfg.dec_width)
        pos = torch.cat([torch.zeros_like(self.pos_queries[:, :1]), self.pos_queries], 1)
        return x + pos[:, start:start + tokens.shape[1]]

    def run(self, ctx, queries, mem_kv, qmask=None, cmask=None, caches=None):
        for i, (layer, cache) in enumerate(zip(self.layers, caches or [None] * len(self.layers))):
            queries, ctx = layer(queries, ctx, mem_kv[i], qmask, cmask, i < len(self.layers) - 1, cache)
        return self.head(self.norm(queries))

    def loss(self, images, tokens):
        """PLM loss: (sum of token cross-entropies over num_orders(cfg, L) orders, token count); EOS is a target in the
        first two only. Eval uses the two fixed orders (no RNG). Extra padding changes nothing in eval, nor in training
        while L >= 5 (the same orders), dropout aside."""
        mem_kv, ctx_tok, tgt, L = self.memory_kv(images), tokens[:, :-1], tokens[:, 1:], tokens.shape[1] - 2
        ctx, queries = self.embed(ctx_tok), self.pos_queries[:, :L + 1].expand(len(tokens), -1, -1)
        keep = ((ctx_tok != self.pad) & (ctx_tok != self.eos))[:, None, None, :]  # padded context is never seen
        n_orders = num_orders(self.cfg, L) if self.training else 2
        orders = sample_orders(L, n_orders, self.cfg.perm_mirrored, self.cfg.max_len, tokens.device)
        qmasks, cmasks = order_masks(orders)
        total, n = 0.0, 0
        for i in range(n_orders):
            if i == 2:  # EOS is a target of the forward and reverse orders only
                tgt = tgt.masked_fill(tgt == self.eos, self.pad)
            # input dropout drawn afresh for every order (a mask per sample and order), as the original does
            logits = self.run(self.drop(ctx), self.drop(queries), mem_kv, qmasks[i] & keep, cmasks[i] & keep)
            order_total, order_n = self.token_loss(logits, tgt)
            total, n = total + order_total, n + order_n
        return total, n

    @torch.no_grad()
    def decode(self, images, max_len=None, ar=True, refine_iters=1):
        """AR (greedy; cached context keys/values) or NAR decoding, then refine_iters cloze passes that run every
        position query against the previous output, as the original does (so a removed EOS lengthens the text)."""
        T = min(max_len or self.cfg.max_len, self.cfg.max_len) + 1
        B, dev, mem_kv = len(images), images.device, self.memory_kv(images)
        queries = self.pos_queries[:, :T].expand(B, -1, -1)
        bos = torch.full((B, 1), self.bos, dtype=torch.long, device=dev)
        if ar:
            ctx_tok, logits, caches = bos, [], [{} for _ in self.layers]
            for i in range(T):
                logits.append(self.step(ctx_tok[:, -1:], i, queries[:, i:i + 1], mem_kv, caches))
                ctx_tok = torch.cat([ctx_tok, logits[-1].argmax(-1)], 1)
                if (ctx_tok == self.eos).any(1).all():
                    break
            logits = torch.cat(logits, 1)
        else:                                                  # NAR: every query sees only [B]
            logits = self.run(self.embed(bos), queries, mem_kv)
        for _ in range(refine_iters):                          # cloze: every slot but one's own, none after EOS
            ctx_tok = torch.cat([bos, logits[:, :-1].argmax(-1)], 1)   # (B, S): S = T, or less after an early AR stop
            S = ctx_tok.shape[1]
            keep = ((ctx_tok == self.eos).int().cumsum(1) == 0)[:, None, None, :]
            causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
            cloze = torch.arange(S, device=dev)[None] != torch.arange(1, T + 1, device=dev)[:, None]  # (T, S)
            logits = self.run(self.embed(ctx_tok), queries, mem_kv, cloze & keep, causal & keep)
        probs, ids = logits.float().softmax(-1).max(-1)
        return finish(ids, probs, self.eos, self.pad)

    def step(self, tok, i, query, mem_kv, caches):
        """Cached AR step i: add context slot i (token tok), then run query i against slots 0..i."""
        return self.run(self.embed(tok, start=i), query, mem_kv, caches=caches)


# ----------------------------------------------------------------------------- sizes

# the original TrOCR decoder (transformers' TrOCRConfig as in microsoft/trocr-*): Base/Large style; Small below
_TROCR = dict(arch='trocr', img_h=384, img_w=384, patch_h=16, patch_w=16, cls_token=1, qkv_bias=False,
              dec_width=1024, dec_depth=12, dec_heads=16, dec_eps=1e-5)
# the original PARSeq decoder: dropout 0.1 on inputs, attention and MLP; LayerNorm eps 1e-5
_PARSEQ = dict(arch='parseq', img_h=32, img_w=128, patch_h=4, patch_w=8, cls_token=0, qkv_bias=True,
               attn_dropout=0.1, act_dropout=0.1, dec_eps=1e-5)
# the CPU ladder T1..T7: widths and depths spaced for a size law on a laptop
_TINY = dict(img_h=16, img_w=64, patch_h=16, patch_w=4, qkv_bias=True, dec_depth=1, dropout=0.0, pos_std=0.5,
             init_std=0)


SIZES = {
    'trocr': {
        # S (guess): DeiT-S/16 (qkv bias) + a 384-wide decoder in TrOCR-Small's style (ReLU, scaled embeddings); the
        # study's 43.09M leaves ~21M for it: 9 layers (TrOCR-S's own, 6 x 256, would total 28M with a char vocabulary)
        'S': dict(_TROCR, enc_width=384, enc_depth=12, enc_heads=6, qkv_bias=True,
                  dec_width=384, dec_depth=9, dec_heads=6, dec_act='relu', emb_scale=True),
        # B, L: original TrOCR-Base/Large (ViT-B/16, ViT-L/16 at 384 + 12x1024 decoder) with a char vocabulary
        'B': dict(_TROCR, enc_width=768, enc_depth=12, enc_heads=12),
        'L': dict(_TROCR, enc_width=1024, enc_depth=24, enc_heads=16),
        # H (guess): unpublished recipe; ViT-H/16 encoder (1280 x 32) and the decoder doubled to 24 layers hits 1.037B
        'H': dict(_TROCR, enc_width=1280, enc_depth=32, enc_heads=16, dec_depth=24),
    },
    'parseq': {
        # S: the original PARSeq-S (23.83M at 94 chars; the study prints 22.51M). Decoder heads = width/32.
        'S': dict(_PARSEQ, enc_width=384, enc_depth=12, enc_heads=6, dec_width=384, dec_depth=1, dec_heads=12),
        # B, H (guesses): ViT-B / ViT-H encoders at 32x128; two decoder layers make up the published ~104M / 682M.
        'B': dict(_PARSEQ, enc_width=768, enc_depth=12, enc_heads=12, dec_width=768, dec_depth=2, dec_heads=24),
        # L (guess, unpublished): ViT-L, as TrOCR-L; ~336M, near B and H's geometric mean: evenly spaced in log N
        'L': dict(_PARSEQ, enc_width=1024, enc_depth=24, enc_heads=16, dec_width=1024, dec_depth=2, dec_heads=32),
        'H': dict(_PARSEQ, enc_width=1280, enc_depth=32, enc_heads=16, dec_width=1280, dec_depth=2, dec_heads=40),
    },
}
for _arch in SIZES:
    SIZES[_arch].update({f'T{i + 1}': dict(_TINY, arch=_arch, cls_token=int(_arch == 'trocr'), enc_width=w, dec_width=w,
                                           enc_depth=depth, enc_heads=max(1, w // 32), dec_heads=max(1, w // 32))
                         for i, (w, depth) in enumerate(zip((16, 24, 32, 48, 64, 96, 128), (1, 2, 2, 2, 3, 3, 4)))})

PAPER_PARAMS = {  # paper §3: (text) quoted, (fig) read off figures
    'trocr': {'S': 43.09e6, 'B': 282.5e6, 'L': 505.6e6, 'H': 1.037e9},
    'parseq': {'S': 22.51e6, 'B': 104e6, 'L': None, 'H': 682e6},
}
BASIS = {'trocr': {'B': 'TrOCR-B (ViT for BEiT)', 'L': 'TrOCR-L (ViT for BEiT)'}, 'parseq': {'S': 'original PARSeq-S'}}


def make_config(arch, size, vocab_size, **overrides):
    if size not in SIZES.get(arch, {}):
        raise KeyError(f'unknown model {arch}-{size}; arch is one of {list(SIZES)}, size one of {list(SIZES["trocr"])}')
    bad, valid = set(overrides) - {f.name for f in fields(ModelConfig)}, sorted(f.name for f in fields(ModelConfig))
    if bad:
        raise TypeError(f'unknown config field(s) {sorted(bad)}; valid: {valid}')
    return ModelConfig(**{**SIZES[arch][size], 'vocab_size': vocab_size, **overrides})


def build_model(cfg):
    return {'trocr': TrOCR, 'parseq': PARSeq}[cfg.arch](cfg)


# ----------------------------------------------------------------------------- parameters, FLOPs, size table

def count_params(cfg):
    """(total, non_embedding) parameters of build_model(cfg) built on the meta device; the second leaves out the token
    embedding and every position embedding (the head is counted)."""
    with torch.device('meta'):
        sizes = {name: p.numel() for name, p in build_model(cfg).named_parameters()}
    embeddings = ('tok_emb.weight', 'text_emb.weight', 'pos_emb', 'pos_queries', 'encoder.pos')
    return sum(sizes.values()), sum(n for name, n in sizes.items() if name not in embeddings)


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
    # PARSeq: the query stream in every layer, the content stream in every layer but the last
    dec = cfg.dec_depth * (kv + stream) + (cfg.arch == 'parseq') * (cfg.dec_depth - 1) * stream
    return enc, xkv, dec + 2 * d * C * T_d


def forward_flops(cfg, dec_len=None):
    """Forward FLOPs per image: the encoder + one teacher-forced decoder pass (PARSeq: one order) of dec_len + 1."""
    return float(sum(_flops_parts(cfg, dec_len)))


def train_flops_per_sample(cfg, dec_len=None):
    """Forward + backward (3x forward) FLOPs per training image padded to dec_len (default max_len) label tokens;
    PARSeq runs the decoder once per order, num_orders(cfg, dec_len), against cross-attention keys/values made once."""
    enc, xkv, dec = _flops_parts(cfg, dec_len)
    return 3.0 * (enc + xkv + dec * num_orders(cfg, dec_len or cfg.max_len))


def print_table(vocab_size=97):
    fmt = lambda n: f'{n / 1e3:.1f}k' if n < 1e6 else f'{n / 1e6:.2f}M' if n < 1e9 else f'{n / 1e9:.3f}B'  # noqa: E731
    print(f'{"arch":7}{"size":5}{"enc L/d/h":>14}{"dec L/d/h":>13}{"image/patch":>15}{"params":>10}'
          f'{"study":>10}{"gap":>7}{"GFLOPs":>9}  basis')
    for arch in SIZES:
        for size in SIZES[arch]:
            c, paper = make_config(arch, size, vocab_size), PAPER_PARAMS[arch].get(size)
            n, basis = count_params(c)[0], BASIS[arch].get(size, 'CPU ladder' if size[0] == 'T' else 'guess')
            enc, dec = f'{c.enc_depth}/{c.enc_width}/{c.enc_heads}', f'{c.dec_depth}/{c.dec_width}/{c.dec_heads}'
            print(f'{arch:7}{size:5}{enc:>14}{dec:>13}{f"{c.img_h}x{c.img_w}/{c.patch_h}x{c.patch_w}":>15}{fmt(n):>10}'
                  f'{fmt(paper) if paper else "-":>10}{f"{100 * (n / paper - 1):+.1f}%" if paper else "":>7}'
                  f'{forward_flops(c) / 1e9:>9.4g}  {basis}')


# ----------------------------------------------------------------------------- released checkpoints -> ours

class _Opaque(dict):
    """Stands for every class a checkpoint names beyond tensors and plain containers (Lightning's hyper-parameter
    dict, callback states): built from nothing (dict.__new__ ignores arguments), keeping only dict items, so no code
    from the file runs."""
    __init__ = __setstate__ = lambda self, *args, **kwargs: None


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in (('torch._utils', '_rebuild_tensor_v2'), ('torch._utils', '_rebuild_parameter'),
                              ('collections', 'OrderedDict')) or module == 'torch' and (
                name.endswith('Storage') or name == 'Size' or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        return _Opaque


def load_weights(path):
    """A .safetensors file, else torch.load(weights_only=True), or _DataUnpickler for files that pickle other objects
    too (Lightning .ckpt)."""
    data_only = SimpleNamespace(Unpickler=_DataUnpickler, load=lambda f, **kw: _DataUnpickler(f, **kw).load(),
                                __name__='data_only')
    try:
        if str(path).endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path)
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:
            return torch.load(path, map_location='cpu', weights_only=False, pickle_module=data_only)
    except ImportError:
        raise SystemExit(f'reading {path} needs the safetensors package: pip install safetensors')
    except Exception as e:  # torch, pickle and safetensors raise many kinds for a file that is no checkpoint
        raise SystemExit(f'{path}: cannot read it as a torch checkpoint ({str(e).splitlines()[0][:100]})')


def _renamed(sd, names):
    """sd with each (theirs, ours) fragment of names replaced in every key, in order."""
    for theirs, ours in names:
        sd = {key.replace(theirs, ours): value for key, value in sd.items()}
    return sd


def _load_converted(cfg, state, source):  # tensors our model does not have (a pooler, ...) are left out
    try:
        model = build_model(cfg)
    except (AssertionError, ArithmeticError, TypeError, ValueError) as err:  # heads that do not divide the width, ...
        raise SystemExit(f'{source}: the inferred {cfg.arch} config cannot be built ({err})')
    missing = [k for k, v in model.state_dict().items() if k not in state or state[k].shape != v.shape]
    if missing:
        raise SystemExit(f'{source}: weights do not fit the inferred {cfg.arch} model (missing {missing[:3]} or '
                         'of another shape)')
    model.load_state_dict({k: state[k] for k in model.state_dict()})
    return model.eval()


# transformers' names -> ours, in order; q, k, v stay apart until stacked. '.gamma', '.beta': older LayerNorm names
_HF_NAMES = [('.gamma', '.weight'), ('.beta', '.bias'), ('decoder.model.decoder.', ''),
             # the ViT / DeiT encoder
             ('encoder.encoder.layer.', 'encoder.blocks.'), ('encoder.layernorm.', 'encoder.norm.'),
             ('encoder.embeddings.patch_embeddings.projection.', 'encoder.patch.'),
             ('attention.attention.query.', 'attn.q.'), ('attention.attention.key.', 'attn.k.'),
             ('attention.attention.value.', 'attn.v.'), ('attention.output.dense.', 'attn.proj.'),
             ('intermediate.dense.', 'mlp.0.'), ('output.dense.', 'mlp.2.'),
             ('layernorm_before.', 'norm1.'), ('layernorm_after.', 'norm2.'),
             # the TrOCR decoder
             ('layernorm_embedding.', 'emb_norm.'), ('self_attn_layer_norm.', 'norm1.'),
             ('encoder_attn_layer_norm.', 'norm2.'), ('final_layer_norm.', 'norm3.'), ('encoder_attn.', 'cross_attn.'),
             ('q_proj.', 'q.'), ('k_proj.', 'k.'), ('v_proj.', 'v.'), ('out_proj.', 'proj.'),
             ('fc1.', 'mlp.0.'), ('fc2.', 'mlp.2.')]
_HF_TOKENIZER_FILES = ('tokenizer.json', 'vocab.json', 'merges.txt', 'tokenizer_config.json', 'special_tokens_map.json')


def _sinusoids(first, n, d):
    """Rows first..first+n-1 of fairseq's sinusoidal position table (sines then cosines; a zero column if d is odd)."""
    freq = torch.exp(torch.arange(d // 2) * -(math.log(10000) / (d // 2 - 1)))
    angle = torch.arange(first, first + n)[:, None].float() * freq[None]
    return F.pad(torch.cat([angle.sin(), angle.cos()], 1), (0, d % 2))[None]


def trocr_from_transformers(hf_dir):
    """(model, tokenizer spec, --check reference) from a VisionEncoderDecoderModel folder: ViT or DeiT encoder +
    TrOCRForCausalLM (learned or sinusoidal positions). The spec holds the folder's tokenizer files and ids[i] =
    transformers' id of our id i; its <s> is our BOS (no input: the decoder starts from EOS), never predicted."""
    try:
        hc = json.load(open(os.path.join(hf_dir, 'config.json')))
        e, d = hc['encoder'], hc['decoder']
    except (OSError, KeyError, ValueError) as err:
        raise SystemExit(f'{hf_dir}: not a VisionEncoderDecoderModel folder ({err})')
    if e.get('model_type') not in ('vit', 'deit') or d.get('model_type') != 'trocr' or e.get('hidden_act') != 'gelu':
        raise SystemExit(f"{hf_dir}: a {e.get('model_type')} ({e.get('hidden_act')}) encoder with a "
                         f"{d.get('model_type')} decoder: only ViT or DeiT (GELU) encoders with a TrOCR decoder convert")
    V, eos, pad, bos = d['vocab_size'], d['eos_token_id'], d['pad_token_id'], d['bos_token_id']
    start = next(i for i in (hc.get('decoder_start_token_id'), d.get('decoder_start_token_id'), eos) if i is not None)
    if start != eos:   # every released TrOCR starts from </s>
        raise SystemExit(f'{hf_dir}: decoder_start_token_id {start} is not the EOS id {eos}: not a TrOCR as released')
    hf_id = [eos] + [i for i in range(V) if i not in (eos, pad, bos)] + [bos, pad]
    (img_h, img_w), (patch_h, patch_w) = ((v, v) if isinstance(v, int) else v for v in (e['image_size'], e['patch_size']))
    cfg = ModelConfig(
        arch='trocr', img_h=img_h, img_w=img_w, patch_h=patch_h, patch_w=patch_w, in_chans=e['num_channels'],
        enc_width=e['hidden_size'], enc_depth=e['num_hidden_layers'], enc_heads=e['num_attention_heads'],
        mlp_ratio=e['intermediate_size'] / e['hidden_size'], cls_token=1 + (e['model_type'] == 'deit'),
        qkv_bias=e.get('qkv_bias', True), enc_eps=e['layer_norm_eps'], dec_width=d['d_model'],
        dec_depth=d['decoder_layers'], dec_heads=d['decoder_attention_heads'], dec_eps=1e-5,
        dec_mlp_ratio=d['decoder_ffn_dim'] / d['d_model'], max_len=d['max_position_embeddings'] - 1, vocab_size=V,
        dropout=d['dropout'], attn_dropout=d['attention_dropout'], act_dropout=d['activation_dropout'],
        emb_scale=d['scale_embedding'], emb_norm=d['layernorm_embedding'], dec_act=d['activation_function'])
    weights = [os.path.join(hf_dir, n) for n in ('model.safetensors', 'pytorch_model.bin')]
    if not any(map(os.path.exists, weights)):
        raise SystemExit(f'{hf_dir}: no model.safetensors or pytorch_model.bin (merge a sharded checkpoint first)')
    sd = _renamed(load_weights(next(filter(os.path.exists, weights))), _HF_NAMES)
    try:
        emb, out_proj = sd['embed_tokens.weight'], sd.get('decoder.output_projection.weight')
        cfg.tie_head = out_proj is None or torch.equal(out_proj, emb)
        sd['tok_emb.weight'], sd['head.weight'] = emb[hf_id], (emb if cfg.tie_head else out_proj)[hf_id[:V - 2]]
        sd['encoder.cls'] = torch.cat([sd['encoder.embeddings.' + k] for k in
                                       ('cls_token', 'distillation_token')[:cfg.cls_token]], 1)
        sd['encoder.pos'] = sd['encoder.embeddings.position_embeddings']
        if d.get('use_learned_position_embeddings', True):
            sd['pos_emb'] = sd['embed_positions.weight'][None, 2:cfg.max_len + 3]   # offset 2 there
        else:  # positions count from pad + 1 there; the fixed table goes into our learned slot
            sd['pos_emb'] = _sinusoids(pad + 1, cfg.max_len + 1, cfg.dec_width)
        for k in [k for k in sd if '.k.' in k]:   # stacked as ours: self-attention q, k, v; cross-attention k, v
            parts = [k, k.replace('.k.', '.v.')] if 'cross_attn' in k else [k.replace('.k.', f'.{p}.') for p in 'qkv']
            sd[k.replace('.k.', '.kv.' if len(parts) == 2 else '.qkv.')] = torch.cat([sd[p] for p in parts])
    except (KeyError, IndexError) as err:  # IndexError: a vocab_size beyond embed_tokens' rows
        what = f'no weight {err}' if isinstance(err, KeyError) else 'embed_tokens has fewer rows than vocab_size'
        raise SystemExit(f'{hf_dir}: {what} (the weights do not match the config.json of a TrOCR folder)')
    if 'enc_to_dec_proj.weight' in sd:   # fold transformers' encoder -> decoder width projection into K/V
        P, b = sd['enc_to_dec_proj.weight'].double(), sd['enc_to_dec_proj.bias'].double()
        for i in range(cfg.dec_depth):
            w, c = f'layers.{i}.cross_attn.kv.weight', f'layers.{i}.cross_attn.kv.bias'
            sd[w], sd[c] = (sd[w].double() @ P).float(), (sd[w].double() @ b + sd[c].double()).float()
    model = _load_converted(cfg, sd, hf_dir)
    files = {n: open(os.path.join(hf_dir, n), encoding='utf-8').read() if n in _HF_TOKENIZER_FILES else
             base64.b64encode(open(os.path.join(hf_dir, n), 'rb').read()).decode()
             for n in sorted(os.listdir(hf_dir)) if n in _HF_TOKENIZER_FILES or n.endswith('.model')}
    for name in [n for n in files if n.endswith('.json')]:
        try:
            json.loads(files[name])
        except ValueError as err:
            raise SystemExit(f'{hf_dir}: {name} is not JSON ({err})')
    if not ('tokenizer.json' in files or {'vocab.json', 'merges.txt'} <= files.keys() or
            any(n.endswith('.model') for n in files)):
        raise SystemExit(f'{hf_dir}: no tokenizer.json, vocab.json + merges.txt or SentencePiece .model: save the '
                         'processor into the folder too (TrOCRProcessor.save_pretrained)')
    spec = {'type': 'hf', 'files': files, 'ids': hf_id, 'max_len': cfg.max_len}
    return model, spec, partial(_transformers_reference, hf_dir, hf_id)


def _transformers_reference(hf_dir, hf_id, model, images, tokens):
    """transformers' own model: teacher-forced logits and greedy generate's ids (<s> and <pad> suppressed), in ours."""
    try:
        from transformers import VisionEncoderDecoderModel
    except ImportError:
        raise SystemExit('--check needs transformers: pip install transformers')
    ref = VisionEncoderDecoderModel.from_pretrained(hf_dir).float().eval()
    positions = ref.decoder.model.decoder.embed_positions
    if getattr(positions, 'weights', None) is not None and positions.weights.is_meta:
        # from_pretrained leaves the sinusoid table on the meta device: rebuild it at its full length
        positions.weights = positions.get_embedding(len(positions.weights), model.cfg.dec_width, positions.padding_idx)
    gen = ref.generate(pixel_values=images, max_new_tokens=model.cfg.max_len + 1, num_beams=1, do_sample=False,
                       decoder_start_token_id=hf_id[0], eos_token_id=hf_id[0], pad_token_id=hf_id[-1],
                       suppress_tokens=hf_id[-2:])
    ours_of = {h: i for i, h in enumerate(hf_id)}
    return (ref(pixel_values=images, decoder_input_ids=torch.tensor(hf_id)[tokens]).logits[..., hf_id[:-2]],
            [[ours_of[t] for t in row[1:]] for row in gen.tolist()])


# strhub's names -> ours, in order; its decoder attention's in_proj (q, k, v stacked) is split into q and kv
_STRHUB_NAMES = [('encoder.pos_embed', 'encoder.pos'), ('encoder.patch_embed.proj', 'encoder.patch'),
                 ('.mlp.fc1.', '.mlp.0.'), ('.mlp.fc2.', '.mlp.2.'), ('.linear1.', '.mlp.0.'), ('.linear2.', '.mlp.2.'),
                 ('.out_proj.', '.proj.'), ('decoder.layers.', 'layers.'), ('decoder.norm.', 'norm.'),
                 ('text_embed.embedding.', 'text_emb.')]
STRHUB_CHARSET = string.digits + string.ascii_lowercase + string.ascii_uppercase + string.punctuation  # its 94


def parseq_from_strhub(path):
    """(model, tokenizer spec, --check reference) from a torch.hub state_dict (keys with a 'model.' prefix, or none in
    older files) or a Lightning .ckpt. Without hyper-parameters, as every released model: heads = width/64 (encoder),
    width/32 (decoder), max_len = len(pos_queries) - 1, the image 32x128 if pos_embed's length fits, else square."""
    ckpt = load_weights(path)
    sd, hp = (ckpt.get('state_dict', ckpt), ckpt.get('hyper_parameters') or {}) if isinstance(ckpt, dict) else ({}, {})
    sd = {k.removeprefix('model.'): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not {'pos_queries', 'encoder.pos_embed', 'encoder.patch_embed.proj.weight', 'text_embed.embedding.weight'} <= sd.keys():
        raise SystemExit(f'{path}: not a PARSeq checkpoint (no pos_queries, encoder.pos_embed, ... weights)')
    V, e, d = len(sd['text_embed.embedding.weight']), sd['encoder.pos_embed'].shape[-1], sd['pos_queries'].shape[-1]
    charset = hp.get('charset_train') or (STRHUB_CHARSET if V == len(STRHUB_CHARSET) + 3 else None)
    if not isinstance(charset, str) or len(charset) != V - 3:
        raise SystemExit(f'{path}: {V - 3} characters and no charset_train of that length in its hyper-parameters')
    patch_h, patch_w = sd['encoder.patch_embed.proj.weight'].shape[2:]
    n, side = sd['encoder.pos_embed'].shape[1], int(sd['encoder.pos_embed'].shape[1] ** 0.5)
    img_h, img_w = hp.get('img_size') or ((32, 128) if (32 // patch_h) * (128 // patch_w) == n else
                                          (side * patch_h, side * patch_w))
    depth = lambda prefix: 1 + max(int(k.split('.')[2]) for k in sd if k.startswith(prefix))  # noqa: E731
    cfg = make_config('parseq', 'S', V, img_h=img_h, img_w=img_w, patch_h=patch_h, patch_w=patch_w, enc_width=e,
                      enc_depth=depth('encoder.blocks.'), enc_heads=hp.get('enc_num_heads', max(1, e // 64)),
                      dec_width=d, mlp_ratio=len(sd['encoder.blocks.0.mlp.fc1.weight']) / e,
                      max_len=len(sd['pos_queries'][0]) - 1, dec_depth=depth('decoder.layers.'),
                      dec_heads=hp.get('dec_num_heads', max(1, d // 32)),
                      dec_mlp_ratio=len(sd['decoder.layers.0.linear1.weight']) / d)
    ours = _renamed(sd, _STRHUB_NAMES)
    for key in [k for k in ours if '.in_proj_' in k]:
        prefix, kind = key.split('.in_proj_')
        ours[f'{prefix}.q.{kind}'], ours[f'{prefix}.kv.{kind}'] = ours[key][:d], ours[key][d:]
    spec = {'type': 'char', 'charset': charset, 'max_len': cfg.max_len}
    return _load_converted(cfg, ours, path), spec, partial(_strhub_reference, charset, sd)


def _strhub_reference(charset, sd, model, images, tokens):
    """strhub's PARSeq (ore-strhub): forward-order teacher-forced logits, and AR decoding with one refinement pass."""
    try:
        from strhub.models.parseq.system import PARSeq as StrhubPARSeq
    except ImportError as err:
        raise SystemExit(f'--check needs strhub and timm (pip install ore-strhub timm): {err}')
    c = model.cfg
    ref = StrhubPARSeq(charset, charset, c.max_len, 1, 0.0, 0.0, 0.0, [c.img_h, c.img_w], [c.patch_h, c.patch_w],
                       c.enc_width, c.enc_heads, int(c.mlp_ratio), c.enc_depth, c.dec_heads, int(c.dec_mlp_ratio),
                       c.dec_depth, c.perm_num, True, c.perm_mirrored, True, 1, c.dropout)
    ref.load_state_dict(sd)
    ref.eval()
    blocked = torch.full((tokens.shape[1], tokens.shape[1]), float('-inf')).triu(1)   # additive causal mask
    logits = ref.head(ref.decode(tokens, ref.encode(images), blocked, tgt_query_mask=blocked))
    return logits, ref(images).argmax(-1).tolist()


def _upto_eos(row, eos=0):
    return row[:(row + [eos]).index(eos)]


def check_converted(model, reference):
    """(max logit difference, decoded strings identical) against the original code on random images and tokens:
    reference(model, images, tokens) gives its teacher-forced logits and decoded ids, both in our ids."""
    c, g = model.cfg, torch.Generator().manual_seed(0)
    images = torch.rand(4, c.in_chans, c.img_h, c.img_w, generator=g) * 2 - 1
    tokens = torch.randint(1, c.vocab_size - 2, (4, min(12, c.max_len) + 1), generator=g)
    tokens[:, 0] = model.eos if c.arch == 'trocr' else model.bos   # each decoder's first input
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()
    with torch.no_grad():
        (theirs, ref_ids), mem_kv = reference(model, images, tokens), model.memory_kv(images)
        ours = model.decoder(tokens, mem_kv) if c.arch == 'trocr' else model.run(
            model.embed(tokens), model.pos_queries[:, :tokens.shape[1]].expand(4, -1, -1), mem_kv, causal, causal)
        ids, _ = model.decode(images)
    same = all(_upto_eos(a) == _upto_eos(b) for a, b in zip(ids.tolist(), ref_ids))
    return (ours - theirs).abs().max().item(), same


def convert_main(argv):
    ap = argparse.ArgumentParser(prog='model.py', description='Convert released weights into a checkpoint that '
                                 'train.py --init, ocrscale.py read and eval take.')
    ap.add_argument('command', choices=['convert-trocr', 'convert-parseq'])
    ap.add_argument('source', help='convert-trocr: a transformers VisionEncoderDecoderModel folder with its tokenizer '
                    'files; convert-parseq: a released PARSeq .pt (torch.hub) or .ckpt (Lightning) file')
    ap.add_argument('out', help='checkpoint to write (.pt)')
    ap.add_argument('--check', action='store_true', help='compare logits and decoded strings with the original code '
                    '(transformers / strhub); exit 1 above 1e-4 or if any string differs')
    args = ap.parse_args(argv)
    convert = trocr_from_transformers if args.command == 'convert-trocr' else parseq_from_strhub
    model, spec, reference = convert(args.source)
    c = model.cfg
    try:
        torch.save(dict(model=model.state_dict(), model_config=asdict(c), tokenizer=spec,
                        source=os.path.abspath(args.source)), args.out)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch's for a folder that is not there
        raise SystemExit(f'model.py {args.command}: cannot write {args.out}: {e}')
    print(f'{args.out}: {c.arch}, {count_params(c)[0] / 1e6:.2f}M params, {c.img_h}x{c.img_w} images, {c.vocab_size} '
          f'ids, max_len {c.max_len}')
    if args.check:
        diff, same = check_converted(model, reference)
        print(f'max |logits - {"transformers" if c.arch == "trocr" else "strhub"}| = {diff:.3g}; decoded strings '
              f'identical: {same}')
        sys.exit(int(diff > 1e-4 or not same))


if __name__ == '__main__':
    if sys.argv[1:2] in (['convert-trocr'], ['convert-parseq']):
        convert_main(sys.argv[1:])
    else:
        ap = argparse.ArgumentParser(description='Print the size table (parameters at a 97-id char vocabulary).')
        ap.add_argument('--vocab', type=int, default=97, help='tokenizer vocab size (94 chars + EOS/BOS/PAD)')
        vocab = ap.parse_args().vocab
        if vocab < 4:
            ap.error(f'argument --vocab: {vocab}: a vocabulary holds a text token besides EOS, BOS and PAD (>= 4)')
        print_table(vocab)
