"""Asset checks: each Pandera contract becomes a blocking check, plus SQL invariants."""

import dagster as dg
import pandas as pd
import pandera.pandas as pa
from dagster_duckdb import DuckDBResource

from persona_assets.contracts import columns, identifying_columns
from persona_assets.core.stage import StageResult

CHUNK_ROWS = 500_000
FAILURES_SHOWN = 20
# Columns that name a person (tagged in the contracts). Metadata lands in Dagster's event log,
# which `persona forget` cannot edit, so tables shown there leave these out (values are replaced by a mark).
IDENTIFYING = identifying_columns()
HIDDEN = "(identifier hidden)"


# Each table with a contract check: its contract (the catalog's column schemas come from these).
CONTRACTS: dict[str, type[pa.DataFrameModel]] = {}


def column_schema(model: type[pa.DataFrameModel]) -> dg.TableSchema:
    """A contract as Dagster's column schema: each column's DuckDB type, whether it may be
    missing or must be unique, and tags for the ones that name a person or stay unpublished."""
    out = []
    for name, col in model.to_schema().columns.items():
        meta = col.metadata or {}
        tags = {"identifying": "yes"} if meta.get("identifying") else {}
        if not meta.get("serving", True):
            tags["restricted"] = "never published"
        out.append(
            dg.TableColumn(
                name,
                meta["sql"],
                constraints=dg.TableColumnConstraints(nullable=col.nullable, unique=col.unique),
                tags=tags,
            )
        )
    return dg.TableSchema(columns=out)


def shareable(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame without identifying columns, and without identifying values in failure cases."""
    frame = frame.drop(columns=[c for c in frame.columns if c in IDENTIFYING])
    if {"column", "failure_case"} <= set(frame.columns):
        frame = frame.assign(failure_case=frame["failure_case"].where(~frame["column"].isin(IDENTIFYING), HIDDEN))
    return frame


def validate_in_chunks(con, model: type[pa.DataFrameModel], select_sql: str) -> tuple[int, pd.DataFrame]:
    """Validate the rows of `select_sql` against `model`, a chunk at a time.

    Returns the number of rows validated and the failure cases (empty when all pass).
    """
    reader = con.sql(select_sql).to_arrow_reader(CHUNK_ROWS)
    rows = 0
    failures: list[pd.DataFrame] = []
    for batch in reader:
        frame = batch.to_pandas()
        rows += len(frame)
        try:
            model.validate(frame, lazy=True)
        except pa.errors.SchemaErrors as err:
            failures.append(err.failure_cases)
    cases = pd.concat(failures, ignore_index=True) if failures else pd.DataFrame()
    return rows, cases


def contract_check(
    asset: str,
    model: type[pa.DataFrameModel],
    table: str,
    where: str = "",
    description: str | None = None,
    all_columns: bool = False,
) -> dg.AssetChecksDefinition:
    """A blocking check that `table` (or the rows `where` selects) meets its contract. The
    contract also becomes the asset's column schema in the catalog (`CONTRACTS`)."""
    CONTRACTS.setdefault(table, model)

    @dg.asset_check(
        asset=asset,
        name=f"{table}_contract",
        blocking=True,
        description=description or f"Rows of {table} satisfy the {model.__name__} contract (contracts.py).",
    )
    def _check(warehouse: DuckDBResource) -> dg.AssetCheckResult:
        cols = "*" if all_columns else ", ".join(f'"{c}"' for c in columns(model))
        with warehouse.get_connection() as con:
            rows, cases = validate_in_chunks(con, model, f'SELECT {cols} FROM "{table}" {where}')
        metadata: dict[str, object] = {"rows_validated": rows, "failure_cases": len(cases)}
        if len(cases):
            summary = cases.groupby(["column", "check"], dropna=False).size().reset_index(name="count")
            metadata["failing_checks"] = dg.MetadataValue.md(summary.to_markdown(index=False))
            shown = shareable(cases.head(FAILURES_SHOWN)[["column", "check", "failure_case", "index"]])
            metadata["examples"] = dg.MetadataValue.md(shown.astype(str).to_markdown(index=False))
        return dg.AssetCheckResult(passed=len(cases) == 0, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata)

    return _check


def frame_md(frame: pd.DataFrame) -> dg.MetadataValue:
    """A DataFrame as a markdown table for asset metadata ("_none_" when empty), identifiers left out."""
    return dg.MetadataValue.md(shareable(frame).to_markdown(index=False) if len(frame) else "_none_")


def markdown(rows: list[tuple], headers: list[str]) -> dg.MetadataValue:
    """A small table for asset metadata (identifiers left out)."""
    return frame_md(pd.DataFrame(rows, columns=headers))


def sql_check(asset: str, name: str, violations_sql: str, description: str, blocking: bool = True):
    """A check that passes when `violations_sql` (a SELECT of offending rows) returns none.

    A blocking check fails as an error and stops what depends on the asset; a non-blocking
    one is a warning the UI shows while everything goes on."""

    @dg.asset_check(asset=asset, name=name, blocking=blocking, description=description)
    def _check(warehouse: DuckDBResource) -> dg.AssetCheckResult:
        with warehouse.get_connection() as con:
            count = con.execute(f"SELECT count(*) FROM ({violations_sql})").fetchall()[0][0]
            sample = con.execute(f"SELECT * FROM ({violations_sql}) LIMIT {FAILURES_SHOWN}").df() if count else None
        metadata: dict[str, object] = {"violations": count}
        if sample is not None:
            metadata["examples"] = dg.MetadataValue.md(shareable(sample).astype(str).to_markdown(index=False))
        severity = dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN
        return dg.AssetCheckResult(passed=count == 0, severity=severity, metadata=metadata)

    return _check


def stage_metadata(result: StageResult) -> dict:
    """How a person-level stage ran, the same for every stage: full or incremental and why, the
    people it recomputed beside everyone in its table (a run that finds nothing new leaves the
    table's figure as it was instead of showing 0), and whether it could fit."""
    return {
        "dagster/row_count": result.people,
        "refresh": result.mode,
        "why": result.why,
        "people_recomputed": result.recomputed(),
        "people_in_table": result.people,
        "status": result.status,
    }
