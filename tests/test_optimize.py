"""`refdir optimize` on tiny models: the search, its storage (resume, two workers), the
front and its pick rules, the kernel, the export's parity with the edit's hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refdir.artifacts.export import ExportManifest
from refdir.artifacts.pareto import FrontPoint, HeldoutRecord, ParetoRecord
from refdir.errors import RefdirError
from refdir.interventions.edit import Edit
from refdir.model.generation import last_position_logits
from refdir.optimize.config import OptimizeConfig
from refdir.optimize.front import knee, pick
from refdir.optimize.run import optimize
from refdir.optimize.space import kernel
from tiny import TINY_RUN, tiny_chat_model

CONFIG = OptimizeConfig.model_validate(
    {**TINY_RUN.model_dump(), "trials": 6, "n_front": 3, "n_subspace": 4, "long_tokens": 3}
)


def test_kernel_shape() -> None:
    w = kernel(9, peak=1.2, center=4.0, width=2.0, edge=0.5)
    assert w == pytest.approx((0, 0, 0.6, 0.9, 1.2, 0.9, 0.6, 0, 0))
    flat = kernel(5, peak=1.0, center=0.0, width=5.0, edge=1.0)
    assert flat == (1.0,) * 5  # the paper's edit: weight 1 everywhere
    assert kernel(3, peak=1.0, center=1.5, width=1.0, edge=0.0) == pytest.approx((0, 0.5, 0.5))
    with pytest.raises(RefdirError, match="width must be positive"):
        kernel(3, 1.0, 1.0, 0.0, 0.5)


def test_optimize_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "opt"
    record = optimize(CONFIG, out, progress=False, model=tiny_chat_model("llama"))
    assert record.trials == 6
    assert ParetoRecord.read(out).model_dump() == record.model_dump()
    assert record.points and 0 <= record.chosen < len(record.points)
    kls = [p.kl for p in record.points]
    assert kls == sorted(kls)
    # the front: no point dominates another by the search's objectives
    for a in record.points:
        for b in record.points:
            assert not (
                (a.kl, a.refusal_score) != (b.kl, b.refusal_score)
                and a.kl <= b.kl
                and a.refusal_score <= b.refusal_score
            )
    assert record.paper.label == "paper" and record.paper.refusal_generated is not None
    held = HeldoutRecord.read(out)
    assert [r.label for r in held.results] == ["none", "paper", "chosen"]
    assert held.results[0].kl_mean == pytest.approx(0.0, abs=1e-9)
    assert (out / "figures" / "pareto.png").stat().st_size > 1000
    assert "| paper |" in (out / "optimize.md").read_text()
    # the export equals the chosen edit by hooks
    manifest = ExportManifest.read(out / "best")
    assert manifest.exact and manifest.parity_max_abs_logit_delta < 1e-4
    edit = Edit.load(out / "best")
    base = tiny_chat_model("llama")
    prompts = ["hi", "write a poem"]
    with edit.apply(base):
        hooked = last_position_logits(base, prompts)
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out / "best")
    batch = base.chat.encode(prompts)
    with torch.no_grad():
        logits = exported(**batch.inputs()).logits[:, -1].float()
    torch.testing.assert_close(logits, hooked, rtol=0, atol=1e-4)


def _point(kl: float, rate: float) -> FrontPoint:
    return FrontPoint(
        trial=0,
        label="t",
        params={},
        refusal_score=rate,
        refusal_first_token=rate,
        kl=kl,
        refusal_generated=rate,
        ce_text=None,
    )


def test_pick_rules() -> None:
    points = [_point(0.01, 0.9), _point(0.03, 0.3), _point(0.05, 0.02), _point(0.2, 0.0)]
    assert pick(points, None, None) == (knee(points), "the knee of the front")
    assert knee(points) == 2
    assert pick(points, 0.04, None)[0] == 1
    assert pick(points, None, 0.02)[0] == 2
    assert pick(points, None, 0.0)[0] == 3
    with pytest.raises(RefdirError, match=r"no front point has KL <= 0\.001"):
        pick(points, 0.001, None)
    with pytest.raises(RefdirError, match="not both"):
        pick(points, 0.1, 0.1)
