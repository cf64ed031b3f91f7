"""The SQL connected components (the algorithm identity runs on Spark) on DuckDB, against scipy."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from persona_assets.core import components, identity
from persona_assets.core.ingest import ingest
from persona_assets.core.warehouse import scratch


def _scipy_partition(n: int, edges: list[tuple[int, int]]) -> set[frozenset[int]]:
    src = np.array([a for a, _ in edges], dtype=np.int64)
    dst = np.array([b for _, b in edges], dtype=np.int64)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return _partition(range(n), labels)


def _partition(nodes, labels) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for node, label in zip(nodes, labels, strict=True):
        groups.setdefault(int(label), set()).add(int(node))
    return {frozenset(g) for g in groups.values()}


def _sql_partition(n: int, edges: list[tuple[int, int]]) -> tuple[set[frozenset[int]], int, pd.DataFrame]:
    con = duckdb.connect()
    con.register("_node_frame", pd.DataFrame({"node": np.arange(n, dtype=np.int64)}))
    con.register("_edge_frame", pd.DataFrame(edges or [(0, 0)], columns=["a", "b"], dtype=np.int64))
    with scratch(con) as s:
        s.table("_all_nodes", "SELECT * FROM _node_frame")
        s.table("_edges_in", "SELECT * FROM _edge_frame")
        labels, rounds = components.label(s, "_all_nodes", "_edges_in")
        rows = con.execute(f"SELECT node, component FROM {labels} ORDER BY node").df()
    return _partition(rows.node, rows.component), rounds, rows


def _chain(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """A path through all n nodes in a random order (so node numbers do not follow the path)."""
    order = rng.permutation(n)
    return [(int(order[i]), int(order[i + 1])) for i in range(n - 1)]


GRAPHS = {
    "chain-200": lambda rng: (200, _chain(200, rng)),
    "chain-200-in-order": lambda rng: (200, [(i, i + 1) for i in range(199)]),
    "star": lambda rng: (150, [(int(c), i) for c in [rng.integers(150)] for i in range(150)]),
    "isolated": lambda rng: (300, [(3, 4), (10, 200)]),
    "cycle": lambda rng: (120, [(i, (i + 1) % 120) for i in range(120)]),
    "random-sparse": lambda rng: (400, [tuple(map(int, rng.integers(400, size=2))) for _ in range(300)]),
}


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_same_partition_as_scipy(graph):
    """Adversarial graphs (long chains, a star, isolated nodes, a cycle, many small trees): the
    partition is scipy's, every component is named by its smallest node, in few rounds."""
    n, edges = GRAPHS[graph](np.random.default_rng(5))
    found, rounds, rows = _sql_partition(n, edges)
    assert found == _scipy_partition(n, edges)
    smallest = rows.groupby("component").node.min()
    assert (smallest.index == smallest.values).all()
    assert rounds <= 2 * int(np.ceil(np.log2(n))) ** 2


def test_identity_graph_as_scipy(generated):
    """On generated people's identity graph (identity's own edges), the same partition as resolve's scipy."""
    con = duckdb.connect()
    ingest(con, generated("jsonl"), b"k")
    opts = identity.IdentityOptions(linkage=False)
    with scratch(con) as s:
        for name in identity.SCRATCH_TABLES:
            s.adopt(name)
        identity._stage_identifiers(con, opts)
        identity._components(con)
        scipy_rows = con.execute("SELECT node, component FROM _labels ORDER BY node").df()
        s.table("_identity_edges", identity.EDGES)
        labels, rounds = components.label(s, "_nodes", "_identity_edges", "_sql_labels")
        rows = con.execute(f"SELECT node, component FROM {labels} ORDER BY node").df()
    assert len(rows) == len(scipy_rows) > 1000
    assert _partition(rows.node, rows.component) == _partition(scipy_rows.node, scipy_rows.component)
    assert rounds > 1
