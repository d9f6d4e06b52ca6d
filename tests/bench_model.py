"""
CPU benchmark of model.py against reference implementations (benchmark-only dependencies):

    pip install transformers timm -c constraints.txt      # never let pip change torch
    python tests/bench_model.py                                 # modest default size, 1 thread
    python tests/bench_model.py --width 384 --depth 6 --batch 32 --threads 2

Prints three ratios:
1. TrOCR training step (forward + backward + AdamW) of ours / transformers' VisionEncoderDecoderModel
   (ViTModel + TrOCRForCausalLM) with the same widths, depths, heads, image/patch size and vocabulary.
2. ViT encoder forward + backward of ours / timm's VisionTransformer of the same config.
3. Greedy decoding of a batch of 64 without / with the KV cache (TrOCR; PARSeq AR as well).
Timings alternate between the two sides round by round and report medians, so load from other processes
hits both alike. timm needs torchvision only for imports we do not use: if torchvision is missing or
broken (a wheel built for another torch), a stub stands in for it.
"""
import argparse
import importlib.abc
import importlib.machinery
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's files
from model import build_model, count_params, make_config
from test_model import parseq_reference_ar, trocr_reference_greedy  # uncached decoding, re-running every prefix


def stub_torchvision():
    """Let `import timm` succeed without a working torchvision (timm imports it at module level only)."""
    try:
        import torchvision  # noqa: F401
        return 'torchvision'
    except Exception:
        for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
            del sys.modules[name]

    class Meta(type(torch.nn.Module)):
        def __getattr__(cls, name):
            if name.startswith('__'):
                raise AttributeError(name)
            return name

    class Stub(types.ModuleType):
        __path__ = []

        def __getattr__(self, name):
            if name.startswith('__'):
                raise AttributeError(name)
            return Meta(name, (torch.nn.Module,), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == 'torchvision' or name.startswith('torchvision.'):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)

        def create_module(self, spec):
            return Stub(spec.name)

        def exec_module(self, module):
            module.__version__ = '0.0.0'

    sys.meta_path.insert(0, Finder())
    return 'stub'


def timed_pair(fa, fb, rounds, warmup=2):
    for _ in range(warmup):
        fa(), fb()
    ta, tb = [], []
    for r in range(rounds):          # alternate which side goes first, so neither always runs on a warm cache
        for f, ts in ((fa, ta), (fb, tb))[::1 if r % 2 else -1]:
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def hf_trocr(cfg):
    from transformers import TrOCRConfig, TrOCRForCausalLM, ViTConfig, ViTModel, VisionEncoderDecoderModel
    enc = ViTModel(ViTConfig(hidden_size=cfg.enc_width, num_hidden_layers=cfg.enc_depth,
                             num_attention_heads=cfg.enc_heads, intermediate_size=int(cfg.enc_width * cfg.mlp_ratio),
                             hidden_act='gelu', hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             image_size=(cfg.img_h, cfg.img_w), patch_size=(cfg.patch_h, cfg.patch_w),
                             qkv_bias=cfg.qkv_bias, layer_norm_eps=cfg.enc_eps), add_pooling_layer=False)
    dec = TrOCRForCausalLM(TrOCRConfig(vocab_size=cfg.vocab_size, d_model=cfg.dec_width, decoder_layers=cfg.dec_depth,
                                       decoder_attention_heads=cfg.dec_heads,
                                       decoder_ffn_dim=int(cfg.dec_width * cfg.dec_mlp_ratio),
                                       activation_function=cfg.dec_act, max_position_embeddings=cfg.max_len + 2,
                                       dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                       layernorm_embedding=cfg.emb_norm, scale_embedding=cfg.emb_scale,
                                       cross_attention_hidden_size=cfg.enc_width,
                                       pad_token_id=cfg.vocab_size - 1, bos_token_id=cfg.vocab_size - 2,
                                       eos_token_id=0, decoder_start_token_id=0,
                                       tie_word_embeddings=cfg.tie_head))
    return VisionEncoderDecoderModel(encoder=enc, decoder=dec)


def bench_trocr(cfg, args):
    ours, theirs = build_model(cfg), hf_trocr(cfg)
    x = torch.randn(args.batch, 3, cfg.img_h, cfg.img_w)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(1, cfg.vocab_size - 2, (args.batch, args.label_len + 2), generator=g)
    tok[:, 0], tok[:, -1] = cfg.vocab_size - 2, 0
    pad = cfg.vocab_size - 1
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_t = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours():
        total, n = ours.loss(x, tok)
        loss = total / n
        opt_o.zero_grad(set_to_none=True)
        loss.backward()
        opt_o.step()

    def step_theirs():
        logits = theirs(pixel_values=x, decoder_input_ids=tok[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tok[:, 1:].flatten(), ignore_index=pad)
        opt_t.zero_grad(set_to_none=True)
        loss.backward()
        opt_t.step()

    n_o, n_t = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in theirs.parameters())
    to, tt = timed_pair(step_ours, step_theirs, args.rounds)
    attn = getattr(theirs.config, '_attn_implementation', '?')
    print(f'[1] TrOCR train step  ours {to * 1e3:8.1f} ms ({n_o / 1e6:.2f}M params)   transformers {tt * 1e3:8.1f} ms '
          f'({n_t / 1e6:.2f}M, attn={attn})   ratio {to / tt:.2f}  (goal <= 0.8)')


