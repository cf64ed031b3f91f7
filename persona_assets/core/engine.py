"""One source of stage logic for two engines: SQL written once in DuckDB's dialect, run as it is
on DuckDB and compiled for Spark with SQLGlot.

A stage's statements stay where they are (`cleaning.py` builds them in small functions); on
Spark, `SparkTables` runs the same statements over Parquet tables registered as temp views.
`to_spark` is SQLGlot's duckdb→spark transpiler plus the rules below, each fixing a
translation SQLGlot 30 gets wrong for this code (measured construct by construct on both
engines: the table in docs/scaling.md; each rule has a test giving DuckDB's answer):

- `quantile_cont(v, p)` comes out as `PERCENTILE_CONT(v, p)`, which Spark refuses (it takes
  `WITHIN GROUP`); Spark's `percentile(v, p)` is the same exact, interpolated quantile.
- `epoch_us(ts)` (microseconds since 1970) is left as is; Spark calls it `unix_micros`.
- `round_even(x, n)` (half to even, as DuckDB casts a DOUBLE to an integer) is left as is;
  Spark calls it `bround` (Spark's own cast truncates: 2.7 becomes 2, DuckDB's 3).
- `date_diff('second', a, b)` becomes Spark's `DATEDIFF(SECOND, ...)`, which counts whole
  seconds elapsed; DuckDB counts second boundaries crossed (0.9 s across a boundary is 1).
  Spark's `unix_seconds(b) - unix_seconds(a)` counts boundaries, as DuckDB does.
- `row_number() OVER ()` (a number unique to each row, in no order) Spark refuses (its
  row_number needs an ORDER BY, and would then sort every row into one partition); Spark's
  `monotonically_increasing_id()` is unique to each row too, numbered within each partition.
- A decimal literal (`60.0`) is a DECIMAL in both, but DuckDB divides in DOUBLE while Spark
  divides in DECIMAL rounded to 6 places (count(*) / 6.0 gave 0.166667): on Spark such
  literals are written as DOUBLE.
- `regexp_full_match(x, p)` is left as is; Spark has no such function. `regexp_like` with the
  pattern held between `\A` and `\z` matches the whole text (Java's `$` would also match before a
  final line break).
- `regexp_replace`'s back-reference `\1` (DuckDB, RE2) is passed on as text; Java writes it `$1`
  (and reads a bare `$` as one): Spark put `1` where DuckDB put the group.
- `from_json(x, '[{"category": "VARCHAR"}]')` (DuckDB's structure, given as JSON) is passed on
  as it is, which Spark cannot read as a schema. It becomes Spark's DDL (`array<struct<category:
  string>>`); a list of structs is read item by item (`transform` over `array<string>`), because
  Spark reads a list with one item that is not an object (`[1, {"category": "a"}]`) as NULL
  where DuckDB keeps the objects and gives the others NULL fields.
- `json_valid(x)` is left as is; Spark has no such function. `try_parse_json(x)` is NULL where
  the text is not JSON (it also refuses an object with a key twice, and accepts text after the
  value, where DuckDB does the opposite: see docs/scaling.md).

Where a construct has no Spark equivalent the single source was changed instead, in a form
both engines run with DuckDB's results unchanged (see docs/scaling.md for the list). Where
Spark has no function of DuckDB's meaning and SQL cannot say it (Jaro-Winkler: Spark 4.3's
built-in counts transpositions otherwise), `duckdb_functions` registers DuckDB's own, run on
the executors. Values
are bound as parameters on both engines (`$name` in the source, `:name` on Spark), never
pasted into the SQL text.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

import pandas as pd
import pandera.pandas as pa
import sqlglot
from sqlglot import exp

from persona_assets.core.options import setting

if TYPE_CHECKING:  # pyspark is imported only by the Spark path
    from pyspark.sql import DataFrame, SparkSession

ENGINES = ("duckdb", "spark")
URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The stages that run on Spark under `engine: spark` (`core/spark_stages.py`); the person-level
# stages after them run on DuckDB over what they wrote.
SPARK_STAGES = ("ingest", "identity", "cleaning", "category scores")


@dataclass(frozen=True)
class EngineOptions:
    """Which engine runs the event-scale stages (persona.yaml: `engine: spark`, or an `engine:`
    section with these keys)."""

    name: Literal["duckdb", "spark"] = setting(
        "duckdb", "duckdb (one machine) or spark (the event-scale stages on a Spark cluster: docs/scaling.md)."
    )
    spark_master: str = setting("local[*]", "Spark master URL: local[*] uses this machine's cores.")
    spark_warehouse: str = setting(
        "", "Folder of Parquet tables (one folder a table) Spark reads and writes; empty: PERSONA_HOME/spark."
    )

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ValueError(f"name must be one of {ENGINES}, got {self.name!r}")
        if not self.spark_master:
            raise ValueError("spark_master must name a Spark master, e.g. local[*] or spark://host:7077")
        if self.spark_warehouse:
            warehouse_path(self.spark_warehouse)

    def warehouse(self, home: Path) -> Path:
        """Where Spark's Parquet tables live."""
        return warehouse_path(self.spark_warehouse) if self.spark_warehouse else Path(home) / "spark"

    def spark_config(self) -> dict[str, str]:
        """The Spark session's settings (for dagster-pyspark's resource)."""
        config = {
            "spark.master": self.spark_master,
            "spark.app.name": "persona",
            # DuckDB's TIMESTAMP has no zone: read and compute it as UTC (hour(), unix_seconds()).
            "spark.sql.session.timeZone": "UTC",
            "spark.ui.showConsoleProgress": "false",  # no progress bars in `persona run`'s output
            # Statements carry bound values (ingest's keyed-hash pads among them): no web UI shows
            # their plans, and long hex strings are redacted from what Spark logs of them.
            "spark.ui.enabled": "false",
            "spark.sql.redaction.string.regex": "[0-9a-fA-F]{32,}",
        }
        if self.spark_master.startswith("local"):
            # One machine: shuffles in 2 partitions a core (Spark's 200 make hundreds of tiny tasks).
            config["spark.sql.shuffle.partitions"] = str(2 * (os.cpu_count() or 1))
        return config


