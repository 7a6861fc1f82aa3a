"""The command line: a thin layer over the Python API."""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError

from refdir.allocator import keep_freed_memory
from refdir.errors import RefdirError

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

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="'organism' (default), a local folder, a .gguf file or a hub id.",
        rich_help_panel="Model",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        help="cpu, cuda, cuda:N, or auto (device_map over all GPUs).", rich_help_panel="Model"
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.",
        rich_help_panel="Model",
    ),
]
GgufOpt = Annotated[
    str | None,
    typer.Option(help="GGUF file name inside the --model folder.", rich_help_panel="Model"),
]
SystemOpt = Annotated[
    str | None,
    typer.Option(help="System prompt for the chat template.", rich_help_panel="Model"),
]
TemplateOpt = Annotated[
    Path | None,
    typer.Option(
        help="A Jinja chat template file, for models without one.", rich_help_panel="Model"
    ),
]
RemoteOpt = Annotated[
    bool,
    typer.Option(
        help="Allow code from the model repository (off unless asked).", rich_help_panel="Model"
    ),
]
LayoutOpt = Annotated[
    Path | None,
    typer.Option(
        help="A JSON file of layout patterns (LayoutSpec fields, e.g. "
        '{"mlp": "feed_forward", "mlp_out": "w2"}) for a model whose parts refdir does not find.',
        rich_help_panel="Model",
    ),
]
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
GenBatchOpt = Annotated[
    int,
    typer.Option(
        help="Prompts generated together (each decoding step reads the weights once for all of "
        "them: larger is faster where memory allows)."
    ),
]
SeedOpt = Annotated[int, typer.Option(help="Seed for prompt sampling.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _errors(fn: F) -> F:
    """Print a RefdirError as one line and exit 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RefdirError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _items(value: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated option value."""
    return [item.strip() for item in value.split(",") if item.strip()]


_FLAGS = {"n_random_kl": "random-kl", "fallback_kl_bounds": "fallback-kl"}
"""RunConfig fields whose command-line option is not the field's name with dashes."""


def _option_error(exc: ValidationError) -> RefdirError:
    """The first problem of a rejected RunConfig as a one-line error naming the option."""
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:  # a check across options names its options itself
        return RefdirError(message)
    field = str(error["loc"][0])
    flag = _FLAGS.get(field, field.replace("_", "-"))
    return RefdirError(f"--{flag}: {message[0].lower()}{message[1:]}")


def _load(
    model: str,
    device: str,
    dtype: str,
    gguf_file: str | None = None,
    system: str | None = None,
    chat_template: Path | None = None,
    trust_remote_code: bool = False,
    layout: Path | None = None,
) -> Any:
    from refdir.layout_spec import LayoutSpec, read_layout

    spec = LayoutSpec.from_fields(read_layout(layout)) if layout is not None else None
    template = _template_text(chat_template)
    from refdir.model import load_model  # after the option files are checked: imports torch

    return load_model(
        model,
        dtype=dtype,
        device=device,
        gguf_file=gguf_file,
        system=system,
        chat_template=template,
        trust_remote_code=trust_remote_code,
        layout_spec=spec,
    )


def _template_text(chat_template: Path | None) -> str | None:
    """The text of a --chat-template file."""
    if chat_template is None:
        return None
    if chat_template.is_dir():
        raise RefdirError(f"chat template {chat_template} is a folder; give a Jinja file")
    if not chat_template.is_file():
        raise RefdirError(f"chat template {chat_template} does not exist; give a Jinja file")
    try:
        return chat_template.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RefdirError(f"chat template {chat_template} is not readable text ({exc})") from None


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
    keep_freed_memory()  # before the first large tensor (refdir.allocator)


@app.command()
@_errors
def extract(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    model: ModelOpt = "organism",
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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    gguf_file: GgufOpt = None,
    system: SystemOpt = None,
    chat_template: TemplateOpt = None,
    trust_remote_code: RemoteOpt = False,
    layout: LayoutOpt = None,
) -> None:
    """Difference-of-means candidates at every layer x post-instruction position, and a default direction."""
    from refdir.activations import extract_candidates
    from refdir.data import sample_prompts
    from refdir.direction import output_folder

    if (out / "config.json").exists():
        raise RefdirError(
            f"{out} is a `refdir run` folder, whose direction extract would overwrite; give "
            "extract a folder of its own (a run redoes its extraction with --force extract)"
        )
    if harmful == harmless:
        raise RefdirError("--harmful and --harmless name the same set; their difference is zero")
    with output_folder(out):  # made and checked now, not after the passes
        harmful_prompts = sample_prompts(harmful, n_train, seed)
        harmless_prompts = sample_prompts(harmless, n_train, seed)
        cm = _load(
            model, device, dtype, gguf_file, system, chat_template, trust_remote_code, layout
        )
        if layer is not None and not 0 <= layer <= cm.n_layers:  # check before the passes
            raise RefdirError(f"--layer must be in 0..{cm.n_layers} for this model, got {layer}")
        if position >= 0 or -position > len(cm.chat.suffix_ids):
            raise RefdirError(
                f"--position must be in -{len(cm.chat.suffix_ids)}..-1 (the post-instruction "
                f"tokens), got {position}"
            )
        cands = extract_candidates(
            cm,
            harmful_prompts,
            harmless_prompts,
            batch_size,
            harmful_name=harmful,
            harmless_name=harmless,
        )
        chosen = cands.direction(  # before anything is saved: both files, or neither
            position,
            cm.n_layers // 2 if layer is None else layer,
            rule="default: --layer/--position" if layer is not None else "default: middle layer",
        )
        cands.save(out / "candidates.safetensors")
        chosen.save(out)
        typer.echo(f"candidates {tuple(cands.diffs.shape)} -> {out / 'candidates.safetensors'}")
        typer.echo(
            f"direction layer={chosen.layer} position={chosen.position} norm={chosen.norm:.3f} -> {out / 'direction.safetensors'}"
        )


def _generate_under(
    kind: str,
    model: str,
    direction: Path,
    prompts: str,
    n: int | None,
    max_new_tokens: int,
    batch_size: int,
    as_json: bool,
    coeff: float,
    device: str,
    dtype: str,
    seed: int,
    loading: tuple[str | None, str | None, Path | None, bool, Path | None],
) -> None:
    from refdir.data import sample_prompts
    from refdir.direction import Direction
    from refdir.evaluate import check_jobs, evaluate_refusal

    check_jobs([(kind, coeff)], True, max_new_tokens, batch_size)  # before the model loads
    chosen = Direction.load(direction)
    instructions = sample_prompts(prompts, n or None, seed)  # 0: all
    cm = _load(model, device, dtype, *loading)
    chosen.check(cm.d_model, cm.n_layers)
    result = evaluate_refusal(
        cm, instructions, prompts, kind, chosen, coeff, max_new_tokens, batch_size
    )
    for record in result.completions:
        if as_json:
            typer.echo(json.dumps({"prompt": record["prompt"], "completion": record["completion"]}))
        else:
            typer.echo(f"### {record['prompt']}\n{record['completion'].strip()}\n")
    if not as_json:
        typer.echo(f"refusal rate (markers): {result.refusal_rate:.3f} of {result.n}", err=True)


@app.command(name="ablate")
@_errors
def ablate_cmd(
    direction: DirectionOpt,
    model: ModelOpt = "organism",
    prompts: PromptsOpt = "harmful_test",
    n: NOpt = 8,
    max_new_tokens: TokensOpt = 64,
    batch_size: BatchOpt = 16,
    as_json: JsonOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    gguf_file: GgufOpt = None,
    system: SystemOpt = None,
    chat_template: TemplateOpt = None,
    trust_remote_code: RemoteOpt = False,
    layout: LayoutOpt = None,
) -> None:
    """Generate greedily with the direction ablated at every layer and position."""
    _generate_under(
        "ablate",
        model,
        direction,
        prompts,
        n,
        max_new_tokens,
        batch_size,
        as_json,
        1.0,
        device,
        dtype,
        seed,
        (gguf_file, system, chat_template, trust_remote_code, layout),
    )


@app.command(name="add")
@_errors
def add_cmd(
    direction: DirectionOpt,
    model: ModelOpt = "organism",
    prompts: PromptsOpt = "harmless_test",
    coeff: Annotated[
        float, typer.Option(help="Multiple of the direction added at its layer.")
    ] = 1.0,
    n: NOpt = 8,
    max_new_tokens: TokensOpt = 64,
    batch_size: BatchOpt = 16,
    as_json: JsonOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    gguf_file: GgufOpt = None,
    system: SystemOpt = None,
    chat_template: TemplateOpt = None,
    trust_remote_code: RemoteOpt = False,
    layout: LayoutOpt = None,
) -> None:
    """Generate greedily with coeff x direction added to its layer's input at every position."""
    _generate_under(
        "actadd",
        model,
        direction,
        prompts,
        n,
        max_new_tokens,
        batch_size,
        as_json,
        coeff,
        device,
        dtype,
        seed,
        (gguf_file, system, chat_template, trust_remote_code, layout),
    )


@app.command()
@_errors
def orthogonalize(
    direction: DirectionOpt,
    out: Annotated[Path, typer.Option(help="New folder for the edited checkpoint.")],
    model: ModelOpt = "organism",
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    gguf_file: GgufOpt = None,
    trust_remote_code: RemoteOpt = False,
    layout: LayoutOpt = None,
) -> None:
    """Edit the weights so nothing writes along the direction; export a safetensors checkpoint."""
    from refdir.direction import Direction
    from refdir.orthogonalize import check_export_folder, export_orthogonalized

    check_export_folder(out)  # now, not after loading and checking the model
    chosen = Direction.load(direction)
    cm = _load(model, device, dtype, gguf_file, trust_remote_code=trust_remote_code, layout=layout)
    manifest = export_orthogonalized(cm, chosen, out)
    kind = "exact" if manifest["exact"] else "approximate"
    typer.echo(
        f"wrote {out} ({kind}; max |logit delta| vs hook ablation = {manifest['parity_max_abs_logit_delta']:.2e})"
    )


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
    import torch

    from refdir.organism import OrganismRecipe, build_organism

    overrides: dict[str, Any] = {}
    if recipe is not None:
        try:
            overrides = json.loads(recipe.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RefdirError(f"cannot read the recipe {recipe}: {exc}") from None
        if not isinstance(overrides, dict):
            raise RefdirError(f"the recipe {recipe} must be a JSON object of recipe fields")
    try:
        chosen = OrganismRecipe(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "recipe"
        raise RefdirError(f"bad recipe {recipe}: {where}: {error['msg']}") from None
    if threads is not None and threads < 1:
        raise RefdirError(f"--threads must be 1 or more, got {threads}")
    if threads is not None:
        torch.set_num_threads(threads)
    path = build_organism(chosen, out)
    typer.echo(f"adapter written to {path}")


@app.command(name="run")
@_errors
def run_cmd(
    out: Annotated[Path, typer.Option(help="Run folder (created; an existing one is resumed).")],
    model: ModelOpt = "organism",
    force: Annotated[
        str | None,
        typer.Option(
            help="Redo this step and the later ones: prompts, extract, select, evaluate, "
            "benchmarks, suffix, report."
        ),
    ] = None,
    until: Annotated[str | None, typer.Option(help="Stop after this step.")] = None,
    n_train: Annotated[
        int,
        typer.Option(
            help="Harmful and harmless prompts for the difference of means.",
            rich_help_panel="Prompts",
        ),
    ] = 128,
    n_val: Annotated[
        int,
        typer.Option(help="Harmful and harmless prompts for selection.", rich_help_panel="Prompts"),
    ] = 32,
    n_eval_harmful: Annotated[
        int,
        typer.Option(
            help="Prompts per held-out harmful set (seeded sample; 0: all of them).",
            rich_help_panel="Prompts",
        ),
    ] = 100,
    n_eval_harmless: Annotated[
        int, typer.Option(help="Held-out harmless prompts.", rich_help_panel="Prompts")
    ] = 100,
    harmful_eval: Annotated[
        str, typer.Option(help="Held-out harmful sets, comma-separated.", rich_help_panel="Prompts")
    ] = "harmful_test,jailbreakbench",
    kl_max: Annotated[
        float,
        typer.Option(help="Discard candidates with KL above this.", rich_help_panel="Selection"),
    ] = 0.1,
    max_layer_fraction: Annotated[
        float,
        typer.Option(help="Discard layers >= this fraction of depth.", rich_help_panel="Selection"),
    ] = 0.8,
    induce_min: Annotated[
        float,
        typer.Option(
            help="Discard candidates with induce below this.",
            rich_help_panel="Selection",
        ),
    ] = 0.0,
    fallback_kl: Annotated[
        str,
        typer.Option(
            help="KL bounds tried in order when no candidate passes, comma-separated "
            "('none': no fallback, fail instead).",
            rich_help_panel="Selection",
        ),
    ] = "0.25,0.5,1.0",
    score_all: Annotated[
        bool,
        typer.Option(
            help="Score every candidate on every measure, also those the filters discard "
            "(full heatmaps; slower).",
            rich_help_panel="Selection",
        ),
    ] = False,
    layer: Annotated[
        int | None,
        typer.Option(
            help="Choose the direction by hand (with --position).", rich_help_panel="Selection"
        ),
    ] = None,
    position: Annotated[
        int | None,
        typer.Option(
            help="Choose the direction by hand (with --layer).", rich_help_panel="Selection"
        ),
    ] = None,
    refusal_tokens: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated token ids that start a refusal (default: derived).",
            rich_help_panel="Prompts",
        ),
    ] = None,
    filter_prompts: Annotated[
        bool,
        typer.Option(
            "--filter/--no-filter",
            help="Keep only prompts the model refuses (harmful) or answers (harmless), by the refusal metric.",
            rich_help_panel="Prompts",
        ),
    ] = True,
    harmful_coeff: Annotated[
        float,
        typer.Option(
            help="Activation addition on harmful prompts (negative: subtract).",
            rich_help_panel="Evaluation",
        ),
    ] = -1.0,
    harmless_coeff: Annotated[
        float,
        typer.Option(help="Activation addition on harmless prompts.", rich_help_panel="Evaluation"),
    ] = 1.0,
    n_ce: Annotated[
        int,
        typer.Option(
            help="Texts of the corpus used for the CE loss.", rich_help_panel="Evaluation"
        ),
    ] = 64,
    random_kl: Annotated[
        int,
        typer.Option(
            help="Also ablate this many random directions on the harmless eval prompts: a "
            "reference for the chosen direction's KL (0: skip).",
            rich_help_panel="Evaluation",
        ),
    ] = 0,
    judge: Annotated[
        str | None,
        typer.Option(help="Safety judge: llamaguard or harmbench.", rich_help_panel="Evaluation"),
    ] = None,
    judge_model: Annotated[
        str | None,
        typer.Option(help="Local folder of the judge model.", rich_help_panel="Evaluation"),
    ] = None,
    benchmarks: Annotated[
        str | None,
        typer.Option(
            help="lm-evaluation-harness tasks scored without and with the direction ablated, "
            "comma-separated: task YAML files, or names found in --benchmark-path (else among "
            "lm_eval's built-in tasks, whose data must be in the local cache).",
            rich_help_panel="Benchmarks",
        ),
    ] = None,
    benchmark_path: Annotated[
        str | None,
        typer.Option(
            help="Folders of benchmark task YAMLs, comma-separated.", rich_help_panel="Benchmarks"
        ),
    ] = None,
    benchmark_limit: Annotated[
        int | None,
        typer.Option(
            help="At most this many items per benchmark task.", rich_help_panel="Benchmarks"
        ),
    ] = None,
    suffix: Annotated[
        bool,
        typer.Option(
            "--suffix",
            help="Also search an adversarial suffix and add its analysis to the report.",
            rich_help_panel="Suffix",
        ),
    ] = False,
    suffix_steps: Annotated[
        int,
        typer.Option(
            help="GCG steps of the suffix search (with --suffix).", rich_help_panel="Suffix"
        ),
    ] = 20,
    suffix_max_minutes: Annotated[
        float,
        typer.Option(
            help="Stop the suffix search after this many minutes (0: no limit).",
            rich_help_panel="Suffix",
        ),
    ] = 10.0,
    max_new_tokens: Annotated[
        int, typer.Option(help="New tokens per completion (greedy).", rich_help_panel="Evaluation")
    ] = 64,
    batch_size: Annotated[
        int, typer.Option(help="Prompts per forward pass.", rich_help_panel="Speed")
    ] = 32,
    gen_batch_size: Annotated[
        int,
        typer.Option(
            help="Prompts generated together (larger is faster where memory allows).",
            rich_help_panel="Speed",
        ),
    ] = 256,
    seed: Annotated[
        int, typer.Option(help="Seed for every sample of prompts.", rich_help_panel="Prompts")
    ] = 42,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    gguf_file: GgufOpt = None,
    system: SystemOpt = None,
    chat_template: TemplateOpt = None,
    trust_remote_code: RemoteOpt = False,
    layout: LayoutOpt = None,
) -> None:
    """The paper's study end to end: select a direction, evaluate it, write report.html."""
    from refdir.config import RunConfig, check_step
    from refdir.layout_spec import read_layout

    tokens = None
    if refusal_tokens is not None:
        try:
            tokens = tuple(int(t) for t in _items(refusal_tokens))
        except ValueError:
            raise RefdirError(
                "--refusal-tokens takes comma-separated integer token ids, e.g. 40,1205"
            ) from None
    bounds: tuple[float, ...] = ()
    if fallback_kl.strip().lower() != "none":
        try:
            bounds = tuple(float(b) for b in _items(fallback_kl))
        except ValueError:
            bounds = ()
        if not bounds or not all(math.isfinite(b) and b > 0 for b in bounds):
            raise RefdirError(
                "--fallback-kl takes comma-separated positive numbers, e.g. 0.25,0.5, or 'none'"
            )
    try:
        config = RunConfig(
            model=model,
            device=device,
            dtype=dtype,
            gguf_file=gguf_file,
            trust_remote_code=trust_remote_code,
            system=system,
            chat_template=_template_text(chat_template),
            layout=read_layout(layout) if layout is not None else None,
            seed=seed,
            n_train=n_train,
            n_val=n_val,
            harmful_eval=tuple(_items(harmful_eval)),
            n_eval_harmful=n_eval_harmful or None,
            n_eval_harmless=n_eval_harmless,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            gen_batch_size=gen_batch_size,
            refusal_tokens=tokens,
            kl_max=kl_max,
            induce_min=induce_min,
            max_layer_fraction=max_layer_fraction,
            fallback_kl_bounds=bounds,
            score_all=score_all,
            harmful_coeff=harmful_coeff,
            harmless_coeff=harmless_coeff,
            n_ce=n_ce,
            layer=layer,
            position=position,
            n_random_kl=random_kl,
            judge=judge,
            judge_model=judge_model,
            benchmarks=tuple(_items(benchmarks or "")),
            benchmark_path=tuple(_items(benchmark_path or "")),
            benchmark_limit=benchmark_limit,
            filter_prompts=filter_prompts,
            suffix=suffix,
            suffix_steps=suffix_steps,
            suffix_max_minutes=suffix_max_minutes,
        )
    except ValidationError as exc:
        raise _option_error(exc) from None
    check_step(force, "--force")  # before torch is imported
    check_step(until, "--until")
    from refdir.pipeline import run_pipeline

    done = run_pipeline(config, out, force=force, until=until)
    for step, seconds in done.items():
        typer.echo(f"{step:10s} {seconds:8.1f} s")
    if (out / "report.html").exists():
        typer.echo(f"report: {out / 'report.html'}")


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
) -> None:
    """Several runs side by side: refusal, safety, chosen direction, KL and CE per model."""
    from refdir.compare import write_comparison

    names = _items(labels) if labels is not None else None
    html_path, md_path, csv_path = write_comparison(runs, out, names)
    typer.echo(f"wrote {html_path}, {md_path.name} and {csv_path.name}")


@app.command()
@_errors
def evaluate(
    model: ModelOpt = "organism",
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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    gguf_file: GgufOpt = None,
    system: SystemOpt = None,
    chat_template: TemplateOpt = None,
    trust_remote_code: RemoteOpt = False,
    layout: LayoutOpt = None,
) -> None:
    """Greedy completions on a prompt set, scored for refusal by markers."""
    from refdir.data import sample_prompts
    from refdir.direction import Direction, atomic_path, output_folder
    from refdir.evaluate import check_jobs, evaluate_refusal

    if completions is not None and completions.is_dir():
        raise RefdirError(f"--completions {completions} is a folder; give a .jsonl file path")
    check_jobs([(intervention, coeff)], direction is not None, max_new_tokens, batch_size)
    if intervention == "none" and direction is not None:
        raise RefdirError(
            "--direction is given but --intervention is none; add --intervention ablate or actadd"
        )
    # the completions' folder is made and checked now, not after the generation
    folder = output_folder(completions.parent) if completions is not None else nullcontext()
    with folder:
        chosen = Direction.load(direction) if direction is not None else None
        instructions = sample_prompts(prompts, n or None, seed)  # 0: all
        cm = _load(
            model, device, dtype, gguf_file, system, chat_template, trust_remote_code, layout
        )
        result = evaluate_refusal(
            cm, instructions, prompts, intervention, chosen, coeff, max_new_tokens, batch_size
        )
        if completions is not None:
            with atomic_path(completions) as tmp:
                tmp.write_text(
                    "".join(json.dumps(r) + "\n" for r in result.completions), encoding="utf-8"
                )
    summary = result.summary()
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        for key, value in summary.items():
            typer.echo(f"{key:16s} {value}")


@app.command()
@_errors
def suffix(
    direction: DirectionOpt,
    out: Annotated[Path, typer.Option(help="Output folder.")],
    model: ModelOpt = "organism",
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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    gguf_file: GgufOpt = None,
    system: SystemOpt = None,
    chat_template: TemplateOpt = None,
    trust_remote_code: RemoteOpt = False,
    layout: LayoutOpt = None,
) -> None:
    """Search a universal adversarial suffix (GCG) and show how it moves the refusal direction."""
    if not math.isfinite(max_minutes) or max_minutes < 0:
        raise RefdirError(f"--max-minutes must be 0 (no limit) or more, got {max_minutes}")
    if top_heads < 1:
        raise RefdirError(f"--top-heads must be 1 or more, got {top_heads}")
    if max_new_tokens < 1:
        raise RefdirError(f"--max-new-tokens must be 1 or more, got {max_new_tokens}")
    from refdir.data import sample_prompts
    from refdir.direction import Direction
    from refdir.suffix import SuffixConfig
    from refdir.suffix_analysis import held_out_prompts, run_suffix_experiment

    words = tuple(_items(refusal_words))
    config = SuffixConfig(
        n_tokens=n_tokens,
        n_steps=steps,
        topk=topk,
        batch_size=batch_size,
        objective=objective,  # type: ignore[arg-type]  # checked by SuffixConfig
        target=target,
        refusal_words=words,
        seed=seed,
        max_seconds=60.0 * max_minutes if max_minutes > 0 else None,
    )
    chosen = Direction.load(direction)
    train = sample_prompts(prompts, n_prompts, seed)
    held_out = held_out_prompts(eval_prompts, n_eval, seed, exclude=train)
    cm = _load(model, device, dtype, gguf_file, system, chat_template, trust_remote_code, layout)
    summary = run_suffix_experiment(
        cm,
        chosen,
        out,
        train,
        held_out,
        config,
        eval_name=eval_prompts,
        n_top=top_heads,
        max_new_tokens=max_new_tokens,
        keep_completions=keep_completions,
    )
    rates = summary["refusal_rate"]
    typer.echo(f"suffix {summary['suffix']!r} ({summary['seconds']:.0f} s)")
    typer.echo(
        f"refusal rate on {summary['n_eval']} {eval_prompts}: without {rates['without']:.3f}, "
        f"with {rates['with']:.3f}, random {rates['random']:.3f}"
    )
    typer.echo(f"wrote {out / 'suffix.json'}, analysis.json, history.json, figures")


def entry() -> None:
    """The ``refdir`` command: the app, with a usage error (unknown option, missing or bad
    value) printed as one line instead of typer's box."""
    import sys

    from typer.exceptions import TyperException  # typer's own click: its usage errors

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
    sys.exit(code if isinstance(code, int) else 0)
