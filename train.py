"""train.py: one point of a scaling curve, from a laptop CPU to many GPU nodes.

    python train.py --arch parseq --size T4 --train data/demo/train --val data/demo/val --samples 20000
    torchrun --nproc_per_node=8 train.py --arch parseq --size B --train data/real:3 --train data/synth:1 \
        --val data/val --test IIIT5k=data/IIIT5k --test SVT=data/SVT
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...
    python train.py ... --init runs/NAME/best.pt --charset @greek.txt --name greek      # fine-tune onto a new charset

Writes runs/NAME/: config.json (arguments, N, D = usable images, drops, FLOPs convention, the run's identity),
metrics.jsonl (a line per eval: samples seen, epochs, C, val loss and error), last.pt (every --save-every and every
tenth of the run), best.pt (lowest val error, ties to lower val loss), result.json (written last). A step's loss is its
token losses summed over micro-batches and ranks / its token count: any split of a batch trains the same model.
Re-running a command resumes it exactly, also under another process count or --workers (the data order depends only
on the global batch and the seed); a finished run is not redone; a run name that holds another run is an error.
SIGTERM or Ctrl-C: the current step ends, last.pt is written, the exit status is 128 + the signal; a second exits at once.
Not here: data preparation (data.py), fitting laws (fit.py), sweeps (ocrscale.py).
"""
import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import types

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import model as modellib

# Per-size recipes: paper §4 for the study's sizes (PARSeq lr 7e-4 scaled by batch/256 in its code base, we keep
# it fixed at the study's batch); tiny sizes from the design notes' CPU probe (lr falls with width).
RECIPES = {
    ("trocr", "S"): dict(batch=1024, lr=4e-4), ("trocr", "B"): dict(batch=256, lr=1e-4),
    ("trocr", "L"): dict(batch=128, lr=4e-5), ("trocr", "H"): dict(batch=128, lr=4e-5),
    **{("parseq", s): dict(batch=1024, lr=7e-4, weight_decay=0.0, schedule="onecycle", warmup=0.075, clip=20.0)
       for s in "SBLH"},
}
TINY_LR = {"T1": 3e-3, "T2": 3e-3, "T3": 2.5e-3, "T4": 2e-3, "T5": 1.8e-3, "T6": 1.5e-3, "T7": 1.2e-3}
DEFAULTS = dict(batch=64, lr=2e-3, weight_decay=0.05, schedule="cosine", warmup=0.05, clip=1.0)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
# may change when a run is resumed: the layout of processes, workers and micro-batches, cadences, output
NOT_IDENTITY = ("micro_batch", "workers", "threads", "device", "save_every", "eval_every", "max_bad_steps", "name", "runs",
                "resume", "tag", "bar_position", "quiet")
TRAIN_ONLY = ("dropout", "attn_dropout", "act_dropout", "pos_std", "init_std")  # a size's fields that shape no tensor
VOCAB = ("tok_emb.weight", "text_emb.weight", "head.weight", "head.bias")  # rows by token id (head: V - 2 rows)
FLOPS_CONVENTION = ("C = sum over optimizer steps of train_flops_per_sample(cfg, padded label length of each micro-batch) "
                    "x batch; PARSeq counts the orders used; forward+backward = 3x forward, multiply-add = 2 FLOPs")