def warehouse_path(location: str) -> Path:
    """A Spark warehouse location as a filesystem path: a path or a `file://` URI. Other URIs
    (`s3a://`, `gs://`, `abfss://`, `hdfs://`) are refused, saying why."""
    scheme = URI_SCHEME.match(location)
    if not scheme:
        return Path(location).expanduser()
    if scheme.group(1).lower() == "file":
        return Path(unquote(urlparse(location).path))
    raise ValueError(
        f"warehouse {location}: {scheme.group(1)}:// is not supported yet: the warehouse's tables "
        "are replaced by renaming folders on a filesystem path, which an object store does not offer; "
        "use a path mounted at the same place on the driver and every worker (a local disk on one "
        "machine, NFS or a cluster filesystem on several)"
    )


def refuse_partial(options: EngineOptions) -> str | None:
    """Why a run cannot start on this engine (None: it can): Spark needs Java."""
    if options.name == "spark" and not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        return (
            "engine: spark needs Java 17 or later (Debian: apt-get install openjdk-17-jre-headless), "
            "or use engine: duckdb"
        )
    return None


PARAMETER = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def _unix(fn: str, value: exp.Expression) -> exp.Expression:
    """Spark's unix_seconds / unix_micros of a timestamp (Parquet from DuckDB reads as TIMESTAMP_NTZ,
    which they refuse; the session time zone is UTC, so the cast keeps the instant)."""
    return exp.Anonymous(this=fn, expressions=[exp.cast(value, exp.DataType.build("TIMESTAMP"))])


def _java_replacement(text: str) -> str:
    """An RE2 replacement (`\\1` a group, other characters as they are) in Java's spelling (`$1`)."""
    return re.sub(r"\\(\d)|\$", lambda m: f"${m.group(1)}" if m.group(1) else "\\$", text)


