"""The Direction value (a vector with its layer, position and provenance) and the candidate
set it is chosen from; both saved as safetensors plus JSON, never pickle."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from refdir.errors import RefdirError

__all__ = [
    "Candidates",
    "Direction",
    "atomic_path",
    "file_mode",
    "make_folder",
    "output_folder",
    "writable_folder",
]

DIRECTION_FILE = "direction.safetensors"
DIRECTION_JSON = "direction.json"


def file_mode() -> int:
    """The permissions a new file gets under the current umask (temporary files get 0600)."""
    current = os.umask(0)
    os.umask(current)
    return 0o666 & ~current


def make_folder(path: Path) -> Path:
    """Create the folder ``path`` (and its parents); a one-line error where that cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RefdirError(f"{path} exists and is not a folder; give a folder path") from None
    except OSError as exc:
        raise RefdirError(
            f"cannot create the folder {path} ({exc.strerror or exc}); give another path"
        ) from None
    return path


def _cannot_write(path: Path, exc: OSError) -> RefdirError:
    return RefdirError(f"cannot write in {path} ({exc.strerror or exc}); give another path")


def writable_folder(path: Path) -> Path:
    """:func:`make_folder`, then a one-line error unless a file can be created in it (checked
    before long work whose results go there)."""
    make_folder(path)
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".refdir-probe.")
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    os.close(fd)
    os.unlink(probe)
    return path


@contextmanager
def output_folder(path: Path) -> Iterator[Path]:
    """:func:`writable_folder` for the work inside the block: the folder is made and checked
    now, and the folders it had to make are removed again if the block fails and leaves them
    empty (a failed command leaves no empty output folder behind)."""
    path = Path(os.path.abspath(path))  # "new/../x" must not make "new" on the way
    made = [p for p in (path, *path.parents) if not p.exists()]  # innermost first
    writable_folder(path)
    try:
        yield path
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()  # only an empty folder
            except OSError:
                break
        raise


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only on success."""
    make_folder(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise _cannot_write(target.parent, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes it 0600: give the usual permissions
            tmp_path.chmod(file_mode())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class Direction:
    """A candidate refusal direction: the raw difference of means at one layer and position.

    ``layer`` indexes the residual stream *input* of that decoder layer (``n_layers`` is the
    output of the last one); ``position`` is negative, counted back from the end of the prompt
    over the post-instruction tokens (-1 is the last token).
    """

    vector: torch.Tensor
    layer: int
    position: int
    model: str
    revision: str | None = None
    harmful: str | None = None
    harmless: str | None = None
    n_harmful: int | None = None
    n_harmless: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vector.dim() != 1:
            raise RefdirError(
                f"a direction is one vector; got shape {tuple(self.vector.shape)}: give a 1-D "
                "tensor of the model's d_model values (one candidate, not the candidates)"
            )
        if not torch.isfinite(self.vector).all() or float(self.vector.norm()) == 0.0:
            raise RefdirError(
                "the direction vector is zero or not finite; pick another layer or position"
            )

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def norm(self) -> float:
        return float(self.vector.double().norm())

    def unit(self) -> torch.Tensor:
        """The unit vector, float32."""
        v = self.vector.double()
        return (v / v.norm()).float()

    def check(self, d_model: int, n_layers: int | None = None) -> None:
        """Refuse a direction that does not fit a model."""
        if self.d_model != d_model:
            raise RefdirError(
                f"direction has size {self.d_model} but the model's residual stream has {d_model}; "
                "extract a direction from this model"
            )
        if n_layers is not None and not 0 <= self.layer <= n_layers:
            raise RefdirError(
                f"direction layer {self.layer} is outside 0..{n_layers} for this model; "
                "extract a direction from this model"
            )

    def info(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "vector"}
        data["norm"] = self.norm
        data["d_model"] = self.d_model
        return data

    def save(self, path: str | Path) -> Path:
        """Write ``direction.safetensors`` and ``direction.json`` (into ``path`` if it is a
        folder, else beside the given ``.safetensors`` path). Returns the tensor file."""
        tensor_path, json_path = _paths(Path(path))
        text = _json_text(self.info())  # fails before anything is written
        with atomic_path(tensor_path) as tmp:
            save_file({"direction": self.vector.detach().float().cpu().contiguous()}, str(tmp))
        with atomic_path(json_path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return tensor_path

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Load from a folder, the ``.safetensors`` file or the ``.json`` file."""
        tensor_path, json_path = _paths(Path(path))
        if not tensor_path.exists():
            raise RefdirError(
                f"no direction at {path}: {tensor_path.name} is missing; run `refdir extract`"
            )
        try:
            vector = load_file(str(tensor_path))["direction"]
        except KeyError:
            raise RefdirError(
                f"{tensor_path} holds no tensor named 'direction'; save it with Direction.save"
            ) from None
        except Exception as exc:
            raise RefdirError(f"{tensor_path} is not a safetensors file ({exc})") from None
        if not vector.is_floating_point():
            raise RefdirError(f"{tensor_path} holds an integer 'direction'; save a float vector")
        try:
            info = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RefdirError(
                f"{json_path} is not readable JSON ({exc}); save the direction again"
            ) from None
        if not isinstance(info, dict) or "layer" not in info or "position" not in info:
            raise RefdirError(f"{json_path} is missing or lacks 'layer' and 'position'")
        for key in ("layer", "position"):
            if not isinstance(info[key], int) or isinstance(info[key], bool):
                raise RefdirError(f"{json_path}: '{key}' must be an integer, not {info[key]!r}")
        if info["position"] >= 0:
            raise RefdirError(
                f"{json_path}: 'position' counts back from the last token (-1, -2, ...), "
                f"not {info['position']}"
            )
        fields = {k: info[k] for k in cls.__dataclass_fields__ if k in info and k != "vector"}
        fields.setdefault("model", "unknown")
        return cls(vector=vector, **fields)


