"""Faults met for real, in child processes running the command line: signals (SIGINT, SIGTERM,
SIGKILL) sent to a running ``refdir run``, a file-size limit (RLIMIT_FSIZE), a full disk (a
small tmpfs, where one can be mounted) and a process killed during an export. Each ends in one
line (``error: ...``, exit 2) or a clean exit, leaves nothing half-written and no temporary
file behind, and a resumed run gives the same bytes as one never interrupted.

The children of one phase run side by side (most of their time is Python importing torch);
the reference run and the resumes, which no signal or limit reaches, run in this process."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

import refdir
from refdir.cli import app
from reliability import FAULTS
from tiny import tiny_model, tiny_tokenizer

SRC = Path(refdir.__file__).resolve().parents[1]
"""The code under test, which the children import (a worktree's, not an installed one)."""

TESTS = Path(__file__).resolve().parent
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        p for p in (str(SRC), str(TESTS), os.environ.get("PYTHONPATH")) if p
    ),
    "OMP_NUM_THREADS": "1",  # tiny models; several children at once on few cores
}
CLI = [sys.executable, "-c", "from refdir.cli import entry; entry()"]

SHORT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{% endif %}"
)
"""Two post-instruction tokens: 2 positions x 3 layers of candidates keep the select step short."""

RUN_OPTIONS = [
    *("--refusal-tokens", "5,6", "--no-filter", "--seed", "1"),
    *("--n-train", "6", "--n-val", "8", "--harmful-eval", "jailbreakbench"),
    *("--n-eval-harmful", "6", "--n-eval-harmless", "6", "--max-new-tokens", "16", "--n-ce", "4"),
    *("--fallback-kl", "1,1e9", "--induce-min=-1e9"),
]
"""A whole `refdir run` in about a second once Python has started; from each signal's file to
the run's end there are still tenths of a second (the report's figures alone take that)."""

NOT_COMPARED = {"timings.json", "report.html", "report.md"}
TIMING_KEYS = ("timings", "timing_parts", "timing_devices")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model("qwen2").save_pretrained(path)
    tiny_tokenizer(SHORT_TEMPLATE).save_pretrained(path)
    return path


def run_args(model_dir: Path, out: Path) -> list[str]:
    return [*CLI, *in_process_run_args(model_dir, out)]


def in_process_run_args(model_dir: Path, out: Path) -> list[str]:
    return ["run", "--model", str(model_dir), "--out", str(out), *RUN_OPTIONS]


def run_here(model_dir: Path, out: Path) -> Ended:
    """`refdir run` in this process (the same command line, without a second start of Python
    and torch): the reference run and the resumes, which no signal reaches."""
    result = CliRunner().invoke(app, in_process_run_args(model_dir, out))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Ended(result.exit_code, result.stderr)


@dataclass
class Ended:
    """How a child process ended."""

    returncode: int
    stderr: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def start(args: list[str], limit: int | None = None) -> subprocess.Popen[str]:
    """Start ``args``, with a file-size limit of ``limit`` bytes (RLIMIT_FSIZE) if given."""

    def limited() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.Popen(
        args,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limited,
    )


def ended(process: subprocess.Popen[str], timeout: float = 120) -> Ended:
    _, stderr = process.communicate(timeout=timeout)
    return Ended(process.returncode, stderr)


