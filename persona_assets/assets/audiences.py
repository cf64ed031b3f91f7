"""Computed traits, one asset per audience (made from the definitions file by a factory, so the
lineage shows each downstream of user_profiles and of the audiences it names), the audience
tables, and delivery to destinations."""

import base64
import json
from pathlib import Path

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from persona_assets.automation import EAGER, full_refresh
from persona_assets.checks import contract_check, frame_md, stage_metadata
from persona_assets.contracts import (
    AudienceChanges,
    AudienceMembers,
    AudienceRuns,
    ComputedTraits,
    DestinationDeadLetters,
    DestinationDeliveries,
    ddl,
)
from persona_assets.core import audience_definitions, audiences, computed_traits, destinations
from persona_assets.resources import PersonaHome
from persona_assets.settings import RefreshConfig

GROUP = "audiences"
TABLES = ["audience_members", "audience_changes", "audience_runs"]
DELIVERY_TABLES = ["destination_deliveries", "destination_dead_letters"]


def settings_file(persona: PersonaHome) -> Path | None:
    from persona_assets.settings import SettingsError, settings_path

    try:
        return settings_path(persona.root, persona.config_file or None)
    except SettingsError:
        return None


def checked_definitions(persona: PersonaHome, con, context) -> audience_definitions.Definitions | str:
    """The definitions in force, checked against the data's events and segments; or, when the
    file has mistakes, what they are (also logged as an error). The audience assets then change nothing
    and say why in their `status`, which `persona run` prints: a mistake in the file must not
    fail the run, or the snapshot after it would not be published."""
    try:
        return audience_definitions.load(persona.root, settings_file(persona), audiences.vocabulary(con))
    except audience_definitions.DefinitionsError as exc:
        context.log.error(f"The audience definitions cannot be used:\n{exc}")
        return str(exc)


def not_run(con, why: str, tables: list[str]) -> dict:
    """What an audience asset reports when it changed nothing: its status, and its tables' rows."""
    audiences.ensure_tables(con)
    destinations.ensure_tables(con)
    con.execute(ddl(ComputedTraits, "computed_traits"))
    rows = sum(con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in tables)
    first = why.splitlines()[0] + (f" (and {len(why.splitlines()) - 1} more)" if len(why.splitlines()) > 1 else "")
    return {
        "status": f"not run: {first}",
        "why_not_run": dg.MetadataValue.md(f"```\n{why}\n```"),
        "dagster/row_count": rows,
    }


class ComputedTraitsConfig(RefreshConfig):
    """Computed traits refresh incrementally unless told otherwise (the nightly refresh does a full one)."""

    def options(self) -> None:  # the definitions file holds the rest
        return None


@dg.asset(
    name="computed_traits",
    deps=["user_profiles"],
    automation_condition=EAGER,
    kinds={"duckdb"},
    group_name=GROUP,
    pool="duckdb",
    description="Each person's computed traits (audiences.yaml computed_traits: and the counts behind audiences' "
    "event conditions), provenance computed; recomputed for the people whose profile or window moved.",
)
def computed_traits_asset(
    context: dg.AssetExecutionContext, config: ComputedTraitsConfig, warehouse: DuckDBResource, persona: PersonaHome
):
    with warehouse.get_connection() as con:
        definitions = checked_definitions(persona, con, context)
        if isinstance(definitions, str):
            return dg.MaterializeResult(metadata=not_run(con, definitions, ["computed_traits"]))
        report = computed_traits.build(con, definitions, full=full_refresh(context, config))
        by_trait = con.execute(
            "SELECT trait, kind, count(*) AS people, round(avg(number), 3) AS mean_number FROM computed_traits "
            "GROUP BY ALL ORDER BY trait"
        ).df()
    return dg.MaterializeResult(
        metadata={
            **stage_metadata(report),
            "dagster/row_count": report.rows,  # a row per person and trait
            "traits": report.traits,
            "definitions": definitions.source or "none (no audiences.yaml)",
            "people_per_trait": frame_md(by_trait),
        }
    )


