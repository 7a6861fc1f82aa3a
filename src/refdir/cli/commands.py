"""The command line: a thin layer over the Python API. Each command checks its options, then
hands them to its module in :mod:`refdir.cli.work`, which does the work with the library; the options
shared by commands come from the config models (:mod:`refdir.cli.options`)."""

from __future__ import annotations

import functools
import importlib
import logging
import math
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from typer.exceptions import TyperException  # typer's own click: its usage errors

from refdir.cli.allocator import keep_freed_memory
from refdir.cli.options import flags_in, option_error, register, with_options
from refdir.errors import RefdirError
from refdir.io import defer_signal
from refdir.model.options import ModelOptions
from refdir.optimize.config import OptimizeConfig
from refdir.study.config import RunConfig, read_config

__all__ = ["app", "entry"]

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    help="refdir: find, test and edit the refusal direction of chat language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
organism_app = typer.Typer(
    help="The bundled model organism (safety-tuned SmolLM2-135M).", no_args_is_help=True
)
app.add_typer(organism_app, name="organism")

DirectionOpt = Annotated[
    Path, typer.Option(help="direction.safetensors / direction.json / its folder.")
]
PromptsOpt = Annotated[
    str,
    typer.Option(
        help="A packaged set (harmful_test, jailbreakbench, ...) or a .json/.jsonl/.csv/.txt file."
    ),
]
NOpt = Annotated[
    int | None, typer.Option("--n", help="Number of prompts (seeded sample); 0: all of them.")
]
TokensOpt = Annotated[int, typer.Option(help="New tokens per completion (greedy).")]
BatchOpt = Annotated[int, typer.Option(help="Prompts per forward pass (and per generated batch).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for prompt sampling.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
AnyModelOpt = Annotated[
    bool,
    typer.Option(
        "--any-model",
        help="Apply the direction even to a model of its width other than the one it was "
        "extracted from (refused otherwise).",
    ),
]

for _name, _flag in (
    ("out", "--out"),
    ("force", "--force"),
    ("until", "--until"),
    ("labels", "--labels"),
    ("direction", "--direction"),
    ("intervention", "--intervention"),
    ("coeff", "--coeff"),
    ("max_new_tokens", "--max-new-tokens"),
    ("batch_size", "--batch-size"),
    ("max_minutes", "--max-minutes"),
    ("n_eval", "--n-eval"),
    ("n_steps", "--steps"),
    ("reference", "--reference"),
    ("address", "--address"),
    ("retries", "--retries"),
    ("cpus_per_run", "--cpus-per-run"),
    ("gpus_per_run", "--gpus-per-run"),
):
    register(_name, _flag)
register("any_model", "--any-model", boolean=True)
register("stream", "--stream", boolean=True)
register("cross_eval", "--cross-eval", boolean=True)


def _work(command: str) -> ModuleType:
    """The work of ``command`` (:mod:`refdir.cli.work`), which needs torch: imported when the
    command runs, so that --help and option errors do not wait for it."""
    return importlib.import_module(f"refdir.cli.work.{command}")


_SIGNALLED: list[int] = []
"""The exit code of the signal that is ending the process (SIGINT 130, SIGTERM 143), if any: a
library that runs Python code from native code (pydantic's serializers) may wrap the exception
a signal raised in one of its own, and a reader may then report it as a damaged file (a SIGINT
inside torch's storage code while reading candidates.safetensors); either must still end the
process as that signal."""


def _errors(fn: F) -> F:
    """Print a RefdirError as one line (options as flags) and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RefdirError as exc:
            if _SIGNALLED:  # a signal's exception, turned into a reader's error by native code
                raise typer.Exit(_SIGNALLED[0]) from None
            typer.echo(f"error: {flags_in(str(exc))}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _items(value: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option value."""
    return [item.strip() for item in value.split(",") if item.strip()]


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    keep_freed_memory()  # before the first large tensor (refdir.cli.allocator)


@app.command()
@_errors
@with_options(ModelOptions)
def extract(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    options: ModelOptions,
    harmful: Annotated[str, typer.Option(help="Harmful prompt set.")] = "harmful_train",
    harmless: Annotated[str, typer.Option(help="Harmless prompt set.")] = "harmless_train",
    n_train: Annotated[int, typer.Option(help="Prompts sampled from each set.")] = 128,
    layer: Annotated[
        int | None, typer.Option(help="Layer of the default direction (default: middle layer).")
    ] = None,
    position: Annotated[
        int,
        typer.Option(help="Post-instruction position of the default direction (-1 = last token)."),
    ] = -1,
    seed: SeedOpt = 42,
    batch_size: BatchOpt = 32,
) -> None:
    """Difference-of-means candidates at every layer x post-instruction position, and a default direction."""
    if (out / "config.json").exists() or (out / "refdir-run.json").exists():
        raise RefdirError(
            f"{out} is a `refdir run` folder, whose direction extract would overwrite; give "
            "extract a folder of its own (a run redoes its extraction with --force extract)"
        )
    if harmful == harmless:
        raise RefdirError("--harmful and --harmless name the same set; their difference is zero")
    _work("extract").extract(
        out, options, harmful, harmless, n_train, layer, position, seed, batch_size
    )


@app.command(name="ablate")
@_errors
@with_options(ModelOptions)
def ablate_cmd(
    direction: DirectionOpt,
    options: ModelOptions,
    prompts: PromptsOpt = "harmful_test",
    n: NOpt = 8,
    max_new_tokens: TokensOpt = 64,
    batch_size: BatchOpt = 16,
    as_json: JsonOpt = False,
    seed: SeedOpt = 0,
    any_model: AnyModelOpt = False,
) -> None:
    """Generate greedily with the direction ablated at every layer and position."""
    _work("generate").generate_under(
        "ablate",
        options,
        direction,
        prompts,
        n,
        max_new_tokens,
        batch_size,
        as_json,
        1.0,
        seed,
        any_model,
    )


@app.command(name="add")
@_errors
@with_options(ModelOptions)
def add_cmd(
    direction: DirectionOpt,
    options: ModelOptions,
    prompts: PromptsOpt = "harmless_test",
    coeff: Annotated[
        float, typer.Option(help="Multiple of the direction added at its layer.")
    ] = 1.0,
    n: NOpt = 8,
    max_new_tokens: TokensOpt = 64,
    batch_size: BatchOpt = 16,
    as_json: JsonOpt = False,
    seed: SeedOpt = 0,
    any_model: AnyModelOpt = False,
) -> None:
    """Generate greedily with coeff x direction added to its layer's input at every position."""
    _work("generate").generate_under(
        "actadd",
        options,
        direction,
        prompts,
        n,
        max_new_tokens,
        batch_size,
        as_json,
        coeff,
        seed,
        any_model,
    )


@app.command()
@_errors
@with_options(ModelOptions)
def orthogonalize(
    direction: DirectionOpt,
    out: Annotated[Path, typer.Option(help="New folder for the edited checkpoint.")],
    options: ModelOptions,
    any_model: AnyModelOpt = False,
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--no-stream",
            help="Edit the safetensors checkpoint of a local folder shard by shard, without "
            "loading the model (default: when the folder holds a sharded checkpoint; "
            "safetensors format only).",
        ),
    ] = None,
    export_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="safetensors (the edited checkpoint), lora (a PEFT adapter on the unedited "
            "base) or gguf (one GGUF file; for a model loaded from a GGUF, whose metadata and "
            "tokenizer it keeps).",
        ),
    ] = "safetensors",
    gguf_type: Annotated[
        str,
        typer.Option(
            help="GGUF tensor type: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, or source "
            "(each tensor's type in the input GGUF)."
        ),
    ] = "F16",
) -> None:
    """Edit the weights so nothing writes along the direction; export the edited model
    (safetensors, a LoRA adapter or GGUF) with its manifest and model card."""
    _work("orthogonalize").orthogonalize(
        direction, out, options, any_model, export_format, gguf_type, stream
    )


