"""Start forward passes at a layer: record the residual stream entering every layer once, then
let the layers below the start replay the recording instead of computing it.

Direction selection runs the same validation prompts through many variants of the model that
differ only from one layer on (activation addition at layer ``l``): below ``l`` every variant
computes the same thing, so that work is done once. The recording holds, for each prompt, the
tokens after the prefix that :class:`~refdir.model.prefix.SharedPrefix` shares, so it replays
inside the same prefix-cached passes that :func:`~refdir.directions.scoring.candidate_logits` makes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from refdir.errors import RefdirError
from refdir.model.chat import by_length
from refdir.model.chat_model import ChatModel
from refdir.model.generation import unsort
from refdir.model.hooks import Hook, hooked, residual_stream
from refdir.model.prefix import SharedPrefix

__all__ = ["LayerInputs", "Recorder"]


@dataclass
class LayerInputs:
    """The residual stream entering each decoder layer, per prompt row, after the shared prefix.

    ``inputs[layer][row]`` is a [tokens, d_model] tensor (the row's tokens after ``prefix_len``),
    in the model's dtype, kept in CPU memory (a large model's recording would crowd a GPU).
    """

    prefix_len: int
    inputs: list[list[torch.Tensor]]
    rows: list[tuple[int, ...]]

    @classmethod
    def record(
        cls,
        cm: ChatModel,
        rows: Sequence[Sequence[int]],
        batch_size: int = 32,
        layers: Sequence[int] | None = None,
    ) -> LayerInputs | None:
        """Record the inputs of ``layers`` (default: every layer) for ``rows`` in a pass of
        their own (no intervention may be active).

        None when the model's decoder layers do not return a plain tensor (older layer classes
        return tuples), so that callers fall back to full passes.
        """
        return cls.record_with_logits(cm, rows, batch_size, layers)[0]

    @classmethod
    def record_with_logits(
        cls,
        cm: ChatModel,
        rows: Sequence[Sequence[int]],
        batch_size: int = 32,
        layers: Sequence[int] | None = None,
    ) -> tuple[LayerInputs | None, torch.Tensor]:
        """:meth:`record`, and the rows' last-position logits [N, vocab] from the same pass (the
        baseline that the passes starting at a layer are compared with)."""
        chunks = by_length(rows, batch_size)
        parts: list[torch.Tensor] = []
        with torch.inference_mode():
            prefix = SharedPrefix.build(cm, rows)
            with cls.recording(cm, rows, prefix.length, layers) as recorder:
                for chunk in chunks:
                    recorder.in_flight(chunk)
                    parts.append(prefix.logits(cm, [rows[i] for i in chunk]))
        return recorder.result(), unsort(parts, chunks)

    @classmethod
    @contextmanager
    def recording(
        cls,
        cm: ChatModel,
        rows: Sequence[Sequence[int]],
        prefix_len: int,
        layers: Sequence[int] | None = None,
    ) -> Iterator[Recorder]:
        """Record layer inputs during the caller's own passes over ``rows`` (tokens after a
        shared prefix of ``prefix_len``): before each batch, tell the recorder which rows are in
        flight, in the batch's order; after the block, :meth:`Recorder.result` is the
        recording."""
        recorder = Recorder(cm, rows, prefix_len, layers)
        with hooked(recorder.hooks()):
            yield recorder

    def subset(self, keep: Sequence[int]) -> LayerInputs:
        """The recording of the rows ``keep`` (indices into the recorded rows), in that order;
        passes over them must share the recorded prefix length (``SharedPrefix.build``'s
        ``at_most``), as the rows left may share a longer one."""
        return LayerInputs(
            self.prefix_len,
            [[layer[i] for i in keep] for layer in self.inputs],
            [self.rows[i] for i in keep],
        )

    def check(self, rows: Sequence[Sequence[int]], prefix_len: int) -> None:
        """Raise unless ``rows`` (and their shared prefix) are the ones recorded."""
        if prefix_len != self.prefix_len or [tuple(r) for r in rows] != self.rows:
            raise RefdirError(
                "the recorded layer inputs belong to other prompts; record them again"
            )

    @contextmanager
    def start_at(self, cm: ChatModel, layer: int, live: dict[str, list[int]]) -> Iterator[None]:
        """Within the block, layers below ``layer`` compute nothing: layer ``layer - 1`` returns
        the recorded input of ``layer`` for the rows ``live["rows"]`` names (the recording's row
        indices of the batch in flight, left-padded like :func:`~refdir.model.chat.pad_left`), and the
        layers under it return their input untouched. Only the tokens after the shared prefix may
        go through; layer 0 (``layer`` = 0) runs every layer as usual."""
        if not 0 <= layer < len(self.inputs):
            raise RefdirError(f"layer {layer} is outside 0..{len(self.inputs) - 1}")
        recorded = self.inputs[layer]
        if layer > 0 and any(x.numel() == 0 for x in recorded):
            raise RefdirError(f"the inputs of layer {layer} were not recorded; record that layer")

        def identity(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = args[0] if args else kwargs["hidden_states"]
            assert isinstance(hidden, torch.Tensor)
            return hidden

        def replay(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = identity(*args, **kwargs)
            width = hidden.shape[1]
            if len(live["rows"]) != hidden.shape[0]:
                raise RefdirError("the replayed rows do not match the batch in flight")
            out = torch.zeros(hidden.shape, dtype=hidden.dtype)
            for j, row in enumerate(live["rows"]):
                x = recorded[row]
                if x.shape[0] > width:
                    raise RefdirError("a replayed row is longer than the batch; bad row indices")
                out[j, width - x.shape[0] :] = x
            return out.to(hidden.device)

        patched = list(cm.layout.layers)[:layer]
        # an instance-level forward may already be there (accelerate's device wrapper): keep it
        saved = [vars(module).get("forward") for module in patched]
        try:
            for i, module in enumerate(patched):
                module.forward = replay if i == layer - 1 else identity
            yield
        finally:
            for module, old in zip(patched, saved, strict=True):
                if old is not None:
                    module.forward = old
                elif "forward" in vars(module):
                    del module.forward


class Recorder:
    """Collects the inputs of some decoder layers, per row, while passes run (see
    :meth:`LayerInputs.recording`)."""

    def __init__(
        self,
        cm: ChatModel,
        rows: Sequence[Sequence[int]],
        prefix_len: int,
        layers: Sequence[int] | None,
    ) -> None:
        self.n_layers = len(cm.layout.layers)
        wanted = range(self.n_layers) if layers is None else layers
        if any(not 0 <= layer < self.n_layers for layer in wanted):
            raise RefdirError(f"layers to record must lie in 0..{self.n_layers - 1}")
        self.layers = set(wanted)
        self.cm, self.rows, self.prefix_len = cm, rows, prefix_len
        empty = torch.empty(0)
        self.inputs = [[empty] * len(rows) for _ in range(self.n_layers)]
        self.plain: list[bool] = []
        self.rows_in_flight: list[int] = []

    def in_flight(self, rows: Sequence[int]) -> None:
        """The recording's row indices of the batch about to run, in the batch's order."""
        self.rows_in_flight = list(rows)

    def hooks(self) -> list[Hook]:
        def keep(index: int, hidden: torch.Tensor) -> None:
            if index not in self.layers:
                return
            on_host = hidden.detach().to("cpu")  # one copy per layer and batch, not per row
            for j, row in enumerate(self.rows_in_flight):
                n = len(self.rows[row]) - self.prefix_len
                self.inputs[index][row] = on_host[j, on_host.shape[1] - n :].clone()

        def output_type(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.plain.append(isinstance(output, torch.Tensor))

        hooks = residual_stream(self.cm.layout.layers, keep)[: self.n_layers]
        hooks.append((self.cm.layout.layers[0], "output", output_type))
        return hooks

    def result(self) -> LayerInputs | None:
        """The recording; None when the decoder layers do not return a plain tensor."""
        if not self.plain or not all(self.plain):
            return None
        return LayerInputs(self.prefix_len, self.inputs, [tuple(r) for r in self.rows])
