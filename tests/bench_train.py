"""bench_train.py: the GPU path of train.py and model.py, measured in one run, as a table for the README.

    timeout 480 python tests/bench_train.py --gpu                # one CUDA GPU, ~7 minutes (--budget 450 seconds)
    python tests/bench_train.py --dry-run                        # the same code path on the CPU, tiny sizes, ~1 minute
    python tests/bench_train.py --gpu --profile parseq-B         # top kernels of three compiled training steps
    python tests/bench_train.py --threads                        # CPU: tiny sizes at 1 and 2 threads, alone and in pairs

--gpu renders a varied-style synth set once (cached in OUT/data, on all cores), then runs each part of PLAN
within its time cap and the budget: short training runs of PARSeq-B and TrOCR-B with and without --compile,
PARSeq-S and TrOCR-S with it (bf16, 6 loader workers; `train.py` in a child process, killed once measured),
reading samples/s, MFU and data-wait share of the post-compilation eval window with the median throughput from
the run's metrics.jsonl, plus peak memory, recompiles and graph breaks; a kill -9 and resume against an
uninterrupted run; greedy/beam decoding images/s at batch 256; a 2-process torchrun sharing the one GPU.
After each part it rewrites OUT/bench_train.json and OUT/bench_train.md: a timeout leaves what was measured.
--dry-run swaps S/B for T1/T2, bf16 for fp32, the GPU for the CPU and drops --compile.
--threads trains each of --sizes for --seconds (default 35) on 6,000 'clean' images, with 1 and 2 torch threads,
one run alone and two at once, and prints images/s (tqdm's rate at the end) and the ratios 2 threads / 1 thread.
Not here: model-vs-peer speed (bench_model.py), loader speed (bench_data.py).
"""
import argparse
import contextlib
import functools
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project's files
import data
import model as modellib
import train

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# the parts in priority order, each within its time cap: the B sizes first (their MFU is the number a GPU user
# needs), eager B shows the gain of --compile; torchrun and the S sizes come last
PLAN = [("train", "parseq", "B", True), ("train", "trocr", "B", True), ("train", "parseq", "B", False),
        ("train", "trocr", "B", False), ("resume",), ("decode", "parseq"), ("decode", "trocr"), ("ddp",),
        ("train", "parseq", "S", True), ("train", "trocr", "S", True)]
# Sizes of each part. A training run stops once it has min_rows evals whose windows after the first span steady_s
# seconds, or at its cap. resume_tol: relative loss difference allowed after a resume (bf16 kernels are not
# bit-reproducible; fp32 on the CPU is). The dry run's caps only stop hangs.
GPU = dict(sizes={"S": "S", "B": "B"}, images=20000, val=512, label_len="2,12", workers=6, dtype="bf16",
           micro={("trocr", "S"): 512}, window_steps=20, min_rows=2, steady_s=5.0, decode_batch=256,
           resume=(256, 36, 12), cap_s={"compile": 100, "eager": 35, "decode": 30, "resume": 60, "ddp": 30},
           resume_tol=0.05)
DRY = dict(sizes={"S": "T1", "B": "T2"}, images=800, val=32, label_len="2,6", workers=1, dtype="fp32",
           micro={}, window_steps=4, min_rows=3, steady_s=0.0, decode_batch=32, batch=32, resume=(32, 24, 6),
           cap_s={"compile": 150, "eager": 150, "decode": 60, "resume": 150, "ddp": 150}, resume_tol=1e-4)
TRAIN_COLUMNS = ["model", "params", "compile", "batch", "samples/s", "MFU", "peak mem GB", "data wait",
                 "recompiles", "graph breaks", "first window s", "note"]


START = time.time()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - START:4.0f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- the child: one train.py run