@app.command(name="control-vector")
@_errors
@with_options(ModelOptions)
def control_vector(
    direction: DirectionOpt,
    out: Annotated[Path, typer.Option(help="New .gguf file for the control vector.")],
    options: ModelOptions,
    coeff: Annotated[
        float,
        typer.Option(help="Multiple of the direction added at its layer (negative: subtract)."),
    ] = 1.0,
    any_model: AnyModelOpt = False,
) -> None:
    """Write coeff x direction as a llama.cpp control vector (llama-cli --control-vector)."""
    _work("control_vector").control_vector(direction, out, options, coeff, any_model)


@app.command()
@_errors
@with_options(ModelOptions)
def chat(
    options: ModelOptions,
    direction: Annotated[
        Path | None,
        typer.Option(
            help="direction.safetensors / direction.json / its folder, or a run folder "
            "(default on the organism: its refusal direction, extracted at start)."
        ),
    ] = None,
    intervention: Annotated[
        str, typer.Option(help="The first answers' intervention: none, ablate or add.")
    ] = "none",
    coeff: Annotated[float, typer.Option(help="Coefficient of /add without one.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Most new tokens per answer.")] = 128,
    any_model: AnyModelOpt = False,
) -> None:
    """Chat with the model on stdin, switching the intervention between turns (/help)."""
    if intervention not in ("none", "ablate", "add"):
        raise RefdirError(f"unknown intervention {intervention!r}; use one of none, ablate, add")
    if not math.isfinite(coeff):
        raise RefdirError(f"--coeff must be a finite number, got {coeff}")
    if max_new_tokens < 1:
        raise RefdirError(f"--max-new-tokens must be 1 or more, got {max_new_tokens}")
    _work("chat").chat(options, direction, intervention, coeff, max_new_tokens, any_model)


