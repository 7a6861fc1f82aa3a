"""Parity of weight orthogonalization with hook ablation on every supported family.

Tiny random models of each architecture (float32), a random direction, the max |delta logit|
over every position of two prompts, and what ablation leaves of a direction in the residual
stream (``verify_ablation``). Not a timing; prints one row per architecture.

    python bench/parity.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from refdir.errors import RefdirError
from refdir.interventions.orthogonalization import parity
from refdir.model.layout_check import verify_ablation
from tiny import ARCHS, MORE_ARCHS, tiny_chat_model


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'architecture':12s} {'tied':>5s} {'exact':>6s} {'max |delta logit|':>18s} left")
    for arch in [*ARCHS, *MORE_ARCHS]:
        for tied in (False, True):
            worst, left = 0.0, 0.0
            try:
                for seed in range(3):
                    cm = tiny_chat_model(arch, seed=seed, tied=tied)
                    left = max(left, verify_ablation(cm))
                    torch.manual_seed(100 + seed)
                    report, delta = parity(cm, torch.randn(cm.d_model))
                    worst = max(worst, delta)
            except RefdirError as exc:
                print(f"{arch:12s} {tied!s:>5s} refused: {str(exc)[:70]}")
                continue
            print(f"{arch:12s} {tied!s:>5s} {report.exact!s:>6s} {worst:18.2e} {left:.1e}")


if __name__ == "__main__":
    main()
