"""``batch --shard K/N`` and the collecting pass: a deterministic split that covers every case
exactly once (odd counts included), per-shard tables in one shared output folder, and a pass
without --shard that gathers every finished case into results.csv without recomputing it."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from AnkleFractureLib.cli.main import main
from AnkleFractureLib.errors import InputError
from AnkleFractureLib.io import write_image
from AnkleFractureLib.phantom import generate_case
from AnkleFractureLib.pipeline.batch import BatchCase, discover_inputs, run_batch
from AnkleFractureLib.pipeline.shards import (parse_shard, read_shard_rows, select_shard,
                                              shard_csv_name)

torch.set_num_threads(1)


def read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def mtimes(folder: Path):
    """mtime of every file under ``folder`` but the batch tables."""
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and not p.name.endswith(".csv")}


# ------------------------------------------------------------------------------ the split
def test_parse_shard():
    assert parse_shard("1/2") == (1, 2) and parse_shard(" 10 / 10 ") == (10, 10)
    for bad in ("0/2", "3/2", "1/0", "1-2", "a/b", "1/2/3", ""):
        with pytest.raises(InputError):
            parse_shard(bad)
    assert shard_csv_name(None) == "results.csv"
    assert shard_csv_name((3, 12)) == "results.shard-3-of-12.csv"


@pytest.mark.parametrize("count", [1, 2, 7, 13])
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_shards_cover_every_case_exactly_once(count, parts):
    cases = [BatchCase(f"case_{k:02d}", Path(f"/data/case_{k:02d}.nii.gz"), "file")
             for k in range(count)]
    shards = [select_shard(cases, (k, parts)) for k in range(1, parts + 1)]
    ids = [c.id for s in shards for c in s]
    assert sorted(ids) == [c.id for c in cases]  # all of them, none twice
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # balanced (round robin)
    # Every machine gets the same shard whatever order the inputs were listed in.
    for k in range(1, parts + 1):
        again = select_shard(list(reversed(cases)), (k, parts))
        assert sorted(c.id for c in again) == sorted(c.id for c in shards[k - 1])
        assert [c.id for c in shards[k - 1]] == sorted(c.id for c in shards[k - 1])


def test_ids_never_clash_with_the_shard_tables(tmp_path):
    for name in ("results.shard-1-of-2.csv.nii.gz", "results.csv.nii.gz"):
        (tmp_path / name).write_bytes(b"x")
    ids = [c.id for c in discover_inputs([tmp_path])]
    assert ids == ["results.csv_2", "results.shard-1-of-2.csv_2"]
    with pytest.raises(InputError, match="cannot name an output folder"):
        run_batch([BatchCase("results.shard-1-of-2.csv", tmp_path / "x.nii.gz", "file")],
                  tmp_path / "out")


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_cls):
    """Three cases (odd): two copies of one phantom and a corrupt file, run as shards 1/2 and
    2/2 into one shared folder by the command line."""
    root = tmp_path_factory.mktemp("shard_in") / "scans"
    root.mkdir()
    write_image(generate_case(10, "B", "left", spacing="fast").ct, root / "ankle_a.nii.gz")
    shutil.copy(root / "ankle_a.nii.gz", root / "ankle_b.nii.gz")
    (root / "bad.nii.gz").write_text("this is not a CT scan\n" * 10)
    out = tmp_path_factory.mktemp("shard_out") / "results"
    common = ["--cls-model", str(tiny_cls), "--device", "cpu", "--tta", "0", "--quiet"]
    codes = [main(["batch", str(root), "--out", str(out), "--shard", f"{k}/2"] + common)
             for k in (1, 2)]
    return SimpleNamespace(root=root, out=out, common=common, codes=codes)


def test_shards_write_their_own_tables_into_one_folder(sharded, capsys):
    capsys.readouterr()
    assert sharded.codes == [0, 0]
    one = read_csv(sharded.out / "results.shard-1-of-2.csv")
    two = read_csv(sharded.out / "results.shard-2-of-2.csv")
    assert [r["id"] for r in one] == ["ankle_a", "bad"] and [r["id"] for r in two] == ["ankle_b"]
    assert [r["status"] for r in one + two] == ["ok", "error", "ok"]
    assert not (sharded.out / "results.csv").exists()  # no shard writes the whole table
    for cid in ("ankle_a", "ankle_b"):
        assert (sharded.out / cid / "result.json").is_file()
    assert set(read_shard_rows(sharded.out)) == {"ankle_a", "ankle_b", "bad"}


def test_collecting_recomputes_nothing(sharded, tmp_path, capsys):
    before = mtimes(sharded.out)
    capsys.readouterr()
    args = ["batch", str(sharded.root), "--out", str(sharded.out)] + sharded.common
    assert main(args + ["--collect"]) == 0
    stdout = capsys.readouterr().out
    assert "3 cases, 2 of them from a previous run: 2 classified, 0 refused, 1 failed" in stdout
    assert mtimes(sharded.out) == before  # nothing ran, not even the failed case
    rows = read_csv(sharded.out / "results.csv")
    shard_rows = read_shard_rows(sharded.out)
    assert [r["id"] for r in rows] == ["ankle_a", "ankle_b", "bad"]
    for r in rows:  # the shards' rows (seconds: the analysis time of result.json)
        assert {k: v for k, v in r.items() if k != "seconds"} == \
            {k: v for k, v in shard_rows[r["id"]].items() if k != "seconds"}
    # A plain run (no --collect) reuses the finished cases and retries only the failed one.
    progress = []
    summary = run_batch(discover_inputs([sharded.root], exclude=[sharded.out]), sharded.out,
                        _options(sharded), progress=lambda f, m: progress.append(m))
    assert summary.n_skipped == 2 and [r["status"] for r in summary.rows] == ["ok", "ok",
                                                                              "error"]
    after = mtimes(sharded.out)
    assert {k: v for k, v in after.items() if not k.startswith("bad/")} == \
        {k: v for k, v in before.items() if not k.startswith("bad/")}
    assert not any(m.startswith(("ankle_a (", "ankle_b (")) for m in progress)
    assert after["bad/error.txt"] != before["bad/error.txt"]  # the failed case ran again
    # A case no shard finished: --collect says so instead of running it.
    partial = tmp_path / "partial"
    shutil.copytree(sharded.out, partial)
    shutil.rmtree(partial / "ankle_b")
    (partial / "results.shard-2-of-2.csv").unlink()
    assert main(["batch", str(sharded.root), "--out", str(partial), "--collect"]
                + sharded.common) == 0
    rows = {r["id"]: r for r in read_csv(partial / "results.csv")}
    assert rows["ankle_b"]["status"] == "error" and "not analysed yet" in rows["ankle_b"]["error"]
    assert not (partial / "ankle_b").exists() and rows["ankle_a"]["status"] == "ok"


def _options(sharded):
    from AnkleFractureLib.pipeline.pipeline import PipelineOptions

    return PipelineOptions(device="cpu", cls_model_dir=sharded.common[1], tta=0)
