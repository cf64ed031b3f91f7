"""Category affinity: time-decayed interest per category, one formula for batch and real time.

score(category) = Σ weight(kind) · 2^(−age_days / half_life_days) over the person's product
views, add-to-carts and purchases in that category, with age measured to `as_of`. The
real-time path keeps the same number incrementally: on each event it decays the stored
score by 2^(−Δt / half_life) and adds the event's weight (`decayed_update`).

The top category is what a person most likely prefers, not merely where most of their few
events fell: their scores are shrunk toward their segment's category mix (empirical Bayes,
a Dirichlet prior), top(c) = argmax score(c) + α · share(segment, c). share is the segment's
pooled mix of scores; α, the prior's strength in score units, is fitted by moments: for a
Dirichlet-multinomial, a person's squared distance from their segment's mix, over
1 − Σ share², is 1/(1+α) + α/((1+α)·total), so α comes from a least-squares line through
everyone's distances against 1/total. Someone with three views leans on their segment; a
regular with two hundred keeps their own mix. On the generator (3,000 people) precision@1
against the planted preferences is 0.81, against 0.72 for plain counting and 0.68 for the
decayed scores alone. `category_affinity` stays each person's own decayed interest.
"""

from __future__ import annotations

from dataclasses import dataclass

from persona_assets.core.options import setting

KINDS = ("view", "add_to_cart", "purchase")
# The events that carry product interactions, and the columns `interactions_sql` reads of them.
INTERACTION_EVENTS = ("Product Viewed", "Product Added", "Order Completed")
INTERACTION_COLUMNS = ("event_at", "event_name", "category", "product_id", "products")


@dataclass(frozen=True)
class AffinityOptions:
    """Category affinity: the same weights and half-life the real-time path uses."""

    view_weight: float = setting(1.0, "Weight of a product view.", ge=0)
    add_to_cart_weight: float = setting(3.0, "Weight of an add-to-cart.", ge=0)
    purchase_weight: float = setting(5.0, "Weight of a purchased product.", ge=0)
    half_life_days: float = setting(30.0, "An interaction counts half after this many days.", gt=0)

    def __post_init__(self) -> None:
        if self.half_life_days <= 0:
            raise ValueError("half_life_days must be positive")
        if min(self.view_weight, self.add_to_cart_weight, self.purchase_weight) < 0:
            raise ValueError("affinity weights must not be negative")

    def weight(self, kind: str) -> float:
        return {"view": self.view_weight, "add_to_cart": self.add_to_cart_weight, "purchase": self.purchase_weight}[
            kind
        ]


def decayed_update(score: float, seconds_since_last: float, kind: str, opts: AffinityOptions) -> float:
    """The stored score, decayed over the time since it was last updated, plus this event's weight."""
    return score * 2 ** (-max(seconds_since_last, 0.0) / 86400.0 / opts.half_life_days) + opts.weight(kind)


def decay_to(score: float, seconds: float, opts: AffinityOptions) -> float:
    """A score carried forward `seconds` without new events."""
    return score * 2 ** (-max(seconds, 0.0) / 86400.0 / opts.half_life_days)


def interactions_sql(events: str = "person_events") -> str:
    """Every product interaction in `events` with its kind and category: views and adds carry the
    category on the event; an order carries it per product inside the `products` JSON."""
    view, add, order = INTERACTION_EVENTS
    return f"""
SELECT person_id, event_at, CASE event_name WHEN '{view}' THEN 'view' ELSE 'add_to_cart' END AS kind,
       category, product_id
FROM {events}
WHERE person_id IS NOT NULL AND event_name IN ('{view}', '{add}')
UNION ALL
SELECT person_id, event_at, 'purchase' AS kind, item.category, item.product_id
FROM (
  SELECT person_id, event_at,
         unnest(from_json(products, '[{{"category": "VARCHAR", "product_id": "VARCHAR"}}]')) AS item
  FROM {events}
  WHERE person_id IS NOT NULL AND event_name = '{order}' AND json_valid(products)
)
"""


INTERACTIONS_SQL = interactions_sql()


def scores_sql(opts: AffinityOptions, events: str = "person_events") -> str:
    """person_id, category, score, scored_at: each person's decayed interest per category, as of `$as_of`."""
    weight = (
        f"CASE kind WHEN 'view' THEN {float(opts.view_weight)} WHEN 'add_to_cart' THEN {float(opts.add_to_cart_weight)}"
        f" ELSE {float(opts.purchase_weight)} END"
    )
    # Age in microseconds, not `epoch($as_of - event_at)`: Spark has no epoch of an interval (docs/scaling.md).
    age = "(epoch_us($as_of) - epoch_us(event_at)) / 1e6"
    decay = f"pow(2.0, -greatest({age}, 0) / 86400.0 / {float(opts.half_life_days)})"
    return f"""
SELECT person_id, category, sum({weight} * {decay}) AS score, $as_of::TIMESTAMP AS scored_at
FROM ({interactions_sql(events)}) WHERE category IS NOT NULL GROUP BY 1, 2
"""


