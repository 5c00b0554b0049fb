"""Shards of a batch for any scheduler (Slurm array, Kubernetes job index, a loop over machines).

``ankle-fracture batch INPUTS --out DIR --shard K/N`` runs the K-th of N parts (1-based) of
the cases :func:`~AnkleFractureLib.pipeline.batch.discover_inputs` finds. The split is
deterministic and needs no coordination: every machine discovers the same cases from the same
INPUTS, sorts them by case id (unique, case-insensitively) and takes every case whose position
``i`` in that order has ``i % N == K - 1`` (round robin, so that the parts differ by at most
one case and a folder sorted by size is spread evenly). Ids are given before the split, so a
case has the same id, hence the same ``DIR/<id>/`` folder, in every shard.

Each shard writes its own case folders into the shared ``DIR`` (no two shards share a case) and
its own table ``DIR/results.shard-K-of-N.csv``; no shard writes ``DIR/results.csv``. A later
run without ``--shard`` over the same INPUTS and ``DIR`` collects them: every case whose
``result.json`` a shard finished is reused, not run again (:func:`run_batch`'s resume), and only
cases that failed or never ran are run; with ``--collect`` nothing runs at all and such cases
keep the shard's error row (or get one saying that the case has not run).

Example:
    >>> parse_shard("2/3")
    (2, 3)
    >>> shard_csv_name((2, 3))
    'results.shard-2-of-3.csv'
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, TypeVar

from AnkleFractureLib.errors import InputError

#: Shard K of N, 1-based.
Shard = Tuple[int, int]

T = TypeVar("T")

#: Names of the per-shard tables (the case ids that would clash with them are refused).
SHARD_CSV_RE = re.compile(r"results\.shard-(\d+)-of-(\d+)\.csv", re.IGNORECASE)


def parse_shard(text: str) -> Shard:
    """``"K/N"`` -> (K, N), with 1 <= K <= N.

    Raises:
        InputError: Not of the form K/N with whole numbers, or K outside 1..N.
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise InputError(None, f"--shard must be K/N (e.g. 3/10, 1-based), got {text!r}")
    return check_shard((int(m.group(1)), int(m.group(2))))


def check_shard(shard: Sequence[int]) -> Shard:
    """The shard as a (K, N) tuple after checking 1 <= K <= N (InputError otherwise)."""
    try:
        k, n = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise InputError(None, f"a shard is (K, N), got {shard!r}") from None
    if n < 1 or not 1 <= k <= n:
        raise InputError(None, f"shard {k}/{n}: K must lie in 1..N (1-based) and N >= 1")
    return k, n


def shard_csv_name(shard: Optional[Shard]) -> str:
    """``results.csv`` for the whole batch, ``results.shard-K-of-N.csv`` for a shard."""
    if shard is None:
        return "results.csv"
    k, n = check_shard(shard)
    return f"results.shard-{k}-of-{n}.csv"


def select_shard(cases: Sequence[T], shard: Optional[Shard], key=lambda c: c.id.lower()
                 ) -> List[T]:
    """The cases of shard K/N, in the batch's order (all cases when ``shard`` is None).

    Args:
        cases: All discovered cases (ids unique).
        shard: (K, N), 1-based.
        key: The sort key that orders the cases before the round-robin split (the lowercased
            case id; it does not depend on where the inputs are mounted).

    Returns:
        The cases ``c`` whose position in ``sorted(cases, key=key)`` is ``i`` with
        ``i % N == K - 1``, kept in their order in ``cases``.

    Example:
        >>> select_shard(["a", "b", "c", "d", "e"], (2, 2), key=str)
        ['b', 'd']
    """
    if shard is None:
        return list(cases)
    k, n = check_shard(shard)
    order = sorted(range(len(cases)), key=lambda i: key(cases[i]))
    chosen = {i for pos, i in enumerate(order) if pos % n == k - 1}
    return [c for i, c in enumerate(cases) if i in chosen]


def read_shard_rows(out_dir: Path) -> Dict[str, Dict[str, str]]:
    """The rows of every ``results.shard-*-of-*.csv`` in ``out_dir``, by lowercased case id.

    A case that appears in several tables (e.g. the batch was split in 2 and later in 3) keeps
    the row of the newest table. Unreadable tables are skipped.
    """
    tables = [p for p in Path(out_dir).glob("results.shard-*-of-*.csv")
              if SHARD_CSV_RE.fullmatch(p.name) and p.is_file()]
    rows: Dict[str, Dict[str, str]] = {}
    for path in sorted(tables, key=lambda p: p.stat().st_mtime):
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    if row.get("id"):
                        rows[row["id"].lower()] = row
        except (OSError, csv.Error, UnicodeDecodeError):
            continue
    return rows
