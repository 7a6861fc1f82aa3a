"""refdir's evaluator on the trials of heretic, a peer tool, run on the organism under a time budget.

The peer is heretic (https://github.com/p-e-w/heretic, PyPI ``heretic-llm``, AGPL-3.0). refdir
neither ships nor imports it: it runs in a virtual environment of its own, only as an external
program (``--heretic``, default ``.bench/heretic-venv/bin/heretic``)::

    python -m venv .bench/heretic-venv
    .bench/heretic-venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    .bench/heretic-venv/bin/pip install heretic-llm==1.4.0

What the bench does, in ``--work`` (default ``.bench/heretic-run``):

1. Writes the organism as an ordinary HF folder, refdir's training samples (``refdir run``'s:
   ``--n-train`` harmful_train and harmless_train, ``--n-val`` harmful_val and harmless_val,
   seed ``--seed``) as local datasets (a ``train.jsonl`` per set: some prompts hold newlines),
   and a ``config.toml`` for heretic: those four sets for its directions and its own scoring,
   float32 on the CPU, a fixed batch size (no batch-size sweep), the chat template's own
   default system prompt (the chat format refdir evaluates in), ``--seed``, and its study
   journal in ``search/checkpoints/``. ``--heretic-arg`` passes more flags to it.
2. Runs heretic's search for ``--minutes`` (``--trials`` at most): at the deadline it gets
   SIGINT, which heretic takes as "stop the study" (the trial under way is dropped), then its
   final menu is answered "Exit program". heretic asks its questions through ``input()`` when
   ``KAGGLE_KERNEL_RUN_TYPE`` is set (its notebook mode), which is how the bench drives it.
3. Reads every completed trial (parameters and heretic's own scores: refusals, KL) from the
   Optuna journal, with the heretic venv's Python and optuna.
4. Saves each trial's model (``--max-export``: the first N only) with heretic itself: its
   ``--reproduce FILE`` mode, fed a reproduce file that holds the search's settings and the
   trial's parameters, recomputes the directions, applies the trial and, driven through its
   menu, saves the merged model ("Save the model to a local folder") into
   ``trials/trial-NNN/model``.
5. Scores the unedited organism, every saved trial and, with ``--refdir DIR`` (a ``refdir
   optimize`` result: ``pareto.json`` and an ``edit.safetensors`` per front point; skipped when
   absent), every front point, with refdir's evaluator: refusals by refdir's markers on
   harmful_test ∪ jailbreakbench (``--n-eval-harmful`` per set, seed ``--seed``: 152 unique
   prompts by default; greedy, ``--max-new-tokens``) through ``refdir evaluate``, and the KL at
   the last position on ``--n-eval-harmless`` harmless_test prompts (seed
   ``--harmless-seed``) against the organism, in this process until ``refdir evaluate
   --reference`` exists (:func:`harmless_kl`).
6. Prints a table and writes ``bench.json`` into ``--work``.

    python bench/heretic.py --minutes 15 [--trials N] [--work DIR] [--refdir DIR]
        [--n-train 128] [--n-val 32] [--max-export N] [--n-eval-harmful 100]
        [--n-eval-harmless 100] [--max-new-tokens 64] [--heretic-arg=--max-response-length=64]
        [--response-prefix ''] [--skip-search] [--skip-export] [--reuse] [--no-eval]

Tiny smoke run (a few minutes on 2 cores)::

    python bench/heretic.py --minutes 4 --trials 2 --n-train 16 --n-val 8 \
        --n-eval-harmful 4 --n-eval-harmless 8 --max-new-tokens 16 \
        --heretic-arg=--max-response-length=16 --work .bench/smoke

Each trial's own scores and its check (refdir's KL on heretic's KL prompts, which repeats
heretic's number when the saved model is the trial's) are in ``bench.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HERETIC = ROOT / ".bench" / "heretic-venv" / "bin" / "heretic"
DEFAULT_WORK = ROOT / ".bench" / "heretic-run"
MENU_PROMPT = "Enter number: "
PATH_PROMPT = "Path to the folder:"
CHOICE = re.compile(r"^\[(\d+)\] (.*)$")
MARK = "\x00SYSTEM\x00"

# Reads heretic's Optuna journal; run by the heretic venv's Python (optuna is MIT-licensed).
DUMP_JOURNAL = r"""
import json, sys
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

