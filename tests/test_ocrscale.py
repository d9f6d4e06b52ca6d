"""ocrscale.py: the quick demo end to end, the sweep planner's FLOPs, and `read` on rendered words."""
import json
import os
import random

import pytest

import data
import model as modellib
import ocrscale
import train


def test_quick_demo_writes_report_fit_and_plots_and_resumes(tmp_path):
    out, data_dir = tmp_path / "runs", tmp_path / "data"
    argv = ["demo", "--quick", "--out", str(out), "--data", str(data_dir), "--jobs", "2"]
    assert ocrscale.main(argv) == 0
    report = (out / "REPORT.md").read_text()
    cfg = ocrscale.QUICK
    names = [f"parseq-N-{s}-s0" for s in cfg["n_sizes"]] + [f"parseq-D-{d}-s0" for d in cfg["d_values"]]
    for name in names:
        result = json.loads((out / name / "result.json").read_text())
        assert result["samples"] >= 0.95 * (cfg["n_train_samples"] if "-N-" in name else cfg["d_train_samples"])
        assert f"| {name} | {result['N']:,} | {result['D']:,} |" in report
    d_runs = [json.loads((out / f"parseq-D-{d}-s0" / "result.json").read_text()) for d in cfg["d_values"]]
    assert [r["D"] for r in d_runs] == cfg["d_values"]
    assert "## Fitted laws" in report and "alpha" in report
    assert (out / "fit_C.png").exists() and "fit_C.png" in report
    # A re-run finds every run finished and trains nothing again.
    stamps = {n: os.path.getmtime(out / n / "result.json") for n in names}
    assert ocrscale.main(argv) == 0
    assert stamps == {n: os.path.getmtime(out / n / "result.json") for n in names}


def test_sweep_flops_agree_with_model_estimate(tmp_path, capsys):
    script = tmp_path / "sweep.sh"
    ocrscale.main(["sweep", "--arch", "trocr", "--sizes", "S,B", "--samples", "1M,300k", "--gpus", "8", "--nodes", "2",
                   "--epochs", "2", "--mfu", "0.5", "--out", str(script)])
    rows = ocrscale.plan_sweep("trocr", ["S", "B"], [1_000_000, 300_000], 8, 2, 0.5, "H100", 2)
    assert len(rows) == 4
    vocab = data.CharTokenizer(data.CHARSET94).vocab_size
    for r in rows:
        cfg = modellib.make_config("trocr", r["size"], vocab)
        assert r["flops"] == pytest.approx(modellib.train_flops_per_sample(cfg) * 2 * r["D"])
        assert r["gpu_hours"] == pytest.approx(r["flops"] / (train.PEAK_FLOPS["H100"] * 0.5) / 3600)
        assert r["wall_hours"] == pytest.approx(r["gpu_hours"] / 16)
    text = script.read_text()
    assert text.count("torchrun --nproc_per_node=8 --nnodes=2") == 4
    assert "--size B --charset 94 --samples 300000 --train-samples 600000" in text
    assert "--rdzv-id=trocr-B-d300000 " in text
    assert "GPU-hours" in capsys.readouterr().out


def test_read_recognises_rendered_words(tmp_path, capsys):
    words = ["cat", "dog", "sun", "42", "tree", "fish", "moon", "7up"]
    data.synth(str(tmp_path / "train"), 3000, seed=0, words=words, workers=1)
    data.synth(str(tmp_path / "val"), 64, seed=1, words=words, workers=1)
    train.main(["--arch", "parseq", "--size", "T4", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                "--train-samples", "12800", "--batch", "32", "--runs", str(tmp_path / "runs"), "--name", "reader",
                "--threads", "2", "--quiet"])
    rng, paths = random.Random(5), []
    for i, word in enumerate(words):  # new renderings, not the training images
        path = tmp_path / f"{i}.png"
        data.render_word(word, rng).save(path)
        paths.append(str(path))
    ckpt = str(tmp_path / "runs" / "reader" / "best.pt")
    results = ocrscale.read_images(ckpt, paths)
    assert [text for _, text, _ in results] == words
    assert all(0 < conf <= 1 for _, _, conf in results)
    capsys.readouterr()  # drop train.py's summary line
    ocrscale.main(["read", "--ckpt", ckpt, "--json", *paths[:2]])
    printed = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in printed] == words[:2] and set(printed[0]) == {"image", "text", "confidence"}