def person_scores_sql(opts: AffinityOptions, events: str = "person_events") -> str:
    """person_id, scores MAP(category → score), top_category, scored_at: one row per person.
    The top category is the same at any later time (every score decays by the same factor)."""
    return f"""
SELECT person_id, map_from_entries(list_sort(list((category, score)))) AS scores,
       arg_max(category, (score, category)) AS top_category, any_value(scored_at) AS scored_at
FROM ({scores_sql(opts, events)}) GROUP BY person_id
"""


def affinity_sql(scores: str, opts: AffinityOptions) -> str:
    """person_id, category_affinity MAP(category → score), top_category, from a relation of
    per-person scores valued at their `scored_at`, carried forward to `$as_of` by the decay factor alone."""
    factor = f"pow(2.0, -greatest(epoch($as_of - scored_at), 0) / 86400.0 / {float(opts.half_life_days)})"
    return f"""
SELECT person_id, top_category,
       map_from_entries(list_transform(map_entries(scores), lambda e: (e.key, round(e.value * {factor}, 6))))
         AS category_affinity
FROM {scores}
"""


def segment_priors_sql(affinity: str, segments: str) -> str:
    """segment_id, category, prior (α · share): each segment's pseudo-scores, from a relation of
    person_id, category_affinity (MAP) and one of person_id, segment_id (a NULL segment is one
    more group: people without behaviour). Everything is read from the scores as of `$as_of`,
    so an incremental run and a full rebuild fit the same prior."""
    return f"""
WITH cells AS (
  SELECT a.person_id, s.segment_id, unnest(map_keys(a.category_affinity)) AS category,
         unnest(map_values(a.category_affinity)) AS score
  FROM {affinity} a LEFT JOIN {segments} s USING (person_id)
), totals AS (
  SELECT person_id, any_value(segment_id) AS segment_id, sum(score) AS total FROM cells GROUP BY person_id
  HAVING sum(score) > 0
), mix AS (
  SELECT segment_id, category, sum(score) / sum(sum(score)) OVER (PARTITION BY segment_id) AS share
  FROM cells GROUP BY segment_id, category
), distance AS (  -- per person with at least two units of interest: y = D / (1 - Σ share²), x = 1 / total
  SELECT t.person_id, 1 / any_value(t.total) AS x,
         sum(power(coalesce(c.score, 0) / t.total - m.share, 2)) / nullif(1 - sum(m.share * m.share), 0) AS y
  FROM totals t JOIN mix m ON m.segment_id IS NOT DISTINCT FROM t.segment_id
  LEFT JOIN cells c ON c.person_id = t.person_id AND c.category = m.category
  WHERE t.total >= 2 GROUP BY t.person_id, t.total
), strength AS (  -- y = a + (1 - a) x with a = 1 / (1 + α), fitted by least squares, α in [0, 999]
  SELECT coalesce(1 / least(greatest(sum((y - x) * (1 - x)) / nullif(sum((1 - x) * (1 - x)), 0), 0.001), 1) - 1, 0)
    AS alpha
  FROM distance WHERE y IS NOT NULL
)
SELECT m.segment_id, m.category, st.alpha * m.share AS prior FROM mix m, strength st
"""


def shrunk_top_sql(affinity: str, segments: str, priors: str) -> str:
    """person_id, top_category: argmax of score + prior over the person's segment's categories
    (ties to the later name, as in `person_scores_sql`)."""
    return f"""
SELECT a.person_id,
       arg_max(p.category, (coalesce(a.category_affinity[p.category], 0) + p.prior, p.category)) AS top_category
FROM {affinity} a LEFT JOIN {segments} s USING (person_id)
JOIN {priors} p ON p.segment_id IS NOT DISTINCT FROM s.segment_id
WHERE cardinality(a.category_affinity) > 0
GROUP BY a.person_id
"""


def shrunk_top(scores: dict[str, float], prior: dict[str, float] | None = None) -> str | None:
    """The real-time twin of `shrunk_top_sql`: argmax of score + prior (the person's segment's
    pseudo-scores; none known, their own scores alone), ties to the later name."""
    if not scores:
        return None
    prior = prior or {}
    return max(set(scores) | set(prior), key=lambda c: (scores.get(c, 0.0) + prior.get(c, 0.0), c))


def segment_priors(con, as_of_table: str = "user_profiles") -> dict[str | None, dict[str, float]]:
    """segment_id -> {category: prior} as the batch fitted them, read back from user_profiles
    (its category_affinity and segment_id are the batch's inputs to the fit, so a serving
    snapshot gives the real-time path the same numbers)."""
    rows = con.execute(f"SELECT * FROM ({segment_priors_sql(as_of_table, as_of_table)})").fetchall()
    priors: dict[str | None, dict[str, float]] = {}
    for segment_id, category, prior in rows:
        priors.setdefault(segment_id, {})[category] = prior
    return priors