def _spark_rule(node: exp.Expression) -> exp.Expression:
    """The translations SQLGlot's spark dialect gets wrong for our SQL (see the module docstring)."""
    if isinstance(node, exp.PercentileCont):
        return exp.Anonymous(this="percentile", expressions=[node.this, node.expression])
    if isinstance(node, exp.Anonymous) and node.name.lower() == "epoch_us":
        return _unix("unix_micros", node.expressions[0])
    if isinstance(node, exp.Anonymous) and node.name.lower() == "round_even":
        return exp.Anonymous(this="bround", expressions=node.expressions)
    if isinstance(node, exp.DateDiff) and node.unit is not None and node.unit.name.upper() == "SECOND":
        return exp.paren(
            exp.Sub(this=_unix("unix_seconds", node.this), expression=_unix("unix_seconds", node.expression))
        )
    if isinstance(node, exp.RegexpFullMatch):
        whole = exp.DPipe(
            this=exp.DPipe(this=exp.Literal.string(r"\A(?:"), expression=node.expression),
            expression=exp.Literal.string(r")\z"),
        )
        return exp.Anonymous(this="regexp_like", expressions=[node.this, whole])
    if isinstance(node, exp.RegexpReplace) and isinstance(node.args.get("replacement"), exp.Literal):
        node = node.copy()
        node.set("replacement", exp.Literal.string(_java_replacement(node.args["replacement"].name)))
        return node
    if isinstance(node, exp.FromJson) and isinstance(node.expression, exp.Literal):
        return _from_json(node.this, json.loads(node.expression.name))
    if isinstance(node, exp.Anonymous) and node.name.lower() == "json_valid":
        (text,) = node.expressions
        parsed = exp.Anonymous(this="try_parse_json", expressions=[text.copy()])
        return exp.If(this=text.copy().is_(exp.null()), true=exp.null(), false=parsed.is_(exp.null()).not_())
    if isinstance(node, exp.Window) and isinstance(node.this, exp.RowNumber) and _unordered(node):
        return exp.Anonymous(this="monotonically_increasing_id", expressions=[])
    if isinstance(node, exp.Literal) and not node.is_string and "." in node.name and "e" not in node.name.lower():
        return exp.cast(node.copy(), exp.DataType.build("DOUBLE"))
    return node


def _spark_type(structure: Any) -> str:
    """DuckDB's JSON structure (`{"k": "VARCHAR"}`, `["BIGINT"]`) as a Spark DDL type."""
    if isinstance(structure, list):
        return f"array<{_spark_type(structure[0])}>"
    if isinstance(structure, dict):
        return "struct<" + ",".join(f"`{k}`:{_spark_type(v)}" for k, v in structure.items()) + ">"
    return exp.DataType.build(structure, dialect="duckdb").sql(dialect="spark").lower()


def _from_json(text: exp.Expression, structure: Any) -> exp.Expression:
    """Spark's from_json of DuckDB's structure; a list of structs item by item (see the module docstring)."""
    if not (isinstance(structure, list) and isinstance(structure[0], dict)):
        return exp.Anonymous(this="from_json", expressions=[text, exp.Literal.string(_spark_type(structure))])
    items = exp.Anonymous(this="from_json", expressions=[text, exp.Literal.string("array<string>")])
    item = exp.Anonymous(
        this="from_json", expressions=[exp.column("_item"), exp.Literal.string(_spark_type(structure[0]))]
    )
    return exp.Anonymous(
        this="transform", expressions=[items, exp.Lambda(this=item, expressions=[exp.to_identifier("_item")])]
    )


def _unordered(window: exp.Window) -> bool:
    return not window.args.get("partition_by") and window.args.get("order") is None


def _utc(value: Any) -> Any:
    return value.replace(tzinfo=UTC) if isinstance(value, datetime) and value.tzinfo is None else value


def to_spark(sql: str) -> str:
    """A statement in DuckDB's dialect compiled for Spark SQL (parameters `$x` become `:x`)."""
    tree = sqlglot.parse_one(sql, read="duckdb")
    return tree.transform(_spark_rule).sql(dialect="spark")