def run_all(*calls: Callable[[], Ended]) -> list[Ended]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def hidden_temporaries(folder: Path) -> list[str]:
    """Temporary files and folders refdir writes through (``.NAME.tmp-...``), anywhere below."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp*"))


def artifacts(out: Path) -> dict[str, bytes]:
    """Every file of a run folder but its timings, report and figures; metrics.json without
    its timing keys."""
    found = {}
    for path in sorted(out.rglob("*")):
        name = path.relative_to(out).as_posix()
        if path.is_dir() or name in NOT_COMPARED or name.startswith("figures/"):
            continue
        data = path.read_bytes()
        if name == "metrics.json":
            metrics = json.loads(data)
            for key in TIMING_KEYS:
                metrics.pop(key)
            data = json.dumps(metrics, sort_keys=True).encode()
        found[name] = data
    return found


# --- signals sent to a running `refdir run`, then a resume ---------------------------------

SIGNALS = {
    # signal: the file whose appearance sends it (the step after the one that wrote it runs)
    "SIGINT": (signal.SIGINT, "candidates.safetensors"),  # during select
    "SIGTERM": (signal.SIGTERM, "selection.json"),  # during select's last files, or evaluate
    "SIGKILL": (signal.SIGKILL, "completions/*.jsonl"),  # during evaluate, after completions
}
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGKILL": -signal.SIGKILL}


def signalled(args: list[str], out: Path, sig: int, pattern: str) -> Ended:
    """Run ``args`` and send ``sig`` as soon as a file matching ``pattern`` is in ``out``."""
    process = start(args)
    while process.poll() is None:
        if any(out.glob(pattern)):
            process.send_signal(sig)
            break
        time.sleep(0.005)
    return ended(process)


@dataclass
class Interrupted:
    out: Path
    first: Ended
    left_by_first: list[str]
    finished_by_first: bool
    resumed: Ended


@pytest.fixture(scope="module")
def interrupted(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Interrupted]]:
    """An uninterrupted reference run, and a run per signal (child processes, side by side)
    with its resume (same options)."""
    root = tmp_path_factory.mktemp("signals")
    reference = root / "reference"
    done = run_here(model_dir, reference)
    assert done.returncode == 0, done.stderr
    outs = {name: root / name for name in SIGNALS}
    first = run_all(
        *(
            lambda name=name: signalled(run_args(model_dir, outs[name]), outs[name], *SIGNALS[name])
            for name in SIGNALS
        ),
    )
    left = {name: hidden_temporaries(outs[name]) for name in SIGNALS}
    finished = {name: (outs[name] / "report.html").exists() for name in SIGNALS}
    return reference, {
        name: Interrupted(
            outs[name], first[i], left[name], finished[name], run_here(model_dir, outs[name])
        )
        for i, name in enumerate(SIGNALS)
    }


@pytest.mark.parametrize("name", list(SIGNALS))
def test_a_signalled_run_resumes_to_the_bytes_of_an_uninterrupted_one(
    interrupted: tuple[Path, dict[str, Interrupted]], name: str
) -> None:
    reference, runs = interrupted
    run = runs[name]
    assert not run.finished_by_first, f"the run ended before {name} came; make its steps longer"
    assert run.first.returncode == EXIT_CODES[name], run.first.stderr
    if name != "SIGKILL":  # a clean exit: its finally blocks ran
        assert "Traceback" not in run.first.stderr, run.first.stderr
        assert run.left_by_first == []
    assert run.resumed.returncode == 0, run.resumed.stderr
    assert hidden_temporaries(run.out) == []
    expected, got = artifacts(reference), artifacts(run.out)
    assert sorted(got) == sorted(expected)
    for file, data in expected.items():
        assert got[file] == data, f"{file} differs from the uninterrupted run's after {name}"


def test_the_estimates_before_a_run_are_not_short(
    interrupted: tuple[Path, dict[str, Interrupted]],
) -> None:
    """The sizes the check before a run compares with the free space and the file-size limit
    are at least those of the files the run wrote."""
    from refdir.study.config import RunConfig, read_config
    from refdir.study.room import run_sizes

    reference, _ = interrupted
    config = RunConfig(**read_config(reference / "config.toml"))
    estimates = run_sizes(config, reference.parent / "new")
    assert set(estimates) == {
        "candidates.safetensors",
        "report.html",
        *(f"completions/{f}" for f in os.listdir(reference / "completions")),
    }
    for file, estimate in estimates.items():
        assert (reference / file).stat().st_size <= estimate, file


# --- a file-size limit (RLIMIT_FSIZE) and a full disk -------------------------------------


@pytest.fixture(scope="module")
def direction_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from refdir.directions.direction import Direction

    folder = tmp_path_factory.mktemp("direction")
    Direction(torch.randn(32, generator=torch.Generator().manual_seed(0)), 1, -1, "tiny").save(
        folder
    )
    return folder


def commands(model_dir: Path, direction: Path, root: Path) -> dict[str, tuple[list[str], Path]]:
    """Each command that writes a large file, and the new folder it writes it into."""
    model = ["--model", str(model_dir)]
    extracted, exported, evaluated = root / "extract", root / "orthogonalized", root / "evaluated"
    evaluate = ["evaluate", *model, "--n", "8", "--max-new-tokens", "16"]
    return {
        "extract": (
            [*CLI, "extract", *model, "--n-train", "3", "--out", str(extracted)],
            extracted,
        ),
        "run": (run_args(model_dir, root / "run"), root / "run"),
        "orthogonalize": (
            [*CLI, "orthogonalize", *model, "--direction", str(direction), "--out", str(exported)],
            exported,
        ),
        "evaluate": ([*CLI, *evaluate, "--completions", str(evaluated / "c.jsonl")], evaluated),
    }


FILE_SIZE_LIMIT = 4000
"""Bytes: less than each command's largest file (candidates about 10 kB, a model 180 kB, a
report, completions of 8 x 16 tokens), more than the small files each writes first (a run's
config.json) would need to be refused by the check rather than by the write."""


@pytest.fixture(scope="module")
def limited(
    model_dir: Path, direction_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Ended]]:
    root = tmp_path_factory.mktemp("limited")
    todo = commands(model_dir, direction_dir, root)
    results = run_all(
        *(lambda name=name: ended(start(todo[name][0], FILE_SIZE_LIMIT)) for name in todo)
    )
    return root, dict(zip(todo, results, strict=True))


@pytest.mark.parametrize("name", ["extract", "run", "orthogonalize", "evaluate"])
def test_a_file_size_limit_is_one_line_before_the_work_and_leaves_nothing(
    limited: tuple[Path, dict[str, Ended]], model_dir: Path, direction_dir: Path, name: str
) -> None:
    root, results = limited
    result = results[name]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.errors) == 1, result.stderr
    assert "would exceed the file-size limit of this process" in result.errors[0]
    assert "ulimit -f" in result.errors[0]
    assert result.errors[0].replace(str(root), "<tmp>") == FAULTS[f"fsize-{name}"].line
    _, folder = commands(model_dir, direction_dir, root)[name]
    assert not folder.exists()  # new, so removed again (or never made): nothing half-written
    assert hidden_temporaries(root) == []


WRITES = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from refdir.errors import RefdirError
    from refdir.io import atomic_folder, atomic_path, write_text
    from tiny import tiny_model, tiny_tokenizer

    root = Path(sys.argv[1])
    model = tiny_model("qwen2")  # made before the limit: its cache files are not the test
    limit = int(sys.argv[2])
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    def text():
        write_text(root / "notes.txt", "x" * 100_000)

    def tensors():  # safetensors' writer is Rust: the OS error is in its message
        with atomic_path(root / "big.safetensors") as tmp:
            save_file({"x": torch.zeros(100_000)}, str(tmp))

    def folder():  # transformers' save_pretrained, then the tokenizer's (Rust) writer
        with atomic_folder(root / "model") as tmp:
            model.save_pretrained(tmp)
            tiny_tokenizer().save_pretrained(tmp)

    found = {}
    for fn in (text, tensors, folder):
        try:
            fn()
            found[fn.__name__] = "written"
        except RefdirError as exc:
            found[fn.__name__] = str(exc)
    print(json.dumps(found))
    """
)