def save_interval(text):  # --save-every: '15m' (minutes of wall time) or a number of samples -> (minutes, samples)
    if not text.removesuffix("m").isdigit():
        raise argparse.ArgumentTypeError(f"takes minutes (15m) or samples (200000), got {text!r}")
    return (float(text[:-1]), None) if text.endswith("m") else (None, int(text))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["trocr", "parseq"], default=None, help="default parseq (--init: the checkpoint's)")
    p.add_argument("--size", default=None, help="S|B|L|H (the study) or T1..T7 (tiny, CPU); default T4 (--init: below)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field, e.g. --set enc_width=96 --set img_w=128")
    p.add_argument("--train", action="append", required=True, metavar="DIR[:WEIGHT]",
                   help="training shards: a folder, a glob or the URL of a folder (http(s)://, s3://, gs://, ...)")
    p.add_argument("--val", required=True, metavar="DIR", help="validation shards (a folder or URL)")
    p.add_argument("--test", action="append", default=[], metavar="NAME=DIR", help="test sets, evaluated at the end")
    p.add_argument("--read-block", type=int, default=None, help="consecutive samples read together (default: 1 for "
                   "local shards, 64 for URLs; raise it for shards on a network filesystem)")
    p.add_argument("--charset", default=None, help="36 (default), 94, the characters or @FILE (UTF-8); --init: a new vocab")
    p.add_argument("--spm", default=None, help="SentencePiece model file (python data.py spm ...) instead of chars")
    p.add_argument("--samples", type=int, default=None, help="D: use only the first D usable training images (default all)")
    p.add_argument("--epochs", type=float, default=20, help="passes over D when --train-samples is not given")
    p.add_argument("--train-samples", type=int, default=None, help="samples to train on in total")
    p.add_argument("--batch", type=int, default=None, help="global batch (all processes, all micro-steps)")
    p.add_argument("--micro-batch", type=int, default=None, help="per-process batch per micro-step")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--betas", default="0.9,0.98")
    p.add_argument("--schedule", choices=["cosine", "onecycle"], default=None)
    p.add_argument("--warmup", type=float, default=None, help="warm-up as a fraction of training")
    p.add_argument("--clip", type=float, default=None, help="gradient norm clip (0 = off)")
    p.add_argument("--ema", type=float, default=0.0, help="weight-averaging decay (0 = off), e.g. 0.999")
    p.add_argument("--ema-start", type=float, default=0.75, help="start averaging after this fraction (PARSeq: last quarter)")
    p.add_argument("--augment", action="store_true", help="light geometric/photometric augmentation")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every this many samples (default: 10 evals)")
    p.add_argument("--save-every", type=save_interval, default="15m", help="write last.pt every 15m (minutes) or N samples")
    p.add_argument("--beam", type=int, default=1, help="TrOCR beam width at evaluation")
    p.add_argument("--beam-len-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="rank TrOCR's final beam by score / length (fairseq's default)")
    p.add_argument("--refine-iters", type=int, default=1, help="PARSeq cloze refinement passes at evaluation")
    p.add_argument("--init", default=None, help="fine-tune this checkpoint's own model (--set may change it, e.g. a smaller "
                   "max_len) and tokenizer; recipe (lr, ...): the size's whose fields it has, else the defaults (converted)")
    p.add_argument("--resume", action="store_true", help="insist on resuming (re-running a run name always resumes)")
    p.add_argument("--name", default=None, help="run name (default: ARCH-SIZE-dD-sSEED-HASH, HASH: of the run's identity)")
    p.add_argument("--runs", default="runs", help="root folder of run folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (labels then pad to max_len)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers per process (default: 0 on CPU, 6 on GPU)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="non-finite losses to skip before stopping")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: 1 for the tiny sizes, else cores / processes)")
    p.add_argument("--tag", default=None, help="free-form label saved in config.json (fit.py --where tag=...)")
    p.add_argument("--bar-position", type=int, default=0, help="tqdm line, when several runs share a terminal")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)  # arch, size and the recipe: tokenizer_and_config


def get_lr(step, total_steps, args):
    """Learning rate at optimizer step `step`: linear (cosine for OneCycle) warm-up, then cosine decay."""
    warm = max(1, int(args.warmup * total_steps))
    if args.schedule == "onecycle":  # torch's OneCycleLR shape: lr/25 -> lr -> lr/25e4, cosine both ways
        lo, end = args.lr / 25, args.lr / 25e4
        if step < warm:
            return lo + (args.lr - lo) * (1 - math.cos(math.pi * step / warm)) / 2
        t = (step - warm) / max(1, total_steps - warm)
        return end + (args.lr - end) * (1 + math.cos(math.pi * t)) / 2
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(1, total_steps - warm)
    return args.lr * (1 + math.cos(math.pi * min(1.0, t))) / 2


def config_overrides(items):  # --set FIELD=VALUE ... -> {field: value}; make_config rejects unknown fields
    overrides = {}
    for key, _, value in (item.partition("=") for item in items):
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(value)  # numbers, booleans, lists; anything else stays a string
        overrides[key] = value
    return overrides


