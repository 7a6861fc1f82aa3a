"""How stable the chosen direction is: runs of one model that differ only by the seed of their
prompt samples or by ``n_train`` (a sweep's grid), side by side. For each such group: the
(position, layer) each run picked; the pairwise cosine of the chosen directions; each run's
direction ablated on the held-out prompts of every run of the group (refusal metric on the
harmful ones, KL on the harmless ones; :mod:`refdir.evaluation.transfer`); and the spread of
the runs' refusal and KL figures."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refdir.artifacts.run import DIRECTION_TENSOR, ConfigRecord, RefusalTokensRecord
from refdir.directions.direction import Direction
from refdir.errors import RefdirError
from refdir.evaluation.transfer import Transfer, ablation_transfer
from refdir.model.loading import load_model
from refdir.model.options import ModelOptions
from refdir.report.blocks import Block, Heading, Para, Table, fmt
from refdir.report.run_data import held_out_prompts

__all__ = ["VARYING", "StabilityGroup", "measure_group", "stability_blocks", "stability_groups"]

VARYING = ("seed", "n_train")
"""The options a stability group's runs may differ in."""


@dataclass(frozen=True)
class Member:
    """One run of a group: what the section reads from it."""

    label: str
    run_dir: Path
    seed: Any
    n_train: Any
    layer: int
    position: int
    refusal: tuple[float, float, float]
    """Harmful refusal score: baseline, ablation, activation addition."""
    induce: float
    """Harmless refusal score under activation addition."""
    kl: float


@dataclass(frozen=True)
class StabilityGroup:
    model: str
    members: list[Member]
    cosines: list[list[float]]
    transfer: list[Transfer] | None
    """Per run j: every direction scored on run j's held-out prompts (None: not measured)."""


def stability_groups(summaries: Sequence[Any]) -> list[list[Any]]:
    """Runs (:class:`refdir.report.compare.RunSummary`) of one model whose options differ only
    in :data:`VARYING`, two or more that differ in them, in the order given."""
    groups: dict[str, list[Any]] = {}
    for s in summaries:
        if not s.options:
            continue  # settings unknown
        rest = {k: v for k, v in s.options.items() if k not in VARYING}
        groups.setdefault(repr(sorted(rest.items())), []).append(s)
    return [
        runs
        for runs in groups.values()
        if len({tuple(repr(r.options.get(k)) for k in VARYING) for r in runs}) > 1
    ]


def _member(s: Any) -> Member:
    m = s.metrics
    refusal = m.harmful.refusal_score
    return Member(
        label=s.label,
        run_dir=s.run_dir,
        seed=s.options.get("seed"),
        n_train=s.options.get("n_train"),
        layer=m.direction.layer,
        position=m.direction.position,
        refusal=(refusal.baseline, refusal.ablation, refusal.actadd),
        induce=m.harmless.refusal_score.actadd,
        kl=m.harmless.kl_ablation,
    )


def _cosines(vectors: torch.Tensor) -> list[list[float]]:
    unit = vectors.double() / vectors.double().norm(dim=-1, keepdim=True)
    return [[round(float(v), 4) for v in row] for row in unit @ unit.T]


def _model_options(run_dir: Path) -> ModelOptions:
    run = ConfigRecord.read(run_dir).run
    return ModelOptions(**{k: v for k, v in run.items() if k in ModelOptions.model_fields})


def measure_group(runs: Sequence[Any], cross_eval: bool = True) -> StabilityGroup:
    """Read a group's directions; with ``cross_eval``, load the model (as the first run loaded
    it) and score every direction on every run's held-out prompts."""
    members = [_member(s) for s in runs]
    directions = [Direction.load(m.run_dir, DIRECTION_TENSOR.fix()) for m in members]
    vectors = torch.stack([d.vector.double() for d in directions])
    transfer = None
    if cross_eval:
        options = _model_options(members[0].run_dir)
        try:
            cm = load_model(options)
        except RefdirError as exc:
            raise RefdirError(
                f"the stability section could not load {options.model} to score each run's "
                f"direction on the others' prompts ({exc}); compare where it loads, or without "
                "that part (`cross_eval=False`)"
            ) from None
        batch = int(ConfigRecord.read(members[0].run_dir).run.get("batch_size", 32))
        transfer = [
            ablation_transfer(
                cm,
                vectors.to(cm.device),
                held_out_prompts(m.run_dir, "harmful"),
                held_out_prompts(m.run_dir, "harmless"),
                RefusalTokensRecord.read(m.run_dir).ids,
                batch,
            )
            for m in members
        ]
    return StabilityGroup(runs[0].model, members, _cosines(vectors), transfer)