def writes(root: Path, limit: int, wrapper: list[str] | None = None) -> dict[str, str]:
    """Run :data:`WRITES` into ``root`` (under ``limit`` bytes a file, 0: none)."""
    args = [*(wrapper or []), sys.executable, "-c", WRITES, str(root), str(limit)]
    done = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_file_size_limit_met_while_writing_is_one_line(tmp_path: Path) -> None:
    """Where no estimate warned in time: the write itself (Python's, safetensors' Rust
    writer's, save_pretrained's) fails with one line naming the file, and leaves nothing."""
    found = writes(tmp_path, 50_000)
    assert found["text"].startswith(f"{tmp_path / 'notes.txt'} would exceed the file-size limit")
    assert found["tensors"].startswith(f"{tmp_path / 'big.safetensors'} would exceed")
    assert found["folder"].startswith(f"{tmp_path / 'model'} would exceed")
    assert all("ulimit -f" in message for message in found.values())
    assert f"error: {found['text']}".replace(str(tmp_path), "<tmp>") == FAULTS["fsize-write"].line
    assert list(tmp_path.iterdir()) == []


def _can_mount_tmpfs() -> list[str] | None:
    """A command prefix that runs its command with a fresh mount namespace where a tmpfs can be
    mounted (a user namespace: no root needed where the kernel allows them), or None."""
    unshare = shutil.which("unshare")
    if unshare is None or sys.platform != "linux":
        return None
    probe = [unshare, "--user", "--map-root-user", "--mount", "sh", "-c"]
    check = subprocess.run(
        [*probe, "mount -t tmpfs -o size=64k tmpfs /tmp && umount /tmp"],
        capture_output=True,
        timeout=30,
    )
    return probe if check.returncode == 0 else None


