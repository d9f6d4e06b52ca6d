"""train.py: one point of a scaling curve, from a laptop CPU to many GPU nodes.

    python train.py --arch parseq --size T4 --train data/demo/train --val data/demo/val --samples 20000
    torchrun --nproc_per_node=8 train.py --arch parseq --size B --train data/real:3 --train data/synth:1 \
        --val data/val --test IIIT5k=data/IIIT5k --test SVT=data/SVT
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py ...

Writes runs/NAME/: config.json (arguments, N, D, FLOPs per sample), metrics.jsonl (one line per eval:
samples seen D, compute C, val loss and word error), last.pt (full state, written atomically), best.pt
(weights with the lowest val error) and result.json (written last: the run is finished). Re-running the
same command resumes from last.pt exactly; a finished run is not redone.
Not here: data preparation (data.py), fitting laws (fit.py), sweeps (ocrscale.py).
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time

import numpy as np
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["trocr", "parseq"], default="parseq")
    p.add_argument("--size", default="T4", help="S|B|L|H (the study) or T1..T7 (tiny, CPU)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field, e.g. --set enc_width=96 --set img_w=128")
    p.add_argument("--train", action="append", required=True, metavar="DIR[:WEIGHT]", help="training shards")
    p.add_argument("--val", required=True, metavar="DIR", help="validation shards")
    p.add_argument("--test", action="append", default=[], metavar="NAME=DIR", help="test sets, evaluated at the end")
    p.add_argument("--charset", default="36", help="36, 94 or the characters themselves")
    p.add_argument("--spm", default=None, help="SentencePiece model file (python data.py spm ...) instead of chars")
    p.add_argument("--samples", type=int, default=None, help="D: use only the first D training images (default all)")
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
    p.add_argument("--beam", type=int, default=1, help="TrOCR beam width at evaluation")
    p.add_argument("--refine-iters", type=int, default=1, help="PARSeq cloze refinement passes at evaluation")
    p.add_argument("--init", default=None, help="start from this checkpoint's weights (fine-tuning)")
    p.add_argument("--resume", action="store_true", help="insist on resuming (re-running a run name always resumes)")
    p.add_argument("--name", default=None, help="run name (default: ARCH-SIZE-dD-sSEED)")
    p.add_argument("--runs", default="runs", help="root folder of run folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=int, default=None, help="data loader workers per process (default: 0 on CPU, 6 on GPU)")
    p.add_argument("--max-bad-steps", type=int, default=5, help="non-finite losses to skip before stopping")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: cores / processes)")
    p.add_argument("--tag", default=None, help="free-form label saved in config.json (fit.py --where tag=...)")
    p.add_argument("--bar-position", type=int, default=0, help="tqdm line, when several runs share a terminal")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    recipe = {**DEFAULTS, **({"lr": TINY_LR[args.size]} if args.size in TINY_LR else {}),
              **RECIPES.get((args.arch, args.size), {})}
    for key, value in recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


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


def make_tokenizer(args):
    if args.spm:
        return data.SPTokenizer(args.spm)
    charset = {"36": data.CHARSET36, "94": data.CHARSET94}.get(args.charset, args.charset)
    return data.CharTokenizer(charset)


def model_config(args, vocab_size):
    overrides = {}
    for item in args.set:  # make_config rejects unknown fields, naming the valid ones
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a plain string
    try:
        return modellib.make_config(args.arch, args.size, vocab_size, **overrides)
    except (KeyError, TypeError) as e:
        sys.exit(f"train.py: {e}")


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous file intact


def write_json(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def rng_state():
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


@torch.no_grad()
def evaluate(net, tok, loader, args, device, autocast):
    """Val loss per character, word error and 1-NED (36-char), exact across ranks (sums are all-reduced)."""
    net.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss*n, n, correct, words, 1-NED sum
    for images, labels in loader:
        images, tokens = images.to(device), tok.encode(labels).to(device)
        with autocast:
            loss, n = net.loss(images, tokens)
            ids, _ = net.decode(images, beam=args.beam, refine_iters=args.refine_iters)
        s = data.score(tok.decode(ids.cpu()), labels)
        sums += torch.tensor([loss.item() * int(n), int(n), s["correct"], s["n"], s["ned_sum"]], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    net.train()
    loss_n, n, correct, words, ned = sums.tolist()
    if words == 0:
        raise SystemExit("evaluation set is empty: check the --val/--test folders")
    return dict(loss=loss_n / max(n, 1), error=100 * (1 - correct / words), ned=100 * ned / words, n=int(words))


def main(argv=None):
    args = parse_args(argv)
    # --- processes and devices: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; plain python is one process
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    master = rank == 0
    dtype = {"auto": torch.bfloat16 if use_cuda else None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)  # bf16 keeps fp32's range: no scaling needed
    workers = args.workers if args.workers is not None else (6 if use_cuda else 0)

    # --- model, tokenizer, data
    torch.manual_seed(args.seed)
    tok = make_tokenizer(args)
    cfg = model_config(args, tok.vocab_size)
    raw_model = modellib.build_model(cfg).to(device)
    micro = args.micro_batch or args.batch // world
    accum = args.batch // (micro * world) if micro else 0
    if accum < 1 or accum * micro * world != args.batch:
        sys.exit(f"--batch {args.batch} must be a multiple of micro-batch {micro} x {world} processes")
    charset = getattr(tok, "charset", None)  # SentencePiece: no character filter
    tests = dict(spec.partition("=")[::2] for spec in args.test)
    try:
        stream = data.ShardStream(data.parse_sources(",".join(args.train)), cfg.img_h, cfg.img_w, micro, charset,
                                  max_len=cfg.max_len, rank=rank, world_size=world, seed=args.seed,
                                  samples=args.samples, augment=args.augment, loop=True)
        for path in [args.val, *tests.values()]:  # fail now, not after hours of training
            if not path:
                raise ValueError(f"--test takes NAME=DIR, got {args.test}")
            data.find_shards(path)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"train.py: {e}")
    D = stream.num_samples
    train_samples = args.train_samples or int(args.epochs * D)
    total_steps = max(1, train_samples // args.batch)
    eval_every = max(1, (args.eval_every or train_samples // 10) // args.batch)  # in optimizer steps
    name = args.name or f"{args.arch}-{args.size}-d{args.samples or 'all'}-s{args.seed}" + ("-ft" if args.init else "")
    run_dir = os.path.join(args.runs, name)
    total, non_embed = modellib.count_params(cfg)
    flops_per_sample = modellib.train_flops_per_sample(cfg)
    config = dict(vars(args), name=name, model=dataclasses.asdict(cfg), N=total, N_nonembed=non_embed, D=D,
                  flops_per_sample=flops_per_sample, train_samples=total_steps * args.batch, tokenizer=tok.spec,
                  git_commit=git_commit(), world_size=world, global_batch=args.batch, micro_batch=micro, accum=accum)
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
    ema = None
    step, samples_seen, flops_seen, wall_s, bad_steps, best_error = 0, 0, 0.0, 0.0, 0, float("inf")
    last_path, metrics_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(last_path):  # resume: same command, same run name
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        stream.load_state_dict(ckpt["stream"][rank])
        if ckpt["ema"] is not None:
            ema = copy.deepcopy(raw_model)
            ema.load_state_dict(ckpt["ema"])
        step, samples_seen, flops_seen, wall_s, bad_steps, best_error = (
            ckpt[k] for k in ("step", "samples", "flops", "wall_s", "bad_steps", "best_error"))
        set_rng_state(ckpt["rng"][rank])
        if master:
            print(f"{name}: resuming at step {step} ({samples_seen:,} samples)")
    elif args.resume:
        sys.exit(f"--resume: no checkpoint at {last_path}")
    elif args.init:
        raw_model.load_state_dict(torch.load(args.init, map_location=device, weights_only=False)["model"])
    if master:
        os.makedirs(run_dir, exist_ok=True)
        write_json(config, os.path.join(run_dir, "config.json"))
        keep_metrics_upto(metrics_path, step)
    net = torch.compile(raw_model) if args.compile else raw_model
    if world > 1:
        net = DDP(net, device_ids=[local_rank] if use_cuda else None)

    def eval_batches(path):  # one pass, each sample once across ranks
        return data.ShardStream(path, cfg.img_h, cfg.img_w, micro, charset, max_len=cfg.max_len, rank=rank,
                                world_size=world, loop=False).loader(workers)
    peak = peak_flops(device) if dtype else None  # the table holds 16-bit dense peaks

    def log_eval(final=False):
        nonlocal best_error
        eval_model = ema if ema is not None else raw_model
        val = evaluate(eval_model, tok, eval_batches(args.val), args, device, autocast)
        row = dict(step=step, samples=samples_seen, flops=flops_seen, wall_s=round(wall_s, 2),
                   gpu_hours=wall_s * world / 3600 if use_cuda else None, train_loss=train_loss, lr=lr,
                   samples_per_s=rate, data_wait=wait_share, mfu=flops_rate / (peak * world) if peak and flops_rate else None,
                   val_loss=val["loss"], val_error=val["error"], val_ned=val["ned"], val_n=val["n"])
        if final:
            row["final"] = True
            if tests:
                row["tests"] = {}
                for tname, tdir in tests.items():
                    r = evaluate(eval_model, tok, eval_batches(tdir), args, device, autocast)
                    row["tests"][tname] = dict(error=r["error"], ned=r["ned"], n=r["n"])
                row["test_error"] = data.weighted_average(row["tests"])
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if val["error"] < best_error:
                best_error = val["error"]
                atomic_save(dict(model=eval_model.state_dict(), model_config=dataclasses.asdict(cfg), tokenizer=tok.spec,
                                 step=step, val_error=val["error"]), os.path.join(run_dir, "best.pt"))
        return row

    def save_last():
        states = [None] * world
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(states, stream.state_dict())
            dist.all_gather_object(rngs, rng_state())
        else:
            states, rngs = [stream.state_dict()], [rng_state()]
        if master:
            atomic_save(dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                             stream=states, rng=rngs, ema=ema.state_dict() if ema is not None else None, step=step,
                             samples=samples_seen, flops=flops_seen, wall_s=wall_s, bad_steps=bad_steps, best_error=best_error,
                             model_config=dataclasses.asdict(cfg), tokenizer=tok.spec, args=vars(args)), last_path)

    # --- the loop
    batches = iter(stream.loader(workers, pin_memory=use_cuda))
    bar = tqdm(total=total_steps * args.batch, initial=samples_seen, unit="img", desc=name, disable=not master or args.quiet,
               dynamic_ncols=True, position=args.bar_position, leave=True)
    train_loss, lr, rate, flops_rate, wait_share = None, get_lr(step, total_steps, args), None, None, None
    loss_sum, window_t, window_wait, window_samples, window_flops = 0.0, time.time(), 0.0, 0, 0.0

    def close_window():
        """Fold the steps since the last eval into wall time, mean train loss, throughput and data-wait share."""
        nonlocal wall_s, train_loss, rate, flops_rate, wait_share, loss_sum, window_t, window_wait, window_samples, window_flops
        elapsed = max(time.time() - window_t, 1e-9)
        wall_s += elapsed
        if window_samples:
            train_loss, rate = loss_sum * args.batch / window_samples, window_samples / elapsed
            flops_rate, wait_share = window_flops / elapsed, window_wait / elapsed
        loss_sum, window_samples, window_wait, window_flops, window_t = 0.0, 0, 0.0, 0.0, time.time()

    final_logged = step >= total_steps
    while step < total_steps:
        lr = get_lr(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # mean loss, FLOPs of this step (all ranks)
        for micro_step in range(accum):
            t0 = time.time()
            images, labels = next(batches)
            window_wait += time.time() - t0
            images, tokens = images.to(device, non_blocking=True), tok.encode(labels).to(device, non_blocking=True)
            if world > 1:  # sync gradients only on the last micro-step
                net.require_backward_grad_sync = micro_step == accum - 1
            with autocast:
                loss, _ = net(images, tokens)
            scaler.scale(loss / accum).backward()
            stats[0] += loss.detach().double() / (accum * world)
            stats[1] += modellib.train_flops_per_sample(cfg, dec_len=tokens.shape[1] - 2) * len(images)  # padded length
        if world > 1:
            dist.all_reduce(stats)
        step_loss, step_flops = stats.tolist()
        flops_seen += step_flops  # compute is spent even on a skipped step
        window_flops += step_flops
        grad_norm = math.nan
        if math.isfinite(step_loss):
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip or math.inf).item()
        # Loss and gradients are the same on every rank, so all ranks skip together. With fp16 the scaler
        # itself skips steps with inf gradients (and lowers its scale): those are not bad steps.
        if not math.isfinite(step_loss) or not (math.isfinite(grad_norm) or scaler.is_enabled()):
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            if master:
                tqdm.write(f"{name}: non-finite loss or gradients at step {step} (skipped, {bad_steps}/{args.max_bad_steps})")
            if bad_steps >= args.max_bad_steps:
                raise SystemExit(f"{name}: {bad_steps} non-finite losses or gradients; stopping. {last_path} holds the "
                                 "last good state; lower --lr, raise --warmup or use --dtype bf16/fp32")
            continue
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        samples_seen += args.batch
        if args.ema > 0 and step >= args.ema_start * total_steps:
            if ema is None:
                ema = copy.deepcopy(raw_model)
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), raw_model.parameters()):
                    pe.lerp_(pm, 1 - args.ema)
        loss_sum += step_loss
        window_samples += args.batch
        bar.update(args.batch)
        if step % eval_every == 0 and step < total_steps:
            close_window()
            t_eval = time.time()
            row = log_eval()
            bar.set_postfix(loss=f"{train_loss:.3f}", img_s=f"{rate:.0f}", val_err=f"{row['val_error']:.1f}%")
            save_last()
            wall_s += time.time() - t_eval  # in wall time and GPU-hours, not in training throughput
            window_t = time.time()
    bar.close()
    if final_logged:  # resumed from the checkpoint written after the final eval
        with open(metrics_path) as f:
            row = json.loads(f.readlines()[-1])
    else:
        close_window()
        row = log_eval(final=True)
        save_last()
    result = dict(name=name, N=total, D=D, C=flops_seen, **{k: row.get(k) for k in
                  ("step", "samples", "wall_s", "val_loss", "val_error", "val_ned", "tests", "test_error")})
    if master:
        write_json(result, os.path.join(run_dir, "result.json"))
        extra = f", test error {result['test_error']:.2f}%" if result.get("test_error") is not None else ""
        print(f"{name}: N={total:,} D={D:,} C={result['C']:.3g} FLOPs, {samples_seen:,} samples in {wall_s:.0f}s, "
              f"val error {result['val_error']:.2f}%{extra}")
    if dist.is_initialized():
        dist.barrier()
    return result


def keep_metrics_upto(path, step):
    """A run killed after logging an eval but before its checkpoint would log it twice: drop lines past `step`."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]  # drop a torn last line
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(rows)
    os.replace(tmp, path)


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
