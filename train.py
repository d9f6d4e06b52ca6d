"""train.py: one point of a scaling curve, from a laptop CPU to many GPU nodes.

    python train.py --arch parseq --size T4 --train data/demo/train --val data/demo/val --samples 20000
    torchrun --nproc_per_node=8 train.py --arch parseq --size B --train data/real:3 --train data/synth:1 \
        --val data/val --test IIIT5k=data/IIIT5k --test SVT=data/SVT
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...
    python train.py ... --init runs/NAME/best.pt --charset @greek.txt --name greek      # fine-tune onto a new charset

Writes runs/NAME/: config.json (N, D = usable images, the run's identity), metrics.jsonl (a row per eval: samples,
epochs, C, val loss and error), last.pt, best.pt (lowest val error), result.json. Any split of a global batch over
processes and micro-batches trains the same model (PARSeq: but for its orders, drawn per micro-batch); re-running a
command resumes it exactly, under any layout; a finished run is not redone; a run name that holds another run is an
error. SIGTERM or Ctrl-C: the current step ends, last.pt is written, the exit status is 128 + the signal; a second
signal exits at once.
"""
import argparse, contextlib, copy, dataclasses, hashlib, json, math, os, pickle, re
import signal, subprocess, sys, time, types, zipfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import model as modellib

# Per-size recipes: paper §4 for the study's sizes (PARSeq's lr 7e-4 kept at the study's batch, not scaled by
# batch/256 as in its code base); the tiny sizes' lr from a CPU probe (lr falls with width).
RECIPES = {("trocr", "S"): dict(batch=1024, lr=4e-4), ("trocr", "B"): dict(batch=256, lr=1e-4),
           **{("trocr", s): dict(batch=128, lr=4e-5) for s in "LH"},
           **{("parseq", s): dict(batch=1024, lr=7e-4, weight_decay=0.0, schedule="onecycle", warmup=0.075, clip=20.0)
              for s in "SBLH"}}
TINY_LR = {"T1": 3e-3, "T2": 3e-3, "T3": 2.5e-3, "T4": 2e-3, "T5": 1.8e-3, "T6": 1.5e-3, "T7": 1.2e-3}
DEFAULTS = dict(batch=64, lr=2e-3, weight_decay=0.05, schedule="cosine", warmup=0.05, clip=1.0)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
# not in a run's identity: what a resume may change (layout, cadences, output), what it holds resolved (tokenizer)
NOT_IDENTITY = ("micro_batch", "workers", "threads", "device", "save_every", "eval_every", "max_bad_steps", "name",
                "runs", "resume", "tag", "bar_position", "quiet", "charset", "spm", "epochs")
TRAIN_ONLY = ("dropout", "attn_dropout", "act_dropout", "pos_std", "init_std")  # a size's fields that shape no tensor
VOCAB = ("tok_emb.weight", "text_emb.weight", "head.weight", "head.bias")  # rows by token id (head: V - 2 rows)
FLOPS_CONVENTION = ("C = sum over optimizer steps of train_flops_per_sample(cfg, padded label length of each micro-batch) "
                    "x batch; PARSeq counts the orders used; forward+backward = 3x forward, multiply-add = 2 FLOPs")


# what a flag may be, where given (a recipe or a default fills the others); nan is never within
LIMITS = {"batch": 1, "micro_batch": 1, "samples": 1, "train_samples": 1, "eval_every": 1, "threads": 1, "workers": 0,
          "max_bad_steps": 1, "beam": 1, "refine_iters": 0, "read_block": 1, "lr": 0.0, "weight_decay": 0.0,
          "clip": 0.0, "epochs": (1e-9, math.inf), "warmup": (0.0, 1.0), "ema": (0.0, 0.99999), "ema_start": (0.0, 1.0)}


def betas(text):  # --betas: two numbers in [0, 1), kept as the text (a run's identity holds the text)
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not (len(values) == 2 and all(0 <= v < 1 for v in values)):
        raise argparse.ArgumentTypeError(f"{text!r}: give two numbers from 0 to below 1, e.g. 0.9,0.98")
    return text


