"""What every person-level stage returns, and the scope it recomputes.

Each stage (identity, cleaning, features, segments, imputation, profiles) runs full or
incremental (see `refresh`) and answers with one `StageResult`: how it ran, why, how many
people it holds and recomputed, the rows it wrote, and whether it could fit. A stage with
more to show (imputation's model comparison, segments' catalog) extends it with typed
fields. The asset shells and `persona run` read every stage the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageResult:
    mode: str = "full"  # "full" or "incremental"
    why: str = ""  # why this mode, or why a model was (re)trained
    people: int = 0  # people in the stage's main table after the run
    people_recomputed: int | None = None  # an incremental run's scope; None: everyone (full)
    counts: dict[str, int] = field(default_factory=dict)  # rows per table written
    status: str = "fitted"  # or, in plain words, why the stage could not fit and what it did instead
    trained: bool = False  # a model was fitted in this run

    def recomputed(self) -> int:
        """How many people this run recomputed (everyone on a full run)."""
        return self.people if self.people_recomputed is None else self.people_recomputed


def retrain_reasons(
    asked: bool, nothing_saved: bool, changed: dict[str, bool], what: str = "model", verb: str = "retrain"
) -> list[str]:
    """Why a stage's model must be fitted again, in plain words (none: the saved one serves).
    `changed`: what the saved model was fitted on that is no longer so (empty when nothing is saved)."""
    reasons = {f"{verb} on request": asked, f"no saved {what}": nothing_saved, **changed}
    return [reason for reason, hit in reasons.items() if hit]