def _spread(values: Sequence[float]) -> list[str]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return [fmt(statistics.fmean(values)), fmt(sd), fmt(min(values)), fmt(max(values))]


def _off_diagonal(matrix: Sequence[Sequence[float]]) -> list[float]:
    return [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j]


def _matrix_table(
    labels: Sequence[str],
    rows: Sequence[tuple[str, Sequence[float]]],
    caption: str,
    corner: str = "direction of ↓ · prompts of →",
) -> Table:
    return Table(
        [corner, *labels],
        [[name, *(fmt(v) for v in values)] for name, values in rows],
        caption,
    )


def _group_blocks(group: StabilityGroup) -> list[Block]:
    members = group.members
    labels = [m.label for m in members]
    picks: dict[tuple[int, int], int] = {}
    for m in members:
        picks[(m.position, m.layer)] = picks.get((m.position, m.layer), 0) + 1
    cells = ", ".join(f"({p}, {layer}) ×{n}" for (p, layer), n in picks.items())
    off = _off_diagonal(group.cosines)
    text = (
        f"{len(members)} runs of {group.model} that differ only in {' and '.join(VARYING)}. "
        f"Picks (position, layer): {cells}. Pairwise cosine of the chosen directions: "
        f"min {fmt(min(off))}, mean {fmt(statistics.fmean(off))}."
    )
    blocks: list[Block] = [
        Heading(f"Stability: {group.model}", level=3),
        Para(text),
        Table(
            [
                "run",
                "seed",
                "n_train",
                "position, layer",
                "harmful refusal: baseline → ablation → act. add",
                "harmless refusal, act. add",
                "KL, harmless",
            ],
            [
                [
                    m.label,
                    fmt(m.seed),
                    fmt(m.n_train),
                    f"{m.position}, {m.layer}",
                    " → ".join(fmt(v) for v in m.refusal),
                    fmt(m.induce),
                    fmt(m.kl),
                ]
                for m in members
            ],
            "The direction each run picked and its own figures (refusal scores by markers on "
            "its held-out prompts).",
        ),
        Table(
            ["figure", "mean", "sd", "min", "max"],
            [
                ["layer", *_spread([float(m.layer) for m in members])],
                ["harmful refusal, baseline", *_spread([m.refusal[0] for m in members])],
                ["harmful refusal, ablation", *_spread([m.refusal[1] for m in members])],
                ["harmful refusal, act. add", *_spread([m.refusal[2] for m in members])],
                ["harmless refusal, act. add", *_spread([m.induce for m in members])],
                ["KL, harmless", *_spread([m.kl for m in members])],
            ],
            "The spread of the runs' figures (sd: the sample standard deviation).",
        ),
        _matrix_table(
            labels,
            list(zip(labels, group.cosines, strict=True)),
            "Cosine similarity of the chosen directions.",
            corner="cosine",
        ),
    ]
    if group.transfer is None:
        blocks.append(Para("Each direction on the others' prompts: not measured."))
        return blocks
    refusal = [[t.refusal[i] for t in group.transfer] for i in range(len(members))]
    kl = [[t.kl[i] for t in group.transfer] for i in range(len(members))]
    own = [refusal[i][i] for i in range(len(members))]
    others = _off_diagonal(refusal)
    base = statistics.fmean(t.refusal_baseline for t in group.transfer)
    blocks += [
        Para(
            "Each direction ablated on every run's held-out prompts: the refusal metric (mean "
            f"log-odds of the refusal tokens; {fmt(base)} without intervention, on average) "
            f"is {fmt(statistics.fmean(own))} with a run's own direction and "
            f"{fmt(statistics.fmean(others))} with another run's (worst "
            f"{fmt(max(others))}); the KL on harmless prompts is "
            f"{fmt(statistics.fmean(kl[i][i] for i in range(len(members))))} with its own "
            f"and {fmt(statistics.fmean(_off_diagonal(kl)))} with another's."
        ),
        _matrix_table(
            labels,
            [
                ("none (baseline)", [t.refusal_baseline for t in group.transfer]),
                *zip(labels, refusal, strict=True),
            ],
            "Refusal metric on the held-out harmful prompts of each column's run, with each "
            "row's direction ablated (lower: refuses less).",
        ),
        _matrix_table(
            labels,
            list(zip(labels, kl, strict=True)),
            "KL(baseline ‖ ablation) on the held-out harmless prompts of each column's run, "
            "with each row's direction ablated.",
        ),
    ]
    return blocks


def stability_blocks(groups: Sequence[StabilityGroup]) -> list[Block]:
    """The comparison's stability section (nothing without a group)."""
    if not groups:
        return []
    blocks: list[Block] = [Heading("Stability of the chosen direction")]
    for group in groups:
        blocks += _group_blocks(group)
    return blocks