def save_interval(text):  # --save-every: '15m' (minutes of wall time) or a number of samples -> (minutes, samples)
    if not text.removesuffix("m").isdigit():
        raise argparse.ArgumentTypeError(f"takes minutes (15m) or samples (200000), got {text!r}")
    return (float(text[:-1]), None) if text.endswith("m") else (None, int(text))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=["trocr", "parseq"], help="default parseq (--init: its own)")
    p.add_argument("--size", help="S|B|L|H (the study) or T1..T7 (tiny, CPU); default T4 (--init: its own)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a model config field: img_w=128")
    p.add_argument("--train", action="append", required=True, metavar="DIR[:WEIGHT]", help="shards: folder, glob, URL")
    p.add_argument("--val", required=True, metavar="DIR", help="validation shards (a folder or URL)")
    p.add_argument("--test", action="append", default=[], metavar="NAME=DIR", help="test sets, evaluated at the end")
    p.add_argument("--read-block", type=int, help="samples read together (default 1 local, 64 URLs)")
    p.add_argument("--charset", help="36 (default), 94, the characters or @FILE (UTF-8); --init: a new vocab")
    p.add_argument("--spm", help="SentencePiece model file (python data.py spm ...) instead of chars")
    p.add_argument("--samples", type=int, help="D: use only the first D usable training images (default all)")
    p.add_argument("--epochs", type=float, default=20, help="passes over D when --train-samples is not given")
    p.add_argument("--train-samples", type=int, help="samples to train on in total")
    p.add_argument("--batch", type=int, help="global batch (all processes, all micro-steps)")
    p.add_argument("--micro-batch", type=int, help="per-process batch per micro-step")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--betas", type=betas, default="0.9,0.98")
    p.add_argument("--schedule", choices=["cosine", "onecycle"])
    p.add_argument("--warmup", type=float, help="warm-up as a fraction of training")
    p.add_argument("--clip", type=float, help="gradient norm clip (0 = off)")
    p.add_argument("--ema", type=float, default=0.0, help="weight-averaging decay (0 = off), e.g. 0.999")
    p.add_argument("--ema-start", type=float, default=0.75, help="start averaging after this fraction (PARSeq: 0.75)")
    p.add_argument("--augment", action="store_true", help="light geometric/photometric augmentation")
    p.add_argument("--eval-every", type=int, help="evaluate every this many samples (default: 10 evals)")
    p.add_argument("--save-every", type=save_interval, default="15m", help="last.pt every 15m (minutes) or N samples")
    p.add_argument("--beam", type=int, default=1, help="TrOCR beam width at evaluation")
    p.add_argument("--beam-len-norm", action=argparse.BooleanOptionalAction, default=True, help="TrOCR: score / length")
    p.add_argument("--refine-iters", type=int, default=1, help="PARSeq cloze refinement passes at evaluation")
    p.add_argument("--init", help="fine-tune this checkpoint's model (--set may change it) and tokenizer; recipe: "
                   "the size's whose fields it has, else the defaults")
    p.add_argument("--resume", action="store_true", help="insist on resuming (re-running a run name always resumes)")
    p.add_argument("--name", help="run name (default: ARCH-SIZE-dD-sSEED-HASH, HASH: of the run's identity)")
    p.add_argument("--runs", default="runs", help="root folder of run folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="auto: bf16 GPU, fp32 CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (labels then pad to max_len)")
    p.add_argument("--workers", type=int, help="data loader workers per process (default: 0 CPU, 6 GPU)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="non-finite losses to skip before stopping")
    p.add_argument("--threads", type=int, help="CPU threads per process (default: 1 tiny, else cores / procs)")
    p.add_argument("--tag", help="free-form label saved in config.json (fit.py --where tag=...)")
    p.add_argument("--bar-position", type=int, default=0, help="tqdm line, when several runs share a terminal")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)  # arch, size and the recipe: tokenizer_and_config
    for name, limits in LIMITS.items():
        low, high = limits if isinstance(limits, tuple) else (limits, math.inf)
        value = getattr(args, name)
        if value is not None and not (low <= value <= high and math.isfinite(value)):
            within = f"at least {low:g}" if high == math.inf else f"from {low:g} to {high:g}"
            p.error(f"argument --{name.replace('_', '-')}: {value}: give a number {within}")
    return args


def test_sets(specs):
    """--test NAME=DIR arguments -> {name: dir}; a ValueError of one line for a malformed or repeated one."""
    sets = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not (name and path) or name in sets:
            raise ValueError(f"--test {spec}: " + (f"a second set named {name}" if name in sets else "takes NAME=DIR"))
        sets[name] = path
    return sets


def get_lr(step, total_steps, args):  # warm-up: linear (OneCycle: cosine from lr/25); cosine decay to 0 (lr/25e4)
    warm = max(1, int(args.warmup * total_steps))
    lo, end = (args.lr / 25, args.lr / 25e4) if args.schedule == "onecycle" else (0.0, 0.0)
    if step >= warm:
        return end + (args.lr - end) * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm)))) / 2
    if args.schedule == "onecycle":
        return lo + (args.lr - lo) * (1 - math.cos(math.pi * step / warm)) / 2
    return args.lr * (step + 1) / warm


