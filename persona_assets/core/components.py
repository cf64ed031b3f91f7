"""Connected components of a graph as SQL statements, one algorithm for DuckDB and Spark.

Identity on DuckDB hands its edges to scipy's C implementation on one machine; on Spark the
graph must stay distributed (never collected onto the driver), so the components are found
by the large-star / small-star iteration (Kiveris et al., "Connected Components in MapReduce
and Beyond", 2014) in DuckDB-dialect statements run as they are on DuckDB (`Scratch`) and
compiled for Spark (`SparkTables`). Both offer `table(name, select)` and `scalar(select)`.

Edges are kept as (node, parent) with parent < node. Large-star points every neighbour larger
than a node at the smallest node of its neighbourhood; small-star points a node and its
smaller neighbours at the smallest of them. Each preserves the components and together they
reach, in O(log² n) rounds, a forest of stars, each centred at its component's smallest node:
then every node has at most one smaller neighbour and no node has both a smaller and a larger
one, which a count tells without collecting anything.
"""

from __future__ import annotations

from typing import Protocol

# A round is a large-star and a small-star; a 200-node chain took 6 to 8 (test_components).
MAX_ROUNDS = 100


class Steps(Protocol):
    """What the algorithm needs of an engine: a step's rows as a named table, and one number."""

    def table(self, name: str, select: str, params: dict | None = None) -> str: ...

    def scalar(self, select: str, params: dict | None = None): ...


# {edges}: any (a, b) pairs of node numbers; self-loops and repeats drop out.
CANONICAL = "SELECT DISTINCT greatest(a, b) AS node, least(a, b) AS parent FROM {edges} WHERE a <> b"

# Each edge both ways: a node's neighbourhood is one GROUP BY away.
BOTH_WAYS = "SELECT node AS a, parent AS b FROM {edges} UNION ALL SELECT parent AS a, node AS b FROM {edges}"

LARGE_STAR = f"""
WITH both_ways AS ({BOTH_WAYS}),
lowest AS (SELECT a, least(a, min(b)) AS m FROM both_ways GROUP BY a)
SELECT DISTINCT w.b AS node, l.m AS parent
FROM both_ways w JOIN lowest l ON l.a = w.a
WHERE w.b > w.a
"""

SMALL_STAR = f"""
WITH smaller AS (SELECT a, b FROM ({BOTH_WAYS}) AS w WHERE b < a),
lowest AS (SELECT a, min(b) AS m FROM smaller GROUP BY a)
SELECT DISTINCT s.b AS node, l.m AS parent FROM smaller s JOIN lowest l ON l.a = s.a WHERE s.b <> l.m
UNION
SELECT a AS node, m AS parent FROM lowest
"""

# Nodes not yet a leaf or a star's centre: a node with two smaller neighbours, or with both a
# smaller and a larger one. None left: every component is a star around its smallest node.
UNSETTLED = f"""
SELECT count(*) FROM (
  SELECT a FROM ({BOTH_WAYS}) AS w GROUP BY a
  HAVING sum(CASE WHEN b < a THEN 1 ELSE 0 END) > 1
      OR (sum(CASE WHEN b < a THEN 1 ELSE 0 END) > 0 AND sum(CASE WHEN b > a THEN 1 ELSE 0 END) > 0)
) AS unsettled
"""

# {nodes}: a table with a `node` column (every node, linked or not); a component is named by its smallest node.
LABELS = """
SELECT n.node, least(n.node, coalesce(min(e.parent), n.node)) AS component
FROM {nodes} n LEFT JOIN {edges} e ON e.node = n.node
GROUP BY n.node
"""


def label(t: Steps, nodes: str, edges: str, name: str = "_labels") -> tuple[str, int]:
    """Table `name` (node, component) for every node of `nodes`, the component being the
    smallest node connected to it through `edges` (columns a, b); returns it and the rounds taken."""
    current = t.table("_cc_edges", CANONICAL.format(edges=edges))
    rounds = 0
    while t.scalar(UNSETTLED.format(edges=current)):
        if rounds == MAX_ROUNDS:
            raise RuntimeError(f"connected components did not settle in {MAX_ROUNDS} rounds")
        large = t.table(f"_cc_large_{rounds % 2}", LARGE_STAR.format(edges=current))
        current = t.table(f"_cc_small_{rounds % 2}", SMALL_STAR.format(edges=large))
        rounds += 1
    return t.table(name, LABELS.format(nodes=nodes, edges=current)), rounds
