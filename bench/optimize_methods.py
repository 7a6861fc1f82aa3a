"""Which edit method buys the KL: ``refdir optimize`` with each method alone, the default ones
together, and none (the direction alone, at full strength: the best single direction), on one
run's candidates, against the paper's selection measured the same way.

Each search gets the same number of trials, starts from a copy of the same run folder (so no
step is redone, and a cone trained there is read back) and is confirmed on the same validation
prompts by generation. The table gives, per search, the least KL on its confirmed front at a
generated refusal rate of at most ``--target`` (harmful_val), and the ratio of the paper's KL
to it.

    python bench/optimize_methods.py --run runs/opt --trials 60 [--out runs/methods]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from refdir.artifacts.pareto import FrontPoint, ParetoRecord
from refdir.model.loading import load_model
from refdir.optimize.cone import CONES
from refdir.optimize.config import DEFAULT_METHODS, METHOD_NAMES, OptimizeConfig
from refdir.optimize.run import optimize
from refdir.study.config import read_config

RUN_FILES = (
    "refdir-run.json",
    "config.json",
    "config.toml",
    "prompts.json",
    "refusal_tokens.json",
    "candidates.safetensors",
    "selection.json",
    "direction.safetensors",
    "direction.json",
    "timings.json",
)
SEARCHES: dict[str, tuple[str, ...]] = {
    "direction only": (),
    **{f"{m} only": (m,) for m in METHOD_NAMES},
    "all": DEFAULT_METHODS,
}
"""Each method alone, and ``all``: the default methods together (every one but ``subspace``)."""


def _rate(p: FrontPoint) -> float:
    return p.refusal_generated if p.refusal_generated is not None else p.refusal_first_token


def least_kl(points: list[FrontPoint], target: float) -> FrontPoint | None:
    fits = [p for p in points if _rate(p) <= target]
    return min(fits, key=lambda p: p.kl) if fits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run or optimize folder")
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--target", type=float, default=0.02)
    parser.add_argument("--n-front", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated search names to run")
    args = parser.parse_args()
    base = OptimizeConfig.model_validate(read_config(args.run / "config.toml"))
    cm = load_model(base)
    rows: list[dict[str, Any]] = []
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    for name, methods in SEARCHES.items():
        if wanted and name not in wanted:
            continue
        folder = args.out / name.replace(" ", "-")
        if not (folder / ParetoRecord.FILE).exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for file in RUN_FILES:
                if (args.run / file).exists():
                    shutil.copy2(args.run / file, folder / file)
            if (args.run / CONES).is_dir():  # trained cones, read back when their settings match
                shutil.copytree(args.run / CONES, folder / CONES)
        config = base.model_copy(
            update={
                "methods": methods,
                "trials": args.trials,
                "n_front": args.n_front,
                "heldout": False,
                "export": False,
                "max_refusal": args.target,
            }
        )
        start = time.perf_counter()
        record: ParetoRecord | None
        try:
            record = optimize(config, folder, model=cm)
        except Exception as exc:  # a search with no point under the target still counts
            print(f"{name}: {exc}")
            record = ParetoRecord.read(folder) if (folder / ParetoRecord.FILE).exists() else None
        wall = time.perf_counter() - start
        if record is None:
            continue
        best = least_kl(record.points, args.target)
        rows.append(
            {
                "search": name,
                "trials": record.trials,
                "wall_s": round(wall, 1),
                "trial_s": record.trial_seconds,
                "paper_kl": record.paper.kl,
                "paper_refusal": record.paper.refusal_generated,
                "best_kl": best.kl if best else None,
                "best_refusal": _rate(best) if best else None,
                "best_params": best.params if best else None,
            }
        )
    print(
        f"\nleast KL on harmful_val at refusal <= {args.target} (generated), {args.trials} trials"
    )
    print(
        f"{'search':18s} {'trials':>6s} {'wall s':>7s} {'best KL':>8s} {'refusal':>8s} {'paper KL':>8s} {'paper/best':>10s}"
    )
    for r in rows:
        ratio = r["paper_kl"] / r["best_kl"] if r["best_kl"] else float("nan")
        best_kl = f"{r['best_kl']:.4f}" if r["best_kl"] is not None else "-"
        refusal = f"{r['best_refusal']:.3f}" if r["best_refusal"] is not None else "-"
        print(
            f"{r['search']:18s} {r['trials']:6d} {r['wall_s']:7.0f} {best_kl:>8s} {refusal:>8s} "
            f"{r['paper_kl']:8.4f} {ratio:10.2f}"
        )
    (args.out / "methods.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