def write_stats(path):
    """Peak memory and dynamo counters of this process (the child), written atomically."""
    # imported by torch.compile (eager runs skip its import time); may be half-imported while this thread runs
    counters = getattr(sys.modules.get("torch._dynamo.utils"), "counters", None)
    on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train.atomic_save(json.dumps(dict(peak_mem_gb=peak / 1e9, peak_mem_kind="cuda max allocated" if on_gpu else "max RSS",
                          graph_breaks=sum(counters["graph_break"].values()) if counters else 0,
                          unique_graphs=counters["stats"]["unique_graphs"] if counters else 0)).encode(), path)


def write_stats_every_second(path, stop):
    while not stop.wait(1.0):
        write_stats(path)


def step_profiler(prof, optimizer, args, kwargs):  # a global optimizer-step hook: one profiler step per step
    prof.step()


def save_profile(prefix, prof):
    sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    prof.export_chrome_trace(prefix + ".trace.json")
    with open(prefix + ".tmp", "w") as f:
        f.write(prof.key_averages().table(sort_by=sort, row_limit=25))
    os.replace(prefix + ".tmp", prefix + ".txt")  # its presence tells the parent the profile is done


def child_main(argv):
    """python tests/bench_train.py --child STATS [--share-gpu] [--profile-at STEP PREFIX] TRAIN_ARGS..."""
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--child", required=True)
    p.add_argument("--share-gpu", action="store_true", help="every torchrun rank on cuda:0")
    p.add_argument("--profile-at", nargs=2, default=None)
    args, train_argv = p.parse_known_args(argv)
    if args.share_gpu:
        os.environ["LOCAL_RANK"] = "0"  # train.py uses cuda:LOCAL_RANK; whether NCCL accepts this is the test
    stats = args.child.replace(".json", f"-rank{os.environ.get('RANK', '0')}.json")
    stop = threading.Event()
    threading.Thread(target=write_stats_every_second, args=(stats, stop), daemon=True).start()
    try:
        if args.profile_at:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            with torch.profiler.profile(activities=activities, on_trace_ready=functools.partial(save_profile, args.profile_at[1]),
                                        schedule=torch.profiler.schedule(wait=int(args.profile_at[0]), warmup=2, active=3)) as prof:
                register_optimizer_step_post_hook(functools.partial(step_profiler, prof))
                train.main(train_argv)
        else:
            train.main(train_argv)
    finally:
        stop.set()
        write_stats(stats)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- the parent: launching and reading runs

def launch(cmd, log_path, env=None):
    """Start cmd in its own session (so a kill reaches its loader and compile workers), output to log_path."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def read_rows(metrics_path):
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]  # a torn last line is still being written


def windows(rows):
    """Per eval window: samples, FLOPs, seconds (training only), samples/s, data-wait share, train.py's MFU."""
    out, samples, flops = [], 0, 0.0
    for r in rows:
        n = r["samples"] - samples
        out.append(dict(samples=n, flops=r["flops"] - flops, seconds=n / r["samples_per_s"], rate=r["samples_per_s"],
                        data_wait=r["data_wait"], mfu_train=r.get("mfu")))
        samples, flops = r["samples"], r["flops"]
    return out


def watch(proc, deadline, metrics_path=None, min_rows=0, steady_s=0.0, until_file=None):
    """Wait for proc to end; kill it at the deadline, once metrics_path holds min_rows rows whose windows after
    the first (compilation) span steady_s seconds, or once until_file exists. Returns 'exit N', 'enough',
    'file' or 'timeout'."""
    while proc.poll() is None:
        rows = read_rows(metrics_path) if metrics_path else []
        if min_rows and len(rows) >= min_rows and sum(w["seconds"] for w in windows(rows)[1:]) >= steady_s:
            kill(proc)
            return "enough"
        if until_file and os.path.exists(until_file):
            kill(proc)
            return "file"
        if time.time() > deadline:
            kill(proc)
            return "timeout"
        time.sleep(0.1)
    return f"exit {proc.returncode}"


