"""The spec of a sweep (``refdir sweep SPEC.toml``): the runs it holds, as grids of
:class:`RunConfig` fields. Free of torch and of Ray, so that a bad spec is refused at once.

A spec is a TOML file::

    [base]               # RunConfig fields every run shares (any field, e.g. model, protocol)
    model = "organism"

    [[grid]]             # each key a RunConfig field and its list of values: every
    seed = [1, 2, 3]     # combination is a run (a single value may be given bare)

    [[grid]]             # more grids: their runs are added (a run given twice is run once)
    n_train = [32, 64]

    [sweep]              # how the runs are scheduled (command-line options override these)
    retries = 1          # times a failed run is tried again before it is reported
    cpus_per_run = 1     # CPUs Ray gives each run (default: the cluster's CPUs split between runs)
    gpus_per_run = 1     # GPUs Ray gives each run (default: 1 where the runs use cuda, else 0)

Each run is named for its grid's values (``seed-1``, ``n_train-32``, ``model-x_seed-2``) and
works in ``OUT/<name>/``.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from refdir.errors import RefdirError, one_line
from refdir.study.config import RunConfig, config_toml, option_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["RESERVED", "SweepRun", "SweepSettings", "SweepSpec", "read_spec"]

RESERVED = frozenset({"sweep", "comparison"})
"""Folders of a sweep's output that are not runs: its own files and the comparison."""

_SETTINGS = ("retries", "cpus_per_run", "gpus_per_run")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its folder name and its options."""

    name: str
    config: RunConfig

    @property
    def toml(self) -> str:
        """Its options as ``refdir run --config`` takes them (and as its folder records them)."""
        return config_toml(self.config)


@dataclass(frozen=True)
class SweepSettings:
    """How a sweep schedules its runs (None: decided from the cluster and the runs)."""

    retries: int = 1
    cpus_per_run: float | None = None
    gpus_per_run: float | None = None


@dataclass(frozen=True)
class SweepSpec:
    runs: tuple[SweepRun, ...]
    settings: SweepSettings


def _value_name(key: str, value: Any) -> str:
    """A grid value as part of a run's name: a model path by its last part."""
    if key in ("model", "gguf_file") and isinstance(value, str):
        value = Path(value).name.removesuffix(".gguf") or value
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, list | tuple):
        text = "+".join(str(v) for v in value) or "none"
    else:
        text = str(value)
    return _UNSAFE.sub("_", text).strip("._") or "_"


def _grid_runs(
    where: str, grid: dict[str, Any], base: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """The (name, options) of every combination of one grid's values."""
    unknown = sorted(set(grid) - set(RunConfig.model_fields))
    if unknown:
        raise RefdirError(
            f"{where}: unknown option {unknown[0]!r}; a grid's keys are fields of RunConfig"
        )
    axes: list[tuple[str, list[Any]]] = []
    for key, values in grid.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise RefdirError(f"{where}: `{key}` has no values; give a list of one or more")
        axes.append((key, values))
    runs = []
    for combo in itertools.product(*(values for _, values in axes)):
        chosen = dict(zip((key for key, _ in axes), combo, strict=True))
        name = "_".join(f"{k}-{_value_name(k, v)}" for k, v in chosen.items()) or "base"
        runs.append((name, {**base, **chosen}))
    return runs


def _settings(path: Path, table: Any) -> SweepSettings:
    if not isinstance(table, dict):
        raise RefdirError(f"{path}: [sweep] must be a table of {', '.join(_SETTINGS)}")
    unknown = sorted(set(table) - set(_SETTINGS))
    if unknown:
        raise RefdirError(
            f"{path}: unknown [sweep] setting {unknown[0]!r}; the settings are "
            + ", ".join(_SETTINGS)
        )
    retries = table.get("retries", 1)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise RefdirError(f"{path}: [sweep] retries must be a whole number, 0 or more")
    amounts: dict[str, float | None] = {}
    for key in ("cpus_per_run", "gpus_per_run"):
        value = table.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < 0
        ):
            raise RefdirError(f"{path}: [sweep] {key} must be a number, 0 or more")
        amounts[key] = None if value is None else float(value)
    return SweepSettings(retries, amounts["cpus_per_run"], amounts["gpus_per_run"])


def read_spec(path: Path) -> SweepSpec:
    """The runs and settings of a spec file; a one-line error for a missing or malformed file,
    an unknown option or setting, an option's bad value (naming the run) or two runs that
    would share a folder."""
    if not path.is_file():
        raise RefdirError(
            f"sweep spec {path} does not exist; give a TOML file of [base] and [[grid]]"
        )
    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RefdirError(
            f"sweep spec {path} is not readable TOML ({one_line(str(exc))})"
        ) from None
    unknown = sorted(set(spec) - {"base", "grid", "sweep"})
    if unknown:
        raise RefdirError(
            f"sweep spec {path}: unknown table {unknown[0]!r}; a spec holds [base], [[grid]] "
            "and [sweep]"
        )
    base = spec.get("base", {})
    if not isinstance(base, dict):
        raise RefdirError(f"sweep spec {path}: [base] must be a table of RunConfig fields")
    unknown = sorted(set(base) - set(RunConfig.model_fields))
    if unknown:
        raise RefdirError(
            f"sweep spec {path}: unknown option {unknown[0]!r} in [base]; the options are the "
            "fields of RunConfig"
        )
    grids = spec.get("grid", [{}])
    if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        raise RefdirError(f"sweep spec {path}: give each grid as a [[grid]] table")
    runs: dict[str, SweepRun] = {}
    for i, grid in enumerate(grids or [{}]):
        for name, options in _grid_runs(f"sweep spec {path}, grid {i + 1}", grid, base):
            try:
                config = RunConfig(**options)
            except ValidationError as exc:
                raise RefdirError(f"sweep spec {path}, run {name}: {option_error(exc)}") from None
            same = [r for r in runs.values() if r.config == config]
            if same:  # the same run from two grids: run once, under its first name
                continue
            if name in runs:
                raise RefdirError(
                    f"sweep spec {path}: two different runs are both named {name!r}; give "
                    "their grids values that differ in name"
                )
            if name in RESERVED:
                raise RefdirError(
                    f"sweep spec {path}: a run may not be named {name!r} (the sweep's own "
                    "folder); change its grid"
                )
            runs[name] = SweepRun(name, config)
    return SweepSpec(tuple(runs.values()), _settings(path, spec.get("sweep", {})))