def tokenizer_and_config(args):
    """(tokenizer, model config, the --init checkpoint or None); fills in --arch, --size (with --init: the size whose
    fields the checkpoint's model has, --set's aside, else None) and the recipe. --charset/--spm: a new vocabulary."""
    overrides, ckpt = config_overrides(args.set), None
    if args.init and not os.path.exists(args.init):
        sys.exit(f"train.py: --init {args.init}: no such checkpoint")
    try:
        if args.init:
            try:
                ckpt = torch.load(args.init, map_location="cpu", weights_only=True)
                cfg, tok = modellib.ModelConfig(**ckpt["model_config"]), data.load_tokenizer(ckpt["tokenizer"])
            except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, ValueError) as e:
                sys.exit(f"train.py: --init {args.init}: not a checkpoint of train.py or model.py convert-* "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})")
            cfg = dataclasses.replace(cfg, **overrides)
            size = next((s for s, fields in modellib.SIZES[cfg.arch].items() if all(
                k in overrides or k in TRAIN_ONLY or getattr(cfg, k) == v for k, v in fields.items())), None)
            for flag, given, theirs in (("arch", args.arch, cfg.arch), ("size", args.size, size)):
                if given not in (None, theirs):
                    sys.exit(f"train.py: --{flag} {given} conflicts with --init {args.init} (a {cfg.arch}"
                             f"{'-' * bool(size)}{size or ''} checkpoint)")
        args.arch, args.size = (cfg.arch, size) if ckpt else (args.arch or "parseq", args.size or "T4")
        if args.spm or args.charset or not ckpt:  # a new vocabulary, or none from --init
            tok = data.SPTokenizer(args.spm) if args.spm else data.CharTokenizer(data.load_charset(args.charset or "36"))
            cfg = dataclasses.replace(cfg, vocab_size=tok.vocab_size) if ckpt else \
                modellib.make_config(args.arch, args.size, tok.vocab_size, **overrides)
        tok = data.load_tokenizer({**tok.spec, "max_len": cfg.max_len})  # the stream skips longer labels
    except (KeyError, TypeError, ValueError, OSError) as e:
        sys.exit(f"train.py: {e}")
    recipe = {**DEFAULTS, **({"lr": TINY_LR[args.size]} if args.size in TINY_LR else {}),
              **RECIPES.get((args.arch, args.size), {})}
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return tok, cfg, ckpt


def source(path):  # a data folder or file as one string in any working directory: absolute, or a URL
    return path if data.is_url(path) else os.path.abspath(path)


def run_identity(args, cfg, tok, D, train_samples, dtype):
    """What makes a run this run, as JSON values: the resolved config minus NOT_IDENTITY (data paths absolute, the
    model config and tokenizer as built, D in usable images); and fit.py's group, what the points of one fit share."""
    spec = json.dumps(tok.spec, sort_keys=True)
    tokenizer = f"char:{tok.charset}" if tok.spec["type"] == "char" else \
        f"{tok.spec['type']}:{hashlib.sha1(spec.encode()).hexdigest()[:12]}"
    group = dict(arch=args.arch, train=[[source(p), w] for p, w in data.parse_sources(",".join(args.train))],
                 val=source(args.val), tokenizer=tokenizer, init=args.init and source(args.init),
                 set=config_overrides(args.set), img=[cfg.img_h, cfg.img_w],
                 eval=f"beam={args.beam}" if args.arch == "trocr" else f"refine={args.refine_iters}")
    identity = {k: v for k, v in vars(args).items() if k not in NOT_IDENTITY + ("charset", "spm", "epochs")}
    identity.update(group, test=[[n, source(p)] for n, _, p in (t.partition("=") for t in args.test)], D=D,
                    model=dataclasses.asdict(cfg), train_samples=train_samples, dtype=str(dtype or "fp32"))
    return json.loads(json.dumps(identity)), group


def brief(value):  # a config value in a one-line message; paths differ in their ends
    text = json.dumps(value)
    return text if len(text) <= 40 else "..." + text[-37:]


