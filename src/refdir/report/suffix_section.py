"""The report's section on an adversarial suffix (the ``suffix`` step of ``refdir run``): its
refusal rates, the projection onto the direction layer by layer, and the top heads' attention."""

from __future__ import annotations

from refdir.report.blocks import Block, Heading, Image, Para, Table
from refdir.report.monitor_section import monitor_section
from refdir.report.run_data import SuffixData
from refdir.suffix.figures import ATTENTION_PNG, OBJECTIVE_PNG, PROJECTION_PNG

__all__ = ["suffix_section"]


def _layers_shown(n_layers: int, direction_layer: int) -> list[int]:
    picks = {0, n_layers // 4, n_layers // 2, direction_layer, (3 * n_layers) // 4, n_layers}
    return sorted(layer for layer in picks if 0 <= layer <= n_layers)


def suffix_section(data: SuffixData) -> list[Block]:
    """The section's blocks, figures read from the experiment's folder."""
    record, analysis = data.record, data.analysis
    rates = record.refusal_rate
    blocks: list[Block] = [
        Heading("Adversarial suffix"),
        Para(
            f"A universal suffix of {len(record.token_ids)} tokens, searched by GCG on "
            f"{len(record.instructions)} harmful instructions in {record.n_steps} steps "
            f"({record.seconds:.0f} s; objective {record.objective} "
            f"{record.initial_loss:.3f} -> {record.loss:.3f})."
        ),
        Table(
            ["held-out prompts", "refusal rate"],
            [
                ["instruction alone", f"{rates.without:.3f}"],
                ["+ adversarial suffix", f"{rates.with_:.3f}"],
                ["+ random suffix", f"{rates.random:.3f}"],
            ],
            f"Refusal rates by markers over {len(analysis.prompts)} prompts "
            f"({record.eval_prompts}), greedy, {analysis.max_new_tokens} new tokens.",
        ),
    ]
    rows = []
    for layer in _layers_shown(analysis.n_layers, analysis.direction_layer):
        mark = " (direction)" if layer == analysis.direction_layer else ""
        rows.append([f"{layer}{mark}", *(f"{row[layer]:.3f}" for row in analysis.projection)])
    blocks.append(
        Table(
            ["layer", *analysis.conditions],
            rows,
            "Mean projection onto the refusal direction at the post-instruction tokens.",
        )
    )
    heads = []
    for t, (layer, head) in enumerate(analysis.top_heads):
        cells = [
            " / ".join(f"{v:.2f}" for v in analysis.attention_split[c][t])
            for c in range(len(analysis.conditions))
        ]
        heads.append([f"L{layer}H{head}", *cells])
    blocks.append(
        Table(
            ["head", *analysis.conditions],
            heads,
            "Attention of the last position, top heads by attribution to the direction "
            "(instruction / suffix / template).",
        )
    )
    captions = {
        PROJECTION_PNG: "Mean projection onto the refusal direction at every layer, per condition.",
        ATTENTION_PNG: "Attention mass of the last position by region, for the top heads.",
        OBJECTIVE_PNG: "The search objective per step: the current suffix and the best so far.",
    }
    for name, caption in captions.items():
        path = data.folder / name
        if path.is_file():
            blocks.append(Image(f"suffix_{name}", caption, path.read_bytes(), caption))
    if data.monitor is not None:
        blocks.extend(monitor_section(data.monitor))
    return blocks
