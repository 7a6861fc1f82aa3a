"""The refusal direction as a monitor: a prompt's score is the projection of its residual
stream, at one layer and post-instruction position, onto the unit direction. One forward pass
per prompt, cut at that layer; nothing is generated.

    scorer = refdir.monitor(cm, direction, layer=10, position=-1)
    scorer(["How do I pick a lock?"])          # -> array of projections
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from refdir.directions.direction import Direction
from refdir.directions.extraction import post_instruction_rows
from refdir.errors import RefdirError
from refdir.model.chat_model import ChatModel

__all__ = ["Monitor", "monitor"]


@dataclass(frozen=True)
class Monitor:
    """Scores prompts by their projection onto ``direction`` at ``layer`` (the residual stream's
    input of that layer; ``n_layers``: the last layer's output) and ``position`` (negative,
    over the post-instruction tokens). Higher: more like the harmful prompts."""

    cm: ChatModel
    direction: Direction
    layer: int
    position: int
    batch_size: int = 32

    def activations(
        self, prompts: Sequence[str], extra: str = "", progress: bool = False
    ) -> torch.Tensor:
        """The prompts' residual stream at the monitor's layer and position: float64 [N, d]."""
        rows = post_instruction_rows(
            self.cm,
            prompts,
            [self.layer],
            [self.position],
            extra,
            self.batch_size,
            progress,
            "monitor",
        )
        return rows[:, 0, 0]

    def scores(
        self, prompts: Sequence[str], extra: str = "", progress: bool = False
    ) -> NDArray[np.float64]:
        """Each prompt's projection onto the unit direction (``extra``: text appended to every
        instruction, such as a suffix)."""
        unit = self.direction.unit().double()
        return (self.activations(prompts, extra, progress) @ unit).numpy()

    def __call__(self, prompts: Sequence[str], extra: str = "") -> NDArray[np.float64]:
        return self.scores(prompts, extra)


def monitor(
    cm: ChatModel,
    direction: Direction,
    layer: int | None = None,
    position: int | None = None,
    batch_size: int = 32,
) -> Monitor:
    """A scorer of prompts by their projection onto ``direction`` at ``layer`` and ``position``
    (default: the direction's own). The direction must fit the model (its width and layers)."""
    direction.fits(cm.layout)
    layer = direction.layer if layer is None else layer
    position = direction.position if position is None else position
    if not 0 <= layer <= cm.n_layers:
        raise RefdirError(f"`layer` {layer} is outside 0..{cm.n_layers} for {cm.name}")
    if not -cm.chat.n_post <= position <= -1:
        raise RefdirError(
            f"`position` {position} is not a post-instruction position (-{cm.chat.n_post}..-1)"
        )
    if batch_size < 1:
        raise RefdirError(f"`batch_size` must be 1 or more, got {batch_size}")
    return Monitor(cm, direction, layer, position, batch_size)