def contract_select(model: type[pa.DataFrameModel], select: str) -> str:
    """`select`'s columns in the contract's order and SQL types, by name (DuckDB's dialect): what
    `INSERT INTO <contract DDL> BY NAME` does on DuckDB, as one statement Spark can compile too."""
    columns = model.to_schema().columns
    # A column's DDL may carry a default (`BIGINT DEFAULT 0`): the cast takes the type alone.
    types = {name: col.metadata["sql"].split(" DEFAULT ")[0] for name, col in columns.items()}
    cols = ", ".join(f'CAST("{name}" AS {sql}) AS "{name}"' for name, sql in types.items())
    return f"SELECT {cols} FROM ({select}) AS _rows"


def empty_select(model: type[pa.DataFrameModel]) -> str:
    """No rows, in the contract's columns and SQL types (a table not written yet, read as empty)."""
    columns = model.to_schema().columns
    cols = ", ".join(
        f'CAST(NULL AS {col.metadata["sql"].split(" DEFAULT ")[0]}) AS "{name}"' for name, col in columns.items()
    )
    return f"SELECT {cols} FROM (SELECT 1 AS one) AS _none WHERE false"


def parquet_glob(warehouse: Path, table: str) -> str:
    """The Parquet files of warehouse table `table`, for DuckDB: `read_parquet(parquet_glob(...))`.
    Spark reads the folder itself (`spark.read.parquet(str(warehouse / table))`); both skip the
    hidden and `_` files Spark's writer leaves beside them."""
    return str(Path(warehouse) / table / "*.parquet")


def swap_folder(new: Path, target: Path) -> None:
    """Replace folder `target` by `new` (beside it): a reader sees the old folder, for an instant
    none, or the new one, never half of one (renames: a local or shared filesystem)."""
    old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_aside(target: Path, write: Callable[[Path], object]) -> None:
    """Table folder `target` replaced by what `write(folder)` writes into a new folder beside it;
    nothing is left behind when the write fails."""
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    try:
        write(aside)
    except BaseException:
        shutil.rmtree(aside, ignore_errors=True)
        raise
    swap_folder(aside, target)