def _plot_metadata(con, name: str, root: Path) -> dict:
    history = audiences.sizes_over_time(con, name)
    if history.empty:
        return {}
    picture = audiences.size_png(history, name)
    path = root / "audiences" / f"{name}.size.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(picture)
    tmp.replace(path)
    png = base64.b64encode(picture).decode()
    recent = history.tail(10).assign(evaluated_at=lambda f: f["evaluated_at"].astype(str))
    return {
        "size_picture": dg.MetadataValue.path(str(path)),
        "size_over_time": dg.MetadataValue.md(f"![size over time](data:image/png;base64,{png})"),
        "recent_runs": frame_md(recent),
    }


def audience_asset(audience: audience_definitions.Audience, depends_on: list[str]) -> dg.AssetsDefinition:
    """The asset `audiences/<name>`: evaluates one audience into the audience tables."""
    name = audience.name

    @dg.asset(
        key_prefix=["audiences"],
        name=name,
        deps=["computed_traits", "user_profiles", *(dg.AssetKey(["audiences", d]) for d in depends_on)],
        automation_condition=EAGER,
        kinds={"duckdb"},
        group_name=GROUP,
        pool="duckdb",
        description=audience.description or f"The audience {name} (audiences.yaml line {audience.line}).",
    )
    def _audience(context: dg.AssetExecutionContext, warehouse: DuckDBResource, persona: PersonaHome):
        with warehouse.get_connection() as con:
            definitions = checked_definitions(persona, con, context)
            if isinstance(definitions, str) or name not in definitions.audiences:
                why = (
                    definitions
                    if isinstance(definitions, str)
                    else (
                        f"{name} is no longer defined in {definitions.source or 'the definitions'}; its members stay "
                        "until the definitions are reloaded (persona ui's Reload, or a new persona run)"
                    )
                )
                return dg.MaterializeResult(metadata=not_run(con, why, ["audience_members"]))
            report = audiences.evaluate(con, definitions, name, context.run_id)
            plot = _plot_metadata(con, name, persona.root)
        return dg.MaterializeResult(
            metadata={
                "size": report.size,
                "entered_this_run": report.entered,
                "exited_this_run": report.exited,
                "seconds": round(report.seconds, 4),
                "data_as_of": str(report.as_of),
                # dates in the file (2026-01-31) as their ISO text
                "definition": dg.MetadataValue.json(json.loads(definitions.audiences[name].definition_json())),
                **plot,
            }
        )

    return _audience


TABLE_DESCRIPTIONS = {
    "audience_members": "Who is in each audience now, and since when.",
    "audience_changes": "Every entry and exit of every audience, in order.",
    "audience_runs": "Each evaluation of each audience: size, entered, exited, the definition used.",
}


def audience_tables_asset(names: list[str]) -> dg.AssetsDefinition:
    """The audience tables, once every audience ran."""
    deps = ["computed_traits", *(dg.AssetKey(["audiences", n]) for n in names)]
    specs = [
        dg.AssetSpec(t, description=d, kinds={"duckdb"}, group_name=GROUP, automation_condition=EAGER, deps=deps)
        for t, d in TABLE_DESCRIPTIONS.items()
    ]

    @dg.multi_asset(specs=specs, name="audience_tables", pool="duckdb")
    def _tables(context: dg.AssetExecutionContext, warehouse: DuckDBResource, persona: PersonaHome):
        """Audiences removed from the file are retired here (each member's exit recorded first, so
        destinations hear of it)."""
        with warehouse.get_connection() as con:
            definitions = checked_definitions(persona, con, context)
            if isinstance(definitions, str):  # nothing retired on a file with mistakes
                for table in TABLES:
                    yield dg.MaterializeResult(asset_key=table, metadata=not_run(con, definitions, [table]))
                return
            retired = audiences.retire(con, definitions, context.run_id)
            sizes = con.execute("SELECT audience, count(*) AS members FROM audience_members GROUP BY 1 ORDER BY 1").df()
            counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in TABLES}
        retired_md = frame_md(pd.DataFrame(sorted(retired.items()), columns=["audience", "members_exited"]))
        for table in TABLES:
            extra = {"sizes": frame_md(sizes), "retired_audiences": retired_md} if table == "audience_members" else {}
            yield dg.MaterializeResult(asset_key=table, metadata={"dagster/row_count": counts[table], **extra})

    return _tables


