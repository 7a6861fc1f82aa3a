"""refdir against the paper's own code, same model, same prompts, same process.

The peer is the reference implementation of Arditi et al. (2024),
https://github.com/andyrdt/refusal_direction. refdir does not ship it: give a checkout of it as
``--peer PATH``; its functions are imported from there and called unchanged. It needs two
packages refdir does not (``pip install jaxtyping einops``), and its loss code the ``datasets``
package (``pip install -e '.[bench]'`` brings it, with lm-eval).

Model: the bundled organism (SmolLM2-135M-Instruct + refusal LoRA), chat-formatted by refdir's
template code for both tools (the peer has no SmolLM2 class of its own; its per-family classes
only format prompts and name modules). Prompts: the samples ``refdir run`` takes by default
(seed 42; 128 + 128 training, 32 + 32 validation), kept by the paper's refusal-metric filter
(refdir's), so that both tools get the same lists. Refusal tokens: derived by refdir from the
model's own refusals, given to both.

Or ``--model SHAPE``: random weights in a real model's shape (``bench/shapes.py``: llama-3-8b,
qwen2.5-7b, smollm2-135m) with ``--tokenizer``'s tokenizer, made on ``--device`` in
``--dtype``, for speed at scale (on a GPU, say). Its refusals are noise, so the filter is
skipped (both tools get the sampled lists) and the score comparisons mean agreement of two
implementations, not a direction; the chosen candidate is the last position at 0.6 L.

What it measures (1 always; ``--parts`` picks among selection: 2 and 3, ce: 4, orthogonalize:
5, generation: 6):

1. Extraction: the peer's ``get_mean_diff`` (what its ``generate_directions`` calls) against
   refdir's ``extract_candidates``, both over the same training prompts; the difference of
   their candidate directions.
2. Scoring like for like: bypass, induce and KL for every candidate of ``--layers`` (every
   post-instruction position), the peer's way (its ``select_direction`` loops, with its
   functions and hooks, restricted to these layers) against refdir's ``score_candidates``
   without pruning; the largest difference of the three scores. ``--score-batch`` sets
   refdir's batch (rows of (candidate, prompt) pairs) for its scoring here and in (3);
   ``--profile DIR`` then runs each tool's scoring of the last of ``--layers`` once more under
   torch's profiler and writes their op tables there (on a GPU: kernel time against wall time,
   and how often the host waited for the GPU).
3. The whole selection: refdir's as ``refdir run`` does it (pruned, every layer below 0.8 L)
   against the peer's projected from (2) to every candidate it scores (every layer and
   position: the peer scores all three scores for all of them). ``--full`` runs the peer's over
   every layer instead of projecting (about 40 minutes on 2 CPU cores).
4. CE loss on the packaged text corpus (``refdir run``'s 64 texts, cut to 256 tokens) under
   baseline, ablation and activation addition (coefficient -1 at the direction's layer, as
   both tools do for the loss): the peer's ``compute_loss_over_dataset`` (at its batch of 2, fed
   the same token rows in its batch format) against refdir's ``ce_losses`` (its batch of 8).
5. Weight orthogonalization against hook ablation: the peer's ``orthogonalize_llama3_weights``
   (the organism is a Llama) and refdir's ``orthogonalize``, each on a copy of the model, with
   the chosen direction (the organism's: layer 22, last position); the largest |logit difference| from hook ablation at
   the last position of the validation prompts kept, how often the top token differs, and how many of
   32 harmful_test completions (32 tokens) equal hook ablation's.
6. Completions under ablation of the chosen candidate: ``--gen N`` harmful_test
   prompts, 64 greedy tokens, the peer's ``generate_completions`` (transformers' ``generate``
   on left-padded batches, its default batch of 8, and refdir's batch) against refdir's decoder
   (batch ``--gen-batch``); how many completions are identical.

    python bench/peer.py --peer PATH [--layers 4 12 22] [--threads 2] [--full]
                         [--parts selection ce generation orthogonalize] [--gen 64] [--gen-batch 64]
                         [--model SHAPE --tokenizer DIR --device cuda --dtype bfloat16]
                         [--score-batch 32] [--profile DIR]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from copy import deepcopy
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from transformers import BatchEncoding

from refdir.data import load_corpus, sample_prompts
from refdir.directions.candidates import Candidates
from refdir.directions.extraction import extract_candidates
from refdir.directions.prompt_filter import filter_prompts
from refdir.directions.refusal_tokens import derive_refusal_tokens
from refdir.directions.scoring import ValidationSets, score_candidates
from refdir.directions.selection import CandidateScores, SelectionConfig, pick
from refdir.errors import RefdirError
from refdir.evaluation.losses import ScoredRows, ce_losses, text_rows
from refdir.interventions.intervention import NONE, Intervention, ablate
from refdir.interventions.orthogonalization import orthogonalize
from refdir.model.chat import pad_left
from refdir.model.chat_model import ChatModel
from refdir.model.generation import generate, last_position_logits
from refdir.model.loading import load_model, resolve_dtype
from shapes import REFUSAL_TEXTS, SHAPES, random_chat_model, refusal_token_ids, sync

SEED, N_TRAIN, N_VAL, BATCH = 42, 128, 32, 32
CHOSEN = (-1, 22)  # (position, layer): the organism's direction, as `refdir run` picks it
PARTS = ("selection", "ce", "generation", "orthogonalize")


def chosen(cm: ChatModel) -> tuple[int, int]:
    """(position, layer) of the direction the parts after selection use."""
    return CHOSEN if cm.name == "organism" else (-1, int(0.6 * cm.n_layers))


def import_peer(path: Path) -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """The peer's direction generation, selection, hook and model modules, from ``path``."""
    if not (path / "pipeline" / "submodules" / "select_direction.py").is_file():
        sys.exit(f"{path} is not a checkout of andyrdt/refusal_direction; clone it and pass --peer")
    sys.path.insert(0, str(path))
    try:
        return (
            importlib.import_module("pipeline.submodules.generate_directions"),
            importlib.import_module("pipeline.submodules.select_direction"),
            importlib.import_module("pipeline.utils.hook_utils"),
            importlib.import_module("pipeline.model_utils.model_base"),
        )
    except ModuleNotFoundError as e:
        sys.exit(f"the peer needs {e.name!r}: pip install jaxtyping einops")