def _paths(path: Path) -> tuple[Path, Path]:
    if path.suffix == ".safetensors":
        return path, path.with_suffix(".json")
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path / DIRECTION_FILE, path / DIRECTION_JSON


@dataclass(frozen=True)
class Candidates:
    """Difference-of-means candidates at every post-instruction position and layer.

    ``harmful_mean`` and ``harmless_mean`` are float64 [P, L+1, d]; ``positions`` are the
    negative positions of the P rows (``-P .. -1``). ``harmful_prompts`` and
    ``harmless_prompts``, when known, are the prompts the means are over (after any filter).
    """

    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    model: str
    revision: str | None = None
    harmful: str | None = None
    harmless: str | None = None
    n_harmful: int = 0
    n_harmless: int = 0
    harmful_prompts: list[str] | None = None
    harmless_prompts: list[str] | None = None

    @property
    def diffs(self) -> torch.Tensor:
        """[P, L+1, d] mean(harmful) - mean(harmless), float64."""
        return self.harmful_mean - self.harmless_mean

    @property
    def positions(self) -> list[int]:
        n = int(self.harmful_mean.shape[0])
        return list(range(-n, 0))

    @property
    def n_layers(self) -> int:
        """Number of decoder layers (the tensors hold one more: the last layer's output)."""
        return int(self.harmful_mean.shape[1]) - 1

    def direction(self, position: int, layer: int, **metadata: Any) -> Direction:
        """The candidate at a negative ``position`` and a ``layer`` in ``0..n_layers``."""
        if position not in self.positions:
            raise RefdirError(
                f"position {position} is not one of the post-instruction positions {self.positions}"
            )
        if not 0 <= layer <= self.n_layers:
            raise RefdirError(f"layer {layer} is outside 0..{self.n_layers}")
        vector = self.diffs[position, layer].float()
        return Direction(
            vector,
            layer,
            position,
            self.model,
            self.revision,
            self.harmful,
            self.harmless,
            self.n_harmful,
            self.n_harmless,
            dict(metadata),
        )

    def save(self, path: str | Path) -> Path:
        meta = {
            "model": self.model,
            "revision": self.revision,
            "harmful": self.harmful,
            "harmless": self.harmless,
            "n_harmful": self.n_harmful,
            "n_harmless": self.n_harmless,
            "harmful_prompts": self.harmful_prompts,
            "harmless_prompts": self.harmless_prompts,
        }
        tensors = {
            "candidates": self.diffs.float().contiguous(),
            "harmful_mean": self.harmful_mean.contiguous(),
            "harmless_mean": self.harmless_mean.contiguous(),
        }
        target = Path(path)
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata={"refdir": json.dumps(meta)})
        return target

    @classmethod
    def load(cls, path: str | Path) -> Candidates:
        """Load from a folder or its ``candidates.safetensors``."""
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / "candidates.safetensors"
        if not path.exists():
            raise RefdirError(f"no candidates at {path}; run `refdir extract`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("refdir", "{}"))
                harmful, harmless = f.get_tensor("harmful_mean"), f.get_tensor("harmless_mean")
            return cls(harmful, harmless, **meta)
        except Exception as exc:  # safetensors and json raise errors of their own
            raise RefdirError(
                f"{path} is not a candidates file written by refdir ({exc}); run `refdir extract`"
            ) from None