class DeliveriesConfig(dg.Config):
    """How long a run keeps trying each webhook before leaving the rest for the next run."""

    budget_seconds: float = 60.0
    redeliver_dead_letters: bool = False  # send the webhooks' dead letters again first (launchpad)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "destination_deliveries",
            kinds={"duckdb"},
            group_name=GROUP,
            automation_condition=EAGER,
            deps=["audience_members", "audience_changes"],
            description="Each destination's progress: delivered, failed attempts, the last error.",
        ),
        dg.AssetSpec(
            "destination_dead_letters",
            kinds={"duckdb"},
            group_name=GROUP,
            automation_condition=EAGER,
            deps=["audience_members", "audience_changes"],
            description="Changes a destination refused or could not take after its attempts.",
        ),
    ],
    name="deliver_to_destinations",
    pool="duckdb",
)
def deliver_to_destinations(
    context: dg.AssetExecutionContext, config: DeliveriesConfig, warehouse: DuckDBResource, persona: PersonaHome
):
    """Audience entries and exits to each destination in audiences.yaml (webhooks signed, files
    written aside and renamed); what a webhook could not take yet waits for the next run."""
    with warehouse.get_connection() as con:
        definitions = checked_definitions(persona, con, context)
        if isinstance(definitions, str):
            for table in DELIVERY_TABLES:
                yield dg.MaterializeResult(asset_key=table, metadata=not_run(con, definitions, [table]))
            return
        options = destinations.DeliveryOptions(budget_seconds=config.budget_seconds)
        reports = destinations.deliver(con, definitions, persona.root, options, config.redeliver_dead_letters)
        state = pd.DataFrame(destinations.lag(con, definitions))
        dead = con.execute("SELECT count(*) FROM destination_dead_letters").fetchall()[0][0]
    failed = [f"{r.destination}: {r.error}" for r in reports if r.error]
    yield dg.MaterializeResult(
        asset_key="destination_deliveries",
        metadata={
            "dagster/row_count": len(state),
            "delivered_this_run": sum(r.delivered for r in reports),
            "dead_lettered_this_run": sum(r.dead_lettered for r in reports),
            "redelivered_this_run": sum(r.redelivered for r in reports),
            "pending": sum(r.pending for r in reports),
            "errors": "; ".join(failed) or "none",
            "destinations": frame_md(state.astype(str)) if len(state) else frame_md(state),
        },
    )
    yield dg.MaterializeResult(asset_key="destination_dead_letters", metadata={"dagster/row_count": dead})


def build_assets(persona: PersonaHome) -> tuple[list, list]:
    """(assets, checks) for the definitions in force. A file with mistakes gives no audience
    assets here (the definitions must load for the rest of Persona to); the audience assets
    then change nothing, their status naming each mistake and its line."""
    try:
        definitions = audience_definitions.load(persona.root, settings_file(persona))
    except audience_definitions.DefinitionsError:
        definitions = audience_definitions.Definitions()
    made = [audience_asset(a, definitions.depends_on(a.name)) for a in definitions.audiences.values()]
    assets = [computed_traits_asset, *made, audience_tables_asset(list(definitions.audiences)), deliver_to_destinations]
    checks = [
        contract_check("computed_traits", ComputedTraits, "computed_traits"),
        contract_check("audience_members", AudienceMembers, "audience_members"),
        contract_check("audience_changes", AudienceChanges, "audience_changes"),
        contract_check("audience_runs", AudienceRuns, "audience_runs"),
        contract_check("destination_deliveries", DestinationDeliveries, "destination_deliveries"),
        contract_check("destination_dead_letters", DestinationDeadLetters, "destination_dead_letters"),
    ]
    return assets, checks
