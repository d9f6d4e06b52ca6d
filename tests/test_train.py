"""train.py end to end on CPU: any layout or a resume on another layout trains the same model, kill-and-resume,
one C, D and drops, new-charset fine-tuning, checkpoint cadence and atomic writes, NaN handling."""
import contextlib
import dataclasses
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import model as modellib
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
TRAIN = [sys.executable, os.path.join(ROOT, "train.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py")]
SYMBOLS = "!#$%&*+<=>?@0123"  # a charset outside the Latin letters that Pillow's built-in font draws; 4 digits shared with '36'


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    data.synth(str(root / "train"), 1200, seed=0, style="clean", min_len=2, max_len=4, charset="0123456789",
               workers=1, shard_size=200)
    data.synth(str(root / "val"), 100, seed=1, style="clean", min_len=2, max_len=4, charset="0123456789", workers=1)
    return root


def base_args(shards, runs, name, *extra):
    return ["--arch", "trocr", "--size", "T1", "--set", "dropout=0.0", "--charset", "0123456789",
            "--train", str(shards / "train"), "--val", str(shards / "val"), "--runs", str(runs), "--name", name,
            "--threads", "1", "--quiet", *extra]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(run_dir, which="last.pt"):
    return torch.load(os.path.join(run_dir, which), weights_only=True)["model"]


def relative_difference(a, b):
    """||a - b|| / ||a|| over the weight matrices. Biases are left out: a key bias shifts every attention score
    equally, so its true gradient is 0 and Adam turns float noise in it into lr-sized steps in any run."""
    keys = [k for k in a if a[k].dim() >= 2]
    diff = sum(((a[k] - b[k]).double() ** 2).sum() for k in keys)
    return (diff / sum((a[k].double() ** 2).sum() for k in keys)).sqrt().item()


class Killed(Exception):
    pass


def save_then_die(*args, **kwargs):
    """train.save_checkpoint, then the process 'dies': a kill right after the checkpoint of step 4."""
    REAL_SAVE_CHECKPOINT(*args, **kwargs)
    if args[0].prog.step == 4:  # args[0]: the run
        raise Killed


REAL_SAVE_CHECKPOINT = train.save_checkpoint


