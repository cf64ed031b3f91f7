"""Category affinity: time-decayed interest per category, one formula for batch and real time.

score(category) = Σ weight(kind) · 2^(−age_days / half_life_days) over the person's product
views, add-to-carts and purchases in that category, with age measured to `as_of`. The
real-time path keeps the same number incrementally: on each event it decays the stored
score by 2^(−Δt / half_life) and adds the event's weight (`decayed_update`).
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("view", "add_to_cart", "purchase")
# The events that carry product interactions, and the columns `interactions_sql` reads of them.
INTERACTION_EVENTS = ("Product Viewed", "Product Added", "Order Completed")
INTERACTION_COLUMNS = ("event_at", "event_name", "category", "product_id", "products")


@dataclass(frozen=True)
class AffinityOptions:
    view_weight: float = 1.0
    add_to_cart_weight: float = 3.0
    purchase_weight: float = 5.0
    half_life_days: float = 30.0

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
    decay = f"pow(2.0, -greatest(epoch($as_of - event_at), 0) / 86400.0 / {float(opts.half_life_days)})"
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
