"""bench_train.py --dry-run: the --gpu code path on the CPU (tiny sizes), checked against independent arithmetic."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bench_train  # noqa: E402
import data  # noqa: E402
import model as modellib  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
LABEL_LEN = 4  # every rendered word has 4 characters, so every batch is padded to the same length


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bench_train.py"), "--dry-run", "--out", str(out),
                           "--label-len", f"{LABEL_LEN},{LABEL_LEN}", "--budget", "600"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(out / "bench_train.json") as f:
        return json.load(f), proc.stdout


def table_rows(markdown, first_cell):
    """Cells of the Markdown table whose header starts with first_cell: (header, rows)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [c.strip() for c in lines[start].strip("|").split("|")], rows


def test_training_table_rows_and_columns(dry_run):
    result, stdout = dry_run
    assert result["table_md"] in stdout  # printed, ready to paste
    header, rows = table_rows(result["table_md"], "model")
    assert header == bench_train.TRAIN_COLUMNS
    assert all(len(r) == len(header) for r in rows)
    # the dry run drops --compile, so the four models appear once each, in eager mode
    assert [(r[0], r[2]) for r in rows] == [("PARSeq-T1", "no"), ("TrOCR-T1", "no"), ("PARSeq-T2", "no"), ("TrOCR-T2", "no")]
    assert [t["model"] for t in result["train"]] == [r[0] for r in rows]


def test_training_numbers_positive_and_mfu_independent(dry_run):
    result, _ = dry_run
    vocab = data.CharTokenizer(data.CHARSET36).vocab_size
    for t in result["train"]:
        assert t["note"] == "", t
        assert t["samples_per_s"] > 0 and t["peak_mem_gb"] > 0 and 0 <= t["data_wait"] < 1
        assert t["recompiles"] == 0 and t["graph_breaks"] == 0 and t["first_window_s"] > 0 and t["windows"] >= 3
        cfg = modellib.make_config(t["arch"], t["size"], vocab)
        assert t["N"] == modellib.count_params(cfg)[0]
        # FLOPs per sample from the model's formula at the padded label length (train.py may pad to max_len)
        expected = {modellib.train_flops_per_sample(cfg, dec_len=L) for L in (LABEL_LEN, cfg.max_len)}
        assert min(abs(t["flops_per_sample"] / e - 1) for e in expected) < 1e-9
        assert t["mfu"] == pytest.approx(t["samples_per_s"] * t["flops_per_sample"] / result["peak_flops"], rel=1e-9)
        assert 0 < t["mfu"] < 1


def test_decoding_rows(dry_run):
    result, _ = dry_run
    header, rows = table_rows(result["table_md"], "model | decoding")
    assert header == ["model", "decoding", "batch", "images/s", "ms/batch"]
    assert [(d["model"], d["mode"]) for d in result["decode"]] == [
        ("PARSeq-T1", "greedy AR"), ("PARSeq-T1", "NAR + 1 refine"), ("TrOCR-T1", "greedy"), ("TrOCR-T1", "beam 5")]
    assert len(rows) == 4
    for d in result["decode"]:
        cfg = modellib.make_config(d["model"].split("-")[0].lower(), "T1", data.CharTokenizer(data.CHARSET36).vocab_size)
        assert d["steps"] == cfg.max_len + 1  # EOS suppressed: the worst case, every step decoded
        assert d["images_per_s"] == pytest.approx(d["batch"] / (d["ms_per_batch"] / 1e3), rel=1e-9)


def test_kill_resume_and_torchrun(dry_run):
    result, _ = dry_run
    r = result["resume"]
    assert r["note"] == "" and r["continues"], r
    assert 0 < r["killed_at_step"] < r["steps"] and r["rows_compared"] >= 1
    assert r["train_loss_rel_diff"] <= 1e-4 and r["val_loss_rel_diff"] <= 1e-4  # fp32 on the CPU: exact resume
    d = result["ddp"]
    assert d["ok"] and d["world_size"] == 2 and d["backend"] == "gloo" and d["samples_per_s"] > 0, d


def test_window_numbers_pick_the_median_steady_window():
    rows = [dict(samples=100, flops=1000.0, samples_per_s=10.0, data_wait=0.5, mfu=None),   # compilation
            dict(samples=200, flops=2000.0, samples_per_s=40.0, data_wait=0.1, mfu=None),
            dict(samples=300, flops=3500.0, samples_per_s=30.0, data_wait=0.2, mfu=None),
            dict(samples=400, flops=4500.0, samples_per_s=50.0, data_wait=0.3, mfu=None)]
    bench = bench_train.Bench.__new__(bench_train.Bench)
    bench.result = dict(peak_flops=1000.0)
    w = bench.window_numbers(rows, "enough", None)
    assert w["samples_per_s"] == 40.0 and w["data_wait"] == 0.1 and w["flops_per_sample"] == 10.0
    assert w["mfu"] == pytest.approx(40.0 * 10.0 / 1000.0) and w["first_window_s"] == 10.0 and w["windows"] == 4


def test_gpu_without_cuda_is_a_one_line_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bench_train.py"), "--gpu"], capture_output=True,
                          text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 1 and "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_error_line_prefers_the_root_cause(tmp_path):
    log = tmp_path / "ddp.log"
    log.write_text("starting\ntorch.distributed.DistBackendError: NCCL error in: ProcessGroupNCCL.cpp\n"
                   "Duplicate GPU detected : rank 1 and rank 0 both on CUDA device 1d000\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n")
    assert bench_train.error_line(str(log)).endswith("ChildFailedError:")
    assert bench_train.error_line(str(log), r"Duplicate GPU").startswith("Duplicate GPU detected")
    bench = bench_train.Bench.__new__(bench_train.Bench)
    bench.result = dict(peak_flops=1.0)
    rows = [dict(samples=10, flops=10.0, samples_per_s=5.0, data_wait=0.0, mfu=None)]
    assert bench.window_numbers(rows, "exit 1", str(log))["note"] == (
        "only the first window (includes compilation); exit 1: torch.distributed.elastic.multiprocessing.errors.ChildFailedError:")


def test_out_of_budget_parts_are_skipped_and_saved(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "bench_train.py"), "--dry-run", "--out", str(tmp_path),
                           "--budget", "1", "--images", "100", "--only", "train,resume"],
                          capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "bench_train.json") as f:
        result = json.load(f)
    assert len(result["train"]) == 4 and all(t["note"] == "skipped: out of time budget" for t in result["train"])
    assert result["resume"]["note"] == "skipped: out of time budget" and result["decode"] == [] and result["ddp"] is None
    assert (tmp_path / "bench_train.md").read_text().count("skipped: out of time budget") == 5
