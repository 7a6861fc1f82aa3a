"""The figure and the page of ``refdir optimize``: the refusals-versus-KL front with the paper's
selection drawn on it as a point, and the held-out check as a table."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure

from refdir.artifacts.pareto import FrontPoint, HeldoutRecord, ParetoRecord

__all__ = ["pareto_figure", "pareto_markdown"]


def _rate(p: FrontPoint) -> float:
    return p.refusal_generated if p.refusal_generated is not None else p.refusal_first_token


def pareto_figure(
    record: ParetoRecord,
    others: Sequence[tuple[str, Sequence[tuple[float, float]]]] = (),
) -> Figure:
    """Generated refusal rate (harmful_val) against harmless KL for each front point, the
    paper's selection, the exported point, and any ``others`` ((label, [(kl, refusal)]))."""
    fig = Figure(figsize=(5.2, 3.6), layout="constrained")
    ax = fig.add_subplot()
    points = record.points
    ax.plot(
        [p.kl for p in points],
        [_rate(p) for p in points],
        "o-",
        color="#1f77b4",
        label=f"refdir front ({record.trials} trials)",
    )
    ax.plot(
        [p.kl for p in points],
        [p.refusal_first_token for p in points],
        "x",
        color="#1f77b4",
        alpha=0.5,
        label="cheap score (first token)",
    )
    chosen = points[record.chosen]
    ax.plot([chosen.kl], [_rate(chosen)], "*", ms=14, color="#2ca02c", label="exported")
    ax.plot(
        [record.paper.kl], [_rate(record.paper)], "s", ms=8, color="#d62728", label="paper's pick"
    )
    for (label, xy), color in zip(others, ("#ff7f0e", "#9467bd", "#8c564b"), strict=False):
        ax.plot([x for x, _ in xy], [y for _, y in xy], "^", color=color, label=label)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("KL on harmless_val (last position)")
    ax.set_ylabel("refusal rate on harmful_val")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    return fig


def _params(p: FrontPoint) -> str:
    parts = []
    for key in ("index", "projected", "norm", "k", "embed"):
        if key in p.params:
            value = p.params[key]
            parts.append(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts)


def pareto_markdown(record: ParetoRecord, heldout: HeldoutRecord | None, figure: str) -> str:
    """The page: the front as a table, the agreement of the cheap score, the held-out check."""
    took = (
        f"this command's trials took {record.search_seconds:.0f} s (median "
        f"{record.trial_seconds:.2f} s each)"
        if record.search_seconds > 0
        else "this command added no trials"
    )
    lines = [
        f"# refdir optimize: {record.model}",
        "",
        f"{record.trials} trials ({', '.join(record.methods) or 'direction only'}); {took}. "
        f"Exported: point {record.chosen} ({record.rule}).",
        "",
        *(
            [
                "The cheap refusal score sums the probability of the tokens "
                + ", ".join(repr(t) for t in record.refusal_tokens)
                + " at the first response position.",
                "",
            ]
            if record.refusal_tokens
            else []
        ),
        f"![front]({figure})",
        "",
        "| point | trial | refusal (generated) | refusal (first token) | KL | CE text | parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [("paper", record.paper), *((str(i), p) for i, p in enumerate(record.points))]
    for name, p in rows:
        generated = f"{p.refusal_generated:.3f}" if p.refusal_generated is not None else "-"
        ce = f"{p.ce_text:.4f}" if p.ce_text is not None else "-"
        lines.append(
            f"| {name} | {p.trial if p.trial is not None else '-'} | {generated} | "
            f"{p.refusal_first_token:.3f} | {p.kl:.4f} | {ce} | {_params(p)} |"
        )
    a = record.agreement
    lines += [
        "",
        f"Cheap score against generation, on {a.n} front points: mean |difference| "
        f"{a.mean_abs_difference:.3f}, rank correlation {a.rank_correlation}, same side of 2% "
        f"{a.same_side:.2f}.",
    ]
    if heldout is not None:
        lines += [
            "",
            f"## Held out ({heldout.n_harmful} harmful prompts of {', '.join(heldout.harmful_sets)}, "
            f"{heldout.n_harmless} harmless)",
            "",
            f"| edit | refusal ({heldout.max_new_tokens} tok) | refusal ({heldout.long_tokens} tok) "
            "| harmless refusal | KL mean | KL median | CE text | CE own | actadd refusal |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in heldout.results:
            cells = [
                r.label,
                f"{r.refusal_harmful:.3f}",
                "-" if r.refusal_harmful_long is None else f"{r.refusal_harmful_long:.3f}",
                f"{r.refusal_harmless:.3f}",
                f"{r.kl_mean:.4f}",
                f"{r.kl_median:.4f}",
                f"{r.ce_text:.4f}",
                "-" if r.ce_own_completions is None else f"{r.ce_own_completions:.4f}",
                "-" if r.actadd_harmless_refusal is None else f"{r.actadd_harmless_refusal:.3f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
