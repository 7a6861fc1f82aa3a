"""An edit as a PEFT LoRA adapter: ``PeftModel.from_pretrained(base, folder)`` runs the edited
model on the unedited base, and ``merge_and_unload()`` folds it in.

An edit of rank k (the paper's orthogonalization: k = 1) changes every weight it touches by a
matrix of rank k: an output projection ``W`` [d, in] becomes ``W - w Q^T (Q W)``, so its LoRA
pair is ``B = -w Q^T`` [d, k] and ``A = Q W`` [k, in]; an embedding ``E`` [V, d] becomes
``E - w (E Q^T) Q``; fused experts [E, d, in] get one such pair per expert. The adapter's rank is
the edit's k and its scaling 1 (``lora_alpha = r``). A bias that writes into the residual stream
(GPT-2) is saved whole, edited, beside the adapter (PEFT's ``bias="lora_only"``).

Every factor pair is checked against the weight edit itself (``W' - W`` computed as
:mod:`refdir.interventions.edit_weights` computes it), and the adapter's logits against the
edit's hooks on probe prompts. A norm-preserving edit rescales every column of a weight, which
is not of low rank: it is refused here (the safetensors and GGUF exports carry it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refdir.errors import RefdirError
from refdir.interventions.edit import Edit
from refdir.interventions.model_card import base_model_id
from refdir.interventions.orthogonalization import (
    OrthogonalizeReport,
    check_editable,
    last_logits,
    logit_delta,
    measured_exactness,
)
from refdir.interventions.projection import edited_copy, write_basis
from refdir.model.chat_model import ChatModel

__all__ = ["LoraFactors", "adapter_parity", "lora_factors"]

_PROBES = (
    "Write a short poem about the sea.",
    "Explain how vaccines work in two sentences.",
)
_ADAPTER = "default"


@dataclass
class LoraFactors:
    """The adapter of one edit: per module, its LoRA pair (in PEFT's shapes), the module
    names PEFT targets, the fused parameters it targets, and the edited biases."""

    rank: int
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """module or parameter name -> (A, B): PEFT's lora_A / lora_embedding_A and lora_B /
    lora_embedding_B weights."""
    modules: list[str] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    """module name -> its edited bias."""
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    """module name -> its bias before the edit (put back once the adapter is written)."""
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    """name -> W' - W as the weight edit computes it (to check PEFT's product against)."""
    conv1d: bool = False

    @property
    def tensors(self) -> int:
        return len(self.pairs) + len(self.biases)


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def lora_factors(cm: ChatModel, edit: Edit) -> LoraFactors:
    """The LoRA pairs that carry out ``edit`` on ``cm`` (unedited), float32 on the CPU."""
    edit.check(cm.layout)
    check_editable(cm)
    if edit.norm_preserving:
        raise RefdirError(
            "a norm-preserving edit rescales every column of a weight, which no low-rank "
            "adapter expresses; export it with `--format safetensors` or `--format gguf`"
        )
    names = _names(cm.model)
    factors = LoraFactors(rank=edit.k)
    with torch.no_grad():
        if edit.embed > 0:
            q = edit.basis.float()
            for embedding in cm.layout.embeddings:
                name = names[id(embedding)]
                e = embedding.weight.detach().float().cpu()
                factors.pairs[name] = ((q @ e.T).contiguous(), (-edit.embed * q.T).contiguous())
                factors.modules.append(name)
                factors.deltas[name] = edited_copy(e, -1, q, edit.embed) - e
        for index, write, w in edit.sites(cm.layout):
            q = write_basis(cm.layout, write, edit.basis_at(index)).float().cpu()
            for weight in write.weights:
                _weight_pair(factors, names, weight.module, weight.name, weight.axis, q, w)
                if weight.bias is not None:
                    if weight.param.dim() != 2:
                        raise RefdirError(
                            f"{type(cm.model).__name__}'s fused experts have biases, which a PEFT "
                            "adapter cannot carry; export with `--format safetensors`"
                        )
                    bias = getattr(weight.module, weight.bias).detach()
                    factors.originals[names[id(weight.module)]] = bias.clone()
                    edited = edited_copy(bias.float().cpu(), -1, q, w)
                    factors.biases[names[id(weight.module)]] = edited
    return factors


def _weight_pair(
    factors: LoraFactors,
    names: dict[int, str],
    module: nn.Module,
    attr: str,
    axis: int,
    q: torch.Tensor,
    w: float,
) -> None:
    """Add the LoRA pair of one output weight: a Linear [d, in], a GPT-2 Conv1D [in, d], or
    fused experts [E, d, in] / [E, in, d] (a PEFT target parameter)."""
    param = getattr(module, attr).detach().float().cpu()
    name = names[id(module)]
    k = q.shape[0]
    delta = edited_copy(param, axis, q, w) - param
    if param.dim() == 2:
        if attr != "weight":
            raise RefdirError(
                f"{name}.{attr} is not a module's weight; PEFT cannot target it, export with "
                "`--format safetensors`"
            )
        plain = param if axis == -2 else param.T  # [d, in]
        if axis == -1:
            factors.conv1d = True
        factors.pairs[name] = ((q @ plain).contiguous(), (-w * q.T).contiguous())
        factors.modules.append(name)
        factors.deltas[name] = delta
        return
    experts = param.shape[0]
    full = f"{name}.{attr}"
    transposed = bool(getattr(module, "is_transposed", False))
    a = torch.empty(k * experts, param.shape[-1] if axis == -2 else param.shape[-2])
    b = torch.empty(param.shape[axis], k * experts)
    if (axis == -1) != transposed:  # PEFT reads [E, in, out] only with the module's flag
        raise RefdirError(
            f"{full} is stored [experts, in, d] without `is_transposed`, which PEFT reads the "
            "other way round; export with `--format safetensors`"
        )
    for e in range(experts):
        plain = param[e] if axis == -2 else param[e].T  # [d, in]
        a[e * k : (e + 1) * k] = q @ plain
        for j in range(k):
            b[:, j * experts + e] = -w * q[j]
    factors.pairs[full] = (a, b)
    factors.parameters.append(full)
    factors.deltas[full] = delta


def _config(factors: LoraFactors, cm: ChatModel) -> Any:
    from peft import LoraConfig  # 1.6 s to import: only the LoRA export needs it

    return LoraConfig(
        r=factors.rank,
        lora_alpha=factors.rank,
        lora_dropout=0.0,
        target_modules=list(factors.modules) or None,
        target_parameters=list(factors.parameters) or None,
        bias="lora_only" if factors.biases else "none",
        fan_in_fan_out=factors.conv1d,
        init_lora_weights=True,  # B = 0: a module without saved weights is left alone
        base_model_name_or_path=base_model_id(cm.name) or cm.name,
        task_type="CAUSAL_LM",
    )


def _install(cm: ChatModel, factors: LoraFactors) -> Any:
    """``cm.model`` wrapped by PEFT with the adapter's weights set and checked (every pair's
    product equals the weight edit). The caller unloads it."""
    from peft import get_peft_model  # see _config

    if len(set(factors.modules) & {n.rsplit(".", 1)[0] for n in factors.parameters}) > 0:
        raise RefdirError("a module is targeted both as a module and by its parameters")
    wrapped: Any = get_peft_model(cm.model, _config(factors, cm))
    wrapped.peft_config[_ADAPTER].base_model_name_or_path = base_model_id(cm.name) or cm.name
    inner: nn.Module = wrapped.base_model.model
    try:
        modules: dict[str, Any] = dict(inner.named_modules())
        with torch.no_grad():
            for name, (a, b) in factors.pairs.items():
                layer = modules[name] if name in modules else _param_layer(modules, name)
                if hasattr(layer, "lora_embedding_A") and _ADAPTER in layer.lora_embedding_A:
                    target_a = layer.lora_embedding_A[_ADAPTER]
                    target_b = layer.lora_embedding_B[_ADAPTER]
                else:
                    target_a = layer.lora_A[_ADAPTER].weight
                    target_b = layer.lora_B[_ADAPTER].weight
                target_a.copy_(a.to(target_a))
                target_b.copy_(b.to(target_b))
                got = layer.get_delta_weight(_ADAPTER).float().cpu()
                want = factors.deltas[name]
                if got.shape != want.shape or not torch.allclose(
                    got, want, atol=1e-5 * float(want.abs().max().clamp_min(1e-6)) + 1e-7
                ):
                    raise RefdirError(
                        f"PEFT's LoRA on {name} does not reproduce the weight edit; export with "
                        "`--format safetensors`"
                    )
            for name, bias in factors.biases.items():
                base = modules[name].get_base_layer()
                base.bias.copy_(bias.to(base.bias))
    except Exception:
        _restore(cm, wrapped, factors)
        raise
    return wrapped


def _param_layer(modules: dict[str, Any], name: str) -> Any:
    """The PEFT layer that wraps the fused parameter ``name`` (its module's name, wrapped)."""
    owner, attr = name.rsplit(".", 1)
    layer = modules[owner]
    while getattr(layer, "parameter_name", attr) != attr:  # nested ParamWrappers
        layer = layer.get_base_layer()
    return layer


def _restore(cm: ChatModel, wrapped: Any, factors: LoraFactors) -> None:
    """Remove the adapter from ``cm.model`` and put the original biases back."""
    base = wrapped.unload()
    modules = dict(base.named_modules())
    with torch.no_grad():
        for name, bias in factors.originals.items():
            modules[name].bias.copy_(bias.to(modules[name].bias))
    cm.model = base


def adapter_parity(
    cm: ChatModel, edit: Edit, folder: Path, prompts: Sequence[str] = _PROBES
) -> tuple[OrthogonalizeReport, float]:
    """Write ``edit`` as a PEFT adapter into ``folder`` (adapter_config.json and
    adapter_model.safetensors) and return its report and the max |logit difference| between the
    base with the adapter and the edit's hooks on ``prompts``. ``cm`` is left unedited."""
    factors = lora_factors(cm, edit)
    with edit.apply(cm):
        hooked = last_logits(cm, prompts)
    wrapped = _install(cm, factors)
    try:
        with torch.inference_mode():
            batch = cm.chat.encode(list(prompts)).to(cm.device)
            adapted = wrapped(**batch.inputs(), use_cache=False).logits.float()
        # the adapter only: not a copy of the embedding it targets
        wrapped.save_pretrained(str(folder), save_embedding_layers=False)
    finally:
        _restore(cm, wrapped, factors)
    mask = cm.chat.encode(list(prompts)).attention_mask
    delta, scale = logit_delta(mask, hooked, adapted)
    exact = not cm.layout.sandwich
    note = (
        "exact: a rank-{k} LoRA adapter on the projections that write into the residual stream"
        if exact
        else "approximate: a norm after attention and after the MLP rescales their output; the "
        "adapter removes the subspace from the norm's output, but not as the hooks do"
    ).format(k=edit.k)
    if cm.layout.tied and edit.embed > 0:
        note += (
            "; the embedding is tied to the unembedding, so merge_and_unload() edits both "
            "(untie the base's lm_head first to keep the adapter's logits)"
        )
    report = OrthogonalizeReport(exact, False, factors.tensors, note)
    dtype = cm.layout.embed.weight.dtype
    return measured_exactness(report, dtype, delta, scale, "the edit's hooks"), delta