path = sys.argv[1]
storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
out = []
for summary in storage.get_all_studies():
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    for t in study.get_trials(deepcopy=False):
        out.append({
            "number": t.number,
            "state": t.state.name,
            "params": t.params,
            "values": t.values,
            "user_attrs": t.user_attrs,
            "start": t.datetime_start.timestamp() if t.datetime_start else None,
            "complete": t.datetime_complete.timestamp() if t.datetime_complete else None,
        })
    out.append({"study_user_attrs": study.user_attrs})
print(json.dumps(out))
"""


# ---------------------------------------------------------------- talking to heretic


class Dialog:
    """heretic as a child process whose questions (``input()`` prompts, menus printed as
    ``[i] title``) are answered by ``answer(prompt, choices)``; its output goes to ``log``."""

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path,
        env: dict[str, str],
        log: Path,
        answer: Callable[[str, list[tuple[int, str]]], str | None],
    ) -> None:
        self.answer = answer
        self.text = ""
        self.scanned = 0
        self.lock = threading.Lock()
        self.log = log.open("w", encoding="utf-8")
        self.proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our Ctrl+C is not its Ctrl+C
            # a bench started in the background (nohup, `&`) ignores SIGINT, and a child
            # inherits that: heretic would never see the deadline's SIGINT
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            text = chunk.decode("utf-8", errors="replace")
            self.log.write(text)
            self.log.flush()
            with self.lock:
                self.text += text

    def _choices(self, before: str) -> list[tuple[int, str]]:
        """The numbered lines printed just before a menu prompt."""
        found: list[tuple[int, str]] = []
        for line in reversed(before.splitlines()):
            m = CHOICE.match(line.strip())
            if m is None:
                if found:
                    break
                continue
            found.append((int(m.group(1)), m.group(2)))
        return found[::-1]

    def step(self) -> None:
        """Answer any question printed since the last call."""
        with self.lock:
            text = self.text
        for prompt in (MENU_PROMPT, PATH_PROMPT):
            at = text.find(prompt, self.scanned)
            if at < 0 or "\n" in text[at:]:  # not a prompt that waits for input
                continue
            self.scanned = at + len(prompt)
            choices = self._choices(text[:at]) if prompt == MENU_PROMPT else []
            reply = self.answer(prompt, choices)
            if reply is None:
                raise RuntimeError(f"no answer to heretic's question {prompt!r} {choices}")
            self.log.write(f"{reply}\n")
            assert self.proc.stdin is not None
            self.proc.stdin.write((reply + "\n").encode())
            self.proc.stdin.flush()
            return

    def run(self, deadline: float | None = None, grace: float = 300.0) -> int:
        """Answer questions until the process ends; at ``deadline`` send it SIGINT, and if it
        is still alive ``grace`` seconds later, SIGTERM and SIGKILL."""
        interrupted = killed = None
        try:
            while self.proc.poll() is None:
                now = time.monotonic()
                if deadline is not None and interrupted is None and now >= deadline:
                    self.proc.send_signal(signal.SIGINT)
                    interrupted = now
                if interrupted is not None and killed is None and now >= interrupted + grace:
                    self.proc.terminate()
                    killed = now
                if killed is not None and now >= killed + 30:
                    self.proc.kill()
                self.step()
                time.sleep(0.2)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            rc = self.proc.wait()
            self.reader.join(timeout=10)
            self.log.close()
        return rc


def pick(choices: list[tuple[int, str]], *wanted: str) -> str | None:
    """The number of the first choice whose title starts with one of ``wanted`` (in order)."""
    for want in wanted:
        for number, title in choices:
            if title.startswith(want):
                return str(number)
    return None


def heretic_env(work: Path, threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(work / "hf-home"),  # its datasets cache, not the user's
        KAGGLE_KERNEL_RUN_TYPE="Batch",  # heretic's notebook mode: questions through input()
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
        NO_COLOR="1",
    )
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# ---------------------------------------------------------------- step 1: inputs


def default_system(tokenizer: Any) -> str:
    """The system prompt the chat template writes when none is given (refdir's chat format),
    so that heretic, which always sends one, formats prompts the same way."""

    def render(system: str | None) -> str:
        chat = [{"role": "user", "content": "Hi"}]
        if system is not None:
            chat.insert(0, {"role": "system", "content": system})
        return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    plain, marked = render(None), render(MARK)
    head, tail = marked.split(MARK)
    if not (plain.startswith(head) and plain.endswith(tail)):
        raise SystemExit("the chat template has no default system prompt; give --system")
    system = plain[len(head) : len(plain) - len(tail)]
    if render(system) != plain:
        raise SystemExit("could not recover the template's default system prompt; give --system")
    return system


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def write_toml(path: Path, settings: dict[str, Any]) -> None:
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items() if not isinstance(v, dict)]
    for key, table in settings.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_dataset(folder: Path, prompts: Sequence[str]) -> dict[str, str]:
    """A local dataset heretic reads with ``datasets.load_dataset(folder, split="train")``."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps({"text": prompt}) + "\n")
    return {"dataset": str(folder), "split": "train", "column": "text"}


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The organism folder, the prompt sets and heretic's config.toml; the heretic settings."""
    from refdir.data import sample_prompts
    from refdir.model.loading import load_model
    from refdir.model.options import ModelOptions

    organism = work / "organism"
    cm = load_model(ModelOptions(model="organism"))
    if not (organism / "config.json").exists():
        cm.model.save_pretrained(organism)
        cm.tokenizer.save_pretrained(organism)
    system = args.system if args.system is not None else default_system(cm.tokenizer)
    sets = work / "prompts"
    s = args.seed
    settings: dict[str, Any] = {
        "model": str(organism),
        "dtypes": ["float32"],
        "device_map": "cpu",
        "batch_size": args.heretic_batch_size,
        "n_trials": args.trials,
        "seed": s,
        "system_prompt": system,
        "study_checkpoint_dir": str(work / "search" / "checkpoints"),
        "export_strategy": "merge",
        "bad_prompts": write_dataset(
            sets / "bad", sample_prompts("harmful_train", args.n_train, s)
        ),
        "good_prompts": write_dataset(
            sets / "good", sample_prompts("harmless_train", args.n_train, s)
        ),
        "bad_evaluation_prompts": write_dataset(
            sets / "bad_eval", sample_prompts("harmful_val", args.n_val, s)
        ),
        "good_evaluation_prompts": write_dataset(
            sets / "good_eval", sample_prompts("harmless_val", args.n_val, s)
        ),
    }
    if args.response_prefix is not None:  # else heretic looks for one (200 completions)
        settings["response_prefix"] = args.response_prefix
    (work / "search").mkdir(parents=True, exist_ok=True)
    write_toml(work / "search" / "config.toml", settings)
    return settings


# ---------------------------------------------------------------- steps 2-4: heretic


def search(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """heretic's search for ``--minutes``; its wall time and exit status."""
    folder = work / "search"
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # a fresh study, no resume menu

    def answer(prompt: str, choices: list[tuple[int, str]]) -> str | None:
        return pick(choices, "Exit program")

    start = time.monotonic()
    dialog = Dialog(
        [str(args.heretic), *args.heretic_arg],
        folder,
        heretic_env(work, args.threads),
        folder / "heretic.log",
        answer,
    )
    rc = dialog.run(deadline=start + args.minutes * 60)
    wall = time.monotonic() - start
    print(f"heretic search: exit {rc}, {wall:.0f} s (log: {folder / 'heretic.log'})")
    return {"rc": rc, "wall_s": wall, "started": time.time() - wall}


def read_trials(args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], dict]:
    """Every trial in heretic's journal, and the study's attributes (its settings)."""
    journals = sorted((work / "search" / "checkpoints").glob("*.jsonl"))
    if not journals:
        return [], {}
    python = Path(args.heretic).parent / "python"
    out = subprocess.run(
        [str(python), "-c", DUMP_JOURNAL, str(journals[0])],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)
    attrs: dict[str, Any] = next(
        (r["study_user_attrs"] for r in rows if "study_user_attrs" in r), {}
    )
    return [r for r in rows if "number" in r], attrs


def export_trial(
    args: argparse.Namespace, work: Path, trial: dict[str, Any], settings: dict[str, Any]
) -> Path | None:
    """The trial's merged model, saved by heretic (``--reproduce``) into trials/trial-NNN/."""
    index = trial["user_attrs"]["index"]
    folder = work / "trials" / f"trial-{index:03d}"
    model = folder / "model"
    if (model / "config.json").exists():
        return model
    folder.mkdir(parents=True, exist_ok=True)
    tiny = write_dataset(folder / "one", ["Hi"])
    # Same settings as the search (directions, chat format, batch size), but heretic's own
    # evaluator, which its reproduce mode builds and never uses, gets one prompt and one token.
    settings = {
        **settings,
        "good_evaluation_prompts": tiny,
        "bad_evaluation_prompts": tiny,
        "max_response_length": 1,
        "export_strategy": "merge",
    }
    attrs = trial["user_attrs"]
    reproduce = {
        "version": "2",
        "environment": {
            "heretic": {"version": args.heretic_version, "metadata": {"type": "pypi"}},
            "pytorch_version": args.heretic_torch,
            "requirements": {},
        },
        "settings": settings,
        "parameters": {
            "direction_index": attrs["direction_index"],
            "abliteration_parameters": attrs["parameters"],
        },
        "metrics": {
            k: attrs[k] for k in ("kl_divergence", "refusals", "base_refusals", "n_bad_prompts")
        },
        "hashes": {},
    }
    (folder / "reproduce.json").write_text(json.dumps(reproduce, indent=2), encoding="utf-8")
    saved = False

    def answer(prompt: str, choices: list[tuple[int, str]]) -> str | None:
        nonlocal saved
        if prompt == PATH_PROMPT:
            saved = True
            return str(model)
        if saved:
            return pick(choices, "Exit program")
        return pick(choices, "Attempt to reproduce", "Save the model to a local folder")

    start = time.monotonic()
    rc = Dialog(
        [str(args.heretic), "--reproduce", str(folder / "reproduce.json")],
        folder,
        heretic_env(work, args.threads),
        folder / "heretic.log",
        answer,
    ).run(deadline=start + args.export_timeout)
    ok = (model / "config.json").exists()
    print(f"  trial {index}: exported in {time.monotonic() - start:.0f} s, exit {rc}, ok {ok}")
    return model if ok else None


# ---------------------------------------------------------------- step 5: refdir's evaluator


@dataclass
class Row:
    tool: str
    trial: str
    model: str
    refusals: int | None = None
    n_harmful: int | None = None
    by_set: dict[str, int] = field(default_factory=dict)
    kl: float | None = None
    kl_check: float | None = None  # refdir's KL on the tool's own KL prompts, to match own["kl"]
    own: dict[str, Any] = field(default_factory=dict)  # the tool's own scores
    eval_s: float | None = None


class KL:
    """KL(organism || model) at the last prompt position, mean over each named prompt set; the
    last model loaded is kept, so several sets cost one load."""

    def __init__(self, sets: dict[str, list[str]]) -> None:
        from refdir.model.generation import last_position_logits
        from refdir.model.loading import load_model
        from refdir.model.options import ModelOptions

        self.sets = sets
        self.logits = last_position_logits
        self.load = lambda spec: load_model(ModelOptions(model=spec))
        base = self.load("organism")
        self.base = {name: self.logits(base, prompts) for name, prompts in sets.items()}
        self.cached: tuple[str, Any] | None = None

    def __call__(self, model: Path, name: str) -> float:
        from refdir.measures import kl_divergence

        if self.cached is None or self.cached[0] != str(model):
            self.cached = (str(model), self.load(str(model)))
        edited = self.logits(self.cached[1], self.sets[name])
        return float(kl_divergence(self.base[name], edited).mean())


def harmless_kl(scorer: KL, model: Path) -> float:
    """The one place to switch to ``refdir evaluate --model MODEL --reference organism
    --prompts HARMLESS --n 0 --json`` once that option exists."""
    return scorer(model, "harmless")


def harmful_refusals(
    args: argparse.Namespace, model: Path, prompts: Path, sets: dict[str, set[str]], out: Path
) -> tuple[int, int, dict[str, int]]:
    """Refusals by refdir's markers (``refdir evaluate``) on the harmful file; per set too."""
    refdir = shutil.which("refdir") or str(Path(sys.executable).parent / "refdir")
    completions = out / "completions.jsonl"
    cmd = [
        refdir,
        "evaluate",
        "--model",
        str(model),
        "--prompts",
        str(prompts),
        "--n",
        "0",
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--completions",
        str(completions),
        "--json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    n = int(result["n"])
    by_set = dict.fromkeys(sets, 0)
    refused = 0
    for line in completions.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["refusal"]:
            refused += 1
            for name, members in sets.items():
                by_set[name] += record["prompt"] in members
    if refused != round(result["refusal_rate"] * n):
        raise RuntimeError(f"{completions}: {refused} refusals, refdir says {result}")
    return refused, n, by_set


def refdir_points(args: argparse.Namespace, work: Path) -> tuple[list[Row], dict[str, Any]]:
    """``--refdir DIR``'s front points as HF folders (the organism with each edit folded in)."""
    if args.refdir is None:
        return [], {}
    src = Path(args.refdir)
    edits = sorted(src.glob("front/*/edit.safetensors"))  # the front, and the paper's edit
    if args.refdir_points and len(edits) > args.refdir_points:
        points = [e for e in edits if e.parent.name != "paper"]
        step = (len(points) - 1) / max(args.refdir_points - 2, 1)
        keep = {points[round(i * step)] for i in range(args.refdir_points - 1)}
        edits = [e for e in edits if e in keep or e.parent.name == "paper"]
    if not (src / "pareto.json").is_file() or not edits:
        print(f"--refdir {src}: no pareto.json or no edit.safetensors; skipped")
        return [], {}
    from refdir.interventions.edit import Edit
    from refdir.interventions.edit_weights import edit_weights
    from refdir.model.loading import load_model
    from refdir.model.options import ModelOptions

    pareto = json.loads((src / "pareto.json").read_text(encoding="utf-8"))
    meta = pareto if isinstance(pareto, dict) else {}
    rows = []
    for path in edits:
        label = str(path.parent.relative_to(src)) or "."
        model = work / "refdir" / label.replace("/", "_") / "model"
        if not (model / "config.json").exists():
            cm = load_model(ModelOptions(model="organism"))
            edit_weights(cm, Edit.load(path))
            cm.model.save_pretrained(model)
            cm.tokenizer.save_pretrained(model)
        rows.append(Row("refdir", label, str(model)))
    tool = {k: meta[k] for k in ("trials", "search_seconds", "trial_seconds") if k in meta}
    if not tool.get("search_seconds") and meta.get("storage"):  # a command that added no trial
        tool.update(study_seconds(str(meta["storage"]), str(meta.get("study", ""))))
    return rows, tool


def study_seconds(storage: str, name: str) -> dict[str, float]:
    """The search's time from its study when the folder's last command ran no trial (it
    confirmed a finished study): the sum and the median of its completed trials' wall times."""
    import statistics

    import optuna

    from refdir.optimize.search import study_storage

    backend, _ = study_storage(storage, Path(storage).parent)
    study = optuna.load_study(study_name=name, storage=backend)
    took = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and t.datetime_start and t.datetime_complete
    ]
    if not took:
        return {}
    return {"search_seconds": sum(took), "trial_seconds": statistics.median(took)}


# ---------------------------------------------------------------- main


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="heretic's search budget")
    p.add_argument("--trials", type=int, default=10000, help="heretic's n_trials (a cap)")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument(
        "--refdir-points",
        type=int,
        default=0,
        help="score at most this many of --refdir's front points, spread along it, and the "
        "paper's edit (0: all)",
    )
    p.add_argument("--heretic", type=Path, default=DEFAULT_HERETIC, help="heretic's executable")
    p.add_argument("--heretic-arg", action="append", default=[], help="a flag for heretic")
    p.add_argument("--heretic-batch-size", type=int, default=32)
    p.add_argument(
        "--response-prefix",
        default=None,
        help="heretic's response_prefix ('' skips its search for a common prefix of 200 "
        "completions, slow on a CPU; the organism's completions have none)",
    )
    p.add_argument("--system", default=None, help="system prompt (default: the template's)")
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--seed", type=int, default=42, help="seed of refdir's prompt samples")
    p.add_argument("--max-export", type=int, default=None, help="trials to save (default all)")
    p.add_argument("--export-timeout", type=float, default=900.0, help="seconds per export")
    p.add_argument("--n-eval-harmful", type=int, default=100, help="per set; 0: all")
    p.add_argument("--n-eval-harmless", type=int, default=100)
    p.add_argument("--harmless-seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--refdir", type=Path, default=None, help="a refdir optimize result folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (all by default)")
    p.add_argument("--skip-search", action="store_true", help="reuse the study in --work")
    p.add_argument(
        "--front-only",
        action="store_true",
        help="save and score only heretic's own Pareto front (its refusals and KL) of the "
        "trials completed within --minutes, spread to --max-export",
    )
    p.add_argument("--skip-export", action="store_true", help="score only models saved before")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take the scores of rows already in --work's bench.json (same tool, trial, model)",
    )
    p.add_argument("--no-eval", action="store_true", help="stop after the exports")
    return p.parse_args(argv)


