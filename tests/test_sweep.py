"""`mixq sweep` (mixq/sweep.py): a small grid on digits trained, frozen and deployed into one
table, plot and JSON; resumed after a kill without retraining what was finished; its options
refused in one line before anything trains."""
import json
import shutil

import pytest

from mixq import cli

GRID = ["--methods", "csq,bsq", "--budgets", "size=18,24", "--epochs", "3", "--train-subset", "300",
        "--test-subset", "90"]
RUNS = ["ste-uniform-w8a8", "ste-uniform-w8a32", "csq-size18", "bsq-size18", "csq-size24", "bsq-size24"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "grid"
    assert cli.main(["sweep", *GRID, "--out", str(out)]) == 0
    return out


def test_the_grid_is_trained_deployed_and_tabled_with_its_references(swept, capsys):
    assert sorted(p.name for p in swept.iterdir() if p.is_dir()) == sorted(RUNS)
    result = json.loads((swept / "sweep.json").read_text())
    assert result["runs_planned"] == result["runs_done"] == 6
    assert "mixq sweep --model digits-cnn --dataset digits --methods csq,bsq --budgets size=18,24" in result["command"]
    rows = {r["run"]: r for r in result["runs"]}
    for name in RUNS[2:]:
        r = rows[name]
        metrics = json.loads((swept / name / "metrics.json").read_text())
        assert r["role"] == "grid" and r["status"] == "done" and r["accuracy"] == metrics["accuracy"]
        assert r["target"] == metrics["budget"] == f"size={name[-2:]}"
        assert metrics["weight_kib"] <= int(name[-2:]) and metrics["train_images"] == 300
        assert [d["bit_exact"] for d in r["deployments"]] == [True]
        report = json.loads((swept / name / "build-host/report.json").read_text())
        assert report["images_checked"] == 90
        assert (swept / name / "sensitivity.json").exists()         # every mixed run's sensitivity
    # the references: uniform 8-bit deployed, the float one (float activations) trained only
    assert rows["ste-uniform-w8a8"]["deployments"] and rows["ste-uniform-w8a8"]["act_bits"] == 8
    assert rows["ste-uniform-w8a32"]["act_bits"] == 32 and not (swept / "ste-uniform-w8a32/frozen").exists()
    assert not (swept / "ste-uniform-w8a8/sensitivity.json").exists()
    # the Pareto front: exactly the shipped runs nothing beats in both size and accuracy
    shipped = [r for r in result["runs"] if r["run"] != "ste-uniform-w8a32"]
    for r in shipped:
        beaten = any(o["weight_kib"] <= r["weight_kib"] and o["accuracy"] >= r["accuracy"]
                     and (o["weight_kib"], o["accuracy"]) != (r["weight_kib"], r["accuracy"]) for o in shipped)
        assert r["front"] == (not beaten)
    md = (swept / "sweep.md").read_text()
    assert "| method | budget | weights KiB | avg bits | storage bits | GBOPs | accuracy % | integer % | bit-exact | Pareto |" in md
    grid_lines = [line for line in md.splitlines() if line.startswith(("| csq |", "| bsq |"))]
    assert [line.split(" | ")[1] for line in grid_lines] == ["size=18", "size=24", "size=18", "size=24"]
    assert all(" | yes | " in line for line in grid_lines)
    assert "| uniform 8-bit (W8A8) | ste-uniform-w8a8 |" in md and "| float (8-bit weights, float activations) |" in md
    assert (swept / "sweep.png").stat().st_size > 20_000


def test_a_killed_sweep_resumes_without_retraining_finished_runs(swept, monkeypatch, capsys):
    out = swept
    before = {n: json.loads((out / n / "metrics.json").read_text()) for n in RUNS}
    mtimes = {n: (out / n / "checkpoint.pt").stat().st_mtime_ns for n in RUNS}
    # csq-size18 is killed in its second epoch (below); csq-size24 was killed while freezing
    # (a half-written temporary beside no frozen model), bsq-size24 while deploying (no
    # report), bsq-size18 between its metrics and its sensitivity
    shutil.rmtree(out / "csq-size18")
    shutil.rmtree(out / "csq-size24/frozen")
    shutil.rmtree(out / "csq-size24/build-host")
    (out / "csq-size24/.frozen.tmp-half").mkdir()
    (out / "bsq-size24/build-host/report.json").unlink()
    (out / "bsq-size18/sensitivity.json").unlink()

    from mixq.train import loop
    train_epoch = loop.train_epoch

    def killed(forward, method, loader, opts, scheds, cfg, epoch, *args, **kwargs):
        if cfg.method == "csq" and cfg.budget == "size=18" and epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(forward, method, loader, opts, scheds, cfg, epoch, *args, **kwargs)
    monkeypatch.setattr(loop, "train_epoch", killed)
    assert cli.main(["sweep", *GRID, "--out", str(out)]) == 130
    assert (out / "csq-size18/checkpoint.pt").exists() and not (out / "csq-size18/metrics.json").exists()
    monkeypatch.setattr(loop, "train_epoch", train_epoch)

    capsys.readouterr()
    assert cli.main(["sweep", *GRID, "--out", str(out)]) == 0
    log = capsys.readouterr().out
    steps = lambda name: [line.split(": ", 1)[1] for line in log.splitlines() if line.startswith("sweep [") and f"] {name}: " in line]
    for name in ("ste-uniform-w8a8", "csq-size24", "bsq-size24", "bsq-size18"):
        assert steps(name)[0] == "trained (kept)"
        assert (out / name / "checkpoint.pt").stat().st_mtime_ns == mtimes[name]        # not retrained
        assert json.loads((out / name / "metrics.json").read_text()) == before[name]
    assert steps("ste-uniform-w8a32") == ["trained (kept)"]
    assert steps("csq-size18")[:1] == ["training, resumed from its checkpoint"]
    assert steps("csq-size24")[1:4] == ["freezing", "compiling", "deploying"]
    assert not (out / "csq-size24/.frozen.tmp-half").exists()
    assert steps("bsq-size24")[1] == "deploying" and steps("bsq-size24")[2].startswith("bit-exact on 90 images")
    assert steps("bsq-size18")[1:] == ["sensitivity", "deployed (kept)"]
    # the resumed run ends where the uninterrupted one did (a resume repeats the epochs exactly)
    resumed = json.loads((out / "csq-size18/metrics.json").read_text())
    for key in ("accuracy", "int_accuracy", "avg_bits", "weight_kib", "layers"):
        assert resumed[key] == before["csq-size18"][key]
    assert json.loads((out / "sweep.json").read_text())["runs_done"] == 6


@pytest.mark.parametrize("argv, message", [
    (["--methods", "csq,nosuch"], "--methods nosuch: unknown method (the mixed ones: csq, bsq, clado"),
    (["--methods", "csq,ste-uniform"], "--methods ste-uniform: not a mixed-precision method"),
    (["--methods", ","], "--methods ',': name at least one of csq, bsq, clado"),
    (["--budgets", "size=abc"], "--budgets size=abc: 'abc' is not a number"),
    (["--budgets", "weight=3"], "--budgets weight=3: expected bits=T, size=KIB or bops=G"),
    (["--budgets", "size="], "--budgets size=: expected MEASURE=V[,V...]"),
    (["--budgets", "size=20,12"], "--budgets size=12: below what 1 bit in every layer needs (15.98 KiB) (--method csq)"),
    (["--budgets", "bits=9"], "--budgets bits=9: mean precision must be in (0, 8]"),
    (["--methods", "clado", "--epochs", "1"], "--method clado needs >= 1 search and >= 1 finetune epoch"),
])
def test_bad_methods_and_budgets_are_one_line_before_anything_trains(argv, message, cli_error, tmp_path):
    args = {"--methods": "csq", "--budgets": "size=20"}
    for flag, value in zip(argv[::2], argv[1::2]):
        args[flag] = value
    err = cli_error(["sweep", *[x for kv in args.items() for x in kv], "--out", str(tmp_path / "s")])
    assert message in err
    assert not (tmp_path / "s").exists()


def test_a_run_directory_of_another_configuration_is_refused(swept, cli_error):
    grid = [x if x != "3" else "4" for x in GRID]                    # --epochs 4
    err = cli_error(["sweep", *grid, "--out", str(swept)])
    assert f"{swept / 'ste-uniform-w8a8'}: a run of another configuration (epochs: run has 3, now 4)" in err
