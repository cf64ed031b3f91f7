"""normalized_features and segments: the modelling matrix and the segment model over it."""

import base64
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from persona_assets.automation import EAGER, full_refresh
from persona_assets.checks import contract_check, frame_md, sql_check, stage_metadata
from persona_assets.contracts import NormalizedFeatures, SegmentCatalog, Segments
from persona_assets.core import features, segments
from persona_assets.resources import PersonaHome
from persona_assets.settings import FeaturesConfig, SegmentsConfig

GROUP = "segmentation"


@dg.asset(
    deps=["cleaned_users"],
    automation_condition=EAGER,
    kinds={"duckdb", "scikitlearn"},
    group_name=GROUP,
    pool="duckdb",
    description="One row per person with behaviour: log1p, clipped and scaled features, with a saved, versioned transform.",
)
def normalized_features(
    context: dg.AssetExecutionContext, config: FeaturesConfig, warehouse: DuckDBResource, persona: PersonaHome
):
    with warehouse.get_connection() as con:
        result = features.build(
            con, persona.models, persona.options(config), refit=config.refit, full=full_refresh(context, config)
        )
    transform = result.transform
    metadata = {**stage_metadata(result), "people_without_behaviour": result.without_behaviour}
    if transform is not None:
        metadata.update(
            {
                "transform_version": transform.version,
                "transform": result.reason,
                "fitted_on_people": transform.fitted_rows,
                "scaling": transform.scaling,
                "parameters": frame_md(transform.summary()),
                "artifact": dg.MetadataValue.path(str(persona.models.root / features.FEATURES_KIND)),
            }
        )
    return dg.MaterializeResult(metadata=metadata)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "segments",
            deps=["normalized_features"],
            automation_condition=EAGER,
            kinds={"duckdb", "scikitlearn"},
            group_name=GROUP,
            description="Each person's segment and sub-segment (k-means, Ward, HDBSCAN noise), ids stable across retrains.",
        ),
        dg.AssetSpec(
            "segment_catalog",
            deps=["normalized_features"],
            automation_condition=EAGER,
            kinds={"duckdb"},
            group_name=GROUP,
            description="Every segment and sub-segment: readable name, size, share and what sets it apart.",
        ),
    ],
    pool="duckdb",
)
def segment_people(
    context: dg.AssetExecutionContext, config: SegmentsConfig, warehouse: DuckDBResource, persona: PersonaHome
):
    with warehouse.get_connection() as con:
        result = segments.build(
            con, persona.models, persona.options(config), retrain=config.retrain, full=full_refresh(context, config)
        )
    model = result.model
    groups = result.catalog
    metadata = {
        **(figures(model, groups, result) if model is not None else {}),
        **stage_metadata(result),
        "trained": result.trained,
        "people_without_segment": result.unsegmented,
        "low_confidence_people": result.low_confidence,
    }
    if model is not None:
        metadata.update(_model_metadata(model, groups, result, persona.models.root))
    yield dg.MaterializeResult(asset_key="segments", metadata=metadata)
    yield dg.MaterializeResult(
        asset_key="segment_catalog",
        metadata={
            "dagster/row_count": len(groups),
            "status": result.status,
            "model_version": model.version if model is not None else "none",
            "catalog": frame_md(groups),
        },
    )


def _saved_picture(picture: bytes, models_root: Path, version: int) -> Path:
    """models/segments/v0001.curves.png (written aside and renamed, once per model version)."""
    path = models_root / segments.SEGMENTS_KIND / f"v{version:04d}.curves.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(picture)
        tmp.replace(path)
    return path


def _model_metadata(model: segments.SegmentModel, groups, result: segments.SegmentResult, models_root: Path) -> dict:
    """What the segment model is: k and why, the curves, the segments and their sizes.

    The figures a person looks at first come before, as numbers (`figures`)."""
    top = groups[groups["level"] == "segment"].drop(columns=["level", "parent_id", "model_version"])
    subs = groups[groups["level"] == "subsegment"].drop(columns=["level", "model_version"])
    curves = model.curves.pivot(index="k", columns="space", values=["inertia", "silhouette"]).round(4)
    curves.columns = [f"{a}_{b}" for a, b in curves.columns]
    picture = segments.curves_png(model)
    png = base64.b64encode(picture).decode()
    metadata = {
        "model_version": model.version,
        "why_this_k": model.reason,
        "space": model.space,
        # The picture as a file beside the model too: its path shows in the table without a click.
        "curves_picture": dg.MetadataValue.path(str(_saved_picture(picture, models_root, model.version))),
        "curves": dg.MetadataValue.md(f"![inertia and silhouette by k](data:image/png;base64,{png})"),
        "curves_table": dg.MetadataValue.md(curves.reset_index().to_markdown(index=False)),
        "segments": frame_md(top),
        "subsegments": frame_md(subs),
    }
    if result.trained and model.matching is not None and len(model.matching):
        metadata["matching_to_previous_model"] = frame_md(model.matching)
    return metadata


def figures(model: segments.SegmentModel, groups, result: segments.SegmentResult) -> dict[str, dg.MetadataValue]:
    """The segmentation's first figures, at the top of the asset's page and typed as numbers, so
    they show without a click (a picture is behind *Show Markdown*) and the Plots tab draws each
    across runs: how many segments, the k chosen, each space's silhouette, the noise share and
    the largest and smallest segment's share of everyone."""
    shares = groups.loc[groups["level"] == "segment", "share"].astype(float)
    out = {
        "segment_count": dg.MetadataValue.int(len(shares)),
        "chosen_k": dg.MetadataValue.int(int(model.chosen_k)),
        "elbow_k": dg.MetadataValue.int(int(model.knee)),
        **{name: dg.MetadataValue.float(float(value)) for name, value in model.scores.items()},
        "noise_share": dg.MetadataValue.float(round(float(result.noise_share), 4)),
        "largest_segment_share": dg.MetadataValue.float(round(float(shares.max()), 4) if len(shares) else 0.0),
        "smallest_segment_share": dg.MetadataValue.float(round(float(shares.min()), 4) if len(shares) else 0.0),
    }
    if result.moved_share is not None:
        out["share_moved_segment"] = dg.MetadataValue.float(round(float(result.moved_share), 4))
    return out


CHECKS = [
    # All columns: the per-category ones are checked too (finite), beyond the fixed contract columns.
    contract_check("normalized_features", NormalizedFeatures, "normalized_features", all_columns=True),
    contract_check("segments", Segments, "segments"),
    contract_check("segment_catalog", SegmentCatalog, "segment_catalog"),
    sql_check(
        "segments",
        "everyone_segmented",
        "SELECT c.person_id FROM cleaned_users c ANTI JOIN segments s USING (person_id)",
        "Every cleaned person, sparse ones too (by nearest centroid, low confidence), has a segment.",
    ),
    sql_check(
        "segments",
        "segments_in_catalog",
        "SELECT s.person_id, s.segment_id FROM segments s ANTI JOIN segment_catalog c ON c.id = s.segment_id "
        "WHERE s.segment_id IS NOT NULL",
        "Every segment id people carry is described in segment_catalog.",
    ),
]
