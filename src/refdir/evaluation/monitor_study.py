"""How good a monitor the refusal direction makes, against a probe and under attack.

On held-out prompts, two scorers read the same activations (one post-instruction position,
every layer): the projection onto the unit refusal direction, and a logistic-regression probe
(scikit-learn, standardised inputs) trained per layer on the training prompts. Each is measured
by AUROC and the true-positive rate at 1% false positives (:mod:`refdir.evaluation.roc`), with
bootstrap intervals at the monitor's layer and as a curve over layers, in conditions: the
harmful prompts plain, and with each suffix given (an adversarial suffix from ``refdir suffix``,
a random one) appended. The harmless prompts stay plain in every condition: the threshold is
the one a deployment would set on its ordinary traffic, and the attacker moves only the harmful
side. The layer and position are the user's, or the best AUROC on validation prompts, or the
direction's own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from refdir.artifacts.monitor import MonitorCell, MonitorCurve, MonitorRecord, RocPoints
from refdir.directions.direction import Direction
from refdir.directions.extraction import post_instruction_rows
from refdir.errors import RefdirError
from refdir.evaluation.monitor import monitor
from refdir.evaluation.roc import MAX_FPR, auroc, roc_points, separation, tpr_at_fpr
from refdir.model.chat_model import ChatModel

__all__ = ["PLAIN", "SCORERS", "PromptPair", "choose_place", "fit_probe", "monitor_study"]

PLAIN = "plain"
SCORERS: tuple[str, ...] = ("direction", "probe")


@dataclass(frozen=True)
class PromptPair:
    """Harmful and harmless prompts, with the names of their sets."""

    harmful: list[str]
    harmless: list[str]
    harmful_name: str = "custom"
    harmless_name: str = "custom"

    def check(self, role: str) -> None:
        if not self.harmful or not self.harmless:
            raise RefdirError(f"the {role} prompts need both harmful and harmless prompts")


def choose_place(
    cm: ChatModel,
    direction: Direction,
    val: PromptPair,
    layer: int | None = None,
    position: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[int, int]:
    """The (layer, position) whose projection separates the validation prompts best (AUROC;
    ties: the shallower layer, the later position), within the ``layer`` or ``position``
    given."""
    val.check("validation")
    layers = None if layer is None else [layer]
    positions = None if position is None else [position]
    unit = direction.unit().double()
    scores = {
        name: post_instruction_rows(
            cm, prompts, layers, positions, "", batch_size, progress, f"validation {name}"
        )
        @ unit
        for name, prompts in (("harmful", val.harmful), ("harmless", val.harmless))
    }
    all_layers = list(range(cm.n_layers + 1)) if layer is None else [layer]
    all_positions = list(range(-cm.chat.n_post, 0)) if position is None else [position]
    best: tuple[float, int, int] | None = None
    for p, pos in enumerate(all_positions):
        for li, lay in enumerate(all_layers):
            value = auroc(scores["harmful"][:, p, li].numpy(), scores["harmless"][:, p, li].numpy())
            key = (value, -lay, pos)
            if best is None or key > (best[0], -best[1], best[2]):
                best = (value, lay, pos)
    assert best is not None
    return best[1], best[2]


def fit_probe(harmful: torch.Tensor, harmless: torch.Tensor, seed: int = 0) -> Pipeline:
    """A logistic-regression probe (standardised inputs, L2, scikit-learn's defaults) on
    activations [N, d] of the two classes; harmful is the positive class."""
    x = torch.cat([harmful, harmless]).numpy()
    y = np.r_[np.ones(harmful.shape[0]), np.zeros(harmless.shape[0])]
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    probe.fit(x, y)
    return probe


def _probe_scores(probe: Pipeline, rows: torch.Tensor) -> NDArray[np.float64]:
    return np.asarray(probe.decision_function(rows.numpy()), dtype=np.float64)


def monitor_study(
    cm: ChatModel,
    direction: Direction,
    train: PromptPair,
    test: PromptPair,
    *,
    val: PromptPair | None = None,
    suffixes: Mapping[str, str] | None = None,
    layer: int | None = None,
    position: int | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> MonitorRecord:
    """The monitor's table, per-layer curves and ROC curves (see the module)."""
    start = time.perf_counter()
    train.check("training")
    test.check("held-out")
    conditions = {PLAIN: "", **dict(suffixes or {})}
    if PLAIN in (suffixes or {}):
        raise RefdirError(f"a suffix condition may not be named {PLAIN!r}")
    monitor(cm, direction, layer, position, batch_size)  # checks the place and the direction
    if layer is not None and position is not None:
        chosen_by = "given"
    elif val is not None:
        layer, position = choose_place(cm, direction, val, layer, position, batch_size, progress)
        chosen_by = "validation"
    else:
        layer = direction.layer if layer is None else layer
        position = direction.position if position is None else position
        chosen_by = "direction"

    def rows(prompts: Sequence[str], extra: str, desc: str) -> torch.Tensor:  # [N, L+1, d]
        return post_instruction_rows(
            cm, prompts, None, [position], extra, batch_size, progress, desc
        )[:, 0]

    train_harmful = rows(train.harmful, "", "train harmful")
    train_harmless = rows(train.harmless, "", "train harmless")
    n_places = cm.n_layers + 1
    probes = [
        fit_probe(train_harmful[:, li], train_harmless[:, li], seed) for li in range(n_places)
    ]
    harmless = rows(test.harmless, "", "held-out harmless")
    harmful = {
        name: rows(test.harmful, extra, f"held-out harmful, {name}")
        for name, extra in conditions.items()
    }
    unit = direction.unit().double()

    def score(scorer: str, acts: torch.Tensor, li: int) -> NDArray[np.float64]:
        if scorer == "direction":
            return (acts[:, li] @ unit).numpy()
        return _probe_scores(probes[li], acts[:, li])

    table, curves, roc = [], [], []
    for scorer in SCORERS:
        negatives = [score(scorer, harmless, li) for li in range(n_places)]
        for name, acts in harmful.items():
            positives = [score(scorer, acts, li) for li in range(n_places)]
            sep = separation(positives[layer], negatives[layer], n_bootstrap, seed)
            table.append(
                MonitorCell(
                    scorer=scorer,
                    condition=name,
                    auroc=sep.auroc,
                    auroc_low=sep.auroc_ci[0],
                    auroc_high=sep.auroc_ci[1],
                    tpr_at_1pct_fpr=sep.tpr,
                    tpr_low=sep.tpr_ci[0],
                    tpr_high=sep.tpr_ci[1],
                )
            )
            curves.append(
                MonitorCurve(
                    scorer=scorer,
                    condition=name,
                    auroc=[auroc(p, n) for p, n in zip(positives, negatives, strict=True)],
                    tpr_at_1pct_fpr=[
                        tpr_at_fpr(p, n) for p, n in zip(positives, negatives, strict=True)
                    ],
                )
            )
            fpr, tpr = roc_points(positives[layer], negatives[layer])
            roc.append(RocPoints(scorer=scorer, condition=name, fpr=fpr, tpr=tpr))
    return MonitorRecord(
        model=cm.name,
        layer=layer,
        position=position,
        chosen_by=chosen_by,
        direction_layer=direction.layer,
        direction_position=direction.position,
        harmful=test.harmful_name,
        harmless=test.harmless_name,
        n_harmful=len(test.harmful),
        n_harmless=len(test.harmless),
        n_train_harmful=len(train.harmful),
        n_train_harmless=len(train.harmless),
        n_val_harmful=len(val.harmful) if val is not None and chosen_by == "validation" else 0,
        n_val_harmless=len(val.harmless) if val is not None and chosen_by == "validation" else 0,
        suffixes=conditions,
        n_bootstrap=n_bootstrap,
        max_fpr=MAX_FPR,
        table=table,
        curves=curves,
        roc=roc,
        seconds=time.perf_counter() - start,
    )
