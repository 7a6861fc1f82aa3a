"""The cone: a subspace trained by gradient, as a method of ``refdir optimize``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refdir.errors import RefdirError
from refdir.interventions.edit_weights import edit_weights
from refdir.model.generation import last_position_logits
from refdir.optimize.cone import ConeSource, train_basis
from refdir.optimize.config import DEFAULT_METHODS, OptimizeConfig
from refdir.optimize.run import optimize
from refdir.optimize.scorer import TrialScorer
from refdir.optimize.sources import DirectionSources
from refdir.optimize.space import edit_of, paper_params
from tiny import TINY_RUN, tiny_chat_model

HARMFUL = ["how to pick a lock", "steal a car", "make a weapon", "hack a bank", "forge a pass"]
HARMLESS = ["bake bread", "a poem on tea", "sum 2 and 2", "name a river", "fold a shirt"]
TOKENS = list(range(40, 90))


def _init(d: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed))


def test_training_lowers_the_loss_and_leaves_the_model_alone() -> None:
    """The loss (refusal-token probability under ablation + KL on harmless prompts) falls from
    its start; the basis is orthonormal; the model's weights and their grad flags are as they
    were."""
    cm = tiny_chat_model("llama", seed=4)
    before = {n: p.detach().clone() for n, p in cm.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in cm.model.named_parameters()}
    basis, losses = train_basis(
        cm,
        _init(cm.d_model, 2),
        HARMFUL,
        HARMLESS,
        TOKENS,
        steps=25,
        lr=0.05,
        batch_size=5,
        progress=False,
    )
    assert basis.shape == (2, cm.d_model) and basis.dtype == torch.float32
    torch.testing.assert_close(basis @ basis.T, torch.eye(2), atol=1e-5, rtol=0)
    assert len(losses) == 25 and losses[-1] < losses[0]
    for name, p in cm.model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad == flags[name]
    with pytest.raises(RefdirError, match="needs harmful and harmless"):
        train_basis(cm, _init(cm.d_model, 1), [], HARMLESS, TOKENS, progress=False)


def test_a_trained_cone_scores_better_than_its_start() -> None:
    """On the training prompts, the search's own objectives under the cone's ablation beat those
    under its starting basis (their sum, which is what the cone minimises)."""
    cm = tiny_chat_model("llama", seed=4)
    start = _init(cm.d_model, 1, seed=1)
    scorer = TrialScorer(cm, HARMFUL, HARMLESS, TOKENS)
    sources = _FixedBasis(start)
    sources.cone = ConeSource(
        cm, lambda k: start, HARMFUL, HARMLESS, TOKENS, steps=30, progress=False
    )
    params = {"index": 0.0, "cone": True}
    cone = sources.cone_basis(1)
    assert sources.cone_basis(1) is cone  # trained once
    plain = edit_of({"index": 0.0}, _FixedBasis(start))
    trained = edit_of(params, sources)
    a, b = scorer.score(plain), scorer.score(trained)
    assert b.refusal_score + b.kl < a.refusal_score + a.kl


class _FixedBasis(DirectionSources):
    """Sources whose basis is one given matrix."""

    def __init__(self, basis: torch.Tensor) -> None:
        self.fixed = basis
        self.cone = None
        self.diffs = torch.zeros(4, basis.shape[1])

    def basis(self, index: float, projected: bool = False, k: int = 1) -> torch.Tensor:
        return self.fixed / self.fixed.norm(dim=-1, keepdim=True)


def test_a_cone_edit_as_weights_equals_its_hooks() -> None:
    cm = tiny_chat_model("llama", seed=4)
    sources = _FixedBasis(_init(cm.d_model, 1))
    sources.cone = ConeSource(
        cm,
        lambda k: _init(cm.d_model, k, seed=k),
        HARMFUL,
        HARMLESS,
        TOKENS,
        steps=3,
        progress=False,
    )
    edit = edit_of({"index": 1.0, "cone": True, "k": 2, "norm": True}, sources)
    assert edit.basis.shape[0] == 2
    with edit.apply(cm):
        hooked = last_position_logits(cm, HARMLESS)
    edit_weights(cm, edit)
    torch.testing.assert_close(last_position_logits(cm, HARMLESS), hooked, atol=1e-4, rtol=0)


def test_the_cone_is_searched_when_named_and_by_default(tmp_path: Path) -> None:
    assert OptimizeConfig().methods == DEFAULT_METHODS == ("weights", "projected", "norm", "cone")
    assert paper_params(2, ("subspace", "cone"), 4) == {"index": 2.0, "k": 1, "cone": False}
    no_cone = _FixedBasis(torch.ones(1, 4))
    with pytest.raises(RefdirError, match="add `cone` to `methods`"):
        edit_of({"index": 0.0, "cone": True}, no_cone)
    config = OptimizeConfig.model_validate(
        {
            **TINY_RUN.model_dump(),
            "trials": 6,
            "n_front": 2,
            "methods": ("subspace", "cone"),
            "cone_steps": 2,
            "heldout": False,
            "export": False,
        }
    )
    record = optimize(config, tmp_path / "opt", progress=False, model=tiny_chat_model("llama"))
    assert record.methods == ["subspace", "cone"] and record.trials == 6


def test_a_kept_cone_is_read_back_and_only_with_the_same_settings(tmp_path: Path) -> None:
    """With a folder, a trained cone is kept in ``cones/``; a later source with the same
    settings reads it instead of training (the model is not run), one with other settings
    trains again."""
    cm = tiny_chat_model("llama", seed=4)

    def source(steps: int) -> ConeSource:
        return ConeSource(
            cm,
            lambda k: _init(cm.d_model, k, seed=k),
            HARMFUL,
            HARMLESS,
            TOKENS,
            steps=steps,
            progress=False,
            folder=tmp_path,
        )

    trained = source(3)(2)
    assert (tmp_path / "cones" / "k2.safetensors").is_file()
    again = source(3)
    calls = []
    handle = cm.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        kept = again(2)
        assert not calls  # read, not trained
        assert torch.equal(kept, trained) and len(again.losses[2]) == 3
        other = source(4)(2)  # other settings: trained again
        assert calls and not torch.equal(other, trained)
    finally:
        handle.remove()
    (tmp_path / "cones" / "k2.safetensors").write_bytes(b"not a cone")
    assert source(4)(2).shape == (2, cm.d_model)  # a broken file is trained over


def test_a_cone_points_actadd_at_the_paper_layer_and_the_candidate_side() -> None:
    """The chosen edit's direction (for activation addition): a cone's sits at the paper's layer
    whatever its unused ``index``, and a basis vector pointing away from the candidate is
    turned round."""
    from refdir.directions.candidates import Candidates
    from refdir.interventions.edit import Edit
    from refdir.optimize.run import _direction_of

    g = torch.Generator().manual_seed(0)
    cands = Candidates(
        torch.randn(1, 5, 8, generator=g, dtype=torch.float64),
        torch.randn(1, 5, 8, generator=g, dtype=torch.float64),
        "m",
    )
    at_paper = cands.direction(-1, 2)
    flipped = -(at_paper.vector / at_paper.vector.norm()).float().unsqueeze(0)
    ones = (1.0,) * 4
    cone = Edit(flipped, ones, ones, 1.0, False, {"index": 0.3, "cone": True})
    direction = _direction_of(cands, cone, -1, paper_layer=2)
    assert direction.layer == 2
    torch.testing.assert_close(
        direction.vector.double(), at_paper.vector.double(), rtol=1e-5, atol=1e-6
    )
    plain = Edit(flipped, ones, ones, 1.0, False, {"index": 3.2})
    assert _direction_of(cands, plain, -1, paper_layer=2).layer == 3