def heretic_versions(heretic: Path) -> tuple[str, str]:
    python = heretic.parent / "python"
    code = "import importlib.metadata as m; print(m.version('heretic-llm'), m.version('torch'))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    version, torch_version = out.stdout.split()
    return version, torch_version


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if not args.heretic.exists():
        raise SystemExit(f"no heretic at {args.heretic}; see this file's docstring")
    args.heretic_version, args.heretic_torch = heretic_versions(args.heretic)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_search:  # else the inputs of the search before stay as they were
        prepare(args, work)

    result: dict[str, Any] = {"heretic_version": args.heretic_version, "args": {}}
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    run_file = work / "search" / "run.json"
    if not args.skip_search:
        run = search(args, work)
        run_file.write_text(json.dumps(run), encoding="utf-8")
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.exists() else {}

    trials, attrs = read_trials(args, work)
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    complete.sort(key=lambda t: t["user_attrs"]["index"])
    print(f"heretic: {len(complete)} completed trials of {len(trials)} started")
    if run.get("started") is not None:  # a trial that ended past the budget does not count
        deadline = run["started"] + args.minutes * 60
        late = [t for t in complete if t["complete"] and t["complete"] > deadline]
        complete = [t for t in complete if t not in late]
        print(
            f"heretic: {len(complete)} completed within {args.minutes} minutes ({len(late)} later)"
        )
    if args.front_only:  # heretic's own Pareto front (its refusals and KL), spread
        scores = [(t["user_attrs"]["refusals"], t["user_attrs"]["kl_divergence"]) for t in complete]
        front = [
            t
            for t, (r, k) in zip(complete, scores, strict=True)
            if not any((r2 <= r and k2 <= k) and (r2, k2) != (r, k) for r2, k2 in scores)
        ]
        front.sort(key=lambda t: t["user_attrs"]["kl_divergence"])
        if args.max_export and len(front) > args.max_export:
            step = (len(front) - 1) / max(args.max_export - 1, 1)
            front = [front[round(i * step)] for i in range(args.max_export)]
        print(
            f"heretic: its front, {len(front)} trials: {[t['user_attrs']['index'] for t in front]}"
        )
        trials_in_budget = len(complete)
        complete = front
    for t in complete:
        a = t["user_attrs"]
        took = t["complete"] - t["start"] if t["start"] and t["complete"] else None
        print(
            f"  trial {a['index']}: refusals {a['refusals']}/{a['n_bad_prompts']}, "
            f"KL {a['kl_divergence']:.4f}, {fmt(took, '.0f')} s, {t['params']}"
        )
    settings = json.loads(attrs["settings"]) if "settings" in attrs else {}

    rows = [Row("none", "organism", str(work / "organism"))]
    export_s = 0.0
    for n, t in enumerate(complete):  # every trial has a row, with its own scores
        a = t["user_attrs"]
        start = time.monotonic()
        due = not args.skip_export and (
            args.front_only or args.max_export is None or n < args.max_export
        )
        model = export_trial(args, work, t, settings) if due else None
        export_s += time.monotonic() - start
        path = work / "trials" / f"trial-{a['index']:03d}" / "model"
        if model is None and (path / "config.json").exists():
            model = path
        own = {
            "refusals": a["refusals"],
            "n_bad_prompts": a["n_bad_prompts"],
            "kl": a["kl_divergence"],
            "params": t["params"],
            "trial_s": t["complete"] - t["start"] if t["start"] and t["complete"] else None,
        }
        rows.append(Row("heretic", str(a["index"]), str(model) if model else "", own=own))
    refdir_rows, refdir_tool = refdir_points(args, work)
    rows += refdir_rows

    result["tools"] = {
        "heretic": {
            "wall_s": run.get("wall_s"),
            "trials": trials_in_budget if args.front_only else len(complete),
            "started": len(trials),
            "rc": run.get("rc"),
            "export_s": export_s,
            "setup_s": min(t["start"] for t in trials) - run["started"]
            if trials and run.get("started")
            else None,
            "settings": settings,
        },
        "refdir": refdir_tool,
    }
    if not args.no_eval:
        evaluate(args, work, rows, settings)
    result["rows"] = [asdict(r) for r in rows]
    (work / "bench.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    report(result, rows)
    print(f"written: {work / 'bench.json'}")


def evaluate(
    args: argparse.Namespace, work: Path, rows: list[Row], settings: dict[str, Any]
) -> None:
    from refdir.data import sample_prompts

    n_harmful = args.n_eval_harmful or None
    sets = {
        name: sample_prompts(name, n_harmful, args.seed)
        for name in ("harmful_test", "jailbreakbench")
    }
    harmful = list(dict.fromkeys(p for prompts in sets.values() for p in prompts))
    prompts = work / "eval" / "harmful.json"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text(json.dumps(harmful), encoding="utf-8")
    members = {name: set(p) for name, p in sets.items()}
    harmless = sample_prompts("harmless_test", args.n_eval_harmless, args.harmless_seed)
    print(f"evaluating {len(rows)} models: {len(harmful)} harmful, {len(harmless)} harmless")
    sets = {"harmless": harmless}
    # heretic's KL prompts: refdir's KL on them should repeat heretic's own number for the
    # trial (first response token, same chat format), which checks that the saved model is
    # the trial's (with no common response prefix found; heretic appends it otherwise).
    if not settings.get("response_prefix"):
        own = Path(settings["good_evaluation_prompts"]["dataset"]) / "train.jsonl"
        lines = own.read_text(encoding="utf-8").splitlines()
        sets["heretic_eval"] = [json.loads(line)["text"] for line in lines]
    scorer = KL(sets)
    before: dict[tuple[str, str, str], dict[str, Any]] = {}
    if args.reuse and (work / "bench.json").is_file():  # rows scored by an earlier invocation
        earlier = json.loads((work / "bench.json").read_text(encoding="utf-8"))
        before = {(r["tool"], r["trial"], r["model"]): r for r in earlier.get("rows", [])}
    for row in rows:
        if not row.model:
            continue
        held = before.get((row.tool, row.trial, row.model))
        if held is not None and held.get("refusals") is not None and held.get("kl") is not None:
            for key in ("refusals", "n_harmful", "by_set", "kl", "kl_check", "eval_s"):
                setattr(row, key, held[key])
            print(f"  {row.tool} {row.trial}: scored before, {row.refusals}/{row.n_harmful}")
            continue
        start = time.monotonic()
        out = work / "eval" / f"{row.tool}-{row.trial.replace('/', '_')}"
        out.mkdir(parents=True, exist_ok=True)
        row.refusals, row.n_harmful, row.by_set = harmful_refusals(
            args, Path(row.model), prompts, members, out
        )
        row.kl = harmless_kl(scorer, Path(row.model))
        if row.tool == "heretic" and "heretic_eval" in sets:
            row.kl_check = scorer(Path(row.model), "heretic_eval")
        row.eval_s = time.monotonic() - start
        print(f"  {row.tool} {row.trial}: {row.refusals}/{row.n_harmful} refusals, KL {row.kl:.4f}")


def report(result: dict[str, Any], rows: list[Row]) -> None:
    cols = ("tool", "trial", "refusals", "by set", "KL", "own refusals", "own KL", "KL check")
    table = [cols]
    for r in rows:
        table.append(
            (
                r.tool,
                r.trial,
                f"{r.refusals}/{r.n_harmful}" if r.refusals is not None else "-",
                "+".join(str(v) for v in r.by_set.values()) or "-",
                fmt(r.kl, ".4f"),
                f"{r.own['refusals']}/{r.own['n_bad_prompts']}" if r.own else "",
                fmt(r.own.get("kl"), ".4f") if r.own else "",
                fmt(r.kl_check, ".4f") if r.own else "",
            )
        )
    widths = [max(len(str(line[i])) for line in table) for i in range(len(cols))]
    print()
    for n, line in enumerate(table):
        print(
            "  ".join(
                str(c).rjust(w) if i > 1 else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    print("refusals: refdir's markers on harmful_test ∪ jailbreakbench (by set: harmful_test +")
    print("jailbreakbench); KL: refdir's, on harmless_test; own: the tool's scores on its own")
    print("prompts; KL check: refdir's KL on heretic's own KL prompts (should equal own KL)")
    scored = [r for r in rows if r.refusals is not None and r.kl is not None]
    ours = [r for r in scored if r.tool == "refdir"]
    theirs = [r for r in scored if r.tool == "heretic"]
    if ours and theirs:
        beaten = [
            h.trial
            for h in theirs
            if any(o.refusals <= h.refusals and o.kl <= h.kl for o in ours)  # type: ignore[operator]
        ]
        print(
            f"refdir's points dominate {len(beaten)} of heretic's {len(theirs)} scored trials "
            "(no more refusals and no more KL)"
        )
        result["dominated"] = {"heretic_trials": len(theirs), "dominated": beaten}
        figure(result, scored)
    for name, tool in result["tools"].items():
        if name == "refdir" and tool:
            print(
                f"refdir: search {fmt(tool.get('search_seconds'), '.0f')} s, trials "
                f"{tool.get('trials', '?')} (median {fmt(tool.get('trial_seconds'), '.2f')} s)"
            )
            continue
        if tool:
            extra = ", ".join(
                f"{k} {fmt(tool[k], '.0f')} s" for k in ("setup_s", "export_s") if k in tool
            )
            print(
                f"{name}: wall {fmt(tool.get('wall_s'), '.0f')} s, trials completed "
                f"{tool.get('trials', '?')}" + (f" ({extra})" if extra else "")
            )


def figure(result: dict[str, Any], rows: list[Row]) -> None:
    """Both tools' scored points, held-out refusals against harmless KL, as ``fronts.png``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.6), layout="constrained")
    ax = fig.add_subplot()
    styles = {"refdir": ("o", "#1f77b4"), "heretic": ("^", "#ff7f0e"), "none": ("s", "#7f7f7f")}
    for tool, (marker, color) in styles.items():
        mine = [r for r in rows if r.tool == tool]
        if mine:
            ax.plot(
                [float(r.kl or 0.0) for r in mine],
                [(r.refusals or 0) / (r.n_harmful or 1) for r in mine],
                marker,
                color=color,
                linestyle="none",
                label=f"{tool} ({len(mine)})",
            )
    for r in rows:
        if r.tool == "refdir" and r.trial.endswith("paper"):
            ax.annotate("paper", (r.kl or 0.0, (r.refusals or 0) / (r.n_harmful or 1)), fontsize=7)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("KL on 100 harmless_test prompts (last position)")
    ax.set_ylabel("refusal rate, harmful_test + jailbreakbench")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out = Path(result["args"]["work"]) / "fronts.png"
    fig.savefig(out, dpi=150)
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