@app.command()
@_errors
def push(
    folder: Annotated[Path, typer.Argument(help="An export folder (refdir orthogonalize).")],
    repo_id: Annotated[str, typer.Option(help="The hub repository, owner/name.")],
    public: Annotated[
        bool, typer.Option("--public", help="Make a new repository public (private by default).")
    ] = False,
    pr: Annotated[
        bool, typer.Option("--pr", help="Open a pull request instead of committing.")
    ] = False,
) -> None:
    """Upload an export folder to the Hugging Face hub (huggingface_hub; a token from
    `hf auth login` or HF_TOKEN)."""
    _work("push").push(folder, repo_id, not public, pr)


@organism_app.command("build")
@_errors
def organism_build(
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for the new adapter (adapter_model.safetensors, adapter_config.json, build.json)."
        ),
    ],
    recipe: Annotated[
        Path | None,
        typer.Option(help="JSON file overriding fields of the recipe (see docs/organism.md)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Torch CPU threads (default: torch's choice).")
    ] = None,
) -> None:
    """Rebuild the model organism from scratch on CPU: self-distillation, then LoRA safety tuning."""
    if threads is not None and threads < 1:
        raise RefdirError(f"--threads must be 1 or more, got {threads}")
    _work("organism").organism_build(out, recipe, threads)


def _run_file(own: Mapping[str, Any]) -> dict[str, Any]:
    """The TOML file given with ``--config``, read before the options that override it."""
    path = own.get("config")
    return read_config(Path(path)) if path is not None else {}


@app.command(name="run")
@_errors
@with_options(RunConfig, base=_run_file)
def run_cmd(
    out: Annotated[Path, typer.Option(help="Run folder (created; an existing one is resumed).")],
    options: RunConfig,
    config: Annotated[
        Path | None,
        typer.Option(
            help="A TOML file of run options (RunConfig fields, as in a run folder's "
            "config.toml); options given here override it."
        ),
    ] = None,
    force: Annotated[
        str | None,
        typer.Option(
            help="Redo this step and the later ones: prompts, extract, select, evaluate, "
            "benchmarks, suffix, monitor, report."
        ),
    ] = None,
    until: Annotated[str | None, typer.Option(help="Stop after this step.")] = None,
) -> None:
    """The paper's study end to end: select a direction, evaluate it, write report.html."""
    _work("run").run(options, out, force, until)


