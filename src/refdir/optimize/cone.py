"""A subspace found by gradient (a refusal "cone", after Wollschläger et al. 2025): ``k``
orthonormal directions, started from the difference-of-means direction and the top directions
of the per-prompt differences, trained so that ablating them at every residual write removes
refusal for as little KL on harmless prompts as possible.

The loss of one step is the search's two objectives (:mod:`.scorer`) on a batch of training
prompts, under the ablation of the current basis: the mean probability of the refusal tokens at
the first response position of harmful prompts, plus ``kl_weight`` x the mean KL(original ||
ablated) of the next token on harmless prompts. The basis is a free ``[k, d]`` matrix made
orthonormal (QR) in every step; Adam moves it. Only the basis has a gradient: the model's
weights are frozen for the duration. The training prompts are the run's training sets, never the
validation prompts the search scores trials on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from refdir.errors import RefdirError
from refdir.interventions.projection import orthonormal
from refdir.io import atomic_path
from refdir.model.chat_model import ChatModel
from refdir.model.hooks import hooked, map_sites

__all__ = ["CONES", "ConeSource", "train_basis"]

CONES = "cones"
"""The folder of trained cones in a run folder (``cones/kN.safetensors``), which a later command
with the same settings reads instead of training again."""

log = logging.getLogger(__name__)


def _orthonormal_rows(free: torch.Tensor) -> torch.Tensor:
    """Differentiable orthonormal rows spanning ``free`` [k, d] (the first along the first)."""
    q, r = torch.linalg.qr(free.T)
    return (q * r.diagonal().sign()).T


def _last_logits(cm: ChatModel, texts: Sequence[str]) -> torch.Tensor:
    """[N, vocab] float32 logits at the last prompt position, with the graph kept."""
    batch = cm.chat.encode(texts).to(cm.device)
    try:
        out = cm.model(**batch.inputs(), logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        out = cm.model(**batch.inputs())
    return out.logits[:, -1].float()


def train_basis(
    cm: ChatModel,
    init: torch.Tensor,
    harmful: Sequence[str],
    harmless: Sequence[str],
    refusal_tokens: Sequence[int],
    steps: int = 40,
    lr: float = 2e-3,
    kl_weight: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, list[float]]:
    """Orthonormal rows [k, d] (float32) trained from ``init`` (see the module's doc), and the
    loss of each step."""
    if steps < 1 or batch_size < 1:
        raise RefdirError(f"a cone needs steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
    if not harmful or not harmless or not refusal_tokens:
        raise RefdirError("a cone needs harmful and harmless training prompts and refusal tokens")
    device = cm.device
    free = orthonormal(init).to(device).clone().requires_grad_(True)
    tokens = torch.tensor(list(refusal_tokens), device=device)
    generator = torch.Generator().manual_seed(seed)
    frozen = [(p, p.requires_grad) for p in cm.model.parameters()]
    holder: dict[str, torch.Tensor] = {}

    def ablate(x: torch.Tensor) -> torch.Tensor:
        q = holder["q"].to(x.device)
        xf = x.float()
        return (xf - (xf @ q.T) @ q).to(x.dtype)

    def pick(texts: Sequence[str]) -> list[str]:
        order = torch.randperm(len(texts), generator=generator)[:batch_size]
        return [texts[int(i)] for i in order]

    optimizer = torch.optim.Adam([free], lr=lr)
    losses: list[float] = []
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for _ in tqdm(range(steps), desc="cone", disable=not progress, unit="step"):
            good = pick(harmless)
            with torch.no_grad():
                base = _last_logits(cm, good).double().log_softmax(-1)
            holder["q"] = _orthonormal_rows(free)
            with hooked(map_sites(cm.layout.residual_writes, ablate)):
                refusal = _last_logits(cm, pick(harmful)).log_softmax(-1)
                edited = _last_logits(cm, good).double().log_softmax(-1)
            p_refusal = refusal[:, tokens].exp().sum(-1).mean()
            kl = (base.exp() * (base - edited)).sum(-1).mean()
            loss = p_refusal + kl_weight * kl
            if not torch.isfinite(loss):
                raise RefdirError("the cone's loss is not finite; lower `cone_lr`")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        for p, grad in frozen:
            p.requires_grad_(grad)
        holder.clear()
    log.info(
        "cone of %d: loss %.4f -> %.4f in %d steps", init.shape[0], losses[0], losses[-1], steps
    )
    return orthonormal(_orthonormal_rows(free.detach())), losses


class ConeSource:
    """Cones of 1 to k directions, each trained once when first asked for (from the basis
    ``start(k)`` gives), with the same prompts and settings; with a ``folder``, kept there and
    read back by a later source whose settings and start are the same."""

    def __init__(
        self,
        cm: ChatModel,
        start: Callable[[int], torch.Tensor],
        harmful: Sequence[str],
        harmless: Sequence[str],
        refusal_tokens: Sequence[int],
        steps: int = 40,
        kl_weight: float = 1.0,
        seed: int = 0,
        progress: bool = True,
        folder: Path | None = None,
    ) -> None:
        self.cm = cm
        self.folder = folder
        self.start = start
        self.harmful = list(harmful)
        self.harmless = list(harmless)
        self.tokens = list(refusal_tokens)
        self.steps = steps
        self.kl_weight = kl_weight
        self.seed = seed
        self.progress = progress
        self._cones: dict[int, torch.Tensor] = {}
        self.losses: dict[int, list[float]] = {}

    def _settings(self, k: int, start: torch.Tensor) -> dict[str, Any]:
        """What a cone of ``k`` is trained from: a kept cone is reused only when these match."""
        return {
            "k": k,
            "model": self.cm.name,
            "steps": self.steps,
            "kl_weight": self.kl_weight,
            "seed": self.seed + k,
            "n_harmful": len(self.harmful),
            "n_harmless": len(self.harmless),
            "refusal_tokens": self.tokens,
            "start": hashlib.sha256(start.float().contiguous().numpy().tobytes()).hexdigest(),
        }

    def _kept(self, k: int, settings: dict[str, Any]) -> torch.Tensor | None:
        if self.folder is None:
            return None
        path = self.folder / CONES / f"k{k}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                held = json.loads((f.metadata() or {})["refdir_cone"])
                basis = f.get_tensor("basis")
        except Exception as exc:  # safetensors and json raise errors of their own
            log.warning("ignoring the kept cone %s (%s); training it again", path, exc)
            return None
        if held.get("settings") != settings:
            log.info("the kept cone %s was trained otherwise; training it again", path)
            return None
        self.losses[k] = [float(x) for x in held.get("losses", [])]
        log.info("cone of %d read from %s", k, path)
        return basis

    def _keep(self, k: int, basis: torch.Tensor, settings: dict[str, Any]) -> None:
        if self.folder is None:
            return
        meta = {"settings": settings, "losses": self.losses[k]}
        with atomic_path(self.folder / CONES / f"k{k}.safetensors") as tmp:
            save_file(
                {"basis": basis.contiguous()}, str(tmp), metadata={"refdir_cone": json.dumps(meta)}
            )

    def __call__(self, k: int) -> torch.Tensor:
        if k not in self._cones:
            start = self.start(k)
            settings = self._settings(k, start)
            kept = self._kept(k, settings)
            if kept is not None:
                self._cones[k] = kept
                return kept
            basis, losses = train_basis(
                self.cm,
                start,
                self.harmful,
                self.harmless,
                self.tokens,
                steps=self.steps,
                kl_weight=self.kl_weight,
                seed=settings["seed"],
                progress=self.progress,
            )
            self._cones[k], self.losses[k] = basis, losses
            self._keep(k, basis, settings)
        return self._cones[k]
