"""Blocking: which pairs of records linkage compares, within a budget of pairs.

Each rule is an equi-join, so a record meets only those who agree on its keys. A key that
thousands share (a first and last name from a small vocabulary, a placeholder birth date)
makes a rule's pairs grow with the square of its records: at 626,000 generated people the
full-name rule alone gave about 590 million pairs and identity needed 22 GB. So the most
common keys are left out, largest first, until the pairs fit the budget (what the blocking
literature calls block purging): a pair in a left-out block is still compared when a
stricter rule (the name and the birth year, say) finds it.

Block sizes and the limit are counted over all records, in a full run and an incremental one
alike, so both compare the same pairs. Each pair keeps which rules found it (a bit each):
a comparison's m can then be estimated from pairs found without looking at its fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

# Together the rules still catch a pair with a typo in any one field, and most with one in two.
RULES = (
    "l.birthday = r.birthday",
    "l.first_name = r.first_name AND l.last_name = r.last_name",
    "l.postal_code = r.postal_code",
    "l.first_name = r.last_name AND l.last_name = r.first_name",
    "l.last_name = r.last_name AND left(l.birthday, 4) = left(r.birthday, 4)",
    "l.first_name = r.first_name AND left(l.birthday, 4) = left(r.birthday, 4)",
    "l.last_name = r.last_name AND right(l.birthday, 5) = right(r.birthday, 5)",
    "l.first_name = r.first_name AND right(l.birthday, 5) = right(r.birthday, 5)",
    "l.first_name = r.first_name AND left(l.postal_code, 2) = left(r.postal_code, 2)",
    "l.last_name = r.last_name AND left(l.postal_code, 2) = left(r.postal_code, 2)",
    "l.shared_contact = r.shared_contact",
)
# Below this many pairs nothing is left out, whatever the number of records.
MIN_BUDGET = 2_000_000


def columns(rule: str) -> set[str]:
    """The record fields a rule looks at."""
    return set(re.findall(r"\b[lr]\.(\w+)", rule))


def _key(rule: str, side: str = "l") -> list[str]:
    """One side of each of a rule's equalities, as expressions over one record."""
    at = 0 if side == "l" else 1
    return [re.sub(rf"\b{side}\.", "", part.split(" = ")[at]) for part in rule.split(" AND ")]


# What each key is, in the words of a person reading the identity_links metadata.
KEY_WORDS = {
    "birthday": "birth date",
    "first_name": "first name",
    "last_name": "last name",
    "postal_code": "postcode",
    "shared_contact": "shared email or phone",
    "left(birthday, 4)": "birth year",
    "right(birthday, 5)": "day and month of birth",
    "left(postal_code, 2)": "postcode area (its first two characters)",
}


def _words(rule: str) -> str:
    left, right = (" and ".join(KEY_WORDS[k] for k in _key(rule, side)) for side in "lr")
    return f"same {left}" if left == right else f"{left} the same as the other's {right}"


def size_column(i: int) -> str:
    return f"_block_{i}"


def with_sizes(select: str) -> str:
    """SQL: the records of `select` with, for each rule, how many records share their key (NULL
    where a key is missing: such a record meets nobody by that rule)."""
    sizes = []
    for i, rule in enumerate(RULES):
        key = _key(rule)
        given = " AND ".join(f"({k}) IS NOT NULL" for k in key)
        sizes.append(f"CASE WHEN {given} THEN count(*) OVER (PARTITION BY {', '.join(key)}) END AS {size_column(i)}")
    return f"SELECT *, {', '.join(sizes)} FROM ({select})"


def capped(i: int, limit: int | None) -> str:
    """Rule i as a join condition that leaves out keys shared by more than `limit` records."""
    if limit is None:
        return RULES[i]
    return f"{RULES[i]} AND l.{size_column(i)} <= {int(limit)} AND r.{size_column(i)} <= {int(limit)}"


@dataclass
class Blocking:
    """The pairs to compare (`table`: match_key, the first rule that found the pair as Splink
    numbers it; join_key_l < join_key_r, record ids; rules, a bit per rule that found it), the
    largest key size kept (None: nothing left out) and what was left out, in plain words."""

    table: str
    records: str  # the records, with their key sizes, that `table`'s join keys point at
    pairs: int
    budget: int
    limit: int | None = None
    left_out: list[str] = field(default_factory=list)