def test_any_layout_or_resume_trains_the_same_model(shards, tmp_path, monkeypatch):
    # Labels of 2-4 digits: a mean of per-micro-batch means would weight short labels more when a batch is split.
    # Step k trains global positions [16k, 16k + 16) whatever the processes x workers x micro-batch.
    common = ["--batch", "16", "--train-samples", "160", "--eval-every", "80"]
    train.main(base_args(shards, tmp_path, "m16", *common, "--micro-batch", "16", "--workers", "0"))
    train.main(base_args(shards, tmp_path, "m8", *common, "--micro-batch", "8", "--workers", "3"))
    assert json.load(open(tmp_path / "m8" / "config.json"))["accum"] == 2
    subprocess.run(TORCHRUN + base_args(shards, tmp_path, "ddp", *common, "--micro-batch", "8", "--workers", "3"),
                   check=True, env=ENV, cwd=ROOT, timeout=180)
    assert json.load(open(tmp_path / "ddp" / "config.json"))["world_size"] == 2
    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):  # one process, killed after step 4, then resumed on 2 processes x 3 workers
        train.main(base_args(shards, tmp_path, "resumed", *common, "--micro-batch", "16", "--workers", "0"))
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["step"] == 4
    out = subprocess.run(TORCHRUN + base_args(shards, tmp_path, "resumed", *common, "--micro-batch", "8", "--workers", "3"),
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "1 -> 2 processes" in out.stdout and "warning" not in out.stderr, out.stderr[-3000:]
    runs = [tmp_path / name for name in ("m16", "m8", "ddp", "resumed")]
    for run in runs[1:]:
        assert relative_difference(weights(runs[0]), weights(run)) < 1e-5, run
        for a, b in zip(metrics(runs[0]), metrics(run), strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert metrics(runs[1])[-1]["flops"] == metrics(runs[2])[-1]["flops"]  # same micro-batches: same C


def test_sigkill_then_resume_exactly_or_under_another_layout(shards, tmp_path):
    # PARSeq with dropout: permutations and dropout masks come from the RNG that the checkpoint must restore.
    common = ["--arch", "parseq", "--set", "dropout=0.1", "--batch", "16", "--train-samples", "960",
              "--eval-every", "320", "--save-every", "160", "--workers", "0"]
    train.main(base_args(shards, tmp_path, "straight", *common))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(TRAIN + base_args(shards, tmp_path, "killed", *common), env=ENV, cwd=ROOT)
    while not (killed / "last.pt").exists():  # written every 10 steps from step 10 on
        assert proc.poll() is None, "run ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists(), "the run finished before it could be killed"
    assert torch.load(killed / "last.pt", weights_only=True)["step"] < 60
    shutil.copytree(killed, tmp_path / "moved")
    # Same layout: the same run, bit for bit.
    train.main(base_args(shards, tmp_path, "killed", *common))
    a, b = metrics(tmp_path / "straight"), metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [20, 40, 60]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
        assert ra["val_error"] == rb["val_error"]
    assert relative_difference(weights(tmp_path / "straight"), weights(killed)) < 1e-6
    before = os.path.getmtime(killed / "result.json")  # re-running a finished run does not redo it
    train.main(base_args(shards, tmp_path, "killed", *common))
    assert os.path.getmtime(killed / "result.json") == before
    # Another seed is another run: one line naming it, nothing resumed.
    out = subprocess.run(TRAIN + base_args(shards, tmp_path, "moved", *common, "--seed", "1"), env=ENV, cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"train.py: {tmp_path / 'moved'} holds another run (seed 0 -> 1): choose another --name, or delete the folder "
        "to start over"]
    # Another layout (2 processes, 1 worker each): the same run, resumed; its RNG streams restart per rank. Rows logged
    # after last.pt's step, and a line cut by the kill, are dropped at the resume.
    with open(tmp_path / "moved" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 59}) + "\n" + '{"step": 6')
    out = subprocess.run(TORCHRUN + base_args(shards, tmp_path, "moved", *common[:-1], "1"), env=ENV, cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "resuming at step" in out.stdout and "1 -> 2 processes" in out.stdout
    result = json.load(open(tmp_path / "moved" / "result.json"))
    assert result["step"] == 60 and result["samples"] == 960
    assert [r["step"] for r in metrics(tmp_path / "moved")] == [20, 40, 60]
    assert result["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=0.2)  # the same data, other dropout masks


@pytest.fixture(scope="module")
def learned(shards, tmp_path_factory):
    runs = tmp_path_factory.mktemp("learn")
    result = train.main(base_args(shards, runs, "learn", "--arch", "parseq", "--size", "T4", "--charset", "36",
                                  "--batch", "32", "--train-samples", "12800", "--eval-every", "3200", "--workers", "0",
                                  "--test", f"again={shards / 'val'}"))
    return runs / "learn", result


def test_learns_and_logs_samples_epochs_and_one_C(learned):
    run_dir, result = learned
    rows = metrics(run_dir)
    assert len(rows) == 4 and rows[-1]["final"] and rows[-1]["tests"]["again"]["n"] == 100
    config = json.load(open(run_dir / "config.json"))
    assert all(r["epochs"] == pytest.approx(r["samples"] / 1200) for r in rows) and result["D"] == config["D"] == 1200
    assert all(b["samples"] > a["samples"] and b["flops"] > a["flops"] for a, b in zip(rows, rows[1:]))
    cfg = modellib.ModelConfig(**config["model"])
    assert config["N"] == sum(p.numel() for p in modellib.build_model(cfg).parameters())
    # One C: each batch at its padded label length (PARSeq: the orders used), as config.json says.
    assert config["flops_convention"] == train.FLOPS_CONVENTION and "padded label length" in config["flops_convention"]
    assert modellib.train_flops_per_sample(cfg, dec_len=2) * rows[-1]["samples"] <= rows[-1]["flops"] == result["C"]
    assert rows[-1]["flops"] <= modellib.train_flops_per_sample(cfg, dec_len=4) * rows[-1]["samples"]
    # untrained it reads nothing (100% error); seeds 0, 1, 2 of this data order end at 85, 72, 48%: the plateau breaks
    # at a step the seed decides
    assert result["val_error"] < 90 and rows[0]["val_error"] > 95, rows
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert torch.load(run_dir / "best.pt", weights_only=True)["tokenizer"]["charset"] == data.CHARSET36


def test_D_counts_usable_images_and_drops_are_recorded(tmp_path):
    # One source of 120 labels of 2-3 digits and 80 of 4: with max_len 3 the 80 are dropped as too long, D = 120.
    for name, n, lo, hi in (("short", 120, 2, 3), ("long", 80, 4, 4)):
        data.synth(str(tmp_path / "mixed" / name), n, seed=n, style="clean", min_len=lo, max_len=hi, charset="0123456789",
                   workers=1)
    result = train.main(["--arch", "trocr", "--size", "T1", "--set", "max_len=3", "--charset", "0123456789",
                         "--train", str(tmp_path / "mixed" / "*" / "*.tar"), "--val", str(tmp_path / "mixed" / "short"),
                         "--runs", str(tmp_path), "--name", "drops", "--batch", "16", "--train-samples", "32",
                         "--workers", "0", "--threads", "1", "--quiet"])
    config = json.load(open(tmp_path / "drops" / "config.json"))
    assert config["D"] == result["D"] == 120 and config["drops"]["too_long"] == 80
    assert result["drops"]["too_long"] >= 80 and result["epochs"] == pytest.approx(32 / 120)


def test_fine_tune_a_36_char_checkpoint_onto_a_new_charset(learned, tmp_path, capsys):
    ckpt_path = str(learned[0] / "best.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    old_tok, tok = data.load_tokenizer(ckpt["tokenizer"]), data.CharTokenizer(SYMBOLS)
    net = modellib.build_model(modellib.make_config("parseq", "T4", tok.vocab_size))
    line = train.load_init(net, tok, ckpt, ckpt_path)
    Vo, V, state, old = old_tok.vocab_size, tok.vocab_size, net.state_dict(), ckpt["model"]
    # new id -> old id: the 4 shared digits by their text, EOS/BOS/PAD by role
    shared = {SYMBOLS.index(c) + 1: data.CHARSET36.index(c) + 1 for c in "0123"}
    vocab_sized = [k for k in state if state[k].shape[0] in (V, V - 2) and old[k].shape[0] in (Vo, Vo - 2)]
    assert len(vocab_sized) == 3 and f"rows of 4/{len(SYMBOLS)} shared tokens" in line, line
    for k in state:
        if k not in vocab_sized:
            assert torch.equal(state[k], old[k]), k
            continue
        pairs = {**shared, 0: 0, **({V - 2: Vo - 2, V - 1: Vo - 1} if state[k].shape[0] == V else {})}
        assert all(torch.equal(state[k][i], old[k][j]) for i, j in pairs.items()), k
        assert not torch.equal(state[k][1], old[k][1])  # '!' is new: a fresh row, not the checkpoint's '0'
    # ... and the run trains on rendered images of the new charset.
    for name, n in (("train", 400), ("val", 60)):
        data.synth(str(tmp_path / name), n, seed=n, style="clean", min_len=2, max_len=4, charset=SYMBOLS, workers=1)
    capsys.readouterr()
    train.main(base_args(tmp_path, tmp_path, "ft", "--arch", "parseq", "--size", "T4", "--charset", SYMBOLS,
                         "--init", ckpt_path, "--batch", "32", "--train-samples", "1920", "--eval-every", "640",
                         "--workers", "0"))
    assert "--init" in capsys.readouterr().out
    rows = metrics(tmp_path / "ft")
    assert rows[-1]["train_loss"] < 0.8 * rows[0]["train_loss"] and rows[-1]["val_loss"] < rows[0]["val_loss"], rows


def checkpoint(path, arch, size, charset, **fields):
    """A checkpoint in the format of train.py's best.pt and model.py convert-* of a freshly built model."""
    tok = data.CharTokenizer(charset)
    cfg = modellib.make_config(arch, size, tok.vocab_size, **fields)
    torch.manual_seed(12345)  # not the runs' seed: a fresh row differs from the checkpoint's
    torch.save(dict(model=modellib.build_model(cfg).state_dict(), model_config=dataclasses.asdict(cfg),
                    tokenizer=tok.spec), path)
    return str(path)


def fine_tune(shards, runs, name, ckpt, *extra):
    """base_args without --arch, --size and --charset, from ckpt, 2 steps."""
    args = base_args(shards, runs, name, "--init", ckpt, "--batch", "16", "--train-samples", "32", "--workers", "0", *extra)
    for flag in ("--arch", "--size", "--charset"):
        del args[args.index(flag):args.index(flag) + 2]
    return args


def test_init_builds_the_checkpoints_model_and_tokenizer_and_lr_0_keeps_every_tensor(shards, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "trocr-t2.pt", "trocr", "T2", data.CHARSET94)
    saved = torch.load(ckpt, weights_only=True)
    result = train.main(fine_tune(shards, tmp_path, "ft", ckpt, "--lr", "0"))
    n = len(saved["model"])
    assert f"--init {ckpt}: loaded {n}/{n} tensors; not loaded: none; fresh: none" in capsys.readouterr().out
    config = json.load(open(tmp_path / "ft" / "config.json"))
    assert config["model"] == saved["model_config"] and config["tokenizer"] == saved["tokenizer"]  # 94 characters
    assert (config["arch"], config["size"], config["lr"]) == ("trocr", "T2", 0)
    for which in ("best.pt", "last.pt"):
        state = weights(tmp_path / "ft", which)
        assert state.keys() == saved["model"].keys()
        assert all(torch.equal(state[k], saved["model"][k]) for k in state), which
    # --arch and --size that name the checkpoint's model: the same run (finished, not redone)
    again = fine_tune(shards, tmp_path, "ft", ckpt, "--lr", "0", "--arch", "trocr", "--size", "T2")
    assert train.main(again) == result
    # --set max_len=8: the checkpoint's first 9 positions; the tokenizer keeps its characters at the new max_len
    train.main(fine_tune(shards, tmp_path, "short", ckpt, "--lr", "0", "--set", "max_len=8"))
    assert torch.equal(weights(tmp_path / "short")["pos_emb"], saved["model"]["pos_emb"][:, :9])
    config = json.load(open(tmp_path / "short" / "config.json"))
    assert config["tokenizer"] == {**saved["tokenizer"], "max_len": 8} and config["model"]["max_len"] == 8


def test_init_into_another_charset_of_the_same_size_remaps_only_vocabulary_rows(shards, tmp_path, capsys):
    # T1 (width 16), 15 characters -> 15 others: V - 2 = 16 = the width, so matching by size would remap every norm
    old, new = "0123456789abcde", "vwxyz0123456789"  # the digits shared, at other ids
    ckpt = checkpoint(tmp_path / "old.pt", "parseq", "T1", old)
    saved = torch.load(ckpt, weights_only=True)["model"]
    train.main(fine_tune(shards, tmp_path, "ft", ckpt, "--lr", "0", "--charset", new))
    assert f"rows of 10/15 shared tokens in " in capsys.readouterr().out
    state, V = weights(tmp_path / "ft"), len(new) + 3
    vocabulary = {"text_emb.weight": V, "head.weight": V - 2, "head.bias": V - 2}
    assert all(torch.equal(state[k], saved[k]) for k in state if k not in vocabulary)
    for k, rows in vocabulary.items():
        pairs = {0: 0, **{new.index(c) + 1: old.index(c) + 1 for c in "0123456789"},
                 **({V - 2: V - 2, V - 1: V - 1} if rows == V else {})}  # EOS, BOS, PAD by role
        assert state[k].shape[0] == rows and all(torch.equal(state[k][i], saved[k][j]) for i, j in pairs.items()), k
        assert k == "head.bias" or not torch.equal(state[k][1], saved[k][1]), k  # 'v': a fresh row (biases start at 0)


def test_init_conflicts_and_another_model_are_one_line(shards, tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "t4.pt", "parseq", "T4", "0123456789")
    out = subprocess.run(TRAIN + fine_tune(shards, tmp_path, "ft", ckpt, "--size", "T2"), env=ENV, cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"train.py: --size T2 conflicts with --init {ckpt} (a parseq-T4 checkpoint)"], out.stderr[-2000:]
    for extra, message in ((["--arch", "trocr"], f"train.py: --arch trocr conflicts with --init {ckpt} (a parseq-T4 "
                                                 "checkpoint)"),
                           (["--set", "enc_width=64"], f"train.py: --init {ckpt}: only 29/59 tensors fit the model "
                            "(changed by --set?); not loaded: encoder.pos, encoder.patch, encoder.blocks, encoder.norm, layers")):
        with pytest.raises(SystemExit) as stop:
            train.main(fine_tune(shards, tmp_path, "ft", ckpt, *extra))
        assert str(stop.value) == message
    # a --set field or value the config cannot take: one line, with or without --init
    for item, message in (("bogus=3", "train.py: --set bogus: not a model config field --set takes"),
                          ("vocab_size=5", "(--arch, --charset and --spm set arch and vocab_size); valid: img_h, "),
                          ("dropout=2", "dropout=2 cannot be built: dropout probability has to be between 0 and 1"),
                          ("in_chans=1", "in_chans=1 cannot be built: "),  # images are RGB: the first step would fail
                          ("img_w=0", "img_w=0 cannot be built: "),
                          ("dec_width=x", "train.py: --set dec_width=x: expected int, e.g. dec_width=384"),
                          ("qkv_bias=1", "train.py: --set qkv_bias=1: expected bool, e.g. qkv_bias=true"),
                          ("enc_heads=5", "enc_heads=5 cannot be built: width ")):  # 16 or 64 not divisible by 5
        for args in (fine_tune(shards, tmp_path, "ft", ckpt), base_args(shards, tmp_path, "ft")):
            with pytest.raises(SystemExit) as stop:
                train.main([*args, "--set", item])
            assert str(stop.value).startswith("train.py: ") and message in str(stop.value), stop.value
    assert not (tmp_path / "ft").exists()
    # A model of no size: named after the checkpoint file, the default recipe; a size's fields changed by --set still
    # give the size's recipe
    odd = checkpoint(tmp_path / "odd.pt", "parseq", "T1", "0123456789", enc_depth=3)
    train.main(without_name(fine_tune(shards, tmp_path, "-", odd)))
    [config] = [json.load(open(p / "config.json")) for p in tmp_path.iterdir() if p.name.startswith("parseq-odd-dall-s0-")]
    assert config["size"] is None and config["lr"] == train.DEFAULTS["lr"] and config["model"]["enc_depth"] == 3
    assert (config["weight_decay"], config["schedule"]) == (train.DEFAULTS["weight_decay"], train.DEFAULTS["schedule"])
    args = train.parse_args(fine_tune(shards, tmp_path, "x", odd, "--set", "enc_depth=1"))
    assert train.tokenizer_and_config(args)[1].enc_depth == 1 and (args.size, args.lr) == ("T1", train.TINY_LR["T1"])
    for field in ("dec_depth=2", "qkv_bias=false"):  # a tiny size's fields that equal ModelConfig's defaults count too
        odd = checkpoint(tmp_path / "odd.pt", "parseq", "T1", "0123456789", **train.config_overrides([field]))
        args = train.parse_args(fine_tune(shards, tmp_path, "x", odd))
        assert train.tokenizer_and_config(args)[2] and args.size is None, field


def test_checkpoint_cadence_fp16_scaler_and_atomic_writes(shards, tmp_path, monkeypatch):
    assert train.save_interval("15m") == (15.0, None) and train.save_interval("200000") == (None, 200000)
    assert train.parse_args(["--train", "x", "--val", "y"]).save_every == (15.0, None)
    for bad in (["--save-every", "15x"], ["--beam", "0"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--train", "x", "--val", "y", *bad])
    real_save, saved = train.atomic_save, []
    monkeypatch.setattr(train, "atomic_save", lambda obj, path: (saved.append((os.path.basename(path), obj.get("step") if isinstance(obj, dict) else None)), real_save(obj, path)))
    args = ["--batch", "16", "--eval-every", "80", "--workers", "0"]
    train.main(base_args(shards, tmp_path, "every48", *args, "--train-samples", "320", "--save-every", "48"))
    # 20 steps: every 48 samples (3 steps), every tenth of the run (2 steps) and at the end (before and after the
    # final evaluation), not at other evals
    assert [s for f, s in saved if f == "last.pt"] == [*sorted({*range(3, 21, 3), *range(2, 21, 2)}), 20]
    assert [s for f, s in saved if f == "best.pt"][:1] == [5]
    assert {f for f, _ in saved} == {"config.json", "metrics.jsonl", "best.pt", "last.pt", "result.json"}  # all atomic
    saved.clear()
    train.main(base_args(shards, tmp_path, "fp16", *args, "--train-samples", "160", "--save-every", "0m", "--dtype", "fp16"))
    assert [s for f, s in saved if f == "last.pt"] == [*range(1, 11), 10]  # minutes: every step once due
    assert "scale" in torch.load(tmp_path / "fp16" / "last.pt", weights_only=True)["scaler"]  # a CPU GradScaler, enabled
    events = []
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync"))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), shutil.move(a, b)))
    real_save({"x": torch.ones(2)}, str(tmp_path / "x.pt"))
    assert events == ["fsync", "replace", "fsync"]  # the file, then the folder that holds its new name
    assert torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["x"], torch.ones(2))


def test_nan_losses_are_skipped_then_stop(shards, tmp_path, monkeypatch):
    real_build = modellib.build_model
    calls = {"n": 0}

    def build_with_nan(cfg, when):
        net = real_build(cfg)
        real_loss = net.loss

        def loss(images, tokens):  # counts training calls only; evaluation (and setup's check on meta) stays clean
            value, n = real_loss(images, tokens)
            if not net.training or images.is_meta:
                return value, n
            calls["n"] += 1
            return (value * float("nan"), n) if when(calls["n"]) else (value, n)
        net.loss = loss
        net.forward = loss
        return net

    args = ["--batch", "16", "--train-samples", "160", "--eval-every", "80", "--save-every", "80", "--workers", "0"]
    monkeypatch.setattr(modellib, "build_model", lambda cfg: build_with_nan(cfg, lambda i: i in (3, 4)))
    result = train.main(base_args(shards, tmp_path, "two-bad", *args))
    assert result["step"] == 10 and torch.load(tmp_path / "two-bad" / "last.pt", weights_only=True)["bad_steps"] == 2
    calls["n"] = 0
    monkeypatch.setattr(modellib, "build_model", lambda cfg: build_with_nan(cfg, lambda i: i > 7))
    with pytest.raises(SystemExit, match="non-finite"):
        train.main(base_args(shards, tmp_path, "goes-bad", *args))
    # The checkpoint of the last good step (7; a save every tenth of the run) is intact; no result was written.
    assert torch.load(tmp_path / "goes-bad" / "last.pt", weights_only=True)["step"] == 7
    assert not (tmp_path / "goes-bad" / "result.json").exists()

    def build_with_nan_grads(cfg):  # a finite loss whose gradients are NaN: skipped too, never applied
        net = real_build(cfg)
        net.encoder.pos.register_hook(lambda g: g * float("nan"))
        return net
    monkeypatch.setattr(modellib, "build_model", build_with_nan_grads)
    with pytest.raises(SystemExit, match="non-finite losses or gradients"):
        train.main(base_args(shards, tmp_path, "bad-grads", *args))
    assert not (tmp_path / "bad-grads" / "last.pt").exists()  # no step was taken, so nothing was saved


def test_unreadable_images_are_skipped_and_counted_over_all_ranks(shards, tmp_path):
    w = data.ShardWriter(str(tmp_path / "damaged"))
    for i in range(40):  # 5 of 40 images do not decode: one epoch of 40 positions reads each of them once
        buf = io.BytesIO(b"\x89PNG\r\n\x1a\nbroken")
        if i % 8 != 3:
            data.render_word(str(i), random.Random(i)).save(buf, "PNG")
        w.write(f"{i:09d}", buf.getvalue(), "png", str(i))
    data.write_index(str(tmp_path / "damaged"), w.close(), w.charset, "test", {})
    args = base_args(shards, tmp_path, "damaged", "--batch", "8", "--train-samples", "40", "--workers", "1")
    args[args.index("--train") + 1] = str(tmp_path / "damaged")
    out = subprocess.run(TORCHRUN + args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    result = json.load(open(tmp_path / "damaged" / "result.json"))
    assert result["D"] == 40 and result["drops"]["unreadable"] == 5 and metrics(tmp_path / "damaged")[-1]["unreadable"] == 5
    w = data.ShardWriter(str(tmp_path / "broken"))  # no image decodes: the run stops with one line
    for i in range(30):
        w.write(f"{i:09d}", b"\x89PNG\r\n\x1a\nbroken", "png", str(i))
    data.write_index(str(tmp_path / "broken"), w.close(), w.charset, "test", {})
    args[args.index("--train") + 1], args[args.index("--name") + 1] = str(tmp_path / "broken"), "broken"
    out = subprocess.run(TRAIN + args + ["--workers", "2"], env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("train.py: ") and "over half of 1,000 consecutive reads" in out.stderr


def test_train_and_evaluate_from_urls(shards, tmp_path, http_server, monkeypatch):
    url, served, server = http_server
    for split in ("train", "val"):
        shutil.copytree(shards / split, served / split)
    monkeypatch.setenv("OCRSCALE_CACHE", str(tmp_path / "cache"))
    args = base_args(shards, tmp_path, "url", "--batch", "16", "--train-samples", "64", "--workers", "1",
                     "--test", f"again={url}/val")
    args[args.index("--train") + 1], args[args.index("--val") + 1] = f"{url}/train", f"{url}/val"
    result = train.main(args)
    assert result["D"] == 1200 and result["tests"]["again"]["n"] == 100
    # 64 training images and 5 passes over the 100 val images (4 evals and the test): 564 images, read in blocks
    assert server.requests < 564 // 8
    with pytest.raises(SystemExit, match="nowhere/index.json: not found"):
        train.main(base_args(shards, tmp_path, "typo", "--val", f"{url}/nowhere"))


def test_lr_schedules():
    args = train.parse_args(["--train", "x", "--val", "y", "--lr", "1e-3", "--warmup", "0.1"])
    lrs = [train.get_lr(s, 100, args) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3) and lrs[-1] < 1e-5
    args.schedule = "onecycle"
    lrs = [train.get_lr(s, 100, args) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-3 / 25) and lrs[10] == pytest.approx(1e-3) and lrs[100] == pytest.approx(1e-3 / 25e4)


def test_bad_paths_fail_before_training(shards, tmp_path):
    with pytest.raises(SystemExit, match="no shards match"):
        train.main(base_args(shards, tmp_path, "typo", "--val", str(tmp_path / "nowhere")))
    with pytest.raises(SystemExit, match="NAME=DIR"):
        train.main(base_args(shards, tmp_path, "typo", "--test", str(shards / "val")))
    with pytest.raises(SystemExit, match="^train.py: --test a=.*: a second set named a$"):
        train.main(base_args(shards, tmp_path, "typo", "--test", f"a={shards / 'val'}", "--test", f"a={shards / 'train'}"))
    with pytest.raises(SystemExit, match="holds only"):
        train.main(base_args(shards, tmp_path, "typo", "--samples", "5000"))
    with pytest.raises(SystemExit, match="^train.py: .*nowhere"):
        train.main(base_args(shards, tmp_path, "typo", "--charset", f"@{tmp_path / 'nowhere.txt'}"))
    with pytest.raises(SystemExit, match="no such checkpoint"):
        train.main(base_args(shards, tmp_path, "typo", "--init", str(tmp_path / "nowhere.pt")))
    assert not (tmp_path / "typo").exists()
    old = base_args(shards, tmp_path, "old", "--batch", "16", "--train-samples", "32")
    train.main(old)
    os.remove(tmp_path / "old" / "result.json")  # unfinished, with a last.pt holding a pickled numpy RNG state
    torch.save({"rng": [{"numpy": np.random.get_state()}]}, tmp_path / "old" / "last.pt")
    with pytest.raises(SystemExit, match="^train.py: cannot resume from .*last.pt"):
        train.main(old)
    for damaged, text, message in (("config.json", "[1, 2]", "config.json is damaged (not a JSON object)"),
                                   ("config.json", None, "holds a last.pt but no config.json"),
                                   ("result.json", '{"N": 1', "result.json is damaged (not a JSON object)")):
        shutil.rmtree(tmp_path / "old")
        train.main(old)
        os.remove(tmp_path / "old" / damaged) if text is None else (tmp_path / "old" / damaged).write_text(text)
        with pytest.raises(SystemExit) as stop:
            train.main(old)
        assert str(stop.value).startswith("train.py: ") and message in str(stop.value), stop.value
    for flag, value in (("--batch", "-4"), ("--clip", "-1"), ("--ema", "1"), ("--lr", "nan"), ("--samples", "0"),
                        ("--train-samples", "0"), ("--warmup", "2"), ("--betas", "0.9"), ("--epochs", "inf")):
        with pytest.raises(SystemExit) as stop:
            train.parse_args(base_args(shards, tmp_path, "x", flag, value))
        assert stop.value.code == 2
    assert train.parse_args(base_args(shards, tmp_path, "x", "--betas", "0.9, 9.8e-1", "--lr", "0")).betas == "0.9, 9.8e-1"


def without_name(args):
    i = args.index("--name")
    return args[:i] + args[i + 2:]


def test_a_run_name_never_becomes_another_run(shards, tmp_path):
    args = ["--batch", "16", "--train-samples", "32", "--workers", "0"]
    first = train.main(base_args(shards, tmp_path, "mine", *args))
    finished = os.path.getmtime(tmp_path / "mine" / "result.json")
    assert train.main(base_args(shards, tmp_path, "mine", *args, "--micro-batch", "8")) == first  # a layout: the same run
    for change, named in ((["--train", str(shards / "val")], "D 1200 -> 1300; train "),  # more training data
                          (["--size", "T2"], 'size "T1" -> "T2"'),
                          (["--seed", "3"], "seed 0 -> 3"),
                          (["--set", "enc_width=32"], "model.enc_width 16 -> 32; set.enc_width null -> 32")):
        with pytest.raises(SystemExit) as stop:
            train.main(base_args(shards, tmp_path, "mine", *args, *change))
        message = str(stop.value)
        assert message.startswith(f"train.py: {tmp_path / 'mine'} holds another run (") and named in message, message
        assert "\n" not in message
    assert os.path.getmtime(tmp_path / "mine" / "result.json") == finished and not (tmp_path / "mine" / "last.pt").exists() \
        or torch.load(tmp_path / "mine" / "last.pt", weights_only=True)["step"] == 2
    # Default names: the readable part and a hash of the identity, so other data makes another folder.
    train.main(without_name(base_args(shards, tmp_path, "-", *args)))
    train.main(without_name(base_args(shards, tmp_path, "-", *args, "--train", str(shards / "val"))))
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("trocr-T1-dall-s0-"))
    assert len(names) == 2 and all(len(n.rsplit("-", 1)[1]) == 6 for n in names), names
    configs = [json.load(open(tmp_path / n / "config.json")) for n in names]
    assert sorted(c["fit_group"]["train"] for c in configs) == [[[str(shards / "train"), 1.0]],
                                                                [[str(shards / "train"), 1.0], [str(shards / "val"), 1.0]]]


def test_sigterm_ends_the_step_saves_it_and_the_same_command_resumes(shards, tmp_path):
    args = ["--batch", "16", "--train-samples", str(16 * 600), "--eval-every", str(16 * 600), "--save-every", "600m",
            "--workers", "1"]
    proc = subprocess.Popen(TRAIN + base_args(shards, tmp_path, "stopped", *args), env={**ENV, "PYTHONUNBUFFERED": "1"},
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert "steps of 16" in proc.stdout.readline()
    time.sleep(1.5)  # its loader worker has started
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler stops a job: every process of the group, the worker too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    step = torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["step"]
    assert 0 < step < 600 and err.strip().splitlines() == [
        f"stopped: stopped by SIGTERM after step {step:,}; {tmp_path / 'stopped' / 'last.pt'} holds it (the same command "
        "resumes)"]
    out = subprocess.run(TRAIN + base_args(shards, tmp_path, "stopped", *args), env=ENV, cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0 and f"resuming at step {step} " in out.stdout, out.stderr[-2000:]
    assert json.load(open(tmp_path / "stopped" / "result.json"))["step"] == 600


def test_ctrl_c_under_torchrun_stops_every_rank_by_that_signal(shards, tmp_path):
    """Ctrl-C reaches every rank; the stop travels in a summed all-reduce, which must not add the signal numbers."""
    args = ["--batch", "16", "--micro-batch", "8", "--train-samples", str(16 * 600), "--eval-every", str(16 * 600),
            "--save-every", "600m", "--workers", "0"]
    proc = subprocess.Popen(TORCHRUN + base_args(shards, tmp_path, "ddp-stop", *args), env={**ENV, "PYTHONUNBUFFERED": "1"},
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "steps of 16" in proc.stdout.readline()
    time.sleep(0.5)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    for pid in ranks:
        os.kill(int(pid), signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    step = torch.load(tmp_path / "ddp-stop" / "last.pt", weights_only=True)["step"]
    assert 0 < step < 600 and f"ddp-stop: stopped by SIGINT after step {step:,}" in err, err[-2000:]


def test_a_second_signal_exits_at_once(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(train, "stop_signal", None)
    monkeypatch.setattr(os, "_exit", exits.append)
    train.request_stop(signal.SIGINT, None)
    assert train.stop_signal == signal.SIGINT and exits == []  # the first: the loop stops after its step
    train.request_stop(signal.SIGINT, None)
    assert exits == [130] and capsys.readouterr().err == "train.py: a second SIGINT: exiting without saving\n"


def test_unusable_val_or_test_sets_stop_before_training(shards, tmp_path):
    letters = tmp_path / "letters"  # labels that the digit charset cannot read
    writer = data.ShardWriter(str(letters))
    for i in range(5):
        buf = io.BytesIO()
        data.render_word("abc", random.Random(i)).save(buf, "PNG")
        writer.write(f"{i:09d}", buf.getvalue(), "png", "abc")
    data.write_index(str(letters), writer.close(), "abc", "test", {})
    for flag, value in (("--test", f"letters={letters}"), ("--val", str(letters))):
        with pytest.raises(SystemExit) as stop:
            train.main(base_args(shards, tmp_path, "never", "--batch", "16", "--train-samples", "32", "--workers", "0",
                                 flag, value))
        assert str(stop.value).startswith(f"train.py: {flag} {value}: no usable sample in {letters}" if flag == "--test"
                                          else f"train.py: --val: no usable sample in {letters}"), stop.value
        assert not (tmp_path / "never").exists()


def test_best_checkpoint_ties_go_to_the_lower_val_loss(shards, tmp_path, capsys):
    result = train.main(base_args(shards, tmp_path, "ties", "--batch", "16", "--train-samples", "160", "--eval-every",
                                  "32", "--workers", "0"))
    rows = metrics(tmp_path / "ties")
    best = min(rows, key=lambda r: (r["val_error"], r["val_loss"]))["step"]
    assert rows[0]["val_error"] == min(r["val_error"] for r in rows) and best != rows[0]["step"]  # a tie on error
    assert result["best_step"] == best == torch.load(tmp_path / "ties" / "best.pt", weights_only=True)["step"]
    assert f"best.pt: step {best} " in capsys.readouterr().out


def test_an_init_that_is_no_checkpoint_is_one_line(shards, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    for notes in (tmp_path / "notes.txt", tmp_path / "empty.pt"):
        with pytest.raises(SystemExit) as stop:
            train.main(base_args(shards, tmp_path, "ft", "--batch", "16", "--train-samples", "32", "--init", str(notes)))
        assert str(stop.value).startswith(f"train.py: --init {notes}: not a checkpoint of train.py") and \
            "\n" not in str(stop.value) and "weights_only" not in str(stop.value) and "zipfile" not in str(stop.value)


def test_tiny_sizes_default_to_one_thread(shards, tmp_path, capsys):
    args = base_args(shards, tmp_path, "threads", "--batch", "16", "--train-samples", "16", "--workers", "0")
    i = args.index("--threads")
    before = torch.get_num_threads()
    try:
        train.main(args[:i] + args[i + 2:])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert ", cpu, fp32, 1 threads" in capsys.readouterr().out.splitlines()[0]


def test_evaluation_builds_no_autograd_graph(shards):
    tok = data.CharTokenizer("0123456789")
    cfg = modellib.make_config("parseq", "T1", tok.vocab_size)
    net, grad_enabled = modellib.build_model(cfg), []
    loss = net.loss
    net.loss = lambda *batch: (grad_enabled.append(torch.is_grad_enabled()), loss(*batch))[1]
    stream = data.ShardStream(str(shards / "val"), cfg.img_h, cfg.img_w, 50, None, max_len=cfg.max_len, loop=False,
                              tokenizer=tok)
    result = train.evaluate(net, tok, stream, {}, 0, torch.device("cpu"), contextlib.nullcontext())
    assert grad_enabled == [False, False] and result["n"] == 100 and net.training


def test_resume_without_a_checkpoint_is_one_line(shards, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train.main(base_args(shards, tmp_path, "fresh", "--resume"))
    assert str(stop.value) == f"train.py: --resume: no checkpoint at {tmp_path / 'fresh' / 'last.pt'}"


def test_a_damaged_metrics_log_is_cleaned_and_a_lost_final_row_evaluated_again(shards, tmp_path, capsys):
    args = base_args(shards, tmp_path, "run", "--batch", "16", "--train-samples", "320", "--workers", "0")
    first = train.main(args)
    run_dir, rows = tmp_path / "run", metrics(tmp_path / "run")
    # killed after last.pt's final save, before result.json; the final row lost, a line damaged by hand
    os.remove(run_dir / "result.json")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]) + "[1, 2]\nnot json\n")
    again = train.main(args)
    assert "dropped 2 unreadable line(s) of metrics.jsonl" in capsys.readouterr().out
    assert again["step"] == first["step"] and again["val_error"] == first["val_error"]
    assert again["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)
    *kept, final = metrics(run_dir)
    assert kept == rows[:-1] and final["train_loss"] is None  # the loss since the last eval was in the lost row
    assert {k: v for k, v in final.items() if k in ("step", "samples", "flops", "final", "val_error", "val_n")} == \
        {k: v for k, v in rows[-1].items() if k in ("step", "samples", "flops", "final", "val_error", "val_n")}


def test_a_stop_while_no_step_is_taken_still_saves_and_exits(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "train_step", lambda run, batches, lr, vote: (False, False, signal.SIGTERM))
    with pytest.raises(SystemExit) as stop:  # every sample unreadable, say: no step ends, the signal still does
        train.main(base_args(shards, tmp_path, "skips", "--batch", "16", "--train-samples", "64"))
    assert stop.value.code == 128 + signal.SIGTERM and (tmp_path / "skips" / "last.pt").exists()


def test_a_data_folder_that_changed_under_a_run_is_other_data(shards, tmp_path):
    shutil.copytree(shards / "train", tmp_path / "grown")
    args = base_args(shards, tmp_path, "g", "--batch", "16", "--train-samples", "32", "--samples", "600")
    args[args.index("--train") + 1] = str(tmp_path / "grown")
    train.main(args)
    data.synth(str(tmp_path / "more"), 100, seed=5, min_len=2, max_len=4, charset="0123456789", workers=1)
    shutil.copy(tmp_path / "more" / "shard-000000.tar", tmp_path / "grown" / "shard-000099.tar")  # D stays 600
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    assert "holds another run (usable [1200] -> [1300])" in str(stop.value)


def test_the_trained_weights_are_kept_when_a_test_set_fails_at_the_end(shards, tmp_path):
    writer = data.ShardWriter(str(tmp_path / "broken"))
    for i in range(4):
        writer.write(f"{i:09d}", b"\x89PNG\r\n\x1a\nbroken", "png", "12")
    data.write_index(str(tmp_path / "broken"), writer.close(), writer.charset, "test", {})
    with pytest.raises(data.DataError, match="no image could be read"):
        train.main(base_args(shards, tmp_path, "t", "--batch", "16", "--train-samples", "400", "--eval-every", "400",
                             "--test", f"broken={tmp_path / 'broken'}"))
    assert torch.load(tmp_path / "t" / "last.pt", weights_only=True)["step"] == 25  # all of it: not 24, the last save