@app.command()
@_errors
@with_options(OptimizeConfig, base=_run_file)
def optimize(
    out: Annotated[
        Path,
        typer.Option(help="Run folder the search starts from and writes into (made when new)."),
    ],
    options: OptimizeConfig,
    config: Annotated[
        Path | None,
        typer.Option(help="A TOML file of run options (a run folder's config.toml)."),
    ] = None,
) -> None:
    """Search weighted edits on a refusals-versus-KL Pareto front; export the chosen one."""
    _work("optimize").optimize(options, out)


@app.command()
@_errors
def compare(
    runs: Annotated[
        list[Path], typer.Argument(help="Folders of finished `refdir run`s, in the order shown.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for comparison.html, .md and .csv.")],
    labels: Annotated[
        str | None,
        typer.Option(help="Comma-separated names of the runs (default: each run's model)."),
    ] = None,
    cross_eval: Annotated[
        bool,
        typer.Option(
            help="For runs of one model that differ only by seed or n_train: load the model "
            "and score each run's direction on the others' held-out prompts."
        ),
    ] = True,
) -> None:
    """Several runs side by side: refusal, safety, chosen direction, KL and CE per model."""
    _work("compare").compare(runs, out, _items(labels) if labels is not None else None, cross_eval)


@app.command()
@_errors
def sweep(
    spec: Annotated[
        Path,
        typer.Argument(help="A TOML file of runs: [base] options, [[grid]]s of their values."),
    ],
    out: Annotated[Path, typer.Option(help="Folder of the runs, one folder each by name.")],
    address: Annotated[
        str | None,
        typer.Option(help="A Ray cluster to join (e.g. auto, or HOST:6379); none: a local Ray."),
    ] = None,
    cpus: Annotated[
        int | None, typer.Option(help="CPUs of the local Ray (none: every core).", min=1)
    ] = None,
    retries: Annotated[
        int | None, typer.Option(help="Times a failed run is tried again (spec's, else 1).", min=0)
    ] = None,
    cpus_per_run: Annotated[
        float | None,
        typer.Option(help="CPUs per run (none: the cluster's split between the runs).", min=0),
    ] = None,
    gpus_per_run: Annotated[
        float | None,
        typer.Option(help="GPUs per run (none: 1 where the runs use cuda, else 0).", min=0),
    ] = None,
) -> None:
    """Many runs as Ray tasks (a local Ray or a cluster), resumable, then one comparison."""
    _work("sweep").sweep(spec, out, address, cpus, retries, cpus_per_run, gpus_per_run)