def check_identity(run_dir, identity):
    """One line and exit when run_dir holds a run of another identity: never resume onto other data or settings, never
    report another run as this one's result."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        was = json.load(f).get("identity")
    if was is None:
        sys.exit(f"train.py: {run_dir} holds a run of an older train.py (no identity recorded): choose another --name")
    differ = [k for k in sorted(identity.keys() | was.keys()) if identity.get(k) != was.get(k)]
    if differ:
        sys.exit(f"train.py: {run_dir} holds another run ({'; '.join(f'{k} {brief(was.get(k))} -> {brief(identity.get(k))}' for k in differ)}): "
                 "choose another --name, or delete the folder to start over")


def load_init(raw_model, tok, ckpt, path):
    """--init: each checkpoint tensor into the model's of the same name and shape (positions of a longer max_len: their
    first rows); under a new vocabulary, VOCAB's rows of tokens both share (by text; EOS, BOS, PAD by role), the others
    fresh. One line and exit when under 90% of its tensors load, else one line saying what was loaded."""
    old_tok, state, loaded, remapped = data.load_tokenizer(ckpt["tokenizer"]), raw_model.state_dict(), [], []
    V, old_V = tok.vocab_size, old_tok.vocab_size
    old_ids = {text: i + 1 for i, text in enumerate(old_tok.tokens)}  # the seams' ids: 0 EOS, 1..V-3 text, V-2 BOS, V-1 PAD
    pairs = [(0, 0), (V - 2, old_V - 2), (V - 1, old_V - 1)]  # (new id, old id)
    pairs += [(i + 1, old_ids[text]) for i, text in enumerate(tok.tokens) if text in old_ids]
    for name in [name for name in ckpt["model"] if name in state]:  # by name only
        old, new = ckpt["model"][name], state[name]
        prefix = name in ("pos_emb", "pos_queries") and old.shape[::2] == new.shape[::2] and old.shape[1] >= new.shape[1]
        if name in VOCAB and old_tok.tokens != tok.tokens and old.shape[1:] == new.shape[1:]:
            rows = torch.tensor([(i, j) for i, j in pairs if i < new.shape[0] and j < old.shape[0]])
            new[rows[:, 0]] = old[rows[:, 1]].to(new.dtype)  # state_dict tensors share the parameters' storage
            remapped.append(name)
        elif new.shape == old.shape or prefix:  # prefix: positions of a longer max_len (a converted TrOCR: 511)
            new.copy_(old[:, :new.shape[1]] if prefix else old)
            loaded.append(name)
    done = set(loaded + remapped)
    groups = lambda names: ", ".join(dict.fromkeys(  # noqa: E731  'encoder.blocks.0.norm1.bias' -> 'encoder.blocks'
        ".".join(p[:next((i for i, part in enumerate(p) if part.isdigit()), len(p))]).removesuffix(".weight").removesuffix(
            ".bias") for p in (n.split(".") for n in names if n not in done))) or "none"
    counts, missed = f"{len(done)}/{len(ckpt['model'])} tensors", groups(ckpt["model"])
    if len(done) < 0.9 * len(ckpt["model"]):
        sys.exit(f"train.py: --init {path}: only {counts} fit the model (changed by --set?); not loaded: {missed}")
    shared = f", rows of {len(pairs) - 3}/{len(tok.tokens)} shared tokens in {', '.join(remapped)}" if remapped else ""
    return f"--init {path}: loaded {counts}{shared}; not loaded: {missed}; fresh: {groups(state)}"


def peak_flops(device):  # the dense 16-bit peak of a known GPU, else None (no MFU)
    return next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)


def git_commit():
    with contextlib.suppress(OSError):  # no git: None
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True).stdout.strip() or None


def atomic_save(obj, path):
    """Write obj (bytes as they are, anything else with torch.save) to path.tmp, flush it to disk, rename it over
    path and flush the folder: a kill or power cut leaves the old file or the new one, never a torn one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)  # the new name is on disk too
    os.fsync(folder)
    os.close(folder)


stop_signal = None  # set by the first SIGTERM/SIGINT: the loop saves last.pt after the current step and exits


