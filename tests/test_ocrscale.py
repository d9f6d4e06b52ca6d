"""ocrscale.py end to end: a demo killed and resumed whose report fits are recomputed from its own run folders by
fit.py, the demo lock, one-line CLI errors, the sweep's GPU-hours from model.py's FLOPs at its --charset, its refusals
(--samples above the data, recipes that do not split) and its script going on past a failed run, `read` on rendered words."""
import dataclasses
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import data
import fit
import model as modellib
import ocrscale
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Smaller than --quick: 3 sizes x 3 D caps of PARSeq-T1..T3 on 1,000 images, so a kill and a resume fit in the budget.
TINY = dict(n_train=1_000, n_val=100, n_test=100, n_sizes=["T1", "T2", "T3"], n_train_samples=640, d_size="T1",
            d_values=[250, 500, 1_000], d_train_samples=640, seeds=[0], metric="loss")


def start_demo(argv, stderr=subprocess.DEVNULL):
    """The demo with the TINY ladder in its own process group (its training processes run in sessions of their own)."""
    code = ("import json, sys, ocrscale; ocrscale.QUICK.update(json.loads(sys.argv[1])); "
            "sys.exit(ocrscale.main(sys.argv[2:]))")
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(TINY), *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, start_new_session=True)


def axis_line(table, axis):
    return next(line for line in table.splitlines() if line.startswith(f"{axis} "))


def fit_cli(folders, capsys):
    capsys.readouterr()
    fit.main([*folders, "--metric", "loss"])
    return capsys.readouterr().out


def test_demo_stopped_then_resumed_reports_fits_of_exactly_its_runs(tmp_path, monkeypatch, capsys):
    out, data_dir = tmp_path / "runs", tmp_path / "data"
    argv = ["demo", "--quick", "--out", str(out), "--data", str(data_dir), "--jobs", "2"]
    # Half-written splits as a killed render leaves them: a partial sibling, and an old in-place split with no index.
    (data_dir / "val.partial").mkdir(parents=True)
    (data_dir / "val.partial" / "shard-000000.tar.tmp").write_bytes(b"torn")
    (data_dir / "test").mkdir()
    (data_dir / "test" / "shard-000000.tar").write_bytes(b"torn")
    proc = start_demo(argv, stderr=open(tmp_path / "stderr", "w"))
    for line in proc.stdout:  # blocks until the demo prints; stopped once the first run has finished
        if line.startswith("[1/"):
            first = line.split(": ", 1)[1].split(":")[0]
            break
    else:
        pytest.fail(f"the demo ended (exit {proc.wait()}) before finishing a run")
    proc.terminate()  # SIGTERM to the demo alone: it stops its runs (each saves last.pt), then itself
    rest = proc.communicate(timeout=120)[0].splitlines()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in (tmp_path / "stderr").read_text()
    assert (tmp_path / "stderr").read_text().splitlines()[-1] == (
        "ocrscale.py demo: stopped by SIGTERM; the runs saved their last.pt: the same command resumes them")
    statuses = [line.split("] ", 1)[1].split(":")[0] for line in rest if line.startswith("[")]
    assert "STOPPED" in statuses and set(statuses) <= {"ok", "STOPPED"}, rest
    with open(out / ".ocrscale.lock") as lock:  # its training processes held the lock too: they ended before it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not (out / "REPORT.md").exists()
    finished_stamp = os.path.getmtime(out / first / "result.json")
    # A run from another call in the same --out: the report must not pool it.
    stray = out / "parseq-N-T1-s7"
    shutil.copytree(out / first, stray)
    rows = [json.loads(line) for line in (stray / "metrics.jsonl").read_text().splitlines()]
    (stray / "metrics.jsonl").write_text("".join(json.dumps({**r, "val_loss": r["val_loss"] * 3}) + "\n" for r in rows))
    config = json.loads((stray / "config.json").read_text())
    # a point of its own on the N ladder, whichever run finished first (a D run's cap would put it on another ladder,
    # and at a size already there the median of three runs could hide it)
    (stray / "config.json").write_text(json.dumps({**config, "name": stray.name, "seed": 7, "tag": "N", "size": "T1",
                                                   "N": 10 ** 6, "D": TINY["n_train"]}))

    monkeypatch.setitem(ocrscale.__dict__, "QUICK", TINY)
    assert ocrscale.main(argv) == 0
    for split, n in (("train", 1_000), ("val", 100), ("test", 100)):
        assert json.loads((data_dir / split / "index.json").read_text())["samples"] == n
    assert sorted(p.name for p in data_dir.iterdir()) == [".ocrscale.lock", "test", "train", "val"]
    assert os.path.getmtime(out / first / "result.json") == finished_stamp  # finished before the kill: not redone
    report = (out / "REPORT.md").read_text()
    assert re.findall(r"^- The ([ND]) law: ", report, re.M) == ["N", "D"]  # a sentence per law above the tables
    names = re.findall(r"^\| (parseq-[ND]-\S+) \|", report, re.M)
    assert sorted(names) == sorted([f"parseq-N-{s}-s0" for s in TINY["n_sizes"]] +
                                   [f"parseq-D-{d}-s0" for d in TINY["d_values"]])
    for name in names:
        result = json.loads((out / name / "result.json").read_text())
        assert result["samples"] >= 640 and f"| {name} | {result['N']:,} | {result['D']:,} |" in report
        if "-D-" in name:
            assert result["D"] == int(name.split("-")[2])
    # The laws in the report, recomputed by fit.py's own command line from the folders the tables list.
    folders = {axis: [str(out / n) for n in names if f"-{axis}-" in n] for axis in "ND"}
    for axis, paths in (("N", folders["N"]), ("D", folders["D"]), ("C", folders["N"] + folders["D"])):
        line = axis_line(fit_cli(paths, capsys), axis)
        assert "not fitted" not in line and line in report
    assert axis_line(fit_cli([str(out)], capsys), "N") not in report  # pooling the stray run would change E(N)