@app.command()
@_errors
@with_options(ModelOptions)
def evaluate(
    options: ModelOptions,
    prompts: PromptsOpt = "harmful_test",
    n: NOpt = None,
    direction: Annotated[
        Path | None, typer.Option(help="Direction for --intervention ablate/actadd.")
    ] = None,
    intervention: Annotated[str, typer.Option(help="none, ablate or actadd.")] = "none",
    coeff: Annotated[float, typer.Option(help="Coefficient for actadd.")] = 1.0,
    max_new_tokens: TokensOpt = 64,
    batch_size: BatchOpt = 64,
    as_json: JsonOpt = False,
    completions: Annotated[
        Path | None, typer.Option(help="Also write the completions as JSONL here.")
    ] = None,
    seed: SeedOpt = 0,
    any_model: AnyModelOpt = False,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Also report KL(reference || model) at the last prompt position against this "
            "model (a hub id, folder, .gguf or organism; loaded with the model options).",
        ),
    ] = None,
    edit: Annotated[
        Path | None,
        typer.Option(
            help="Apply an edit of refdir optimize by hooks (edit.safetensors, or its folder: "
            "an optimize export's best/)."
        ),
    ] = None,
) -> None:
    """Greedy completions on a prompt set, scored for refusal by markers; with --reference, the
    model's KL against another one."""
    if completions is not None and completions.is_dir():
        raise RefdirError(f"--completions {completions} is a folder; give a .jsonl file path")
    if intervention not in ("none", "ablate", "actadd"):
        raise RefdirError(f"unknown intervention {intervention!r}; use one of none, ablate, actadd")
    if intervention != "none" and direction is None:
        raise RefdirError(f"--intervention {intervention} needs --direction FILE")
    if intervention == "none" and direction is not None:
        raise RefdirError(
            "--direction is given but --intervention is none; add --intervention ablate or actadd"
        )
    if not math.isfinite(coeff):
        raise RefdirError(f"--coeff must be a finite number, got {coeff}")
    if edit is not None and intervention != "none":
        raise RefdirError(
            f"--edit and --intervention {intervention} are two interventions; give one of them"
        )
    if reference is not None and not reference.strip():
        raise RefdirError("--reference is empty; give a hub id, a folder, a .gguf file or organism")
    _work("generate").evaluate(
        options,
        prompts,
        n,
        direction,
        intervention,
        coeff,
        max_new_tokens,
        batch_size,
        as_json,
        completions,
        seed,
        any_model,
        reference,
        edit,
    )


@app.command()
@_errors
@with_options(ModelOptions)
def suffix(
    direction: DirectionOpt,
    out: Annotated[Path, typer.Option(help="Output folder.")],
    options: ModelOptions,
    prompts: Annotated[
        str, typer.Option(help="Harmful set the universal suffix is searched on.")
    ] = "harmful_train",
    n_prompts: Annotated[int, typer.Option(help="Instructions the suffix is searched on.")] = 8,
    steps: Annotated[int, typer.Option(help="GCG steps.")] = 20,
    max_minutes: Annotated[
        float, typer.Option(help="Stop the search after this many minutes (0: no limit).")
    ] = 10.0,
    topk: Annotated[int, typer.Option(help="Candidate tokens per suffix position.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Candidate suffixes scored per step.")] = 32,
    n_tokens: Annotated[int, typer.Option(help="Suffix length in tokens.")] = 16,
    objective: Annotated[
        str, typer.Option(help="refusal (log-odds of refusal tokens) or target (--target prefix).")
    ] = "refusal",
    target: Annotated[str, typer.Option(help="Response prefix for --objective target.")] = (
        "Sure, here is"
    ),
    refusal_words: Annotated[
        str, typer.Option(help="Comma-separated words whose first tokens start refusals.")
    ] = "I,As",
    eval_prompts: Annotated[
        str, typer.Option(help="Held-out harmful set for the analysis and refusal rates.")
    ] = "harmful_test",
    n_eval: Annotated[int, typer.Option(help="Held-out prompts (seeded sample).")] = 32,
    top_heads: Annotated[int, typer.Option(help="Heads shown in the attention analysis.")] = 6,
    max_new_tokens: TokensOpt = 64,
    keep_completions: Annotated[
        bool, typer.Option(help="Also store completions (cut to 80 characters) in analysis.json.")
    ] = False,
    seed: Annotated[
        int, typer.Option(help="Seed for prompt sampling, search and random suffix.")
    ] = 0,
    any_model: AnyModelOpt = False,
) -> None:
    """Search a universal adversarial suffix (GCG) and show how it moves the refusal direction."""
    if not math.isfinite(max_minutes) or max_minutes < 0:
        raise RefdirError(f"--max-minutes must be 0 (no limit) or more, got {max_minutes}")
    if top_heads < 1:
        raise RefdirError(f"--top-heads must be 1 or more, got {top_heads}")
    if max_new_tokens < 1:
        raise RefdirError(f"--max-new-tokens must be 1 or more, got {max_new_tokens}")
    _work("suffix").suffix(
        direction,
        out,
        options,
        {
            "n_tokens": n_tokens,
            "n_steps": steps,
            "topk": topk,
            "batch_size": batch_size,
            "objective": objective,
            "target": target,
            "refusal_words": tuple(_items(refusal_words)),
            "seed": seed,
            "max_seconds": 60.0 * max_minutes if max_minutes > 0 else None,
        },
        prompts,
        n_prompts,
        eval_prompts,
        n_eval,
        top_heads,
        max_new_tokens,
        keep_completions,
        seed,
        any_model,
    )


