"""train.py end to end on CPU: DDP equivalence, kill-and-resume, learning, NaN handling."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import model as modellib
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


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
    return torch.load(os.path.join(run_dir, which), weights_only=False)["model"]


def test_two_process_gloo_equals_one_process(shards, tmp_path):
    # Same global batch of 16: two processes x one worker x micro 8, or one process x two workers x 2 micro-steps of 8.
    common = ["--batch", "16", "--micro-batch", "8", "--train-samples", "160", "--eval-every", "32"]
    one = base_args(shards, tmp_path, "one", *common, "--workers", "2")
    two = base_args(shards, tmp_path, "two", *common, "--workers", "1")
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *one], check=True, env=ENV, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "train.py"), *two], check=True, env=ENV, cwd=ROOT)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [2, 4, 6, 8, 10]
    for a, b in zip(m1, m2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert json.load(open(tmp_path / "two" / "config.json"))["world_size"] == 2


def test_sigkill_then_resume_matches_uninterrupted_run(shards, tmp_path):
    # PARSeq with dropout: permutations and dropout masks come from the RNG that the checkpoint must restore.
    common = ["--arch", "parseq", "--set", "dropout=0.1", "--batch", "16", "--train-samples", "3200",
              "--eval-every", "160", "--workers", "0"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    subprocess.run(cmd + base_args(shards, tmp_path, "straight", *common), check=True, env=ENV, cwd=ROOT)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + base_args(shards, tmp_path, "killed", *common), env=ENV, cwd=ROOT)
    while not (killed / "last.pt").exists():
        assert proc.poll() is None, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "result.json").exists(), "the run finished before it could be killed"
    assert torch.load(killed / "last.pt", weights_only=False)["step"] < 200
    subprocess.run(cmd + base_args(shards, tmp_path, "killed", *common), check=True, env=ENV, cwd=ROOT)
    a, b = metrics(tmp_path / "straight"), metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-6)
        assert ra["val_error"] == rb["val_error"]
    wa, wb = weights(tmp_path / "straight"), weights(killed)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    # Re-running a finished run does not redo it.
    before = os.path.getmtime(killed / "result.json")
    subprocess.run(cmd + base_args(shards, tmp_path, "killed", *common), check=True, env=ENV, cwd=ROOT)
    assert os.path.getmtime(killed / "result.json") == before


def test_learns_and_logs_monotone_D_and_C(shards, tmp_path):
    result = train.main(base_args(shards, tmp_path, "learn", "--arch", "parseq", "--size", "T4", "--batch", "32", "--train-samples", "12800",
                                  "--eval-every", "3200", "--workers", "0", "--test", f"again={shards / 'val'}"))
    rows = metrics(tmp_path / "learn")
    assert len(rows) == 4 and rows[-1]["final"] and rows[-1]["tests"]["again"]["n"] == 100
    assert all(b["samples"] > a["samples"] and b["flops"] > a["flops"] for a, b in zip(rows, rows[1:]))
    config = json.load(open(tmp_path / "learn" / "config.json"))
    assert config["N"] == sum(p.numel() for p in modellib.build_model(modellib.ModelConfig(**config["model"])).parameters())
    # C counts each batch at its padded label length: below the max-length estimate, above the encoder alone.
    cfg = modellib.ModelConfig(**config["model"])
    assert modellib.train_flops_per_sample(cfg, dec_len=2) * rows[-1]["samples"] <= rows[-1]["flops"]
    assert rows[-1]["flops"] <= modellib.train_flops_per_sample(cfg, dec_len=4) * rows[-1]["samples"]
    assert result["val_error"] < 75 and rows[0]["val_error"] > 95, rows  # untrained: reads nothing, 100% error
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert (tmp_path / "learn" / "best.pt").exists()


def test_nan_losses_are_skipped_then_stop(shards, tmp_path, monkeypatch):
    real_build = modellib.build_model
    calls = {"n": 0}

    def build_with_nan(cfg, when):
        net = real_build(cfg)
        real_loss = net.loss

        def loss(images, tokens):  # counts training calls only; evaluation stays clean
            value, n = real_loss(images, tokens)
            if not net.training:
                return value, n
            calls["n"] += 1
            return (value * float("nan"), n) if when(calls["n"]) else (value, n)
        net.loss = loss
        net.forward = loss
        return net

    args = ["--batch", "16", "--train-samples", "160", "--eval-every", "80", "--workers", "0"]
    monkeypatch.setattr(modellib, "build_model", lambda cfg: build_with_nan(cfg, lambda i: i in (3, 4)))
    result = train.main(base_args(shards, tmp_path, "two-bad", *args))
    assert result["step"] == 10 and torch.load(tmp_path / "two-bad" / "last.pt", weights_only=False)["bad_steps"] == 2
    calls["n"] = 0
    monkeypatch.setattr(modellib, "build_model", lambda cfg: build_with_nan(cfg, lambda i: i > 7))
    with pytest.raises(SystemExit, match="non-finite"):
        train.main(base_args(shards, tmp_path, "goes-bad", *args))
    # The checkpoint from the last good eval (step 5) is intact; no result was written.
    assert torch.load(tmp_path / "goes-bad" / "last.pt", weights_only=False)["step"] == 5
    assert not (tmp_path / "goes-bad" / "result.json").exists()

    def build_with_nan_grads(cfg):  # a finite loss whose gradients are NaN: skipped too, never applied
        net = real_build(cfg)
        net.encoder.pos.register_hook(lambda g: g * float("nan"))
        return net
    monkeypatch.setattr(modellib, "build_model", build_with_nan_grads)
    with pytest.raises(SystemExit, match="non-finite losses or gradients"):
        train.main(base_args(shards, tmp_path, "bad-grads", *args))
    assert not (tmp_path / "bad-grads" / "last.pt").exists()  # no eval was reached, so nothing was saved


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
    with pytest.raises(SystemExit, match="holds only"):
        train.main(base_args(shards, tmp_path, "typo", "--samples", "5000"))
    assert not (tmp_path / "typo").exists()