def bench_vit(cfg, args):
    tv = stub_torchvision()
    from timm.models.vision_transformer import VisionTransformer
    ours = build_model(cfg).encoder
    theirs = VisionTransformer(img_size=(cfg.img_h, cfg.img_w), patch_size=(cfg.patch_h, cfg.patch_w),
                               embed_dim=cfg.enc_width, depth=cfg.enc_depth, num_heads=cfg.enc_heads,
                               mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, class_token=bool(cfg.cls_token),
                               global_pool='', num_classes=0)
    x = torch.randn(args.batch, 3, cfg.img_h, cfg.img_w)

    def fb(m):
        return lambda: m(x).float().square().mean().backward()

    n_o, n_t = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in theirs.parameters())
    to, tt = timed_pair(fb(ours), fb(theirs), args.rounds)
    print(f'[2] ViT fwd+bwd       ours {to * 1e3:8.1f} ms ({n_o / 1e6:.2f}M params)   timm {tt * 1e3:8.1f} ms '
          f'({n_t / 1e6:.2f}M, torchvision: {tv})   ratio {to / tt:.2f}  (goal <= 1.0)')


def bench_cache(cfg, args):
    x = torch.randn(64, 3, cfg.img_h, cfg.img_w)
    for arch in ('trocr', 'parseq'):
        m = build_model(make_config(arch, 'S', cfg.vocab_size, **{k: getattr(cfg, k) for k in OVERRIDES})).eval()
        with torch.no_grad():   # never emit EOS, so every decode runs the full max_len + 1 steps
            if arch == 'trocr':
                m.tok_emb.weight[0].zero_()
            else:
                m.head.bias[0] = -1e4
        kw = dict(refine_iters=0) if arch == 'parseq' else {}
        uncached = (lambda: parseq_reference_ar(m, x)) if arch == 'parseq' else \
            (lambda: trocr_reference_greedy(m, x, cfg.max_len + 1))
        with torch.no_grad():
            t_cache, t_full = timed_pair(lambda: m.decode(x, **kw), uncached, max(1, args.rounds // 2), warmup=1)
        print(f'[3] {arch:6} greedy decode, batch 64, {cfg.max_len + 1} steps: with cache {t_cache * 1e3:8.1f} ms   '
              f'without {t_full * 1e3:8.1f} ms   speed-up {t_full / t_cache:.2f}x')


OVERRIDES = ('img_h', 'img_w', 'patch_h', 'patch_w', 'enc_width', 'enc_depth', 'enc_heads', 'dec_width',
             'dec_depth', 'dec_heads', 'max_len', 'dropout', 'qkv_bias', 'cls_token')

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--width', type=int, default=256, help='encoder and decoder width')
    ap.add_argument('--depth', type=int, default=4, help='encoder layers')
    ap.add_argument('--dec-depth', type=int, default=2, help='decoder layers')
    ap.add_argument('--heads', type=int, default=4, help='attention heads (encoder and decoder)')
    ap.add_argument('--img', default='32x128', help='image HxW')
    ap.add_argument('--patch', default='4x8', help='patch HxW')
    ap.add_argument('--vocab', type=int, default=97, help='vocabulary size (94 chars + EOS/BOS/PAD)')
    ap.add_argument('--batch', type=int, default=32, help='batch for the training-step and ViT benchmarks')
    ap.add_argument('--label-len', type=int, default=10, help='characters per label in the training step')
    ap.add_argument('--max-len', type=int, default=25, help='decoding steps - 1 in the cache benchmark')
    ap.add_argument('--rounds', type=int, default=6, help='timed rounds per side (after 2 warm-up rounds)')
    ap.add_argument('--threads', type=int, default=1, help='torch threads')
    ap.add_argument('--only', default='123', help='which benchmarks to run, e.g. 13')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (h, w), (ph, pw) = map(int, args.img.split('x')), map(int, args.patch.split('x'))
    cfg = make_config('trocr', 'S', args.vocab, img_h=h, img_w=w, patch_h=ph, patch_w=pw, enc_width=args.width,
                      enc_depth=args.depth, enc_heads=args.heads, dec_width=args.width, dec_depth=args.dec_depth,
                      dec_heads=args.heads, max_len=args.max_len, dropout=0.0, qkv_bias=True)
    print(f'torch {torch.__version__}, {args.threads} thread(s); config: image {args.img}/{args.patch}, '
          f'width {args.width}, {args.depth} enc + {args.dec_depth} dec layers, {args.heads} heads, vocab {args.vocab}, '
          f'{count_params(cfg)[0] / 1e6:.2f}M params; batch {args.batch}')
    if '1' in args.only:
        bench_trocr(cfg, args)
    if '2' in args.only:
        bench_vit(cfg, args)
    if '3' in args.only:
        bench_cache(cfg, args)
