"""The options of ``refdir optimize`` (:class:`OptimizeConfig`): a run's options (the search
starts from a run folder's candidates, selection and refusal tokens, made first when missing)
and the search's own. Free of torch."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from refdir.flags import Flag
from refdir.study.config import RunConfig

__all__ = ["DEFAULT_METHODS", "METHOD_NAMES", "OptimizeConfig"]

OPTIMIZE = "Optimize"
METHOD_NAMES: tuple[str, ...] = ("weights", "projected", "norm", "layers", "subspace", "cone")
DEFAULT_METHODS: tuple[str, ...] = ("weights", "projected", "norm", "cone")
"""Searched unless ``methods`` says otherwise: every method but ``subspace``. One trained
direction (the cone of one) buys more than the directions of the per-prompt differences, and
costs one training before the first trials that ask for it; ``subspace`` with ``cone`` trains
cones of two and three as well."""


class OptimizeConfig(RunConfig):
    """Every option of ``refdir optimize``: the run's, then the search's."""

    trials: Annotated[int, Flag(panel=OPTIMIZE)] = Field(
        200,
        ge=1,
        description="completed trials the study should hold (other workers' and earlier "
        "commands' count; a larger number adds trials)",
    )
    max_minutes: Annotated[float, Flag(panel=OPTIMIZE)] = Field(
        0.0, ge=0.0, description="stop adding trials after this many minutes (0: no limit)"
    )
    storage: Annotated[str | None, Flag(panel=OPTIMIZE)] = Field(
        None,
        description="Optuna storage shared by workers: a database URL (sqlite:///x.db, "
        "postgresql://...) or a journal file's path (default: a journal file in the folder)",
    )
    methods: Annotated[tuple[str, ...], Flag(panel=OPTIMIZE, items=True, empty="none")] = Field(
        DEFAULT_METHODS,
        description="edit methods searched besides the direction: weights (per-layer kernels), "
        "projected, norm (norm-preserving), layers (each layer's writes lose the direction read "
        "at that layer), subspace (up to 3 directions; not searched unless "
        "named), cone (the direction, or with subspace the subspace, trained by gradient); "
        "none: the direction alone",
    )
    cone_steps: Annotated[int, Flag(panel=OPTIMIZE)] = Field(
        40, ge=1, description="gradient steps that train each cone (method cone)"
    )
    cone_kl_weight: Annotated[float, Flag(panel=OPTIMIZE)] = Field(
        1.0, ge=0.0, description="the weight of harmless KL against refusal in a cone's loss"
    )
    max_kl: Annotated[float | None, Flag(panel=OPTIMIZE)] = Field(
        None, ge=0.0, description="export the front point with fewest refusals at this KL or less"
    )
    max_refusal: Annotated[float | None, Flag(panel=OPTIMIZE)] = Field(
        None,
        ge=0.0,
        le=1.0,
        description="export the front point with least KL at this generated refusal rate or less "
        "(default rule, without either: the knee of the front)",
    )
    n_front: Annotated[int, Flag(panel=OPTIMIZE)] = Field(
        12,
        ge=1,
        description="front points confirmed by generation (spread along the front), at most "
        "as many more where the pick rule needs them, and as many more where the generated "
        "refusal rate falls steeply",
    )
    n_subspace: Annotated[int, Flag(panel=OPTIMIZE)] = Field(
        64, ge=2, description="harmful training prompts the subspace directions are taken from"
    )
    heldout: Annotated[bool, Flag(panel=OPTIMIZE)] = Field(
        True,
        description="evaluate the paper's edit and the exported one on the held-out sets",
    )
    export: Annotated[bool, Flag(panel=OPTIMIZE)] = Field(
        True, description="export the chosen point's checkpoint to best/"
    )

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for method in value:
            if method not in METHOD_NAMES:
                raise ValueError(
                    f"unknown edit method {method!r}; use some of {', '.join(METHOD_NAMES)}"
                )
        return tuple(m for m in METHOD_NAMES if m in value)

    def run_config(self) -> RunConfig:
        """The options of the run the search starts from."""
        return RunConfig.model_validate(self.model_dump(include=set(RunConfig.model_fields)))