def error_line(log_path, cause=None):
    """The most telling line of a failed run's log: the first matching the regex `cause` (a known root cause),
    else the last one naming an error, else the last line."""
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    causes = [line for line in lines if cause and re.search(cause, line)]
    named = [line for line in lines if re.search(r"error|exception|killed|refused", line, re.I)]
    return (causes[:1] or named[-1:] or lines[-1:] or ["(no output)"])[0][:300]


class Bench:
    def __init__(self, args):
        self.args, self.mode = args, DRY if args.dry_run else GPU
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.deadline = time.time() + args.budget
        self.out = os.path.abspath(args.out)
        self.runs, self.logs = os.path.join(self.out, "runs"), os.path.join(self.out, "logs")
        for scratch in (self.runs, self.logs):  # ours: a stale run would resume instead of measuring
            shutil.rmtree(scratch, ignore_errors=True)
            os.makedirs(scratch)
        self.vocab_size = data.CharTokenizer(data.CHARSET36).vocab_size
        self.result = dict(device=self.device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                           python=sys.version.split()[0], cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                           shm_free_gb=shutil.disk_usage("/dev/shm").free / 1e9 if os.path.isdir("/dev/shm") else None,
                           mode="dry-run (CPU, tiny sizes, fp32, no compile)" if args.dry_run else "gpu",
                           budget_s=args.budget, train=[], decode=[], resume=None, ddp=None)
        self.result.update(self.peak())

    def device_name(self):
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"CPU ({os.cpu_count()} cores)"

    def peak(self):
        """The dense 16-bit peak of the device (train.PEAK_FLOPS or --peak-tflops) and a measured matmul rate.
        CPUs have no table entry: the measured fp32 matmul rate stands in as the peak."""
        n, dtype = (8192, torch.bfloat16) if self.device.type == "cuda" else (512, torch.float32)
        a, b = (torch.randn(n, n, device=self.device, dtype=dtype) for _ in range(2))
        a @ b  # warm-up
        reps, t = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t < 0.5:
            a @ b
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            reps += 1
        measured = 2 * n ** 3 * reps / (time.perf_counter() - t)
        del a, b
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the training children need the memory
        if self.args.peak_tflops:
            return dict(peak_flops=self.args.peak_tflops * 1e12, peak_source="--peak-tflops", matmul_flops=measured)
        table = train.peak_flops(self.device)
        if table:
            return dict(peak_flops=table, peak_source="train.PEAK_FLOPS (dense bf16)", matmul_flops=measured)
        return dict(peak_flops=measured, peak_source=f"measured {dtype} matmul {n}^3", matmul_flops=measured)

    def left(self, cap):
        return min(cap, self.deadline - time.time())

    def save(self):
        self.result["elapsed_s"] = round(self.args.budget - (self.deadline - time.time()), 1)
        self.result["table_md"] = markdown(self.result)
        train.atomic_save(json.dumps(self.result, indent=1).encode(), os.path.join(self.out, "bench_train.json"))
        with open(os.path.join(self.out, "bench_train.md"), "w") as f:
            f.write(self.result["table_md"] + "\n")

    # ------------------------------------------------------------------------- data

    def render(self):
        """Train and val shard sets, rendered once per (size, label lengths) and reused by later runs."""
        lo, hi = map(int, self.args.label_len.split(","))
        sets = {}
        for split, n, seed in (("train", self.args.images, 0), ("val", self.mode["val"], 1)):
            path = os.path.join(self.out, "data", f"varied-{split}-{n}-len{lo}-{hi}-s{seed}")
            if not os.path.exists(os.path.join(path, "index.json")):
                shutil.rmtree(path + ".tmp", ignore_errors=True)  # a render killed half-way
                cores = len(os.sched_getaffinity(0))
                data.synth(path + ".tmp", n, seed=seed, style="varied", min_len=lo, max_len=hi,
                           shard_size=max(50, -(-n // (2 * cores))))  # two shards per core: all cores busy
                os.replace(path + ".tmp", path)
            sets[split] = path
        self.result["data"] = dict(images=self.args.images, val=self.mode["val"], style="varied", label_len=[lo, hi])
        return sets["train"], sets["val"]

    # ------------------------------------------------------------------------- training throughput

    def train_argv(self, arch, size, name, batch, micro, samples, eval_every, compile_):
        return ["--arch", arch, "--size", size, "--train", self.train_dir, "--val", self.val_dir, "--runs", self.runs,
                "--name", name, "--train-samples", str(samples), "--batch", str(batch), "--micro-batch", str(micro),
                "--eval-every", str(eval_every), "--workers", str(self.args.workers), "--device", self.device.type,
                "--dtype", self.mode["dtype"], "--quiet"] + (["--compile"] if compile_ else []) + (
                ["--threads", "1"] if self.args.dry_run else [])  # tiny models: more threads only contend

    def batch(self, arch, size):
        batch = self.mode.get("batch") or train.RECIPES[arch, size]["batch"]
        return batch, min(batch, self.mode["micro"].get((arch, size), batch))

    def train_speed(self, arch, size_key, compile_, profile_at=None):
        """One train.py run in a child process, killed once its post-compilation windows are measured (or, with
        profile_at, once the profile of optimizer steps profile_at+2 .. +4 is written)."""
        size = self.mode["sizes"][size_key]
        label = f"{'PARSeq' if arch == 'parseq' else 'TrOCR'}-{size}"
        name = f"{arch}-{size}-{'compiled' if compile_ else 'eager'}"
        batch, micro = self.batch(arch, size)
        window = self.mode["window_steps"] * batch
        row = dict(model=label, arch=arch, size=size, size_key=size_key, compile=compile_, batch=batch, micro_batch=micro,
                   workers=self.args.workers, log=os.path.join(self.logs, name + ".log"))
        cap = self.args.budget if profile_at else self.mode["cap_s"]["compile" if compile_ else "eager"]
        if self.left(cap) < 10:
            return dict(row, note="skipped: out of time budget")
        log(f"train {name}: batch {batch} (micro {micro}), eval window {window} samples, up to {self.left(cap):.0f}s")
        stats = os.path.join(self.logs, name + "-stats.json")
        cmd = [sys.executable, os.path.join(HERE, "bench_train.py"), "--child", stats]
        if profile_at:
            row["profile"] = os.path.join(self.out, f"profile-{name}")
            cmd += ["--profile-at", str(profile_at), row["profile"]]
        argv = self.train_argv(arch, size, name, batch, micro, 50 * window, window, compile_)
        proc = launch(cmd + argv, row["log"], env={"TORCH_LOGS": "recompiles"})
        run_dir = os.path.join(self.runs, name)
        ended = watch(proc, time.time() + self.left(cap), os.path.join(run_dir, "metrics.jsonl"),
                      min_rows=0 if profile_at else self.mode["min_rows"], steady_s=self.mode["steady_s"],
                      until_file=row["profile"] + ".txt" if profile_at else None)
        rows = read_rows(os.path.join(run_dir, "metrics.jsonl"))
        row.update(self.window_numbers(rows, ended, row["log"]))
        stats = os.path.join(self.logs, name + "-stats-rank0.json")
        if os.path.exists(stats):
            with open(stats) as f:
                row.update(json.load(f))
        with open(row["log"], errors="replace") as f:
            row["recompiles"] = f.read().count("Recompiling function")
        if os.path.exists(os.path.join(run_dir, "config.json")):
            with open(os.path.join(run_dir, "config.json")) as f:
                config = json.load(f)
            row["N"] = config["N"]
            self.result["flops_convention"] = config.get("flops_convention")
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a B model are GBs
        log(f"train {name}: {ended}; " + ", ".join(f"{k} {row.get(k)}" for k in ("samples_per_s", "mfu", "data_wait", "note")))
        return row

    def window_numbers(self, rows, ended, log_path):
        """Throughput, MFU and data wait of the post-warm-up window with the median samples/s (rows[0] holds
        compilation, CUDA warm-up and loader start; its length is reported as first_window_s)."""
        if not rows:
            return dict(note=f"no eval window finished ({ended}): {error_line(log_path)}")
        ws = windows(rows)
        steady = sorted(ws[1:] or ws, key=lambda w: w["rate"])
        w = steady[len(steady) // 2]
        flops_per_sample = w["flops"] / w["samples"]
        notes = ["only the first window (includes compilation)"] if len(ws) == 1 else []
        if ended.startswith("exit") and ended != "exit 0":  # crashed after some evals
            notes.append(f"{ended}: {error_line(log_path)}")
        return dict(samples_per_s=w["rate"], flops_per_sample=flops_per_sample,
                    mfu=w["rate"] * flops_per_sample / self.result["peak_flops"], mfu_train=w["mfu_train"],
                    data_wait=w["data_wait"], windows=len(ws), first_window_s=ws[0]["seconds"], note="; ".join(notes))

    # ------------------------------------------------------------------------- decoding throughput

    def decode_speed(self, arch):
        """images/s of model.decode at the decode batch, random weights with EOS suppressed so every image runs
        the full max_len + 1 steps (the worst case; a trained model stops at the batch's longest word)."""
        size = self.mode["sizes"]["S"]
        cfg = modellib.make_config(arch, size, self.vocab_size)
        net = modellib.build_model(cfg).to(self.device).eval()
        with torch.no_grad():
            if arch == "parseq":
                net.head.bias[net.eos] = -1e4
            else:  # the EOS logit is 0, below the largest of the others (the head has no bias)
                (net.tok_emb if cfg.tie_head else net.head).weight[net.eos] = 0
        modes = {"parseq": [("greedy AR", dict(ar=True, refine_iters=0)), ("NAR + 1 refine", dict(ar=False, refine_iters=1))],
                 "trocr": [("greedy", dict(beam=1)), ("beam 5", dict(beam=5))]}[arch]
        batch = self.mode["decode_batch"]
        if self.left(self.mode["cap_s"]["decode"]) < 5:
            return []
        images = torch.rand(batch, 3, cfg.img_h, cfg.img_w, device=self.device) * 2 - 1
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        rows = []
        for mode, kwargs in modes:
            with autocast:
                net.decode(images, **kwargs)  # warm-up: kernels, allocator
                calls, t = 0, time.perf_counter()
                while calls < 1 or time.perf_counter() - t < (0 if self.args.dry_run else 2.0):
                    ids, _ = net.decode(images, **kwargs)
                    calls += 1
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
            seconds = (time.perf_counter() - t) / calls
            rows.append(dict(model=f"{'PARSeq' if arch == 'parseq' else 'TrOCR'}-{size}", mode=mode, batch=batch,
                             images_per_s=batch / seconds, ms_per_batch=1e3 * seconds, steps=ids.shape[1]))
            log(f"decode {rows[-1]['model']} {mode}: {rows[-1]['images_per_s']:.0f} images/s")
        del net, images
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return rows

    # ------------------------------------------------------------------------- kill -9 and resume; torchrun

    def resume_check(self):
        """An uninterrupted run, then the same run killed (SIGKILL, loader workers included) once its first
        checkpoint exists and re-run with the same command: its evals after the resume point must match."""
        size, (batch, steps, every) = self.mode["sizes"]["S"], self.mode["resume"]
        cap = self.mode["cap_s"]["resume"]
        if self.left(cap) < 20:
            return dict(note="skipped: out of time budget")
        log(f"resume: parseq-{size}, {steps} steps of {batch}, eval every {every}, up to {self.left(cap):.0f}s")
        deadline = time.time() + self.left(cap)
        argv = {name: self.train_argv("parseq", size, f"resume-{name}", batch, batch, steps * batch, every * batch, False)
                + ["--save-every", str(every * batch)] for name in ("straight", "killed")}  # last.pt at every eval
        last = os.path.join(self.runs, "resume-killed", "last.pt")
        for name, until_file, expect in (("straight", None, "exit 0"), ("killed", last, "file"), ("killed", None, "exit 0")):
            logfile = os.path.join(self.logs, f"resume-{name}.log")
            proc = launch([sys.executable, os.path.join(ROOT, "train.py")] + argv[name], logfile)
            ended = watch(proc, deadline, until_file=until_file)
            if ended != expect:
                return dict(note=f"{name} run: {ended} (expected {expect}): {error_line(logfile)}")
            if until_file:
                killed_at = torch.load(last, map_location="cpu", weights_only=True)["step"]
        rows = {name: {r["step"]: r for r in read_rows(os.path.join(self.runs, f"resume-{name}", "metrics.jsonl"))}
                for name in argv}
        after = [s for s in rows["straight"] if s > killed_at]
        if not after or sorted(rows["killed"]) != sorted(rows["straight"]):
            return dict(note=f"evals at steps {sorted(rows['killed'])} after the resume, {sorted(rows['straight'])} without")
        diff = {k: max(abs(rows["killed"][s][k] / rows["straight"][s][k] - 1) for s in after) for k in ("train_loss", "val_loss")}
        for name in argv:
            shutil.rmtree(os.path.join(self.runs, f"resume-{name}"), ignore_errors=True)
        return dict(model=f"PARSeq-{size}", steps=steps, killed_at_step=killed_at, rows_compared=len(after),
                    train_loss_rel_diff=diff["train_loss"], val_loss_rel_diff=diff["val_loss"],
                    tolerance=self.mode["resume_tol"], continues=max(diff.values()) <= self.mode["resume_tol"], note="")

    def ddp_check(self):
        """torchrun --nproc_per_node=2 with both ranks on the one device (gloo on the CPU, NCCL on a GPU)."""
        cap = self.mode["cap_s"]["ddp"]
        if self.left(cap) < 15:
            return dict(note="skipped: out of time budget")
        size, batch = self.mode["sizes"]["S"], 64 if self.args.dry_run else 512
        log(f"ddp: torchrun 2 processes, parseq-{size}, up to {self.left(cap):.0f}s")
        argv = self.train_argv("parseq", size, "ddp", batch, batch // 2, 20 * batch, 10 * batch, False)
        logfile = os.path.join(self.logs, "ddp.log")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(HERE, "bench_train.py"), "--child", os.path.join(self.logs, "ddp-stats.json"), "--share-gpu"]
        ended = watch(launch(cmd + argv, logfile), time.time() + self.left(cap))
        backend = "gloo" if self.args.dry_run else "nccl"
        result_path = os.path.join(self.runs, "ddp", "result.json")
        if ended != "exit 0" or not os.path.exists(result_path):
            return dict(processes=2, backend=backend, ok=False,
                        note=f"{ended}: {error_line(logfile, r'Duplicate GPU|ncclInvalidUsage|NCCL error|invalid device')}")
        rows = read_rows(os.path.join(self.runs, "ddp", "metrics.jsonl"))
        with open(os.path.join(self.runs, "ddp", "config.json")) as f:
            world = json.load(f)["world_size"]
        return dict(processes=2, backend=backend, ok=world == 2, world_size=world, samples_per_s=rows[-1]["samples_per_s"],
                    final_train_loss=rows[-1]["train_loss"], note="")


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(r):
    lines = [f"**{r['device']}**, torch {r['torch']}, {r['mode']}; MFU against {r['peak_flops'] / 1e12:.3g} TFLOP/s "
             f"({r['peak_source']}; measured matmul {r['matmul_flops'] / 1e12:.3g} TFLOP/s)", "",
             "| " + " | ".join(TRAIN_COLUMNS) + " |", "|" + "---|" * len(TRAIN_COLUMNS)]
    for t in r["train"]:
        batch = f"{t['batch']}" + (f" ({t['micro_batch']})" if t["micro_batch"] != t["batch"] else "")
        mem = f"{t['peak_mem_gb']:.1f}" + ("" if t.get("peak_mem_kind", "").startswith("cuda") else " RSS") if t.get("peak_mem_gb") else "-"
        cells = [t["model"], "-" if t.get("N") is None else f"{t['N'] / 1e6:.1f}M" if t["N"] > 1e6 else f"{t['N'] / 1e3:.1f}k", "yes" if t["compile"] else "no", batch,
                 fmt(t.get("samples_per_s"), ",.0f"), fmt(t.get("mfu"), ".1%"), mem, fmt(t.get("data_wait"), ".1%"),
                 fmt(t.get("recompiles"), "d"), fmt(t.get("graph_breaks"), "d"), fmt(t.get("first_window_s"), ".1f"),
                 t.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    if r["decode"]:
        lines += ["", "| model | decoding | batch | images/s | ms/batch |", "|---|---|---|---|---|"]
        lines += [f"| {d['model']} | {d['mode']} | {d['batch']} | {d['images_per_s']:,.0f} | {d['ms_per_batch']:.1f} |"
                  for d in r["decode"]]
    if r["resume"]:
        s = r["resume"]
        lines += ["", f"- kill -9 and resume ({s.get('model', '')}): " + (s["note"] or
                  f"killed at step {s['killed_at_step']} of {s['steps']}, {s['rows_compared']} later evals vs an uninterrupted "
                  f"run: train loss differs by {s['train_loss_rel_diff']:.1e}, val loss by {s['val_loss_rel_diff']:.1e} "
                  f"(relative) -> {'continues' if s['continues'] else 'DIVERGES'}")]
    if r["ddp"]:
        d = r["ddp"]
        lines.append(f"- torchrun, 2 processes on one {'CPU' if d.get('backend') == 'gloo' else 'GPU'} ({d.get('backend', '')}): " +
                     (f"ok, {d['samples_per_s']:,.0f} samples/s" if d.get("ok") else d["note"]))
    return "\n".join(lines)


def threads_bench(args):
    """Training images/s at 1 and 2 torch threads per run, one run alone and two at once (a busy machine)."""
    train_dir, val_dir = os.path.join(args.out, "threads-data", "train"), os.path.join(args.out, "threads-data", "val")
    if not os.path.exists(os.path.join(val_dir, "index.json")):
        data.synth(train_dir, 6000, seed=0)
        data.synth(val_dir, 200, seed=1)
    runs = os.path.join(args.out, "threads-runs")
    for arch, size in (spec.split("-") for spec in args.sizes.split(",")):
        speed = {}
        for threads in (1, 2):
            for together in (1, 2):
                os.makedirs(runs, exist_ok=True)
                logs = [os.path.join(runs, f"{i}.log") for i in range(together)]
                procs = [subprocess.Popen(
                    [sys.executable, os.path.join(ROOT, "train.py"), "--arch", arch, "--size", size, "--train", train_dir,
                     "--val", val_dir, "--train-samples", "100000000", "--threads", str(threads), "--workers", "0",
                     "--runs", runs, "--name", f"run{i}"], stdout=subprocess.DEVNULL, stderr=open(log, "w"))
                    for i, log in enumerate(logs)]
                time.sleep(args.seconds)
                for proc in procs:
                    proc.kill()
                    proc.wait()
                rates = [re.findall(r"([\d.]+)img/s", open(log).read()) for log in logs]  # tqdm's rate at the end
                speed[threads, together] = [float(r[-1]) if r else 0.0 for r in rates]
                shutil.rmtree(runs)
        ratio = {n: sum(speed[2, n]) / max(sum(speed[1, n]), 1e-9) for n in (1, 2)}
        print(f"{arch}-{size}: alone 1 thread {speed[1, 1][0]:.0f}, 2 threads {speed[2, 1][0]:.0f} images/s "
              f"(x{ratio[1]:.2f}); two at once 1 thread {'+'.join(f'{r:.0f}' for r in speed[1, 2])}, 2 threads "
              f"{'+'.join(f'{r:.0f}' for r in speed[2, 2])} (x{ratio[2]:.2f})", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--gpu", action="store_true", help="measure on the CUDA GPU (exits if there is none)")
    how.add_argument("--dry-run", action="store_true", help="the same code path on the CPU: T1/T2, fp32, no compile")
    how.add_argument("--threads", action="store_true", help="CPU: tiny sizes at 1 and 2 threads, alone and in pairs")
    p.add_argument("--sizes", default="parseq-T1,parseq-T4,parseq-T6,trocr-T4", help="--threads: ARCH-SIZE,...")
    p.add_argument("--seconds", type=float, default=35, help="--threads: seconds of training per measurement")
    p.add_argument("--out", default="runs/bench_train", help="results, logs, run folders and the cached data")
    p.add_argument("--budget", type=float, default=None, help="seconds for everything (default: 450 GPU, 300 dry run)")
    p.add_argument("--images", type=int, default=None, help="training images to render (default: 20000 GPU, 800 dry run)")
    p.add_argument("--label-len", default=None, help="MIN,MAX characters per rendered word (default 2,12 GPU, 2,6 dry run)")
    p.add_argument("--workers", type=int, default=None, help="loader workers per training run (default: 6 GPU, 1 dry run)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense 16-bit peak, when train.PEAK_FLOPS lacks the device")
    p.add_argument("--only", default="train,decode,resume,ddp", help="parts to run, comma-separated")
    p.add_argument("--profile", default=None, metavar="ARCH-SIZE",
                   help="instead of the table: profile 3 compiled training steps of e.g. parseq-B, print the top kernels")
    args = p.parse_args(argv)
    if args.threads:
        return threads_bench(args)
    mode = DRY if args.dry_run else GPU
    args.budget = args.budget or (300 if args.dry_run else 450)
    args.images = args.images or mode["images"]
    args.label_len = args.label_len or mode["label_len"]
    args.workers = mode["workers"] if args.workers is None else args.workers
    if args.gpu and not torch.cuda.is_available():
        sys.exit("bench_train.py --gpu: no CUDA device visible (torch.cuda.is_available() is False); "
                 "use --dry-run to run the same code path on the CPU")
    bench = Bench(args)
    log(f"{bench.result['device']}, torch {torch.__version__}, peak {bench.result['peak_flops'] / 1e12:.3g} TFLOP/s "
        f"({bench.result['peak_source']}), budget {args.budget:.0f}s, output {bench.out}")
    bench.train_dir, bench.val_dir = bench.render()
    log(f"data: {bench.train_dir}")
    if args.profile:
        arch, size_key = args.profile.split("-")
        row = bench.train_speed(arch, size_key, not args.dry_run, profile_at=mode["window_steps"] + 4)  # past compile
        if not os.path.exists(row["profile"] + ".txt"):
            sys.exit(f"no profile written ({row.get('note')}); see {row['log']}")
        with open(row["profile"] + ".txt") as f:
            print(f.read())
        return log(f"top kernels: {row['profile']}.txt; timeline: {row['profile']}.trace.json (ui.perfetto.dev)")
    trained = set()
    for part, *what in PLAN:
        if part not in args.only.split(","):
            continue
        if part == "train":
            arch, size_key, compile_ = what[0], what[1], what[2] and not args.dry_run
            if (arch, size_key, compile_) in trained:  # the dry run drops --compile: the eager B rows repeat
                continue
            trained.add((arch, size_key, compile_))
            bench.result["train"].append(bench.train_speed(arch, size_key, compile_))
            bench.result["train"].sort(key=lambda t: (t["size_key"] == "B", t["arch"], not t["compile"]))
        elif part == "decode":
            bench.result["decode"] += bench.decode_speed(what[0])
        else:
            bench.result[part] = bench.resume_check() if part == "resume" else bench.ddp_check()
        bench.save()
    log(f"done: {os.path.join(bench.out, 'bench_train.json')}")
    print(bench.result["table_md"])


if __name__ == "__main__":
    main()