TMPFS = _can_mount_tmpfs()
needs_tmpfs = pytest.mark.skipif(TMPFS is None, reason="cannot mount a tmpfs (no user namespaces)")


@needs_tmpfs
def test_a_full_disk_is_one_line_before_and_while_writing(tmp_path: Path, model_dir: Path) -> None:
    """Small tmpfs disks: extract refuses before its passes (its candidates and their margin
    need more than 32 kB), and writes that meet a full disk (Python's, safetensors',
    save_pretrained's) end in one line; neither leaves anything on its disk."""
    assert TMPFS is not None
    small, full = tmp_path / "small", tmp_path / "full"
    small.mkdir()
    full.mkdir()
    script = textwrap.dedent(
        f"""
        mount -t tmpfs -o size=32k tmpfs {small} && mount -t tmpfs -o size=64k tmpfs {full}
        {sys.executable} -c 'from refdir.cli import entry; entry()' extract \\
            --model {model_dir} --out {small}/extract --n-train 3 2>{tmp_path}/extract.err &
        {sys.executable} -c "$WRITES" {full} 0 > {tmp_path}/writes.json &
        wait %1; echo $? > {tmp_path}/extract.rc
        wait %2
        ls -A {small} {full} > {tmp_path}/listing
        """
    )
    done = subprocess.run(
        [*TMPFS, script], env={**ENV, "WRITES": WRITES}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    stderr = (tmp_path / "extract.err").read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert (tmp_path / "extract.rc").read_text().strip() == "2", stderr
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith(f"error: no space left to write {small}/extract/candidates.")
    assert errors[0].endswith("free space or give another folder")
    assert errors[0].replace(str(tmp_path), "<tmp>") == FAULTS["full-disk"].line
    found = json.loads((tmp_path / "writes.json").read_text().splitlines()[-1])
    assert (
        found["text"]
        == f"no space left to write {full}/notes.txt; free space or give another folder"
    )
    assert found["tensors"].startswith(f"no space left to write {full}/big.safetensors;")
    assert found["folder"].startswith(f"no space left to write {full}/model;")
    # nothing left on either disk, hidden or not
    assert (tmp_path / "listing").read_text().split() == [f"{full}:", f"{small}:"]


# --- a process killed during an export -----------------------------------------------------

HALF_EXPORT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from refdir.io import atomic_folder

    with atomic_folder(Path(sys.argv[1])) as tmp:
        (tmp / "model.safetensors").write_bytes(bytes(100_000))
        print("writing", flush=True)
        time.sleep(60)
    """
)


def test_the_temporary_folder_of_a_killed_export_goes_with_the_next_export(
    tmp_path: Path, direction_dir: Path
) -> None:
    """SIGKILL leaves no chance to clean up: the next write to the same target removes the
    temporary folder of the process that is gone (one of a live process stays)."""
    from refdir.directions.direction import Direction
    from refdir.interventions.export import export_orthogonalized
    from tiny import tiny_chat_model

    out = tmp_path / "export"
    killed = subprocess.Popen(
        [sys.executable, "-c", HALF_EXPORT, str(out)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    alive = subprocess.Popen(
        [sys.executable, "-c", HALF_EXPORT, str(out)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        assert killed.stdout is not None and alive.stdout is not None
        assert killed.stdout.readline().strip() == alive.stdout.readline().strip() == "writing"
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        left = hidden_temporaries(tmp_path)
        assert len(left) == 2 and all(
            f".tmp-{killed.pid}-" in n or f".tmp-{alive.pid}-" in n for n in left
        )
        cm = tiny_chat_model("llama")
        export_orthogonalized(cm, Direction.load(direction_dir), out)
        assert [n for n in hidden_temporaries(tmp_path) if f".tmp-{killed.pid}-" in n] == []
        assert [n for n in hidden_temporaries(tmp_path) if f".tmp-{alive.pid}-" in n] != []
        assert (out / "refdir_manifest.json").exists()
    finally:
        alive.kill()
        alive.wait()


SLOW_WRITE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from refdir.cli.commands import app, entry
    from refdir.io import atomic_folder, atomic_path

    @app.command("slow-write")
    def slow_write(out: str) -> None:
        with atomic_folder(Path(out)) as tmp, atomic_path(Path(out + ".json")) as file:
            (tmp / "model.safetensors").write_bytes(bytes(100_000))
            file.write_text("{}")
            print("writing", flush=True)
            time.sleep(60)

    sys.argv = ["refdir", "slow-write", sys.argv[1]]
    entry()
    """
)


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_a_write_exits_cleanly_and_removes_the_temporaries(
    tmp_path: Path, name: str, code: int
) -> None:
    """The command line turns SIGTERM, as Ctrl-C, into an exit through every ``finally``:
    the temporary file and folder being written go, and no traceback is printed."""
    out = tmp_path / "export"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITE, str(out)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "writing"
    assert len(hidden_temporaries(tmp_path)) == 2
    child.send_signal(getattr(signal, name))
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == code, stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


