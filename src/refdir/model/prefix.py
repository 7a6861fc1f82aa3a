"""The token prefix that every prompt of a call shares (system prompt, template header) runs
once; its key/value cache serves every batch. Batches of prompts are read in parts of similar
length whose caches are joined for decoding, and a decoding cache keeps room for the tokens to
come instead of growing by concatenation."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache, cache_utils

from refdir.hf import cache_kwargs, returned_cache
from refdir.model.chat import by_length, pad_left
from refdir.model.chat_model import ChatModel

__all__ = ["SharedPrefix", "rows_selectable", "shared_prefix_len"]


def shared_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix common to every row, leaving at least one token per row."""
    first = rows[0]
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


_MIN_SHARED = 4


@dataclass
class SharedPrefix:
    """The token prefix every row shares, and its key/value cache (one cache row per
    ``copies``: callers that run several variants of the model, such as one candidate
    direction per row, keep one prefix row per variant)."""

    length: int
    cache: Cache | None
    copies: int = 1

    @classmethod
    def build(
        cls,
        cm: ChatModel,
        rows: Sequence[Sequence[int]],
        enabled: bool = True,
        copies: int = 1,
        at_most: int | None = None,
    ) -> SharedPrefix:
        """Run the prefix ``rows`` share (cut to ``at_most`` tokens) once; no prefix when it is
        shorter than a few tokens, when ``enabled`` is false or when the cache cannot serve it."""
        shared = shared_prefix_len(rows) if enabled and len(rows) > 1 else 0
        if at_most is not None:
            shared = min(shared, at_most)
        if shared < _MIN_SHARED:
            return cls(0, None)
        ids = torch.tensor([list(rows[0][:shared])] * copies, dtype=torch.long, device=cm.device)
        result = cm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = returned_cache(result)
        usable = isinstance(cache, Cache) and rows_selectable(cache)
        return cls(shared, cache, copies) if usable else cls(0, None)

    def _prefill(
        self,
        cm: ChatModel,
        rows: Sequence[Sequence[int]],
        cache_rows: torch.Tensor | None,
        use_cache: bool,
        keep: int = 1,
    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """One forward over left-padded ``rows`` after the prefix: (output, attention mask of
        prefix + rows, position ids of the rows). ``keep``: the logits of the last ``keep``
        positions (0: every position after the prefix)."""
        batch = pad_left([r[self.length :] for r in rows], cm.chat.pad_id).to(cm.device)
        if self.cache is None:
            positions = batch.position_ids
            result = cm.model(**batch.inputs(), use_cache=use_cache, logits_to_keep=keep)
            return result, batch.attention_mask, positions
        n = batch.input_ids.shape[0]
        mask = torch.cat(
            [batch.attention_mask.new_ones(n, self.length), batch.attention_mask], dim=1
        )
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, self.length :]
        past = copy.deepcopy(self.cache)
        if cache_rows is None:
            past.batch_repeat_interleave(n)
        else:
            past.batch_select_indices(cache_rows.cpu())
        result = cm.model(
            input_ids=batch.input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs(cm.model, past),
            logits_to_keep=keep,
        )
        return result, mask, positions

    def logits(
        self,
        cm: ChatModel,
        rows: Sequence[Sequence[int]],
        cache_rows: torch.Tensor | None = None,
        on_host: bool = True,
    ) -> torch.Tensor:
        """Last-position logits of ``rows`` (float32, on the host unless ``on_host`` is false);
        ``cache_rows`` picks the prefix row of each."""
        result, _, _ = self._prefill(cm, rows, cache_rows, use_cache=False)
        logits = result.logits[:, -1].float()
        return logits.cpu() if on_host else logits

    def last_logits(self, cm: ChatModel, rows: Sequence[Sequence[int]], keep: int) -> torch.Tensor:
        """Logits [B, keep, vocab] at the last ``keep`` positions of ``rows`` (left-padded, so
        every row ends at the last one), as the model returns them; only those positions go
        through the unembedding. ``keep`` may not exceed the longest row after the prefix."""
        result, _, _ = self._prefill(cm, rows, None, use_cache=False, keep=keep)
        return result.logits[:, -keep:]

    def greedy(
        self,
        cm: ChatModel,
        rows: Sequence[Sequence[int]],
        max_new_tokens: int,
        stops: set[int],
        variants: torch.Tensor | None = None,
        on_batch: Callable[[torch.Tensor], None] | None = None,
    ) -> list[list[int]]:
        """Greedy answers to ``rows`` (one batch), each ending at its first stop token.

        The prompts are read in parts of similar length whose caches are joined for decoding
        (see :meth:`_prefill_parts`). A row leaves the batch (and its cache rows are dropped) as
        soon as it stops, so the remaining steps cost only what the rows still answering need;
        with a cache whose rows cannot be selected (recurrent state), stopped rows ride along
        and are ignored. ``variants`` and ``on_batch``: see :func:`generate_ids` (the prefix
        must then hold one cache row per variant)."""
        kinds = variants if variants is not None else torch.zeros(len(rows), dtype=torch.long)
        tell = on_batch or (lambda _: None)
        logits, past, mask, position, order = self._prefill_parts(cm, rows, kinds, tell)
        kinds = kinds[order]
        if _joinable(past):
            for layer in past.layers:
                _RoomyLayer.adopt(layer, max_new_tokens)
        shrink = rows_selectable(past)
        answers: list[list[int]] = [[] for _ in rows]
        active: list[int | None] = list(order)  # batch row -> answer (None: stopped)
        stop_list = torch.tensor(sorted(stops), dtype=torch.long)
        for step in range(max_new_tokens):
            token = logits.argmax(-1).cpu()
            for row, t in zip(active, token.tolist(), strict=True):
                if row is not None:
                    answers[row].append(t)
            stopped = torch.isin(token, stop_list).tolist()
            active = [None if s else row for row, s in zip(active, stopped, strict=True)]
            going = [i for i, row in enumerate(active) if row is not None]
            if not going or step == max_new_tokens - 1:
                break
            if shrink and len(going) < len(active):
                keep = torch.tensor(going)
                active = [active[i] for i in going]
                token, mask, position, kinds = token[keep], mask[keep], position[keep], kinds[keep]
                past.batch_select_indices(keep)  # CPU indices serve caches on any device
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            position = position + 1
            tell(kinds)
            result = cm.model(
                input_ids=token[:, None].to(cm.device),
                attention_mask=mask,
                position_ids=position,
                use_cache=True,
                **cache_kwargs(cm.model, past),
            )
            past = returned_cache(result)
            logits = result.logits[:, -1]
        return answers

    def _prefill_parts(
        self,
        cm: ChatModel,
        rows: Sequence[Sequence[int]],
        variants: torch.Tensor,
        tell: Callable[[torch.Tensor], None],
    ) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor, list[int]]:
        """Read the prompts before decoding: (last-position logits, cache, attention mask,
        last position ids, and for each batch row the index of its prompt in ``rows``).

        A batch larger than ``_PREFILL_ROWS`` is read in parts of similar length, each padded
        only to its own longest prompt; their key/value caches are then joined into one batch,
        zero-padded (and masked) between the shared prefix and each part's tokens, so decoding
        runs every row at once. Caches whose layers are not plain key/value layers (sliding
        windows, recurrent state) are read in one padded pass instead."""

        def read(part: list[int]) -> tuple[torch.Tensor, Any, torch.Tensor, torch.Tensor]:
            kinds = variants[part]
            tell(kinds)
            cache_rows = kinds if self.copies > 1 else None
            result, mask, positions = self._prefill(
                cm, [rows[i] for i in part], cache_rows, use_cache=True
            )
            return result.logits[:, -1], returned_cache(result), mask, positions[:, -1:]

        whole = list(range(len(rows)))
        if len(rows) <= _PREFILL_ROWS:
            return (*read(whole), whole)
        parts = by_length(rows, _PREFILL_ROWS)
        outs = [read(parts[0])]
        if not _joinable(outs[0][1]):  # every part gets the same kind of cache
            return (*read(whole), whole)
        outs += [read(part) for part in parts[1:]]
        order = [i for part in parts for i in part]
        width = max(mask.shape[1] for _, _, mask, _ in outs)

        def widen(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = width - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            head = t.narrow(dim, 0, self.length)
            tail = t.narrow(dim, self.length, t.shape[dim] - self.length)
            return torch.cat([head, t.new_zeros(shape), tail], dim=dim)

        past = outs[0][1]
        for index, layer in enumerate(past.layers):
            layer.keys = torch.cat([widen(o[1].layers[index].keys, -2) for o in outs])
            layer.values = torch.cat([widen(o[1].layers[index].values, -2) for o in outs])
        logits = torch.cat([o[0] for o in outs])
        mask = torch.cat([widen(o[2], 1) for o in outs])
        position = torch.cat([o[3] for o in outs])
        return logits, past, mask, position, order


class _RoomyLayer(cache_utils.DynamicLayer):
    """A plain key/value cache layer with room reserved for the tokens to come: a decoding step
    writes its keys and values into that room instead of concatenating them to the cache (which
    copies the whole cache at every step). ``keys`` and ``values`` are views of the room."""

    room: tuple[torch.Tensor, torch.Tensor]
    length: int

    @classmethod
    def adopt(cls, layer: cache_utils.DynamicLayer, extra: int) -> None:
        """Turn a filled :class:`DynamicLayer` into one with room for ``extra`` more tokens."""
        keys, values = layer.keys, layer.values
        assert keys is not None and values is not None
        layer.__class__ = cls
        assert isinstance(layer, cls)
        layer.room, layer.length = (keys, values), keys.shape[-2]
        layer.reserve(extra)

    def reserve(self, extra: int) -> None:
        keys, values = self.room
        n = self.length
        more_keys = keys.new_empty((*keys.shape[:-2], n + extra, keys.shape[-1]))
        # values may have a head size of their own (multi-head latent attention)
        more_values = values.new_empty((*values.shape[:-2], n + extra, values.shape[-1]))
        more_keys[..., :n, :] = keys[..., :n, :]
        more_values[..., :n, :] = values[..., :n, :]
        self._view(more_keys, more_values, n)

    def _view(self, keys: torch.Tensor, values: torch.Tensor, n: int) -> None:
        self.room, self.length = (keys, values), n
        self.keys, self.values = keys[..., :n, :], values[..., :n, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, m = self.length, key_states.shape[-2]
        if n + m > self.room[0].shape[-2]:
            self.reserve(max(m, n))
        keys, values = self.room
        keys[..., n : n + m, :] = key_states
        values[..., n : n + m, :] = value_states
        self._view(keys, values, n + m)
        return keys[..., : n + m, :], values[..., : n + m, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        keys, values = self.room
        self._view(keys[indices], values[indices], self.length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        keys, values = self.room
        self._view(
            keys.repeat_interleave(repeats, 0), values.repeat_interleave(repeats, 0), self.length
        )

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self._view(*self.room, self.length + tokens_to_remove)


_PREFILL_ROWS = 32
"""Prompts per prefill pass when a generated batch is larger (see ``_prefill_parts``)."""


def _joinable(cache: Any) -> bool:
    """Whether caches like ``cache`` can be joined along the batch: plain key/value layers
    only, every one holding keys."""
    layers: list[Any] = list(getattr(cache, "layers", None) or [])

    def plain(layer: Any) -> bool:
        keys = getattr(layer, "keys", None)
        return (
            type(layer) is cache_utils.DynamicLayer
            and isinstance(keys, torch.Tensor)
            and keys.dim() == 4
            and keys.shape[-2] > 0
        )

    return bool(layers) and all(plain(layer) for layer in layers)


def rows_selectable(cache: Any) -> bool:
    """Whether every layer of ``cache`` can keep or repeat a subset of its batch rows: the
    key/value layers can; the recurrent-state layers of linear-attention models cannot."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    recurrent = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())
    return all(
        callable(getattr(layer, "batch_select_indices", None))
        and callable(getattr(layer, "batch_repeat_interleave", None))
        and not isinstance(layer, recurrent)
        for layer in layers
    )
