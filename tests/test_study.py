"""bench/study.py's bookkeeping (the grid itself runs for hours: `make study`)."""


def row(method, target, wbits, acc, bits=None, recipe="mixq", seed=0):
    return {"method": method, "target_bits": target, "weight_bits": wbits, "recipe": recipe, "seed": seed,
            "accuracy": acc, "avg_bits": bits if bits is not None else (target or wbits - 1)}


def test_the_grid_has_the_issues_rows_with_unique_run_names(study):
    names = {study.row_name(*spec, seed=0) for spec in study.GRID}
    assert len(names) == len(study.GRID) == 6 + 5 + 4 + 1
    assert "csq-t3-s0" in names and "ste-uniform-w4-s0" in names and "csq-paper-t3-s0" in names
    # every row once; after the first comparisons, the rows outside the CSQ family come first
    assert sorted(study.RUN_ORDER, key=str) == sorted(study.GRID, key=str)
    rest = study.RUN_ORDER[len(study.FIRST):]
    family = [spec[0].startswith("csq") for spec in rest]
    assert family == sorted(family) and any(family) and not all(family)


def test_close_pairs_get_a_second_seed_and_targets_are_checked(study):
    rows = [row("csq", 3, None, 70.0), row("ste-uniform", None, 4, 70.5), row("bsq", 3, None, 75.0),
            row("csq", 2, None, 71.5, bits=1.8)]
    again = study.second_seeds(rows)
    assert study.CSQ3 in again and ("ste-uniform", None, 4, "mixq") in again
    assert ("bsq", 3, None, "mixq") not in again and ("csq", 2, None, "mixq") not in again
    lines = "\n".join(study.checks(rows + [row("csq", 3, None, 72.0, seed=1)]))
    assert "csq T2 lands within 0.1 of the target: MISSED (1.80 bits)" in lines
    assert "ste-uniform W4 (same storage) minus 2: met (71.00 vs 70.50)" in lines     # mean over seeds
    assert "bsq T3 minus 1: MISSED (71.00 vs 75.00)" in lines
    assert "rises with the target within noise (1.0 point): met" in lines


def test_results_are_written_atomically_and_a_full_disk_is_one_line(study, tmp_path, monkeypatch):
    import argparse
    import json

    import pytest

    rows = [{**row("csq", 3, None, 70.0), "act_bits": 8, "relaxed_accuracy": 70.1, "int_accuracy": 70.0,
             "bit_exact": True, "paper_comp": 32 / 3, "storage_bits": 3.9},
            {**row("ste-uniform", None, 4, 71.0), "act_bits": 8, "relaxed_accuracy": None, "int_accuracy": 71.0,
             "bit_exact": True, "paper_comp": 32 / 3, "storage_bits": 4.0}]
    monkeypatch.setattr(study, "machine", lambda: "a test machine")     # (bench/machine.py: run as a script)
    args = argparse.Namespace(out=tmp_path / "docs", epochs=20, train_images=20000, act_bits=8, batch_size=128)
    study.write(rows, args)
    assert sorted(p.name for p in args.out.iterdir()) == ["study.json", "study.md", "study.png"]
    assert [r["method"] for r in json.loads((args.out / "study.json").read_text())["rows"]] == ["ste-uniform", "csq"]
    assert "| csq | mixq | 3 |" in (args.out / "study.md").read_text()
    assert json.loads((args.out / "study.json").read_text())["machine"] == "a test machine"    # no row names one
    # rows trained on two machines: each row names its own, the file lists both
    two = [{**rows[0], "machine": "AMD EPYC, 2 cores, no GPU"}, {**rows[1], "machine": "Intel Xeon, 2 cores, no GPU"}]
    study.write(two, args)
    assert json.loads((args.out / "study.json").read_text())["machine"] == \
        "Intel Xeon, 2 cores, no GPU; AMD EPYC, 2 cores, no GPU"
    assert "| 3.90 | AMD EPYC |" in (args.out / "study.md").read_text()

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(study.fsio, "is_disk_full", lambda e, where: True)
    monkeypatch.setattr("pathlib.Path.write_text", full)
    with pytest.raises(study.StudyError, match="no space left on device writing .*study.json"):
        study.write(rows, args)
    assert sorted(p.name for p in args.out.iterdir()) == ["study.json", "study.md", "study.png"]     # no temp left


def test_rows_recorded_with_the_same_settings_are_kept_when_their_run_directory_is_gone(study, tmp_path, monkeypatch):
    import json
    import sys

    docs, data = tmp_path / "docs", tmp_path / "cifar10.tar.gz"
    docs.mkdir()
    data.write_bytes(b"")
    old = {**row("csq", 3, None, 70.0), "run": "csq-t3-s0"}
    meta = {"epochs": 20, "train_images": 20000, "batch_size": 128, "act_bits": 8, "machine": "then's CPU",
            "rows": [old]}
    (docs / "study.json").write_text(json.dumps(meta))
    trained, written = [], []
    monkeypatch.setattr(study, "do_row", lambda spec, seed, args: trained.append((spec, seed)) or row(*spec[:3], 60.0))
    monkeypatch.setattr(study, "write", lambda rows, args: written.append(list(rows)))
    argv = ["study.py", "--data", str(data), "--runs", str(tmp_path / "runs"), "--out", str(docs)]
    monkeypatch.setattr(sys, "argv", argv)
    study.main()
    assert (study.CSQ3, 0) not in trained and len([t for t in trained if t[1] == 0]) == len(study.GRID) - 1
    assert {**old, "machine": "then's CPU"} in written[-1]      # the file's machine when it was written
    # other settings: the recorded row is not theirs, every row is trained
    trained.clear()
    monkeypatch.setattr(sys, "argv", argv + ["--epochs", "30"])
    study.main()
    assert (study.CSQ3, 0) in trained