class SparkTables:
    """A stage's tables on Spark: inputs read from a warehouse folder of Parquet tables (one
    folder per table), steps kept as cached temp views, results written back as Parquet.

    It offers what a DuckDB stage uses of `Scratch` (`table(name, select, params)`), so the
    functions that name a stage's steps run unchanged on either engine.
    """

    def __init__(self, spark: SparkSession, warehouse: Path, checkpoint: bool = False) -> None:
        self.spark = spark
        # An iterative stage's steps are local checkpoints, so each step's plan starts afresh
        # (cached steps keep their whole lineage in the plan: one more join per round).
        self.checkpoint = checkpoint
        self.warehouse = Path(warehouse)
        self.names: list[str] = []
        self._cached: list[DataFrame] = []
        # DuckDB's TIMESTAMP has no zone; hour() and unix_seconds() then read it as UTC on Spark too.
        spark.conf.set("spark.sql.session.timeZone", "UTC")

    def path(self, table: str) -> Path:
        return self.warehouse / table

    def read(self, *tables: str) -> None:
        """Register warehouse tables (Parquet folders) as temp views under their own names."""
        for table in tables:
            self.spark.read.parquet(str(self.path(table))).createOrReplaceTempView(table)
            self._adopt(table)

    def parquet(self, name: str, folder: Path) -> str:
        """The Parquet files in `folder` as temp view `name`."""
        self.spark.read.parquet(str(folder)).createOrReplaceTempView(name)
        return self._adopt(name)

    def frame(self, name: str, frame: Any) -> str:
        """A small pandas frame (a vocabulary) as temp view `name`."""
        self.spark.createDataFrame(frame).createOrReplaceTempView(name)
        return self._adopt(name)

    def query(self, select: str, params: dict | None = None) -> DataFrame:
        """A DuckDB-dialect SELECT run on Spark with its `$name` parameters bound (not pasted).
        A naive datetime (DuckDB's TIMESTAMP) is bound as that UTC instant, whatever the
        driver's own time zone."""
        wanted = set(PARAMETER.findall(select))
        args = {k: _utc(v) for k, v in (params or {}).items() if k in wanted}
        missing = wanted - set(args)
        if missing:
            raise ValueError(f"no value for parameter(s) {', '.join(sorted(missing))}")
        return self.spark.sql(to_spark(select), args=args)

    def view(self, name: str, select: str, params: dict | None = None) -> str:
        """A SELECT as temp view `name`, recomputed where read (an input other steps filter)."""
        self.query(select, params).createOrReplaceTempView(name)
        return self._adopt(name)

    def table(self, name: str, select: str, params: dict | list | None = None) -> str:
        """A step's rows as temp view `name`, cached (or checkpointed) and computed once: later steps
        read it several times."""
        frame = self.query(select, params if isinstance(params, dict) else None)
        if self.checkpoint:
            frame = frame.localCheckpoint()
        else:
            frame = frame.cache()
            frame.count()
        self._cached.append(frame)
        frame.createOrReplaceTempView(name)
        return self._adopt(name)

    def scalar(self, select: str, params: dict | None = None) -> Any:
        """The one value a SELECT gives (a count an iterative step stops on): one row to the driver."""
        return self.query(select, params).first()[0]

    def write(self, model: type[pa.DataFrameModel], table: str, select: str, params: dict | None = None) -> int:
        """Replace warehouse table `table` with `select`'s rows in the contract's columns and types:
        written beside it, then moved in: a reader sees the old folder, for an instant none, or the
        new one, never half of one (folder renames: a local or shared filesystem, not an object
        store). Returns the rows written."""
        frame = self.query(contract_select(model, select), params)
        target = self.path(table)
        write_aside(target, lambda aside: frame.write.parquet(str(aside)))
        self.read(table)
        return self.spark.read.parquet(str(target)).count()

    def _adopt(self, name: str) -> str:
        if name not in self.names:
            self.names.append(name)
        return name

    def drop(self, keep: Iterable[str] = ()) -> None:
        """Drop the temp views and cached steps (warehouse tables stay on disk)."""
        for frame in self._cached:
            frame.unpersist()
        self._cached.clear()
        for name in self.names:
            if name not in keep:
                self.spark.catalog.dropTempView(name)
        self.names = [n for n in self.names if n in keep]


def duckdb_functions(spark: SparkSession, functions: dict[str, tuple]) -> None:
    """Register DuckDB's own functions of text values in `spark`, by name: {name: (SQL type of
    the result, DuckDB SQL of `l` and `r`)}, or (type, SQL, the argument names) for others, e.g.
    ("x",). Each runs on the executors as a vectorized Python function over a private DuckDB (the
    executors must run Persona's interpreter, as `resources.spark_resource` sets), so Spark gets
    DuckDB's exact values where it has no function of the same meaning."""
    from pyspark.sql.functions import pandas_udf

    for name, (result, sql, *args) in functions.items():
        run = _duckdb_function(sql, *(args or [("l", "r")]))
        spark.udf.register(name, pandas_udf(run, result.lower()))


def _duckdb_function(sql: str, args: tuple[str, ...]):
    # (pandas is a module global: pandas_udf reads the type hints, strings under `annotations`.)
    def run(*columns: pd.Series) -> pd.Series:
        import duckdb

        with duckdb.connect() as con:
            con.register("frame", pd.DataFrame(dict(zip(args, columns))))
            return con.execute(f"SELECT {sql} AS v FROM frame").df()["v"]

    # pandas_udf reads the number of arguments from the hints: one per argument name.
    if len(args) == 1:

        def one(x: pd.Series) -> pd.Series:
            return run(x)

        return one

    def two(l: pd.Series, r: pd.Series) -> pd.Series:  # noqa: E741  (DuckDB's names for the two sides)
        return run(l, r)

    return two
