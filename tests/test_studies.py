"""ocrscale.py demo --study: the shapes task's labels, the runs each study trains, and --study all --quick end to end."""
import io
import json
import os
import re
import tarfile

import numpy as np
from PIL import Image
from scipy import ndimage

import data
import ocrscale


def test_shapes_labels_count_the_shapes(tmp_path):
    ocrscale.render_shapes(str(tmp_path), 40, seed=3)
    shard = os.path.join(tmp_path, json.load(open(tmp_path / "index.json"))["shards"].popitem()[0])
    labels, samples = set(), {}
    with tarfile.open(shard) as tf:  # read with the standard library, not our reader
        for m in tf.getmembers():
            key, ext = m.name.split(".")
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    for files in samples.values():
        img = np.asarray(Image.open(io.BytesIO(files["png"])).convert("RGB")).astype(int)
        background = img[0, -1]  # the last column band never holds a shape
        blobs = ndimage.label((img != background).any(-1), structure=np.ones((3, 3)))[1]
        assert str(blobs) == files["txt"].decode()
        labels.add(blobs)
    assert len(samples) == 40
    assert labels == set(range(1, 7))


def test_study_runs_share_budget_and_init_from_their_own_pretraining(tmp_path):
    out = str(tmp_path / "runs")
    cfg = dict(ocrscale.STUDY, seeds=[0, 1])
    first, second = ocrscale.study_runs("parseq", out, cfg, "D", ["mix", "pretrain"])
    argv = {name: a for name, _, a in first + second}
    arms = ["real", "synth", "mix1", "mix3", "mix10", "shapes"]
    assert sorted(n for n, _, _ in first) == sorted(f"parseq-{a}-s{s}" for a in arms for s in (0, 1))
    assert sorted(n for n, _, _ in second) == sorted(f"parseq-ft-{p}-s{s}" for p in ("synth", "shapes") for s in (0, 1))
    for name, a in argv.items():  # one size, one budget, one test set for every arm
        assert a[a.index("--size") + 1] == cfg["size"]
        assert a[a.index("--train-samples") + 1] == str(cfg["train_samples"])
        assert a[a.index("--test") + 1] == "real=" + os.path.join("D", "real-test")
        assert a[a.index("--seed") + 1] == name[-1]
    trains = lambda a: [a[i + 1] for i, x in enumerate(a) if x == "--train"]
    assert trains(argv["parseq-mix3-s1"]) == [os.path.join("D", "train") + ":3", os.path.join("D", "real-train") + ":1"]
    assert trains(argv["parseq-synth-s0"]) == [os.path.join("D", "train")]
    for pre in ("synth", "shapes"):
        a = argv[f"parseq-ft-{pre}-s1"]
        assert trains(a) == [os.path.join("D", "real-train")] and trains(a) == trains(argv["parseq-real-s1"])
        assert a[a.index("--init") + 1] == os.path.join(out, f"parseq-{pre}-s1", "best.pt")
    only_mix = ocrscale.study_runs("parseq", out, cfg, "D", ["mix"])
    assert not only_mix[1] and not any("shapes" in n for n, _, _ in only_mix[0])


def table_rows(report, heading):
    """{first cell: [other cells]} of the markdown table under `heading`."""
    section = report.split(heading, 1)[1].split("\n## ", 1)[0]
    return {cells[0]: cells[1:] for line in section.splitlines() if line.startswith("| ") and "---" not in line
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_quick_study_all_writes_one_report_with_every_finding(tmp_path):
    out, data_dir = tmp_path / "runs", tmp_path / "data"
    assert ocrscale.main(["demo", "--study", "all", "--quick", "--out", str(out), "--data", str(data_dir)]) == 0
    report = (out / "REPORT.md").read_text()
    cfg = ocrscale.QUICK_STUDY
    findings = [line for line in report.splitlines() if line.startswith("- ")]
    assert [f.split(": ")[0] for f in findings] == ["- The N law", "- The D law", "- The synthetic:real mix", "- Pretraining"]
    assert all(re.search(r"the miniature (reproduced|did not reproduce) the study's direction", f) for f in findings[2:])
    for heading in ("## The N, D and C laws", "## The synthetic:real mix", "## Pretraining, then fine-tuning on real"):
        assert heading in report
    # The ladders train in laws/, the other runs in studies/; the plots are linked from the top folder.
    assert (out / "laws" / "parseq-N-T1-s0" / "result.json").exists() and "](laws/fit_C.png)" in report
    assert "](studies/mix.png)" in report and report.count("\n# ") == 0  # one title, the sections under it
    assert (out / "laws" / "fit_C.png").exists() and (out / "studies" / "mix.png").exists()

    def error(arm):  # the table's number, read independently from the run's result.json
        return f"{json.loads((out / 'studies' / f'parseq-{arm}-s0' / 'result.json').read_text())['tests']['real']['error']:.1f}"
    mix = table_rows(report, "## The synthetic:real mix")
    assert list(mix)[1:] == ["0 (real only)", "1:1", "3:1", "10:1", "synthetic only"]
    for label, arm in zip(list(mix)[1:], ["real", "mix1", "mix3", "mix10", "synth"]):
        assert mix[label] == [error(arm), error(arm)]
    pre = table_rows(report, "## Pretraining")
    assert {k: v for k, v in list(pre.items())[1:]} == {
        "from scratch": ["none", "real-style", error("real"), error("real")],
        "synthetic, then real": ["synthetic", "real-style", error("ft-synth"), error("ft-synth")],
        "unrelated, then real": ["counting shapes", "real-style", error("ft-shapes"), error("ft-shapes")],
        "synthetic, not fine-tuned": ["synthetic", "none", error("synth"), error("synth")],
        "unrelated, not fine-tuned": ["counting shapes", "none", error("shapes"), error("shapes")]}
    for pre_arm in ("synth", "shapes"):
        config = json.loads((out / "studies" / f"parseq-ft-{pre_arm}-s0" / "config.json").read_text())
        assert config["init"] == str(out / "studies" / f"parseq-{pre_arm}-s0" / "best.pt")
        scratch = json.loads((out / "studies" / "parseq-real-s0" / "config.json").read_text())
        assert config["train_samples"] == scratch["train_samples"] >= 0.95 * cfg["train_samples"]