def request_stop(signum, frame):
    global stop_signal
    if stop_signal is not None:  # a second signal: at once
        print(f"train.py: a second {signal.Signals(signum).name}: exiting without saving", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    stop_signal = signum


@torch.no_grad()
def evaluate(net, tok, stream, decode_options, workers, device, autocast, cased=False, punctuation=False):
    """Loss per token, word error and 1-NED (data.score: cased, punctuation), mean confidence and label length on one
    pass over an evaluation stream, exact across ranks (sums are all-reduced). ocrscale.py eval calls it too."""
    net.eval()
    sums = torch.zeros(8, dtype=torch.float64, device=device)  # loss, tokens, correct, words, 1-NED, unreadable,
    for images, labels, unreadable in stream.loader(workers):  # confidence and label characters summed
        images, tokens = data.normalize(images.to(device)), tok.encode(labels).to(device)
        with autocast:
            total, n = net.loss(images, tokens)
            ids, conf = net.decode(images, **decode_options)
        s = data.score(tok.decode(ids.cpu()), labels, getattr(tok, "charset", None), cased, punctuation)
        sums += torch.tensor([total.item(), n.item(), s["correct"], s["n"], s["ned_sum"], unreadable, conf.sum().item(),
                              sum(map(len, labels))], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    net.train()
    loss_sum, n, correct, words, ned, unreadable, confidence, characters = sums.tolist()
    if words == 0:
        raise data.DataError(f"{', '.join(stream.names)}: no image could be read ({int(unreadable)} unreadable)")
    return dict(loss=loss_sum / max(n, 1), error=100 * (1 - correct / words), ned=100 * ned / words, n=int(words),
                unreadable=int(unreadable), confidence=100 * confidence / words, label_length=characters / words)


def log_eval(row, eval_model, tok, cfg, args, eval_args, streams, run_dir, prog, master):
    """Evaluate on --val (and every --test set when row['final']), append the row to metrics.jsonl, keep the
    weights of a new best val error (ties: lower val loss) in best.pt. Returns the row."""
    val = evaluate(eval_model, tok, streams["val"], *eval_args)
    row.update(val_loss=val["loss"], val_error=val["error"], val_ned=val["ned"], val_n=val["n"], val_unreadable=val["unreadable"])
    if row["final"] and args.test:
        row["tests"] = {name: {k: r[k] for k in ("error", "ned", "n", "unreadable")} for name, r in (
            (name, evaluate(eval_model, tok, stream, *eval_args)) for name, stream in streams["tests"].items())}
        row["test_error"] = data.weighted_average(row["tests"])
    if (val["error"], val["loss"]) < (prog.best_error, prog.best_loss):
        prog.best_error, prog.best_loss, prog.best_step = val["error"], val["loss"], row["step"]
        if master:
            atomic_save(dict(model=eval_model.state_dict(), model_config=dataclasses.asdict(cfg), tokenizer=tok.spec,
                             step=row["step"], val_error=val["error"], val_loss=val["loss"]), os.path.join(run_dir, "best.pt"))
    if master:
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def save_checkpoint(path, raw_model, optimizer, scaler, ema, prog, cfg, tok, args, master):
    """last.pt: the full state, with every rank's RNG state (gathered: every rank calls this). Only torch's global
    RNG drives training (dropout, PARSeq orders); the data order is a function of prog.position and the seed."""
    ranks = [[torch.get_rng_state(), *([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])]]
    if dist.is_initialized():
        ranks = ranks * dist.get_world_size()
        dist.all_gather_object(ranks, ranks[0])
    if master:
        atomic_save(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                         ema=ema.state_dict() if ema is not None else None, **vars(prog),
                         rng=ranks,
                         model_config=dataclasses.asdict(cfg), tokenizer=tok.spec, args=vars(args)), path)


def keep_metrics_upto(path, step):
    """A run killed after logging an eval but before its checkpoint would log it twice: drop lines past `step`."""
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]  # drop a torn last line
        atomic_save("".join(rows).encode(), path)


