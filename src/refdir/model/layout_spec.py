"""The name patterns that locate a decoder's parts (:class:`LayoutSpec`), kept free of torch so
that the command line can check a ``--layout`` file before loading anything."""

from __future__ import annotations

import difflib
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from refdir.errors import RefdirError, one_line

__all__ = ["LayoutSpec", "read_layout"]

_NULLABLE = ("layers", "attn", "mlp")
"""Fields that may be null: ``layers`` (found by size) and a block kind the layers lack."""


@dataclass(frozen=True)
class LayoutSpec:
    """Regular expressions (matched against a child's name) that locate each part.

    Where a pattern has alternatives, the first alternative that names a child wins (so
    ``post_self_attn_layernorm`` is preferred to ``post_attention_layernorm``, which is the
    pre-MLP norm in GLM-4). Override any field to support a model the defaults miss, for
    example ``LayoutSpec(mlp=r"feed_forward", mlp_out=r"w2")``.
    """

    layers: str | None = field(
        default=None,
        metadata={"help": "dotted path of the decoder-layer ModuleList; None finds it by size"},
    )
    attn: str | None = field(
        default=r"self_attn|self_attention|attention|attn|linear_attn|mamba|mixer|conv",
        metadata={
            "help": "token mixers: every child that matches writes into the residual stream "
            "(several in parallel-mixer families such as Falcon-H1); None: layers have none"
        },
    )
    mlp: str | None = field(
        default=r"mlp|block_sparse_moe|feed_forward|ffn|shared_mlp",
        metadata={
            "help": "MLP or MoE blocks: every child that matches writes into the residual "
            "stream (Granite's shared MLP beside its experts); None: layers have none (a "
            "model whose every layer holds one mixer, such as Nemotron-H)"
        },
    )
    attn_out: str = field(
        default=r"o_proj|out_proj|dense|c_proj|wo", metadata={"help": "a mixer's output projection"}
    )
    mlp_out: str = field(
        default=r"down_proj|w2|fc2|fc_out|c_proj|dense_4h_to_h|wo|output_linear",
        metadata={"help": "MLP output projection(s); every match in the MLP subtree is edited"},
    )
    post_attn_norm: str = field(
        default=r"post_self_attn_layernorm|post_attention_layernorm|post_attn_norm",
        metadata={"help": "norm applied to the attention output (sandwich families only)"},
    )
    post_mlp_norm: str = field(
        default=r"post_feedforward_layernorm|post_mlp_layernorm|post_ffw_norm",
        metadata={"help": "norm applied to the MLP output; its presence marks a sandwich family"},
    )
    final_norm: str = field(
        default=r"norm|final_layernorm|ln_f|final_norm", metadata={"help": "final norm"}
    )

    def __post_init__(self) -> None:
        if self.attn is None and self.mlp is None:
            raise RefdirError(
                "layout fields 'attn' and 'mlp' cannot both be null: set the pattern of the "
                "blocks that write into the residual stream"
            )

    @classmethod
    def from_fields(cls, values: Mapping[str, Any]) -> LayoutSpec:
        """A spec with ``values`` (field name -> pattern) over the defaults; a one-line error
        for an unknown field, a value that is not a string (``layers`` may be null) or a
        pattern that is not a regular expression."""
        names = [f.name for f in fields(cls)]
        for key, value in values.items():
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise RefdirError(
                    f"unknown layout field {key!r}; {hint}the fields are {', '.join(names)}"
                )
            if not isinstance(value, str) and not (key in _NULLABLE and value is None):
                null = " or null" if key in _NULLABLE else ""
                raise RefdirError(
                    f"layout field {key!r} must be a string (a regular expression){null}, "
                    f"got {value!r}"
                )
            if key != "layers" and isinstance(value, str):
                try:
                    with warnings.catch_warnings():
                        # a pattern whose meaning a later Python will change ("[[", "--")
                        warnings.simplefilter("error", FutureWarning)
                        re.compile(value)
                except FutureWarning as exc:
                    raise RefdirError(
                        f"layout field {key!r}: {value!r} is ambiguous ({one_line(str(exc))}); "
                        "escape the character with a backslash"
                    ) from None
                except (re.error, OverflowError, RecursionError) as exc:  # re's own limits too
                    raise RefdirError(
                        f"layout field {key!r}: {value!r} is not a regular expression "
                        f"({one_line(str(exc))})"
                    ) from None
        return cls(**dict(values))


def read_layout(path: Path) -> dict[str, str | None]:
    """The field overrides in a ``--layout`` JSON file (an object of :class:`LayoutSpec` field
    names to patterns); a one-line error for a missing or malformed file. Its fields are
    checked where it is used (:meth:`LayoutSpec.from_fields`)."""
    if not path.is_file():
        raise RefdirError(
            f"layout file {path} does not exist; give a JSON object of LayoutSpec fields"
        )
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RefdirError(f"layout file {path} is not readable JSON ({exc})") from None
    except (ValueError, RecursionError) as exc:  # past json's limits
        why = "nested too deeply" if isinstance(exc, RecursionError) else "a number too long"
        raise RefdirError(f"layout file {path} is not readable JSON ({why} to read)") from None
    if not isinstance(values, dict) or not values:
        raise RefdirError(
            f"layout file {path} must hold a non-empty JSON object of LayoutSpec fields, "
            'e.g. {"mlp": "feed_forward", "mlp_out": "w2"}'
        )
    return values