@app.command(name="monitor")
@_errors
@with_options(ModelOptions)
def monitor_cmd(
    direction: DirectionOpt,
    options: ModelOptions,
    harmful: Annotated[str, typer.Option(help="Held-out harmful set.")] = "harmful_test",
    harmless: Annotated[str, typer.Option(help="Held-out harmless set.")] = "harmless_test",
    n: Annotated[
        int, typer.Option("--n", help="Held-out prompts per set (seeded sample); 0: all.")
    ] = 100,
    train_harmful: Annotated[
        str, typer.Option(help="Harmful set the probe is trained on.")
    ] = "harmful_train",
    train_harmless: Annotated[
        str, typer.Option(help="Harmless set the probe is trained on.")
    ] = "harmless_train",
    n_train: Annotated[int, typer.Option(help="Training prompts per set.")] = 128,
    val_harmful: Annotated[
        str, typer.Option(help="Harmful set the layer and position are chosen on.")
    ] = "harmful_val",
    val_harmless: Annotated[
        str, typer.Option(help="Harmless set the layer and position are chosen on.")
    ] = "harmless_val",
    n_val: Annotated[int, typer.Option(help="Validation prompts per set.")] = 32,
    layer: Annotated[
        int | None,
        typer.Option(help="Layer the monitor reads (default: best AUROC on the validation sets)."),
    ] = None,
    position: Annotated[
        int | None,
        typer.Option(
            help="Post-instruction position it reads (default: best on the validation sets)."
        ),
    ] = None,
    suffix: Annotated[
        Path | None,
        typer.Option(
            help="The --out folder of `refdir suffix` (or a run's suffix/): its adversarial "
            "suffix, and its random one, are appended to the held-out harmful prompts."
        ),
    ] = None,
    random_suffix: Annotated[
        bool, typer.Option(help="Also measure with a random suffix appended.")
    ] = True,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples of the confidence intervals (0: none).")
    ] = 1000,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 32,
    out: Annotated[
        Path | None, typer.Option(help="Also write monitor.json and the figures here.")
    ] = None,
    as_json: JsonOpt = False,
    any_model: AnyModelOpt = False,
) -> None:
    """Score prompts by their projection onto the direction: AUROC and TPR at 1% FPR against a
    logistic probe, plain and under an adversarial and a random suffix, and per layer."""
    for name, value in (("--n-train", n_train), ("--n-val", n_val), ("--batch-size", batch_size)):
        if value < 1:
            raise RefdirError(f"{name} must be 1 or more, got {value}")
    if n < 0:
        raise RefdirError(f"--n must be 0 (all) or more, got {n}")
    if bootstrap < 0:
        raise RefdirError(f"--bootstrap must be 0 (no intervals) or more, got {bootstrap}")
    if harmful == harmless:
        raise RefdirError("--harmful and --harmless name the same set; give two sets")
    _work("monitor").monitor(
        options,
        direction,
        harmful,
        harmless,
        n or None,
        train_harmful,
        train_harmless,
        n_train,
        val_harmful,
        val_harmless,
        n_val,
        layer,
        position,
        suffix,
        random_suffix,
        bootstrap,
        seed,
        batch_size,
        out,
        as_json,
        any_model,
    )