def config_overrides(items):  # --set FIELD=VALUE ... -> {field: value}, typed as the field's default
    defaults, overrides = {f.name: f.default for f in dataclasses.fields(modellib.ModelConfig)}, {}
    for key, _, text in (item.partition("=") for item in items):
        if key not in defaults or key in ("arch", "vocab_size"):
            sys.exit(f"train.py: --set {key}: not a model config field --set takes (--arch, --charset and --spm set "
                     f"arch and vocab_size); valid: {', '.join(k for k in defaults if k not in ('arch', 'vocab_size'))}")
        kind, value = type(defaults[key]), text
        with contextlib.suppress(json.JSONDecodeError):
            value = text if kind is str else json.loads(text)
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:
            sys.exit(f"train.py: --set {key}={text}: expected {kind.__name__}, e.g. {key}={json.dumps(defaults[key])}")
        overrides[key] = value
    return overrides


def read_checkpoint(path):  # (checkpoint, model config, tokenizer), weights-only (runs no code); else a ValueError
    try:  # memory-mapped (torch.save's zip format): a resume or a config check reads no tensor
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        if not isinstance(ckpt, dict) or {"model", "model_config", "tokenizer"} - ckpt.keys():
            raise ValueError("no model, model_config and tokenizer entries")
        cfg = modellib.ModelConfig(**ckpt["model_config"])
        if cfg.arch not in modellib.SIZES:
            raise ValueError(f"its model_config names no known arch ({cfg.arch!r})")
        return ckpt, cfg, data.load_tokenizer(ckpt["tokenizer"])
    except Exception as e:  # torch, pickle, the config and the tokenizer raise many kinds for a file that is no checkpoint
        why = ("it pickles more than tensors and containers" if isinstance(e, pickle.UnpicklingError)
               else (str(e).strip().splitlines() or [type(e).__name__])[0][:100])
        raise ValueError(f"{path}: not a checkpoint of train.py or model.py convert-* ({why})") from None


def tokenizer_and_config(args):
    """(tokenizer, model config, --init checkpoint or None); fills in --arch, --size (--init: the size whose fields its
    model has, --set's aside, else None) and the recipe."""
    overrides, size = config_overrides(args.set), None
    if args.init and not os.path.exists(args.init):
        sys.exit(f"train.py: --init {args.init}: no such checkpoint")
    try:
        ckpt, cfg, tok = read_checkpoint(args.init) if args.init else (None, None, None)
    except ValueError as e:
        sys.exit(f"train.py: --init {e}")
    try:
        if ckpt:
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
    recipe = {**DEFAULTS, "lr": TINY_LR.get(args.size, DEFAULTS["lr"]), **RECIPES.get((args.arch, args.size), {})}
    vars(args).update({key: value for key, value in recipe.items() if getattr(args, key) is None})
    return tok, cfg, ckpt