def main(argv=None):
    args = parse_args(argv)
    tok, cfg, init = tokenizer_and_config(args)  # and args.arch, args.size, the recipe
    # --- processes and devices: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; plain python is one process
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        # tiny sizes: one thread. On 2 cores a second thread gives -5% to +11% alone (PARSeq-T1/T4/T6, TrOCR-T4), and
        # loses 75-97% beside another such run (their threads spin waiting for each other): bench_train.py --threads
        torch.set_num_threads(args.threads or (1 if args.size in TINY_LR else
                                               max(1, data.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", world)))))
    threads = torch.get_num_threads()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    master = rank == 0
    dtype = {"auto": torch.bfloat16 if use_cuda else None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # bf16 keeps fp32's range: no scaling
    workers = args.workers if args.workers is not None else (6 if use_cuda else 0)

    # --- model, tokenizer, data
    torch.manual_seed(args.seed)
    raw_model = modellib.build_model(cfg).to(device)
    micro = args.micro_batch or args.batch // world
    accum = args.batch // (micro * world) if micro else 0
    if accum < 1 or accum * micro * world != args.batch:
        sys.exit(f"--batch {args.batch} must be a multiple of micro-batch {micro} x {world} processes")
    settings = dict(max_len=cfg.max_len, rank=rank, world_size=world, fold=tok.fold, tokenizer=tok, block=args.read_block)
    charset, flag = getattr(tok, "charset", None), "--train"
    try:  # every set opened and checked now, on every rank, not after hours of training
        stream = data.ShardStream(data.parse_sources(",".join(args.train)), cfg.img_h, cfg.img_w, micro, charset,
                                  seed=args.seed, samples=args.samples, augment=args.augment, **settings)
        flag = "--val"
        streams = dict(val=data.ShardStream(args.val, cfg.img_h, cfg.img_w, micro, charset, loop=False, **settings), tests={})
        for spec in args.test:
            flag = f"--test {spec}"
            test_name, _, path = spec.partition("=")
            if not (test_name and path):
                raise ValueError("takes NAME=DIR")
            streams["tests"][test_name] = data.ShardStream(path, cfg.img_h, cfg.img_w, micro, charset, loop=False, **settings)
    except (ValueError, OSError) as e:
        sys.exit(f"train.py: {flag}: {e}")
    D = stream.num_samples  # usable images: what a D axis means
    train_samples = args.train_samples or int(args.epochs * D)
    total_steps = max(1, train_samples // args.batch)
    eval_every = max(1, (args.eval_every or train_samples // 10) // args.batch)  # in optimizer steps
    save_minutes, save_samples = args.save_every
    tenth = max(1, total_steps // 10)  # last.pt also every tenth of the run: a stop loses at most a tenth
    identity, fit_group = run_identity(args, cfg, tok, D, total_steps * args.batch, dtype)
    short_hash = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:6]
    size = args.size or os.path.splitext(os.path.basename(args.init))[0]  # a model of no --size: the checkpoint's name
    name = args.name or f"{args.arch}-{size}-d{args.samples or 'all'}-s{args.seed}-{short_hash}"
    run_dir = os.path.join(args.runs, name)
    last_path, metrics_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "metrics.jsonl")
    total, non_embed = modellib.count_params(cfg)
    config = dict(vars(args), name=name, model=dataclasses.asdict(cfg), N=total, N_nonembed=non_embed, D=D,
                  drops=stream.drops, flops_per_sample=modellib.train_flops_per_sample(cfg), flops_convention=FLOPS_CONVENTION,
                  train_samples=total_steps * args.batch, tokenizer=tok.spec, git_commit=git_commit(),
                  world_size=world, global_batch=args.batch, micro_batch=micro, accum=accum, identity=identity,
                  fit_group=fit_group)
    check_identity(run_dir, identity)
    if os.path.exists(os.path.join(run_dir, "result.json")):
        with open(os.path.join(run_dir, "result.json")) as f:
            result = json.load(f)
        if master:
            print(f"{name}: already finished (val error {result['val_error']:.2f}%), not redone")
        return result

    decay = [p for n, p in raw_model.named_parameters() if p.dim() >= 2 and "pos" not in n]
    no_decay = [p for n, p in raw_model.named_parameters() if not (p.dim() >= 2 and "pos" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=tuple(float(b) for b in args.betas.split(",")), fused=use_cuda)
    # where the run stands (saved in last.pt); loss_sum / tokens since the last eval = the next row's train loss;
    # position: the global sample position of the next step's data (skipped steps used theirs too)
    prog = types.SimpleNamespace(step=0, samples=0, position=0, flops=0.0, wall_s=0.0, bad_steps=0, unreadable=0,
                                 best_error=math.inf, best_loss=math.inf, best_step=None, loss_sum=0.0, tokens=0.0)
    ema = None

    # --- resume: same run name and identity; any layout of processes, workers and micro-batches continues exactly
    if os.path.exists(last_path):
        try:
            ckpt = torch.load(last_path, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
        except pickle.UnpicklingError as e:  # e.g. written by an older train.py (numpy RNG states)
            sys.exit(f"train.py: cannot resume from {last_path} ({str(e).splitlines()[0]}); move it away to start over")
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ckpt["ema"] is not None:
            ema = copy.deepcopy(raw_model)
            ema.load_state_dict(ckpt["ema"])
        if any(k not in ckpt for k in vars(prog)):
            sys.exit(f"train.py: cannot resume from {last_path}: an older train.py wrote it; move it away to start over")
        prog = types.SimpleNamespace(**{k: ckpt[k] for k in vars(prog)})
        if len(ckpt["rng"]) == world:
            torch.set_rng_state(ckpt["rng"][rank][0])
            if use_cuda and ckpt["rng"][rank][1:]:  # this process's GPU
                torch.cuda.set_rng_state(ckpt["rng"][rank][1])
        else:  # another process count: per-rank RNG streams cannot carry over
            torch.manual_seed(args.seed * 1000003 + prog.step * world + rank)
        if master:
            print(f"{name}: resuming at step {prog.step} ({prog.samples:,} samples, {len(ckpt['rng'])} -> {world} processes)")
    elif args.resume:
        sys.exit(f"--resume: no checkpoint at {last_path}")
    elif args.init:
        line = load_init(raw_model, tok, init, args.init)
        if master:
            print(line)
    del init  # its tensors
    if master:
        os.makedirs(run_dir, exist_ok=True)
        atomic_save(json.dumps(config, indent=1).encode(), os.path.join(run_dir, "config.json"))
        keep_metrics_upto(metrics_path, prog.step)
    net = torch.compile(raw_model) if args.compile else raw_model
    if world > 1:
        net = DDP(net, device_ids=[local_rank] if use_cuda else None)
    peak = peak_flops(device) if dtype else None
    decode_options = dict(beam=args.beam, len_norm=args.beam_len_norm) if args.arch == "trocr" else \
        dict(refine_iters=args.refine_iters)
    eval_args = (decode_options, workers, device, autocast)
    if master:
        drops = ", ".join(f"{k} {v:,}" for k, v in stream.drops.items()) or "none"
        print(f"{name}: N={total:,} D={D:,} (dropped: {drops}), {total_steps:,} steps of {args.batch} = {micro} x {world} "
              f"process(es) x {accum} micro-step(s), {device.type}, {str(dtype or 'fp32').replace('torch.', '')}, "
              f"{threads if not use_cuda else '-'} threads")

    # --- the loop
    batches = iter(stream.loader(workers, start=prog.position, pin_memory=use_cuda))
    bar = tqdm(total=total_steps * args.batch, initial=prog.samples, unit="img", desc=name, disable=not master or args.quiet,
               dynamic_ncols=True, position=args.bar_position, leave=True)
    wall_start, started, last_save = prog.wall_s, time.time(), time.time()
    window = dict(start=started, wait=0.0, samples=0, flops=0.0)  # throughput since the last eval (or resume)
    if prog.step >= total_steps:  # resumed from the checkpoint written after the final eval
        with open(metrics_path) as f:
            row = json.loads(f.readlines()[-1])
    while prog.step < total_steps:
        lr = get_lr(prog.step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        save_vote = master and save_minutes is not None and time.time() - last_save >= 60 * save_minutes
        stats = torch.zeros(6, dtype=torch.float64, device=device)  # loss sum, tokens, FLOPs, save vote, unreadable, stop
        stats[3] = save_vote  # a fill, not a host-to-device copy that would wait for the last step's kernels
        stats[5] = stop_signal or 0  # any rank signalled: all stop after this step
        for micro_step in range(accum):
            t0 = time.time()
            images, labels, unreadable = next(batches)  # unreadable samples were left out: a batch may be smaller
            window["wait"] += time.time() - t0
            tokens = tok.encode(labels, length=cfg.max_len if args.compile else None)  # compile: one static shape
            images, tokens = data.normalize(images.to(device, non_blocking=True)), tokens.to(device, non_blocking=True)
            stats[4] += unreadable
            if world > 1:  # sync gradients only on the last micro-step
                net.require_backward_grad_sync = micro_step == accum - 1
            with autocast:
                loss_sum, n = net(images, tokens)  # summed over this micro-batch's tokens
            scaler.scale(loss_sum / args.batch).backward()  # /batch keeps fp16 gradients in range; rescaled below
            stats[:2] += torch.stack([loss_sum.detach(), n]).double()
            stats[2] += modellib.train_flops_per_sample(cfg, dec_len=tokens.shape[1] - 2) * len(images)  # padded length
        if world > 1:
            dist.all_reduce(stats)
        # DDP averaged the gradients over ranks; scale them to d(all token losses of the step) / (its token count)
        scaler.unscale_(optimizer)
        torch._foreach_mul_([p.grad for p in raw_model.parameters() if p.grad is not None],
                            (world * args.batch / stats[1].clamp_min(1)).float())
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip or math.inf)
        loss_sum, step_tokens, step_flops, save_vote, unreadable, stop, grad_norm = torch.cat(
            [stats, grad_norm.double().view(1)]).tolist()
        prog.flops += step_flops
        prog.position += args.batch
        prog.unreadable += int(unreadable)
        if step_tokens == 0:  # every sample of the step was unreadable (counted): nothing to learn from
            optimizer.zero_grad(set_to_none=True)
            continue
        window["flops"] += step_flops
        # Loss and gradients are the same on every rank, so all ranks skip together. With fp16 the scaler
        # itself skips steps with inf gradients (and lowers its scale): those are not bad steps.
        if not math.isfinite(loss_sum) or not (math.isfinite(grad_norm) or scaler.is_enabled()):
            optimizer.zero_grad(set_to_none=True)
            scaler.update()  # fp16: closes this step's unscale_ and lowers the scale
            prog.bad_steps += 1
            if master:
                tqdm.write(f"{name}: non-finite loss or gradients at step {prog.step} (skipped, {prog.bad_steps}/{args.max_bad_steps})")
            if prog.bad_steps >= args.max_bad_steps:
                raise SystemExit(f"{name}: {prog.bad_steps} non-finite losses or gradients; stopping. {last_path} holds "
                                 "the last good state; lower --lr, raise --warmup or use --dtype bf16/fp32")
            continue
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        prog.step += 1
        prog.samples += args.batch
        prog.wall_s = wall_start + time.time() - started
        if args.ema > 0 and prog.step >= args.ema_start * total_steps:
            ema = ema or copy.deepcopy(raw_model)
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - args.ema)
        prog.loss_sum += loss_sum
        prog.tokens += step_tokens
        window["samples"] += args.batch
        bar.update(args.batch)
        final = prog.step == total_steps
        if prog.step % eval_every == 0 or final:
            elapsed = time.time() - window["start"]
            row = dict(step=prog.step, samples=prog.samples, epochs=prog.samples / D, flops=prog.flops, wall_s=round(prog.wall_s, 2),
                       gpu_hours=prog.wall_s * world / 3600 if use_cuda else None, lr=lr, train_loss=prog.loss_sum / prog.tokens,
                       samples_per_s=window["samples"] / elapsed, data_wait=window["wait"] / elapsed,
                       mfu=window["flops"] / elapsed / (peak * world) if peak else None, unreadable=prog.unreadable, final=final)
            row = log_eval(row, ema or raw_model, tok, cfg, args, eval_args, streams, run_dir, prog, master)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", img_s=f"{row['samples_per_s']:.0f}", val_err=f"{row['val_error']:.1f}%")
            window, prog.loss_sum, prog.tokens = dict(start=time.time(), wait=0.0, samples=0, flops=0.0), 0.0, 0.0
        if save_vote or final or stop or prog.step % tenth == 0 or \
                save_samples and prog.samples // save_samples > (prog.samples - args.batch) // save_samples:
            save_checkpoint(last_path, raw_model, optimizer, scaler, ema, prog, cfg, tok, args, master)
            last_save = time.time()
        if stop and not final:
            bar.close()
            if master:
                print(f"{name}: stopped by {signal.Signals(int(stop)).name} after step {prog.step:,}; {last_path} holds it "
                      "(the same command resumes)", file=sys.stderr)
            raise SystemExit(128 + int(stop))
    bar.close()
    drops = {k: v for k, v in dict(stream.drops, unreadable=prog.unreadable).items() if v}
    result = dict(name=name, N=total, D=D, C=prog.flops, epochs=prog.samples / D, drops=drops, best_step=prog.best_step,
                  **{k: row.get(k) for k in ("step", "samples", "wall_s", "val_loss", "val_error", "val_ned", "tests",
                                             "test_error")})
    if master:
        atomic_save(json.dumps(result, indent=1).encode(), os.path.join(run_dir, "result.json"))
        print(f"{name}: N={total:,} D={D:,} C={prog.flops:.3g} FLOPs, {prog.samples:,} samples in {prog.wall_s:.0f}s, val error "
              f"{row['val_error']:.2f}%" + (f", test error {row['test_error']:.2f}%" if row.get("test_error") is not None else "")
              + f"; best.pt: step {prog.best_step:,} (val error {prog.best_error:.2f}%, loss {prog.best_loss:.4f})")
    if dist.is_initialized():
        dist.barrier()
    return result


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, request_stop)  # what schedulers send before preemption
    signal.signal(signal.SIGINT, request_stop)
    try:
        main()
    except data.DataError as e:  # raised where a loader worker found the data unusable
        sys.exit(f"train.py: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