_MODEL_FIELDS = ModelOptions.model_fields


@app.command(name="compare-directions")
@_errors
def compare_directions_cmd(
    a: Annotated[Path, typer.Argument(help="A run folder, an extract folder or a direction file.")],
    b: Annotated[Path, typer.Argument(help="Another, of a model of the same width.")],
    labels: Annotated[
        str | None,
        typer.Option(help="Comma-separated names of A and B (default: each direction's model)."),
    ] = None,
    model_a: Annotated[
        str | None,
        typer.Option(help="The model of A (default: the model its direction records)."),
    ] = None,
    model_b: Annotated[
        str | None,
        typer.Option(help="The model of B (default: the model its direction records)."),
    ] = None,
    device: Annotated[
        str, typer.Option(help=str(_MODEL_FIELDS["device"].description) + ".")
    ] = "cpu",
    dtype: Annotated[
        str, typer.Option(help=str(_MODEL_FIELDS["dtype"].description) + ".")
    ] = "auto",
    harmful: Annotated[str, typer.Option(help="Held-out harmful set.")] = "harmful_test",
    harmless: Annotated[str, typer.Option(help="Held-out harmless set.")] = "harmless_test",
    n: Annotated[
        int, typer.Option("--n", help="Held-out prompts per set (seeded sample); 0: all.")
    ] = 32,
    max_new_tokens: TokensOpt = 64,
    batch_size: BatchOpt = 32,
    seed: SeedOpt = 0,
    measure: Annotated[
        bool,
        typer.Option(
            help="Load both models for the projections and the cross-ablation and "
            "cross-addition refusal rates (--no-measure: the cosines alone)."
        ),
    ] = True,
    out: Annotated[
        Path | None, typer.Option(help="Also write directions.json and directions.png here.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Two models' refusal directions: cosine per layer, projections onto each other's
    direction, and each model's refusal with the other's direction ablated or added."""
    try:
        ModelOptions(device=device, dtype=dtype)
    except ValidationError as exc:
        raise option_error(exc, ModelOptions) from None
    if n < 0:
        raise RefdirError(f"--n must be 0 (all) or more, got {n}")
    _work("compare_directions").compare_directions(
        a,
        b,
        _items(labels) if labels is not None else None,
        model_a,
        model_b,
        device,
        dtype,
        harmful,
        harmless,
        n or None,
        max_new_tokens,
        batch_size,
        seed,
        measure,
        out,
        as_json,
    )


def _exit(code: int) -> None:
    raise SystemExit(code)


def _interrupt() -> None:
    raise KeyboardInterrupt


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a cluster's scheduler, a container stopping): leave as Ctrl-C does,
    through every ``finally`` that removes temporary files, with the shell's code for it
    (128 + 15). A second SIGTERM while that runs ends the process at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _SIGNALLED.append(128 + signum)
    if not defer_signal(functools.partial(_exit, 128 + signum)):  # not inside a temp file's birth
        raise SystemExit(128 + signum)


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C: Python's own KeyboardInterrupt, remembered (see :data:`_SIGNALLED`)."""
    _SIGNALLED.append(130)
    if not defer_signal(_interrupt):
        raise KeyboardInterrupt


def entry() -> None:
    """The ``refdir`` command: the app, with a usage error (unknown option, missing or bad
    value) printed as one line instead of typer's box, and SIGTERM turned into a clean exit."""
    signal.signal(signal.SIGTERM, _terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C
        sys.exit(130)
    except TyperException as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `refdir` alone: typer printed the help
            sys.exit(0)
        where = ctx.command_path if ctx is not None else "refdir"
        message = exc.format_message().rstrip(".")
        typer.echo(f"error: {message}; see {where} --help", err=True)
        sys.exit(2)
    except BaseException:
        if _SIGNALLED:  # a signal's exception, wrapped by the code it interrupted
            sys.exit(_SIGNALLED[0])
        raise
    sys.exit(code if isinstance(code, int) else 0)