def limit_for(scratch: duckdb.DuckDBPyConnection, records: str, budget: int) -> int | None:
    """The largest key size at which every rule's blocks of that size or smaller give at most
    `budget` pairs in all (None when all of them fit). A block of n records gives n(n-1)/2
    pairs, so the records in blocks of size n give records * (n-1) / 2."""
    by_size = " UNION ALL ".join(
        f"SELECT {size_column(i)} AS n, count(*) AS records FROM {records} WHERE {size_column(i)} > 1 GROUP BY 1"
        for i in range(len(RULES))
    )
    rows = scratch.execute(
        f"""SELECT n, sum(sum(records * (n - 1) / 2)) OVER (ORDER BY n) AS pairs
            FROM ({by_size}) GROUP BY n ORDER BY n"""
    ).fetchall()
    if not rows or rows[-1][1] <= budget:
        return None
    fits = [n for n, pairs in rows if pairs <= budget]
    return int(fits[-1]) if fits else 1


def left_out(scratch: duckdb.DuckDBPyConnection, records: str, limit: int | None) -> list[str]:
    """Per rule with keys over `limit` records: how many keys, how many records they hold, the largest."""
    if limit is None:
        return []
    said = []
    for i, rule in enumerate(RULES):
        keys, held, largest = scratch.execute(
            f"""SELECT sum(1 / {size_column(i)}), count(*), max({size_column(i)})
                FROM {records} WHERE {size_column(i)} > {int(limit)}"""
        ).fetchall()[0]
        if held:
            said.append(
                f"{_words(rule)}: {round(keys):,} values shared by more than {limit:,} records "
                f"({held:,} records, up to {largest:,} on one value)"
            )
    return said


def block(
    scratch: duckdb.DuckDBPyConnection, records: pa.Table, pairs_per_record: int, area_only: bool = False
) -> Blocking:
    """The pairs of `records` (record_id, the compared fields, in_area, and the key sizes of
    `with_sizes`) the rules give within a budget of `pairs_per_record` per record (at least
    MIN_BUDGET); with `area_only`, only pairs with a record of this run (in_area) on at least
    one side, found from those records outward, so an incremental run does not pair up everyone
    to keep a handful."""
    scratch.register("_blocking_arrow", records)
    scratch.execute("CREATE OR REPLACE TABLE _blocking_records AS SELECT * FROM _blocking_arrow")
    scratch.unregister("_blocking_arrow")
    budget = max(MIN_BUDGET, pairs_per_record * records.num_rows)
    limit = limit_for(scratch, "_blocking_records", budget)
    if area_only:
        left, order = "(SELECT * FROM _blocking_records WHERE in_area)", "l.record_id <> r.record_id"
    else:
        left, order = "_blocking_records", "l.record_id < r.record_id"
    found = " UNION ALL ".join(
        f"""SELECT {i} AS rule, least(l.record_id, r.record_id) AS join_key_l, greatest(l.record_id, r.record_id) AS join_key_r
            FROM {left} l JOIN _blocking_records r ON {capped(i, limit)} AND {order}"""
        for i in range(len(RULES))
    )
    scratch.execute(
        f"""CREATE OR REPLACE TABLE _blocked AS
            SELECT min(rule)::VARCHAR AS match_key, join_key_l, join_key_r, bit_or(1 << rule)::INTEGER AS rules
            FROM ({found}) GROUP BY join_key_l, join_key_r"""
    )
    pairs = scratch.execute("SELECT count(*) FROM _blocked").fetchall()[0][0]
    return Blocking(
        "_blocked", "_blocking_records", pairs, budget, limit, left_out(scratch, "_blocking_records", limit)
    )


def found_without(fields: tuple[str, ...]) -> str:
    """SQL on a `rules` column: the pair was found by a rule that looks at none of `fields`."""
    mask = sum(1 << i for i, rule in enumerate(RULES) if not columns(rule) & set(fields))
    return f"(rules & {mask}) <> 0"