IN_A_SERIALIZER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pydantic import BaseModel, model_serializer
    from refdir.cli.commands import app, entry
    from refdir.io import atomic_path

    class Slow(BaseModel):
        x: int = 1

        @model_serializer(mode="wrap")
        def _slow(self, handler):  # Python called from pydantic's Rust serializer
            print("serializing", flush=True)
            time.sleep(60)
            return handler(self)

    @app.command("slow-dump")
    def slow_dump(out: str) -> None:
        with atomic_path(Path(out)) as tmp:
            tmp.write_text(str(Slow().model_dump()))

    sys.argv = ["refdir", "slow-dump", sys.argv[1]]
    entry()
    """
)


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_inside_a_serializer_exits_cleanly(tmp_path: Path, name: str, code: int) -> None:
    """pydantic wraps an exception raised in Python code it calls (a serializer) in one of its
    own: a signal landing there still ends the process as that signal, without a traceback,
    and the temporary file goes."""
    child = subprocess.Popen(
        [sys.executable, "-c", IN_A_SERIALIZER, str(tmp_path / "out.txt")],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "serializing"
    child.send_signal(getattr(signal, name))
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []


IN_A_READER = textwrap.dedent(
    """
    import sys, time
    from refdir.cli.commands import _errors, app, entry
    from refdir.errors import RefdirError

    @app.command("slow-read")
    @_errors
    def slow_read() -> None:
        try:  # native code that turns the signal's exception into its own, caught by a reader
            print("reading", flush=True)
            time.sleep(60)
        except BaseException as exc:
            raise RefdirError(f"candidates.safetensors is not a candidates file ({exc!r})") from exc

    sys.argv = ["refdir", "slow-read"]
    entry()
    """
)


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_a_reader_reports_as_damage_still_exits_as_the_signal(
    name: str, code: int
) -> None:
    """A signal landing in native code while a file is read (torch's storage code, under
    safetensors) can come out as that reader's one-line error: the process still ends as the
    signal, and prints no claim that the file is damaged (CI met it: a SIGINT while reading
    candidates.safetensors exited 2, asking to redo extract)."""
    child = subprocess.Popen(
        [sys.executable, "-c", IN_A_READER],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "reading"
    child.send_signal(getattr(signal, name))
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == code, stderr
    assert "error:" not in stderr, stderr
    assert "Traceback" not in stderr, stderr


AT_BIRTH = textwrap.dedent(
    """
    import sys, tempfile, time
    from pathlib import Path
    from refdir.cli.commands import app, entry
    from refdir.io import atomic_folder, atomic_path

    real = {"file": tempfile.mkstemp, "folder": tempfile.mkdtemp}

    def slow(kind):
        def made(*args, **kwargs):  # the signal lands right after the temporary is made
            out = real[kind](*args, **kwargs)
            print("made", flush=True)
            time.sleep(2)
            return out
        return made

    tempfile.mkstemp, tempfile.mkdtemp = slow("file"), slow("folder")

    @app.command("write-one")
    def write_one(out: str, kind: str) -> None:
        if kind == "file":
            with atomic_path(Path(out) / "x.json") as tmp:
                tmp.write_text("{}")
        else:
            with atomic_folder(Path(out) / "x") as tmp:
                (tmp / "a").write_text("a")

    sys.argv = ["refdir", "write-one", sys.argv[1], sys.argv[2]]
    entry()
    """
)


@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_as_a_temporary_is_born_leaves_nothing(
    tmp_path: Path, kind: str, name: str, code: int
) -> None:
    """A signal between the making of a temporary file or folder and its recording (CI met a
    `.timings.json` temporary left by a signalled run) waits until it is recorded: the
    process still ends as the signal, and nothing is left."""
    child = subprocess.Popen(
        [sys.executable, "-c", AT_BIRTH, str(tmp_path), kind],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "made"
    child.send_signal(getattr(signal, name))
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []


DIES_MID_SWAP = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import refdir.io
    from refdir.io import atomic_folder

    target = Path(sys.argv[1])
    renames = []
    real_replace = os.replace

    def replace(src, dst):  # the process dies between the swap's two renames
        renames.append(dst)
        if len(renames) == 2:
            os._exit(0)
        real_replace(src, dst)

    refdir.io.os.replace = replace
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "version").write_text("new")
    """
)