class Peer:
    """The peer's functions over one model, as its ``ModelBase`` would hand them over."""

    def __init__(self, cm: ChatModel, refusal_toks: Sequence[int], path: Path) -> None:
        self.gen, self.sel, self.hooks, self.base = import_peer(path)
        self.cm = cm
        self.refusal_toks = list(refusal_toks)
        self.blocks = list(cm.layout.layers)
        self.attn = [layer.attn for layer in cm.layout.per_layer]
        self.mlp = [layer.mlp for layer in cm.layout.per_layer]

    def tokenize(self, instructions: Sequence[str]) -> Any:
        return self.cm.chat.encode(list(instructions))  # left-padded, like the peer's

    def mean_diff(self, harmful: list[str], harmless: list[str]) -> torch.Tensor:
        """[P, L, d] float64: what the peer's ``generate_directions`` computes."""
        positions = list(range(-self.cm.chat.n_post, 0))
        diff: torch.Tensor = self.gen.get_mean_diff(
            self.cm.model,
            self.cm.tokenizer,
            harmful,
            harmless,
            self.tokenize,
            self.blocks,
            batch_size=BATCH,
            positions=positions,
        )
        return diff

    def ablation_hooks(self, direction: torch.Tensor) -> tuple[list[Any], list[Any]]:
        h = self.hooks
        pre = [
            (b, h.get_direction_ablation_input_pre_hook(direction=direction)) for b in self.blocks
        ]
        post = [(m, h.get_direction_ablation_output_hook(direction=direction)) for m in self.attn]
        post += [(m, h.get_direction_ablation_output_hook(direction=direction)) for m in self.mlp]
        return pre, post

    def refusal_scores(self, prompts: list[str], pre: list[Any], post: list[Any]) -> float:
        scores = self.sel.get_refusal_scores(
            self.cm.model,
            prompts,
            self.tokenize,
            self.refusal_toks,
            fwd_pre_hooks=pre,
            fwd_hooks=post,
            batch_size=BATCH,
        )
        return float(scores.mean())

    def last_logits(self, prompts: list[str], pre: list[Any], post: list[Any]) -> torch.Tensor:
        logits: torch.Tensor = self.sel.get_last_position_logits(
            self.cm.model,
            self.cm.tokenizer,
            prompts,
            self.tokenize,
            fwd_pre_hooks=pre,
            fwd_hooks=post,
            batch_size=BATCH,
        )
        return logits

    def completions(
        self, prompts: list[str], direction: torch.Tensor, batch_size: int, max_new_tokens: int
    ) -> list[str]:
        """Its ``ModelBase.generate_completions`` under the ablation of ``direction``."""
        pre, post = self.ablation_hooks(direction)
        handle = SimpleNamespace(  # what the method reads from its ModelBase
            model=self.cm.model, tokenizer=self.cm.tokenizer, tokenize_instructions_fn=self.tokenize
        )
        dataset = [{"instruction": p, "category": ""} for p in prompts]
        done = self.base.ModelBase.generate_completions(
            handle, dataset, pre, post, batch_size=batch_size, max_new_tokens=max_new_tokens
        )
        return [str(c["response"]) for c in done]

    def scores(
        self, harmful: list[str], harmless: list[str], diffs: torch.Tensor, layers: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """The peer's ``select_direction`` loops over ``layers``: KL, bypass, induce, [P, L]."""
        n_pos, n_layers = int(diffs.shape[0]), int(diffs.shape[1])
        out = {
            k: torch.full((n_pos, n_layers), torch.nan, dtype=torch.float64)
            for k in (*_SCORES, "kl_exact")
        }
        # its baselines: harmful and harmless refusal scores, harmless last-position logits
        self.refusal_scores(harmful, [], [])
        self.refusal_scores(harmless, [], [])
        base = self.last_logits(harmless, [], [])
        for p in range(n_pos):
            for layer in layers:
                pre, post = self.ablation_hooks(diffs[p, layer])
                ablated = self.last_logits(harmless, pre, post)
                out["kl"][p, layer] = float(self.sel.kl_div_fn(base, ablated, mask=None).mean())
                out["kl_exact"][p, layer] = exact_kl(base, ablated)
        for p in range(n_pos):
            for layer in layers:
                pre, post = self.ablation_hooks(diffs[p, layer])
                out["bypass"][p, layer] = self.refusal_scores(harmful, pre, post)
        for p in range(n_pos):
            for layer in layers:
                add = self.hooks.get_activation_addition_input_pre_hook(
                    vector=diffs[p, layer], coeff=torch.tensor(1.0)
                )
                out["induce"][p, layer] = self.refusal_scores(
                    harmless, [(self.blocks[layer], add)], []
                )
        return out


_SCORES = ("bypass", "induce", "kl")


def exact_kl(base: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(base || other) of last-position logits [N, vocab], in float64 without the
    peer's epsilon inside the logarithms (its ``kl_div_fn`` adds 1e-6 to every probability)."""
    a, b = base.double().log_softmax(-1), other.double().log_softmax(-1)
    return float((a.exp() * (a - b)).sum(-1).mean())


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    sync()
    began = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - began


def profiled(label: str, fn: Callable[[], Any], out: Path) -> None:
    """Run ``fn`` under torch's profiler; write its op table to ``out/LABEL.txt`` and print one
    line: wall time (the profiler's own overhead included), the time the GPU's kernels were
    busy, and how often the host waited for the GPU (a synchronize, or a copy to or from it)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sync()
    began = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync()
    wall = time.perf_counter() - began
    events = prof.key_averages()
    waits = sum(e.count for e in events if e.key.endswith("Synchronize"))
    copies = sum(e.count for e in events if e.key.startswith("cudaMemcpy"))
    # torch before 2.4 names the device times "cuda"
    name = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else None
    name = name or "self_cuda_time_total"
    busy = sum(getattr(e, name) for e in events) / 1e6 if cuda else 0.0
    sort = name if cuda else "self_cpu_time_total"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{label}.txt"
    path.write_text(events.table(sort_by=sort, row_limit=40))
    device = f", GPU busy {busy:.2f} s ({busy / wall:.0%})" if cuda else ""
    print(
        f"profile {label}: wall {wall:.2f} s under the profiler{device}, {waits} synchronizes, "
        f"{copies} host/device copies; ops by self time: {path}"
    )


def largest_gap(peer: dict[str, torch.Tensor], ours: CandidateScores, layers: Sequence[int]) -> str:
    """The largest |peer - refdir| of each score over the candidates both scored; ``kl_exact``
    is the peer's logits' KL without its epsilon, against refdir's KL."""
    gaps = []
    for name in (*_SCORES, "kl_exact"):
        a = peer[name][:, layers]
        b = getattr(ours, name.removesuffix("_exact"))[:, layers]
        both = torch.isfinite(a) & torch.isfinite(b)
        gap = float((a[both] - b[both]).abs().max()) if both.any() else float("nan")
        gaps.append(f"{name} {gap:.2e} ({int(both.sum())} candidates)")
    return ", ".join(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", type=Path, required=True, help="checkout of refusal_direction")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12, 22])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="run the peer over every layer")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
    )
    parser.add_argument("--gen", type=int, default=64, help="prompts for the completions")
    parser.add_argument("--gen-batch", type=int, default=64, help="refdir's decoding batch")
    parser.add_argument(
        "--model", default="organism", choices=("organism", *SHAPES), help="or a random shape"
    )
    parser.add_argument("--tokenizer", type=Path, default=None, help="a shape's tokenizer folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--score-batch", type=int, default=BATCH, help="refdir's batch for candidate scoring"
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="folder for op tables of one layer's scoring"
    )
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, args.device)
    if args.model == "organism":
        cm = load_model(device=args.device, dtype=dtype)
    else:
        cm = random_chat_model(args.model, args.tokenizer, args.device, dtype)
    cm.model.requires_grad_(False)  # as the peer's loaders do
    sets = {
        name: sample_prompts(name, N_TRAIN if name.endswith("train") else N_VAL, SEED)
        for name in ("harmful_train", "harmless_train", "harmful_val", "harmless_val")
    }
    if args.model == "organism":
        tokens = derive_refusal_tokens(cm, sets["harmful_val"], progress=False)
        ids, texts = list(tokens.ids), list(tokens.texts)
        kept = {
            name: filter_prompts(cm, prompts, ids, name.startswith("harmful"), BATCH)
            for name, prompts in sets.items()
        }
    else:  # a random model refuses nothing: the paper's Llama-3 tokens ("I", "As"), no filter
        texts, ids = list(REFUSAL_TEXTS), refusal_token_ids(cm)
        kept = sets
    print(
        f"{cm.name} on {args.device} ({dtype}): {cm.n_layers} layers, {cm.chat.n_post} "
        f"post-instruction positions; refusal tokens {texts}; prompts kept "
        + ", ".join(f"{k} {len(v)}/{len(sets[k])}" for k, v in kept.items())
    )
    peer = Peer(cm, ids, args.peer)
    train = (kept["harmful_train"], kept["harmless_train"])
    val = (kept["harmful_val"], kept["harmless_val"])

    peer_diff, t_peer = timed(lambda: peer.mean_diff(*train))
    cands: Candidates
    cands, t_ours = timed(lambda: extract_candidates(cm, *train, BATCH, progress=False))
    ours_diff = cands.diffs[:, : cm.n_layers]
    rel = float((peer_diff.cpu() - ours_diff).norm(dim=-1).max() / ours_diff.norm(dim=-1).max())
    print(
        f"extraction: peer {t_peer:.1f} s   refdir {t_ours:.1f} s   speed-up x{t_peer / t_ours:.2f}"
        f"   largest difference of a candidate / largest candidate norm {rel:.1e}"
    )

    if "ce" in args.parts:
        compare_ce(cm, peer, cands)
    if "orthogonalize" in args.parts:
        compare_orthogonalization(cm, peer, cands, [*val[0], *val[1]])
    if "generation" in args.parts:
        compare_generation(cm, peer, cands, args.gen, args.gen_batch)
    if "selection" in args.parts:
        compare_selection(
            cm,
            peer,
            cands,
            peer_diff,
            ids,
            val,
            args.layers,
            args.full,
            args.score_batch,
            args.profile,
        )


def peer_batches(cm: ChatModel, rows: ScoredRows, batch: int) -> Iterator[tuple[Any, Any]]:
    """The rows in the peer's loss batch format: left-padded inputs and a mask [B, T] that is 1
    at each position whose next token is scored."""
    for i in range(0, len(rows.ids), batch):
        ids, starts = rows.ids[i : i + batch], rows.starts[i : i + batch]
        padded = pad_left(ids, cm.chat.pad_id)
        mask = torch.zeros_like(padded.input_ids)
        width = padded.input_ids.shape[1]
        for b, (row, start) in enumerate(zip(ids, starts, strict=True)):
            pad = width - len(row)
            mask[b, pad + start - 1 : width - 1] = 1
        inputs = BatchEncoding(
            {"input_ids": padded.input_ids, "attention_mask": padded.attention_mask}
        )
        yield inputs, mask


def compare_ce(cm: ChatModel, peer: Peer, cands: Candidates, coeff: float = -1.0) -> None:
    try:
        loss = importlib.import_module("pipeline.submodules.evaluate_loss")
    except ImportError as e:  # the other parts still run
        print(f"CE: skipped, the peer's loss code needs the datasets package ({e})")
        return
    rows = text_rows(cm, load_corpus("prose", 64))
    direction = cands.direction(*chosen(cm))
    pre, post = peer.ablation_hooks(direction.vector)
    add = peer.hooks.get_activation_addition_input_pre_hook(
        vector=direction.vector, coeff=torch.tensor(coeff)
    )
    hooks = {
        "baseline": ([], []),
        "ablation": (pre, post),
        "actadd": ([(peer.blocks[direction.layer], add)], []),
    }
    theirs: dict[str, float] = {}
    began = time.perf_counter()
    for name, (fwd_pre, fwd) in hooks.items():
        ce, _, _ = loss.compute_loss_over_dataset(
            cm.model, cm.tokenizer, peer_batches(cm, rows, 2), -1, fwd_pre, fwd
        )
        theirs[name] = float(ce)
    t_peer = time.perf_counter() - began
    conditions = {
        "baseline": NONE,
        "ablation": Intervention.ablation(direction),
        "actadd": Intervention.addition(direction, coeff),
    }
    ours, t_ours = timed(lambda: ce_losses(cm, rows, conditions, progress=False))
    n = sum(len(r) - s for r, s in zip(rows.ids, rows.starts, strict=True))
    print(
        f"CE on 64 texts ({n} tokens) under baseline, ablation, actadd: peer {t_peer:.1f} s   "
        f"refdir {t_ours:.1f} s   speed-up x{t_peer / t_ours:.2f}   "
        + "   ".join(f"{k} {theirs[k]:.5f} / {ours[k].ce:.5f}" for k in conditions)
        + " (peer / refdir)"
    )


def compare_orthogonalization(
    cm: ChatModel, peer: Peer, cands: Candidates, prompts: list[str], n_gen: int = 32
) -> None:
    llama3 = importlib.import_module("pipeline.model_utils.llama3_model")
    direction = cands.direction(*chosen(cm))
    harmful = sample_prompts("harmful_test", n_gen, SEED)
    with ablate(cm, direction):
        reference = last_position_logits(cm, prompts)
        ref_text = generate(cm, harmful, 32, 64, progress=False)

    def edited(edit: Callable[[ChatModel], object]) -> tuple[torch.Tensor, list[str], float]:
        copy = ChatModel(
            deepcopy(cm.model),  # keeps the tied embedding tied, as a loaded model has it
            cm.tokenizer,
            name=cm.name,
            system=cm.system,
            chat_template=cm.chat_template,
            template_kwargs=cm.template_kwargs,
        )
        began = time.perf_counter()
        edit(copy)
        seconds = time.perf_counter() - began
        return last_position_logits(copy, prompts), generate(copy, harmful, 32, 64, False), seconds

    tied = cm.model.get_output_embeddings().weight is cm.layout.embed.weight

    def peer_edit(c: ChatModel) -> None:
        llama3.orthogonalize_llama3_weights(c.model, direction.vector)

    def untie_then_peer_edit(c: ChatModel) -> None:  # the read-out keeps its own copy
        head = c.model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        peer_edit(c)

    for name, edit in (
        ("peer", peer_edit),
        ("peer after untying the read-out", untie_then_peer_edit),
        ("refdir", lambda c: orthogonalize(c, direction)),
    ):
        logits, texts, seconds = edited(edit)
        gap = float((logits - reference).abs().max())
        top = int((logits.argmax(-1) != reference.argmax(-1)).sum())
        same = sum(a == b for a, b in zip(texts, ref_text, strict=True))
        print(
            f"orthogonalized weights ({name}, tied embedding: {tied}), {seconds:.1f} s: max |logit "
            f"- hook ablation's| {gap:.2e} over {len(prompts)} prompts, top token differs on "
            f"{top}; {same}/{n_gen} completions equal to hook ablation's"
        )


def compare_generation(
    cm: ChatModel, peer: Peer, cands: Candidates, n: int, batch: int, max_new_tokens: int = 64
) -> None:
    prompts = sample_prompts("harmful_test", n, SEED)
    direction = cands.direction(*chosen(cm))
    texts: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for size in sorted({8, batch}):
        name = f"peer, batch {size}"
        began = time.perf_counter()
        texts[name] = peer.completions(prompts, direction.vector, size, max_new_tokens)
        seconds[name] = time.perf_counter() - began

    def ours() -> list[str]:
        with ablate(cm, direction):
            return generate(cm, prompts, max_new_tokens, batch, progress=False)

    texts["refdir"], seconds["refdir"] = timed(ours)
    for name, t in seconds.items():
        if name == "refdir":
            continue
        same = sum(
            a.strip() == b.strip() for a, b in zip(texts[name], texts["refdir"], strict=True)
        )
        ratio = t / seconds["refdir"]
        print(
            f"completions under ablation ({n} harmful_test prompts, {max_new_tokens} tokens): "
            f"{name} {t:.1f} s   refdir {seconds['refdir']:.1f} s (batch {batch})   speed-up "
            f"x{ratio:.2f}   {same}/{n} completions identical"
        )


def compare_selection(
    cm: ChatModel,
    peer: Peer,
    cands: Candidates,
    peer_diff: torch.Tensor,
    token_ids: Sequence[int],
    val: tuple[list[str], list[str]],
    chosen_layers: Sequence[int],
    run_full: bool,
    batch: int = BATCH,
    profile_out: Path | None = None,
) -> None:
    layers = sorted(set(chosen_layers))
    peer_scores, t_peer = timed(lambda: peer.scores(*val, peer_diff, layers))
    validation, t_val = timed(lambda: ValidationSets.build(cm, *val, token_ids, False, BATCH))
    ours, t_ours = timed(
        lambda: score_candidates(
            cm,
            cands,
            *val,
            token_ids,
            layers=layers,
            batch_size=batch,
            progress=False,
            prune=False,
            validation=validation,
        )
    )
    t_ours += t_val
    n_scored = cm.chat.n_post * len(layers)
    print(
        f"scoring layers {layers} ({n_scored} candidates, all three scores): peer {t_peer:.1f} s"
        f"   refdir {t_ours:.1f} s   speed-up x{t_peer / t_ours:.2f}"
    )
    print(f"largest score difference: {largest_gap(peer_scores, ours, layers)}")
    if profile_out is not None:  # one layer's candidates, each tool's way
        one = layers[-1:]
        profiled("peer_scoring", lambda: peer.scores(*val, peer_diff, one), profile_out)
        profiled(
            f"refdir_scoring_batch{batch}",
            lambda: score_candidates(
                cm,
                cands,
                *val,
                token_ids,
                layers=one,
                batch_size=batch,
                progress=False,
                prune=False,
                validation=validation,
            ),
            profile_out,
        )
    for p, position in enumerate(cands.positions):
        for layer in layers:
            print(
                f"  layer {layer:2d} position {position:2d}: KL peer {peer_scores['kl'][p, layer]:.4f}"
                f" refdir {ours.kl[p, layer]:.4f}   induce peer {peer_scores['induce'][p, layer]:.3f}"
                f" refdir {ours.induce[p, layer]:.3f}"
            )

    # a random model's induce scores are all negative, so pruning would skip nearly every KL
    # and bypass pass: time it unpruned (every score of every candidate below 0.8 L)
    prune = cm.name == "organism"
    run_scores, t_run = timed(
        lambda: score_candidates(
            cm,
            cands,
            *val,
            token_ids,
            batch_size=batch,
            progress=False,
            prune=prune,
            validation=validation,
        )
    )
    t_run += t_val
    n_all = cm.chat.n_post * cm.n_layers
    if run_full:
        every = list(range(cm.n_layers))
        full, t_full = timed(lambda: peer.scores(*val, peer_diff, every))
        label = "measured"
        print(f"score differences, candidates both scored: {largest_gap(full, run_scores, every)}")
        peer_view = CandidateScores(
            cands.positions,
            every,
            full["bypass"],
            full["induce"],
            full["kl"],
            run_scores.baseline_harmful,
            run_scores.baseline_harmless,
        )
        try:  # the peer's rule: the paper's filter, no fallback (it stops at an assertion)
            peer_pick = pick(peer_view, SelectionConfig(fallback_kl_bounds=()))
            print(f"the peer's pick: layer {peer_pick.layer}, position {peer_pick.position}")
        except RefdirError:
            usable = torch.isfinite(full["kl"]) & (full["induce"] >= 0)
            usable[:, int(0.8 * cm.n_layers) :] = False
            kl = torch.where(usable, full["kl"], torch.full_like(full["kl"], torch.inf))
            p, layer = divmod(int(kl.argmin()), kl.shape[1])
            print(
                "the peer's pick: none; no candidate passes the paper's filter with its scores "
                f"(lowest KL with induce >= 0 below 0.8 L: {float(kl[p, layer]):.4f}, at layer "
                f"{layer}, position {cands.positions[p]}), so its "
                "select_direction stops at 'All scores have been filtered out!'"
            )
    else:
        t_full, label = t_peer * n_all / n_scored, "projected from the layers above"
    print(
        f"whole selection: peer {t_full:.0f} s ({n_all} candidates, {label})   refdir "
        f"{t_run:.1f} s ({'pruned, as refdir run does' if prune else 'not pruned'})   "
        f"speed-up x{t_full / t_run:.1f}"
    )
    try:
        chosen = pick(run_scores, SelectionConfig())
        print(f"refdir's pick: layer {chosen.layer}, position {chosen.position} ({chosen.rule})")
    except RefdirError as e:
        print(f"refdir's pick: none ({e})")


if __name__ == "__main__":
    main()