def setup(args, cfg, tok):  # the run: processes (torchrun's env), device, threads, precision, batch split; main adds more
    try:  # the model built and run once on the meta device: a config it cannot take fails now, not at a step
        N = modellib.count_params(cfg)
        with torch.device("meta"):
            modellib.build_model(cfg).loss(torch.zeros(1, 3, cfg.img_h, cfg.img_w), torch.tensor([[tok.bos_id, 0]]))
    except (AssertionError, ArithmeticError, LookupError, RuntimeError, ValueError) as e:
        sys.exit(f"train.py: the model config {' '.join(args.set)} cannot be built: {str(e).splitlines()[0]}")
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("train.py: --device cuda: this torch sees no CUDA device")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:  # tiny sizes: one thread (on 2 cores a second gives -5..+11% alone, loses 75-97% beside another run)
        torch.set_num_threads(args.threads or (1 if args.size in TINY_LR else
                                               max(1, data.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", world)))))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    micro = args.micro_batch or args.batch // world
    accum = args.batch // (micro * world) if micro else 0
    if accum < 1 or accum * micro * world != args.batch:
        sys.exit(f"train.py: --batch {args.batch} must be a multiple of micro-batch {micro} x {world} processes")
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, auto=torch.bfloat16 if use_cuda else None).get(args.dtype)
    return types.SimpleNamespace(args=args, cfg=cfg, tok=tok, rank=rank, world=world, master=rank == 0, device=device,
                                 use_cuda=use_cuda, micro=micro, accum=accum, dtype=dtype, N=N,
                                 autocast=torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext(),
                                 workers=args.workers if args.workers is not None else (6 if use_cuda else 0),
                                 peak=peak_flops(device), ema=None)


def open_stream(run, flag, sources, **options):  # checked now on every rank, not after hours of training
    try:
        return data.ShardStream(sources, run.cfg.img_h, run.cfg.img_w, run.micro, None, max_len=run.cfg.max_len,
                                rank=run.rank, world_size=run.world, tokenizer=run.tok, block=run.args.read_block,
                                **options)
    except (ValueError, OSError) as e:
        sys.exit(f"train.py: {flag}: {e}")


def source(path):  # a data folder or file as one string in any working directory: absolute, or a URL
    return path if data.is_url(path) else os.path.abspath(path)


def run_identity(args, cfg, tok, stream, train_samples, dtype):
    """The resolved config minus NOT_IDENTITY, as JSON (paths absolute, model and tokenizer as built, D and each
    source's usable images: a data folder that changed is other data); and fit.py's group, what a fit's points share."""
    digest = hashlib.sha1(json.dumps(tok.spec, sort_keys=True).encode()).hexdigest()[:12]
    tokenizer = f"char:{tok.charset}" if tok.spec["type"] == "char" else f"{tok.spec['type']}:{digest}"
    group = dict(arch=args.arch, train=[[source(p), w] for p, w in data.parse_sources(",".join(args.train))],
                 val=source(args.val), tokenizer=tokenizer, init=args.init and source(args.init),
                 set=config_overrides(args.set), img=[cfg.img_h, cfg.img_w],
                 eval=f"beam={args.beam}" if args.arch == "trocr" else f"refine={args.refine_iters}")
    identity = {k: v for k, v in vars(args).items() if k not in NOT_IDENTITY}
    identity.update(group, test=[[n, source(p)] for n, _, p in (t.partition("=") for t in args.test)],
                    D=stream.num_samples, usable=list(stream.usable),
                    model=dataclasses.asdict(cfg), train_samples=train_samples, dtype=str(dtype or "fp32"))
    return json.loads(json.dumps(identity)), group


def read_json(path, remedy):  # a JSON object, None where there is no such file; one line and exit for a damaged one
    if os.path.exists(path):
        with contextlib.suppress(ValueError), open(path) as f:
            value = json.load(f)
            if isinstance(value, dict):
                return value
        sys.exit(f"train.py: {path} is damaged (not a JSON object): {remedy}")


def brief(value):  # a config value in a one-line message; paths differ in their ends
    text = json.dumps(value)
    return text if len(text) <= 40 else "..." + text[-37:]


def check_run_dir(run, identity):
    """The result when run.dir holds this run finished, else None; one line and exit when it holds another run."""
    config = read_json(os.path.join(run.dir, "config.json"), "delete the run folder to start over")
    if config is None and os.path.exists(run.last):
        sys.exit(f"train.py: {run.dir} holds a last.pt but no config.json, so it cannot be told whose: delete the "
                 "folder to start over")
    if config is None:
        return None
    was, differ = config.get("identity", {}), []
    for key in sorted(identity.keys() | was.keys()):  # a field of the model's config by its own name
        old, new = was.get(key), identity.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differ += [(f"{key}.{k}", old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
                       if old.get(k) != new.get(k)]
        elif old != new:
            differ.append((key, old, new))
    if differ:
        changes = "; ".join(f"{key} {brief(old)} -> {brief(new)}" for key, old, new in differ)
        sys.exit(f"train.py: {run.dir} holds another run ({changes}): choose another --name, or delete the folder to "
                 "start over")
    again = "delete it to evaluate the run's end again"
    result = read_json(os.path.join(run.dir, "result.json"), again)
    if result is not None and "val_error" not in result:
        sys.exit(f"train.py: {run.dir}/result.json is damaged (no val_error): {again}")
    if result is not None and run.master:
        print(f"{run.name}: already finished (val error {result['val_error']:.2f}%), not redone")
    return result


def tensor_groups(names):  # 'encoder.blocks.0.norm1.bias' -> 'encoder.blocks', in order, once each
    return ", ".join(dict.fromkeys(re.sub(r"\.\d+\..*|\.(weight|bias)$", "", name) for name in names)) or "none"


def load_init(raw_model, tok, ckpt, path):
    """--init: each tensor into the model's of the same name and shape; under a new vocabulary, VOCAB's rows of the
    tokens both share (EOS, BOS, PAD by role). One line and exit when under 90% of its tensors load."""
    old_tok, state, loaded, remapped = data.load_tokenizer(ckpt["tokenizer"]), raw_model.state_dict(), [], []
    V, old_V = tok.vocab_size, old_tok.vocab_size
    old_ids = {text: i + 1 for i, text in enumerate(old_tok.tokens)}  # ids: 0 EOS, 1..V-3 text, V-2 BOS, V-1 PAD
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
    counts, missed = f"{len(done)}/{len(ckpt['model'])} tensors", tensor_groups(n for n in ckpt["model"] if n not in done)
    if len(done) < 0.9 * len(ckpt["model"]):
        sys.exit(f"train.py: --init {path}: only {counts} fit the model (changed by --set?); not loaded: {missed}")
    shared = f", rows of {len(pairs) - 3}/{len(tok.tokens)} shared tokens in {', '.join(remapped)}" if remapped else ""
    fresh = tensor_groups(n for n in state if n not in done)
    return f"--init {path}: loaded {counts}{shared}; not loaded: {missed}; fresh: {fresh}"


def peak_flops(device):  # the dense 16-bit peak of a known GPU, else None (no MFU)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def atomic_save(obj, path):  # every file of a run folder (bytes as they are, else torch.save): a kill leaves old or new
    with open(path + ".tmp", "wb") as f:
        f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
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
    """Loss per token, word error, 1-NED, mean confidence and label length of a stream, exact across ranks."""
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


def resume(run):  # last.pt; each rank's RNG state under the same process count, else a seed from the step
    try:
        ckpt = torch.load(run.last, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
    except Exception as e:  # numpy RNG states (pickle), a damaged or cut file (torch's RuntimeError, EOFError)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        sys.exit(f"train.py: cannot resume from {run.last} ({why}); move it away to start over")
    for key in ("model", "optimizer", "scaler"):
        getattr(run, key).load_state_dict(ckpt[key])
    if ckpt["ema"] is not None:
        run.ema = copy.deepcopy(run.model)
        run.ema.load_state_dict(ckpt["ema"])
    vars(run.prog).update({k: ckpt[k] for k in vars(run.prog)})
    if len(ckpt["rng"]) == run.world:
        torch.set_rng_state(ckpt["rng"][run.rank][0])
        if run.use_cuda and ckpt["rng"][run.rank][1:]:  # this process's GPU
            torch.cuda.set_rng_state(ckpt["rng"][run.rank][1])
    else:  # another process count: per-rank RNG streams cannot carry over
        torch.manual_seed(run.args.seed * 1000003 + run.prog.step * run.world + run.rank)
    if run.master:
        print(f"{run.name}: resuming at step {run.prog.step} ({run.prog.samples:,} samples, {len(ckpt['rng'])} -> "
              f"{run.world} processes)")


def train_step(run, batches, lr, save_vote):
    """One optimizer step, skipped when no sample was readable or the loss or gradients are not finite. Returns
    whether it was taken, and the all-reduced save vote and stop signal."""
    args, prog, optimizer, scaler = run.args, run.prog, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    stats = torch.zeros(6, dtype=torch.float64, device=run.device)  # loss sum, tokens, FLOPs, save vote, unreadable, stop
    # fills, not host-to-device copies that would wait for the last step's kernels; any rank's stop stops all
    stats[3], stats[5] = save_vote, stop_signal is not None
    for micro_step in range(run.accum):
        t0 = time.time()
        images, labels, unreadable = next(batches)  # unreadable samples were left out: a batch may be smaller
        run.wait += time.time() - t0
        tokens = run.tok.encode(labels, length=run.cfg.max_len if args.compile else None)  # compile: one static shape
        images, tokens = data.normalize(images.to(run.device, non_blocking=True)), tokens.to(run.device, non_blocking=True)
        if run.world > 1:  # sync gradients only on the last micro-step
            run.net.require_backward_grad_sync = micro_step == run.accum - 1
        with run.autocast:
            loss_sum, n = run.net(images, tokens)  # summed over this micro-batch's tokens
        scaler.scale(loss_sum / args.batch).backward()  # /batch keeps fp16 gradients in range; rescaled below
        stats[:2] += torch.stack([loss_sum.detach(), n]).double()
        stats[2] += modellib.train_flops_per_sample(run.cfg, dec_len=tokens.shape[1] - 2) * len(images)  # padded length
        stats[4] += unreadable
    if run.world > 1:
        dist.all_reduce(stats)
    # DDP averaged the gradients over ranks; scale them to d(all token losses of the step) / (its token count)
    scaler.unscale_(optimizer)
    torch._foreach_mul_([p.grad for p in run.model.parameters() if p.grad is not None],
                        (run.world * args.batch / stats[1].clamp_min(1)).float())
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip or math.inf)
    loss_sum, tokens, flops, save_vote, unreadable, stop, grad_norm = torch.cat([stats, grad_norm.double().view(1)]).tolist()
    stop = (stop_signal or signal.SIGTERM) if stop else 0  # the signal this rank got; SIGTERM stands for another's
    prog.flops += flops
    prog.position += args.batch  # a skipped step's data is not read again
    prog.unreadable += int(unreadable)
    # With fp16 the scaler itself skips steps with inf gradients (and lowers its scale): those are not bad steps.
    bad = not math.isfinite(loss_sum) or not (math.isfinite(grad_norm) or scaler.is_enabled())
    if tokens and not bad:  # tokens == 0: every sample of the step was unreadable (counted)
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if bad:
        prog.bad_steps += 1
        if run.master:
            tqdm.write(f"{run.name}: non-finite loss or gradients at step {prog.step} (skipped, "
                       f"{prog.bad_steps}/{args.max_bad_steps})")
        if prog.bad_steps >= args.max_bad_steps:
            raise SystemExit(f"{run.name}: {prog.bad_steps} non-finite losses or gradients; stopping. {run.last} "
                             "holds the last good state; lower --lr, raise --warmup or use --dtype bf16/fp32")
    if bad or not tokens:
        return False, save_vote, stop
    prog.step, prog.samples, prog.wall_s = prog.step + 1, prog.samples + args.batch, time.time() - run.start
    prog.loss_sum, prog.tokens = prog.loss_sum + loss_sum, prog.tokens + tokens
    if args.ema > 0 and prog.step >= args.ema_start * run.total_steps:
        run.ema = run.ema or copy.deepcopy(run.model)
        with torch.no_grad():
            torch._foreach_lerp_(list(run.ema.parameters()), list(run.model.parameters()), 1 - args.ema)
    return True, save_vote, stop


def log_eval(run, lr, final):
    """metrics.jsonl's row of this step (the --test sets when final); best.pt at a new best val error, then loss."""
    prog, args, net, (since, samples, flops) = run.prog, run.args, run.ema or run.model, run.window
    elapsed = time.time() - since
    row = dict(step=prog.step, samples=prog.samples, epochs=prog.samples / run.D, flops=prog.flops,
               wall_s=round(prog.wall_s, 2), gpu_hours=prog.wall_s * run.world / 3600 if run.use_cuda else None, lr=lr,
               train_loss=prog.loss_sum / prog.tokens if prog.tokens else None,  # None: its row was lost (resumed)
               samples_per_s=(prog.samples - samples) / elapsed, data_wait=run.wait / elapsed,
               unreadable=prog.unreadable, final=final,
               mfu=(prog.flops - flops) / elapsed / (run.peak * run.world) if run.peak and run.dtype else None)
    options = dict(beam=args.beam, len_norm=args.beam_len_norm) if args.arch == "trocr" else \
        dict(refine_iters=args.refine_iters)
    scores = {name: evaluate(net, run.tok, stream, options, run.workers, run.device, run.autocast)
              for name, stream in run.streams.items() if name == "--val" or final}
    val = scores.pop("--val")
    row.update({f"val_{k}": val[k] for k in ("loss", "error", "ned", "n", "unreadable")})
    if scores:
        row["tests"] = {name: {k: r[k] for k in ("error", "ned", "n", "unreadable")} for name, r in scores.items()}
        row["test_error"] = data.weighted_average(row["tests"])
    if (val["error"], val["loss"]) < (prog.best_error, prog.best_loss):
        prog.best_error, prog.best_loss, prog.best_step = val["error"], val["loss"], row["step"]
        if run.master:
            atomic_save(dict(model=net.state_dict(), model_config=dataclasses.asdict(run.cfg), tokenizer=run.tok.spec,
                             step=row["step"], val_error=val["error"], val_loss=val["loss"]),
                        os.path.join(run.dir, "best.pt"))
    if run.master:  # a line cut by a crash is dropped at the resume (logged_rows)
        with open(os.path.join(run.dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    prog.loss_sum, prog.tokens, run.wait, run.window = 0.0, 0.0, 0.0, (time.time(), prog.samples, prog.flops)
    return row


def save_checkpoint(run):  # last.pt with every rank's RNG state (every rank calls this); the data order: prog.position
    ranks = [[torch.get_rng_state(), *([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])]]
    if dist.is_initialized():
        ranks = ranks * dist.get_world_size()
        dist.all_gather_object(ranks, ranks[0])
    if run.master:
        atomic_save(dict(model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
                         scaler=run.scaler.state_dict(), ema=run.ema.state_dict() if run.ema else None,
                         **vars(run.prog), rng=ranks, model_config=dataclasses.asdict(run.cfg), tokenizer=run.tok.spec,
                         args=vars(run.args)), run.last)
    run.saved = time.time()


def logged_rows(path, step):  # metrics.jsonl's rows up to `step` (later ones are logged again), unreadable lines
    rows, unreadable = [], 0
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                if row["step"] <= step:
                    rows.append(row)
            except (ValueError, TypeError, KeyError):  # a line cut by a crash, or damaged
                unreadable += 1
    return rows, unreadable


def write_config(run, stream, identity, fit_group, rows, unreadable):  # config.json, metrics.jsonl's rows, a line
    args, cfg, (total, non_embed) = run.args, run.cfg, run.N
    atomic_save("".join(json.dumps(row) + "\n" for row in rows).encode(), os.path.join(run.dir, "metrics.jsonl"))
    if unreadable:
        print(f"{run.name}: dropped {unreadable} unreadable line(s) of metrics.jsonl")
    commit = None
    with contextlib.suppress(OSError):  # no git: None
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True).stdout.strip() or None
    config = dict(vars(args), name=run.name, model=dataclasses.asdict(cfg), N=total, N_nonembed=non_embed, D=run.D,
                  drops=stream.drops, flops_per_sample=modellib.train_flops_per_sample(cfg),
                  flops_convention=FLOPS_CONVENTION, train_samples=run.total_steps * args.batch, tokenizer=run.tok.spec,
                  git_commit=commit, world_size=run.world, global_batch=args.batch, micro_batch=run.micro,
                  accum=run.accum, identity=identity, fit_group=fit_group)
    atomic_save(json.dumps(config, indent=1).encode(), os.path.join(run.dir, "config.json"))
    drops = ", ".join(f"{k} {v:,}" for k, v in stream.drops.items()) or "none"
    print(f"{run.name}: N={total:,} D={run.D:,} (dropped: {drops}), {run.total_steps:,} steps of {args.batch} = "
          f"{run.micro} x {run.world} process(es) x {run.accum} micro-step(s), {run.device.type}, "
          f"{str(run.dtype or 'fp32').replace('torch.', '')}, {torch.get_num_threads() if not run.use_cuda else '-'} threads")


def write_result(run, stream, row):  # result.json from the final metrics row, and the run's last line
    prog = run.prog
    drops = {k: v for k, v in dict(stream.drops, unreadable=prog.unreadable).items() if v}
    result = dict(name=run.name, N=run.N[0], D=run.D, C=prog.flops, epochs=prog.samples / run.D, drops=drops,
                  best_step=prog.best_step, **{k: row.get(k) for k in (
                      "step", "samples", "wall_s", "val_loss", "val_error", "val_ned", "tests", "test_error")})
    if run.master:
        atomic_save(json.dumps(result, indent=1).encode(), os.path.join(run.dir, "result.json"))
        test = f", test error {row['test_error']:.2f}%" if row.get("test_error") is not None else ""
        print(f"{run.name}: N={result['N']:,} D={run.D:,} C={prog.flops:.3g} FLOPs, {prog.samples:,} samples in "
              f"{prog.wall_s:.0f}s, val error {row['val_error']:.2f}%{test}; best.pt: step {prog.best_step:,} "
              f"(val error {prog.best_error:.2f}%, loss {prog.best_loss:.4f})")
    return result


def main(argv=None):
    args = parse_args(argv)
    try:
        tests = test_sets(args.test)
    except ValueError as e:
        sys.exit(f"train.py: {e}")
    tok, cfg, init = tokenizer_and_config(args)  # and args.arch, args.size, the recipe
    run = setup(args, cfg, tok)
    stream = open_stream(run, "--train", ",".join(args.train), seed=args.seed, samples=args.samples, augment=args.augment)
    run.D = stream.num_samples  # usable images: what a D axis means
    train_samples = args.train_samples or int(args.epochs * run.D)
    run.total_steps = max(1, train_samples // args.batch)
    identity, fit_group = run_identity(args, cfg, tok, stream, run.total_steps * args.batch, run.dtype)
    short_hash = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:6]
    size = args.size or os.path.splitext(os.path.basename(args.init))[0]  # a model of no --size: the checkpoint's name
    run.name = args.name or f"{args.arch}-{size}-d{args.samples or 'all'}-s{args.seed}-{short_hash}"
    run.dir, run.last = os.path.join(args.runs, run.name), os.path.join(args.runs, run.name, "last.pt")
    result = check_run_dir(run, identity)  # another run there: one line and exit
    if result is not None:
        return result
    run.streams = {"--val": open_stream(run, "--val", args.val, loop=False)}  # then the --test sets by name
    for name, path in tests.items():
        run.streams[name] = open_stream(run, f"--test {name}={path}", path, loop=False)

    torch.manual_seed(args.seed)
    run.model = model = modellib.build_model(cfg).to(run.device)
    groups = [dict(params=[p for n, p in model.named_parameters() if (p.dim() >= 2 and "pos" not in n) == decays],
                   weight_decay=args.weight_decay if decays else 0.0) for decays in (True, False)]  # matrices decay
    betas = tuple(map(float, args.betas.split(",")))
    run.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=betas, fused=run.use_cuda)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
    # saved in last.pt; position: the global sample position of the next step; loss_sum / tokens: since the last eval
    run.prog = prog = types.SimpleNamespace(step=0, samples=0, position=0, flops=0.0, wall_s=0.0, bad_steps=0,
                                            unreadable=0, best_error=math.inf, best_loss=math.inf, best_step=None,
                                            loss_sum=0.0, tokens=0.0)
    if os.path.exists(run.last):  # any layout of processes, workers and micro-batches continues exactly
        resume(run)
    elif args.resume:
        sys.exit(f"train.py: --resume: no checkpoint at {run.last}")
    elif args.init:
        line = load_init(model, tok, init, args.init)
        if run.master:
            print(line)
    del init  # its tensors
    rows, unreadable = logged_rows(os.path.join(run.dir, "metrics.jsonl"), prog.step)
    if run.master:
        os.makedirs(run.dir, exist_ok=True)
        write_config(run, stream, identity, fit_group, rows, unreadable)
    run.net = torch.compile(model) if args.compile else model
    if run.world > 1:
        run.net = DDP(run.net, device_ids=[run.device.index] if run.use_cuda else None)

    # --- the loop. run.start: the origin of prog.wall_s; run.window: (time, samples, FLOPs) at the last eval
    batches = iter(stream.loader(run.workers, start=prog.position, pin_memory=run.use_cuda))
    now = time.time()
    run.start, run.saved, run.window, run.wait = now - prog.wall_s, now, (now, prog.samples, prog.flops), 0.0
    eval_every = max(1, (args.eval_every or train_samples // 10) // args.batch)  # in optimizer steps
    tenth = max(1, run.total_steps // 10)  # last.pt also every tenth of the run: a stop loses at most a tenth
    save_minutes, save_samples = args.save_every
    if prog.step >= run.total_steps:  # resumed from the checkpoint written after the final eval: its row, else anew
        row = rows[-1] if rows and rows[-1]["step"] == prog.step and rows[-1].get("final") else \
            log_eval(run, get_lr(prog.step, run.total_steps, args), True)
    with tqdm(total=run.total_steps * args.batch, initial=prog.samples, unit="img", desc=run.name, dynamic_ncols=True,
              disable=not run.master or args.quiet, position=args.bar_position, leave=True) as bar:
        while prog.step < run.total_steps:
            lr = get_lr(prog.step, run.total_steps, args)
            vote = run.master and save_minutes is not None and time.time() - run.saved >= 60 * save_minutes
            stepped, save_vote, stop = train_step(run, batches, lr, vote)
            if not (stepped or stop):
                continue
            final = stepped and prog.step == run.total_steps
            if stepped:
                bar.update(args.batch)
            if final:  # the trained weights are kept before the final evaluation, which a test set may fail
                save_checkpoint(run)
            if stepped and (prog.step % eval_every == 0 or final):
                row = log_eval(run, lr, final)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", img_s=f"{row['samples_per_s']:.0f}",
                                val_err=f"{row['val_error']:.1f}%")
            if save_vote or final or stop or prog.step % tenth == 0 or \
                    save_samples and prog.samples // save_samples > (prog.samples - args.batch) // save_samples:
                save_checkpoint(run)
            if stop and not final:
                if run.master:
                    tqdm.write(f"{run.name}: stopped by {signal.Signals(int(stop)).name} after step {prog.step:,}; "
                               f"{run.last} holds it (the same command resumes)", file=sys.stderr)
                raise SystemExit(128 + int(stop))
    result = write_result(run, stream, row)
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
