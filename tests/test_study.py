"""bench/study.py's bookkeeping (the grid itself runs for hours: `make study`)."""


def row(method, target, wbits, acc, bits=None, recipe="mixq", seed=0):
    return {"method": method, "target_bits": target, "weight_bits": wbits, "recipe": recipe, "seed": seed,
            "accuracy": acc, "avg_bits": bits if bits is not None else (target or wbits - 1)}


def test_the_grid_has_the_issues_rows_with_unique_run_names(study):
    names = {study.row_name(*spec, seed=0) for spec in study.GRID}
    assert len(names) == len(study.GRID) == 6 + 5 + 4 + 1
    assert "csq-t3-s0" in names and "ste-uniform-w4-s0" in names and "csq-paper-t3-s0" in names


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