def test_second_demo_on_the_same_folders_is_refused_until_the_holder_dies(tmp_path, capsys):
    out, data_dir = tmp_path / "runs", tmp_path / "data"
    code = ("import sys, time, ocrscale; held = ocrscale.lock_folder(sys.argv[1]); print('locked', flush=True); "
            "time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(data_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(SystemExit) as e:
            ocrscale.main(["demo", "--quick", "--out", str(out), "--data", str(data_dir)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"pid {holder.pid}" in err and "--out/--data" in err
        assert not (data_dir / "train").exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    ocrscale.lock_folder(str(data_dir)).close()  # a dead holder does not keep the lock


def save_checkpoint(path, arch):
    """An untrained checkpoint as train.py saves one (weights, model_config, tokenizer spec)."""
    tok = data.CharTokenizer(data.CHARSET36)
    cfg = modellib.make_config(arch, "T1", tok.vocab_size)
    torch.save(dict(model=modellib.build_model(cfg).state_dict(), model_config=dataclasses.asdict(cfg),
                    tokenizer=tok.spec), path)


def test_a_last_pt_with_weight_averaging_loads_the_average(tmp_path):
    """train.py evaluates the --ema average once it exists; eval and read score the same weights."""
    tok = data.CharTokenizer(data.CHARSET36)
    cfg = modellib.make_config("parseq", "T1", tok.vocab_size)
    raw, average = modellib.build_model(cfg).state_dict(), modellib.build_model(cfg).state_dict()
    for ema, want in ((None, raw), (average, average)):
        torch.save(dict(model=raw, ema=ema, model_config=dataclasses.asdict(cfg), tokenizer=tok.spec),
                   tmp_path / "last.pt")
        net, _ = ocrscale.load_checkpoint(str(tmp_path / "last.pt"))
        assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())


class WritesFileWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("argv, flag, valid", [
    (["demo", "--seeds", "x"], "--seeds", "0,1,2"),
    (["demo", "--seeds", "0,0"], "--seeds", "distinct"),
    (["demo", "--jobs", "0"], "--jobs", "at least 1"),
    (["sweep", "--sizes", "Q"], "--sizes", "S,B,L,H"),
    (["sweep", "--sizes", "S, B"], "--sizes", "no spaces"),
    (["sweep", "--samples", "1x"], "--samples", "300k,1M"),
    (["sweep", "--samples", "1M,"], "--samples", "300k,1M"),
    (["sweep", "--samples", "1.5"], "--samples", "whole counts"),
    (["sweep", "--samples", "1k,1000"], "--samples", "distinct"),
    (["sweep", "--sizes", "S,S"], "--sizes", "distinct"),
    (["sweep", "--train", "{tmp}/train:0"], "--train", "positive number"),
    (["sweep", "--test", "foo"], "--test foo", "takes NAME=DIR"),
    (["sweep", "--samples", "100", "--epochs", "0.001"], "--epochs", "under one sample"),
    (["sweep", "--samples", "1k", "--out", "{tmp}/nope/sweep.sh"], "--out", "cannot write in"),
    (["sweep", "--samples", "1k", "--out", "{tmp}"], "--out", "a folder"),
    (["demo", "--out", "{tmp}/notes.txt"], "notes.txt", "cannot hold run or data folders there"),
    (["eval", "--ckpt", "{tmp}/parseq.pt", "--test", "x={tmp}", "--device", "cuda"], "--device", "no CUDA device"),
    (["sweep", "--gpus", "0"], "--gpus", "at least 1"),
    (["sweep", "--mfu", "40"], "--mfu", "from 0.01 to 1"),
    (["sweep", "--charset", "@{tmp}/nope.txt"], "--charset", "cannot read the charset file"),
    (["read", "--ckpt", "{tmp}/nope.pt", "{tmp}/a.png"], "--ckpt", "best.pt"),
    (["read", "--ckpt", "{tmp}/notes.txt", "{tmp}/a.png"], "--ckpt", "not a checkpoint"),
    (["read", "--ckpt", "{tmp}/tensor.pt", "{tmp}/a.png"], "--ckpt", "not a checkpoint"),
    (["read", "--ckpt", "{tmp}/payload.pt", "{tmp}/a.png"], "--ckpt", "not a checkpoint"),
    (["read", "--ckpt", "{tmp}/parseq.pt", "--beam", "3", "{tmp}/a.png"], "--beam", "trocr checkpoints only"),
    (["read", "--ckpt", "{tmp}/trocr.pt", "--refine-iters", "2", "{tmp}/a.png"], "--refine-iters", "parseq"),
])
def test_cli_mistakes_get_one_line_naming_the_argument_and_exit_2(tmp_path, capsys, argv, flag, valid):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save(WritesFileWhenUnpickled(str(tmp_path / "pwned")), tmp_path / "payload.pt")  # loading it runs open()
    data.render_word("cat", random.Random(0)).save(tmp_path / "a.png")
    save_checkpoint(tmp_path / "parseq.pt", "parseq")
    save_checkpoint(tmp_path / "trocr.pt", "trocr")
    with pytest.raises(SystemExit) as e:
        ocrscale.main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert flag in err and valid in err
    assert not (tmp_path / "pwned").exists()


def test_sweep_gpu_hours_match_model_flops_counted_separately(tmp_path, capsys):
    script = tmp_path / "sweep.sh"
    assert ocrscale.main(["sweep", "--arch", "trocr", "--sizes", "S,B", "--samples", "1M,300k", "--gpus", "8",
                          "--nodes", "2", "--epochs", "2", "--mfu", "0.5", "--test", "IC13=data/IC13", "--test",
                          "SVT=data/SVT", "--out", str(script)]) == 0
    text = script.read_text()
    notes = re.findall(r"^# N=([\d,]+) D=([\d,]+) FLOPs=(\S+) GPU-hours=(\S+)\n(torchrun .*)$", text, re.M)
    assert len(notes) == 4
    h100_bf16_peak = 989e12  # dense bf16 FLOP/s of an H100 SXM
    for n, d, flops, gpu_hours, command in notes:
        size = re.search(r"--size (\S+)", command).group(1)
        cfg = modellib.make_config("trocr", size, 97)  # 94 chars + EOS, BOS, PAD
        seen = 2 * int(d.replace(",", ""))
        assert f"--samples {d.replace(',', '')} --train-samples {seen} " in command
        assert int(n.replace(",", "")) == modellib.count_params(cfg)[0]
        expected = modellib.train_flops_per_sample(cfg) * seen
        assert float(flops) == pytest.approx(expected, rel=1e-3)
        assert float(gpu_hours) == pytest.approx(expected / (h100_bf16_peak * 0.5) / 3600, rel=1e-3)
        assert command.startswith("torchrun --nproc_per_node=8 --nnodes=2 ") and f"--rdzv-id=trocr-{size}-d" in command
        assert "--test IC13=data/IC13 --test SVT=data/SVT" in command
    assert "--metric test --holdout largest --plot runs/plots\n" in text  # fits the benchmarks' average
    assert "GPU-h" in capsys.readouterr().out


def sweep(argv, capsys):
    """(exit code, stdout, stderr) of `ocrscale.py sweep ARGV` as main returns or exits."""
    try:
        code = ocrscale.main(["sweep", *argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("spec, n_chars", [("36", 36), ("94", 94), ("@{tmp}/greek.txt", 5), ("xyz", 3)])
def test_sweep_counts_n_at_the_charset_and_passes_it_on(tmp_path, capsys, spec, n_chars):
    (tmp_path / "greek.txt").write_text("α\nβ\nγ\nδ\nε\n", encoding="utf-8")
    spec = spec.format(tmp=tmp_path)
    code, out, _ = sweep(["--sizes", "S,B", "--samples", "1k", "--charset", spec, "--out", str(tmp_path / "s.sh")], capsys)
    assert code == 0
    text = (tmp_path / "s.sh").read_text()
    for size in ("S", "B"):
        n = modellib.count_params(modellib.make_config("parseq", size, n_chars + 3))[0]  # + EOS, BOS, PAD
        assert re.search(rf"^\s+{size}\s+{n:,}\s", out, re.M)
        assert f"# N={n:,} D=1,000 " in text and f"--size {size} --charset {spec} " in text


def test_sweep_refuses_samples_above_the_train_data(tmp_path, capsys):
    data.synth(str(tmp_path / "a"), 40, seed=0, workers=1)
    data.synth(str(tmp_path / "b"), 30, seed=1, workers=1)
    capsys.readouterr()  # synth's progress bars
    script = tmp_path / "s.sh"
    for train_args, samples, asked, where, holds in (
            (["--train", str(tmp_path / "a")], "20,41", "41", "a", "40"),
            # 1:3 weights: 100 = 25 from a + 75 from b, which holds 30 (train.py splits D so)
            (["--train", f"{tmp_path / 'a'}:1", "--train", f"{tmp_path / 'b'}:3"], "40,100", "100", "b", "30")):
        code, out, err = sweep([*train_args, "--samples", samples, "--sizes", "S", "--out", str(script)], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert f"argument --samples: {asked} needs " in err and f"--train {tmp_path / where}" in err
        assert err.rstrip().endswith(f"which holds {holds}") and not script.exists()
    # all of it (a, alone) or each share within its source (40 = 10 from a + 30 from b): written
    for train_args, samples in ((["--train", str(tmp_path / "a")], "40"),
                                (["--train", f"{tmp_path / 'a'}:1", "--train", f"{tmp_path / 'b'}:3"], "40")):
        assert sweep([*train_args, "--samples", samples, "--sizes", "S", "--out", str(script)], capsys)[0] == 0
        assert script.exists()
        script.unlink()
    # data that cannot be counted: one line says so and the script is written
    for source in (str(tmp_path / "nowhere"), "https://example.com/shards"):
        code, _, err = sweep(["--train", source, "--samples", "1M", "--sizes", "S", "--out", str(script)], capsys)
        assert code == 0 and script.exists() and err.count("\n") == 1 and "--samples not checked" in err


def test_sweep_leaves_out_recipes_that_do_not_split_over_the_gpus(tmp_path, capsys):
    script = tmp_path / "s.sh"
    # 32 nodes x 8 = 256 processes: TrOCR-S's batch 1024 and B's 256 split, L's and H's 128 cannot
    code, out, err = sweep(["--arch", "trocr", "--sizes", "S,B,L,H", "--samples", "1k", "--gpus", "8", "--nodes", "32",
                            "--out", str(script)], capsys)
    refusals = [line for line in err.splitlines() if not line.startswith("note: --samples not checked")]
    assert code == 0 and len(refusals) == 1 and "256 GPUs" in refusals[0]
    assert refusals[0].startswith("refused trocr-L (batch 128), trocr-H (batch 128): ")
    assert re.findall(r"--name (\S+)", script.read_text()) == ["trocr-S-d1000", "trocr-B-d1000"]
    assert re.findall(r"^\s+([SBLH]) ", out, re.M) == ["S", "B"]
    code, _, err = sweep(["--sizes", "S,B", "--gpus", "3", "--out", str(script) + "2"], capsys)  # 1024 % 3 != 0
    assert code == 2 and err.count("\n") == 1 and "no run to write" in err and not os.path.exists(str(script) + "2")


FAKE_TORCHRUN = """#!/usr/bin/env bash
# stands in for torchrun: logs the run's name and charset, fails the run named in $FAIL, else leaves a result.json
while [ $# -gt 0 ]; do case $1 in --name) name=$2;; --charset) charset=$2;; esac; shift; done
echo "train $name $charset" >> calls.log
[ "$name" = "$FAIL" ] && exit 3
mkdir -p "runs/$name" && echo {} > "runs/$name/result.json"
"""


def test_sweep_script_reports_a_failed_run_goes_on_and_names_it_at_the_end(tmp_path, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(FAKE_TORCHRUN)
    (bin_dir / "python").write_text('#!/usr/bin/env bash\necho "fit $*" >> calls.log\n')
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    charset = "a'b c$"  # quotes, a space and a dollar sign reach train.py as given (the space is dropped by it)
    assert ocrscale.main(["sweep", "--sizes", "S,B", "--samples", "1k,2k", "--charset", charset,
                          "--out", str(tmp_path / "sweep.sh")]) == 0
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAIL": "parseq-S-d2000"}
    proc = subprocess.run(["bash", str(tmp_path / "sweep.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    runs = ["parseq-S-d1000", "parseq-S-d2000", "parseq-B-d1000", "parseq-B-d2000"]
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[:4] == [f"train {r} {charset}" for r in runs]  # the runs after the failed one still ran
    assert calls[4].startswith("fit fit.py runs/ --where arch=parseq") and len(calls) == 5
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["sweep: parseq-S-d2000 failed (exit 3)",
                                        "sweep: not in the fit (no result.json): parseq-S-d2000"]
    proc = subprocess.run(["bash", str(tmp_path / "sweep.sh")], cwd=tmp_path, env={**env, "FAIL": ""},
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""


def test_read_recognises_rendered_words(tmp_path, capsys):
    words = ["cat", "dog", "sun", "42", "tree", "fish", "moon", "7up"]
    data.synth(str(tmp_path / "train"), 2000, seed=0, words=words, workers=1)
    data.synth(str(tmp_path / "val"), 64, seed=1, words=words, workers=1)
    train.main(["--arch", "parseq", "--size", "T3", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                "--train-samples", "6400", "--batch", "32", "--lr", "3e-3", "--eval-every", "6400",
                "--runs", str(tmp_path / "runs"), "--name", "reader", "--test", f"again={tmp_path / 'val'}", "--quiet"])
    rng, paths = random.Random(5), []
    for i, word in enumerate(words):  # new renderings, not the training images
        path = tmp_path / f"{i}.png"
        data.render_word(word, rng).save(path)
        paths.append(str(path))
    ckpt = str(tmp_path / "runs" / "reader" / "best.pt")
    results, _ = ocrscale.read_images(ckpt, paths, batch=3)  # three batches
    assert [text for _, text, _ in results] == words
    assert all(0 < conf <= 1 for _, _, conf in results)
    capsys.readouterr()  # drop train.py's summary line
    assert ocrscale.main(["read", "--ckpt", ckpt, "--json", "--refine-iters", "2", *paths[:2]]) == 0
    printed = json.loads(capsys.readouterr().out)["images"]
    assert [r["text"] for r in printed] == words[:2] and set(printed[0]) == {"image", "text", "confidence"}
    # a folder, a label file and an unreadable file: the good ones read, one line for the bad one, exit code 1
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "labels.tsv").write_text("".join(f"{i}.png\t{w if i else 'wrong'}\n" for i, w in enumerate(words)))
    assert ocrscale.main(["read", "--ckpt", ckpt, "--json", str(tmp_path / "labels.tsv"), str(tmp_path / "broken.png")]) == 1
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert [r["label"] for r in printed["images"]] == ["wrong"] + words[1:] and printed["n"] == len(words)
    assert printed["accuracy"] == pytest.approx(100 * (len(words) - 1) / len(words))
    assert err.splitlines() == [f"ocrscale.py read: cannot read {tmp_path / 'broken.png'} (not an image Pillow can "
                                "decode); skipped"]
    # labels scored as eval scores them: cleaned by the tokenizer's rules, one eval drops (empty once cleaned) is not
    (tmp_path / "mixed.tsv").write_text("0.png\tCAT\n1.png\tdög\n2.png\t@@\n2.png\n3.png\twrong\n")
    assert ocrscale.main(["read", "--ckpt", ckpt, str(tmp_path / "mixed.tsv")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == ("word accuracy 66.67%, 1-NED 66.67% on 3 labelled images "
                                                       "(1 labels not scored: empty or too long once cleaned, as eval "
                                                       "drops them)")
    assert ocrscale.main(["read", "--ckpt", ckpt, "--max-len", "2", str(tmp_path)]) == 1  # the folder holds broken.png
    texts = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    # decoding stops after --max-len tokens and the position meant for EOS: 'tree' -> 'tre'
    assert len(texts) == len(words) and max(map(len, texts)) == 3
    (tmp_path / "latin1.tsv").write_bytes("0.png\tcaté\n".encode("latin-1"))  # label files: data.py's reader
    with pytest.raises(SystemExit):
        ocrscale.main(["read", "--ckpt", ckpt, str(tmp_path / "latin1.tsv")])
    assert "latin1.tsv line 1: not utf-8" in capsys.readouterr().err
    assert ocrscale.main(["read", "--ckpt", ckpt, "--json", "--encoding", "latin-1", str(tmp_path / "latin1.tsv")]) == 0
    assert json.loads(capsys.readouterr().out)["images"][0]["label"] == "caté"
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        ocrscale.main(["read", "--ckpt", ckpt, str(tmp_path / "empty")])
    assert capsys.readouterr().err == f"ocrscale.py read: error: argument images: no image files in {tmp_path / 'empty'}\n"
    # eval scores a checkpoint as train.py scored it at the end of its run (the final weights are last.pt's)
    reported = json.load(open(tmp_path / "runs" / "reader" / "result.json"))["tests"]["again"]
    assert ocrscale.main(["eval", "--ckpt", str(tmp_path / "runs" / "reader" / "last.pt"), "--json", "--batch", "7",
                          "--test", f"again={tmp_path / 'val'}", "--test", f"twice={tmp_path / 'val'}"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["sets"]["again"]["n"] == reported["n"] == 64
    assert scored["sets"]["again"]["accuracy"] == pytest.approx(100 - reported["error"])
    assert scored["sets"]["again"]["ned"] == pytest.approx(reported["ned"])
    assert scored["weighted_accuracy"] == pytest.approx(scored["sets"]["twice"]["accuracy"])
    assert scored["sets"]["again"]["label_length"] == pytest.approx(sum(map(len, labels_of(tmp_path / "val"))) / 64)
    assert 0 < scored["sets"]["again"]["confidence"] <= 100 and scored["sets"]["again"]["drops"] == {}
    assert ocrscale.main(["eval", "--ckpt", ckpt, "--test", f"again={tmp_path / 'val'}", "--cased"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["set", "n", "accuracy", "1-NED", "confidence", "length", "drops"]
    assert table[1].split()[:2] == ["again", "64"] and table[-1].startswith("weighted (by n)")
    with pytest.raises(SystemExit):  # no sets: one usage line
        ocrscale.main(["eval", "--ckpt", ckpt])
    assert capsys.readouterr().err.strip() == "ocrscale.py eval: error: give --test NAME=DIR (any number) or --benchmarks DIR"
    bench = tmp_path / "bench"
    shutil.copytree(tmp_path / "val", bench / "SVT")
    assert ocrscale.main(["eval", "--ckpt", ckpt, "--benchmarks", str(bench), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["sets"]) == ["SVT"]
    for twice in (["--test", f"SVT={tmp_path / 'val'}", "--test", f"SVT={bench / 'SVT'}"],   # a set would replace one
                  ["--test", f"SVT={tmp_path / 'val'}", "--benchmarks", str(bench)]):
        with pytest.raises(SystemExit):
            ocrscale.main(["eval", "--ckpt", ckpt, *twice])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("a second set named SVT" in err or "SVT is also a set of --benchmarks" in err)


def labels_of(shard_dir):
    return [row[0] for path, _ in data.find_shards(str(shard_dir)) for row in data.shard_index(path)]


def test_counts_with_suffixes_are_whole_numbers_as_written():
    assert ocrscale.count_list("4.1M,8.2M,16.1k,2.5e6,300") == [4_100_000, 8_200_000, 16_100, 2_500_000, 300]


def test_the_demo_passes_one_stop_on_to_its_runs_and_a_second_kills_them(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    runner = ocrscale.Runner(1, ())
    runner.procs = {subprocess.Popen(["sleep", "30"])}
    runner.stop(signal.SIGINT, None)  # the first: SIGTERM to each run, so that it saves
    assert [p.wait(10) for p in runner.procs] == [-signal.SIGTERM] and runner.signal == signal.SIGINT and not exits
    runner.procs = {subprocess.Popen(["sleep", "30"])}
    runner.stop(signal.SIGINT, None)  # the second: killed, and the demo exits at once
    assert [p.wait(10) for p in runner.procs] == [-signal.SIGKILL] and exits == [128 + signal.SIGINT]
    assert capsys.readouterr().err == "ocrscale.py demo: a second SIGINT: runs killed without saving\n"