def test_a_process_dead_mid_swap_leaves_the_old_folder_to_be_put_back(tmp_path: Path) -> None:
    """A process that dies (without a chance to clean up) between moving the old folder aside
    and moving the new one in leaves the target missing: the next write to it puts the old
    one back first and removes the dead process's temporary folder."""
    from refdir.io import atomic_folder, remove_stale

    target = tmp_path / "cache"
    target.mkdir()
    (target / "version").write_text("old")
    dead = subprocess.run(
        [sys.executable, "-c", DIES_MID_SWAP, str(target)], env=ENV, capture_output=True, text=True
    )
    assert dead.returncode == 0, dead.stderr
    assert not target.exists()
    assert len(hidden_temporaries(tmp_path)) == 1  # its new folder, not yet moved in
    assert len(list(tmp_path.glob(".cache.old-*"))) == 1  # the old one, set aside
    remove_stale(target)
    assert (target / "version").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    with atomic_folder(target, replace=True) as tmp:
        (tmp / "version").write_text("newer")
    assert (target / "version").read_text() == "newer"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


# --- two runs on one folder ------------------------------------------------------------------


def test_two_runs_on_one_folder_one_is_refused(model_dir: Path, tmp_path: Path) -> None:
    """Two `refdir run` processes on one folder: the first is stopped (SIGSTOP) as soon as it
    has marked the folder, inside its lock, so the second runs while the first is mid-run; the
    second is refused in one line, touches nothing, and the first, resumed (SIGCONT), ends
    well."""
    out = tmp_path / "run"
    args = [*run_args(model_dir, out), "--until", "extract"]
    first = start(args)
    try:
        while not (out / "refdir-run.json").exists():
            assert first.poll() is None, first.communicate()[1]
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        second = ended(start([*run_args(model_dir, out), "--until", "extract", "--n-train", "3"]))
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    finally:
        first.send_signal(signal.SIGCONT)
    done = ended(first)
    assert second.returncode == 2 and len(second.errors) == 1, second.stderr
    assert str(out) in second.errors[0] and "is in use by another refdir run" in second.errors[0]
    assert "Traceback" not in second.stderr
    assert second.errors[0].replace(str(tmp_path), "<tmp>") == FAULTS["two-runs"].line
    assert done.returncode == 0, done.stderr
    assert (out / "candidates.safetensors").exists()
