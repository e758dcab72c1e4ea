"""LoRA as PEFT 0.21.2 means it: plain, rsLoRA, rank/alpha patterns, DoRA, lora_bias, embeddings, convs.

Per module ``ΔW = transpose(B @ A, fan_in_fan_out) * scaling`` with ``scaling = alpha / r`` (rsLoRA:
``alpha / sqrt(r)``), computed in float32 in the same operation order as PEFT so that a single adapter folded
into a base is bit-identical to ``merge_and_unload``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adaptool.adapters.config import AdapterConfig
from adaptool.adapters.family import Family
from adaptool.adapters.layout import base_layout, effective_fan_in_fan_out, numel
from adaptool.adapters.saved import OWN_MARKERS, TOKENS_SUFFIX, aux_edits
from adaptool.adapters.source import Adapter
from adaptool.ops.edits import AddDelta, DoraRescale
from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import Checkpoint
from adaptool.io.safetensors_file import torch_dtype
from adaptool.plan.resolve import TensorResolver

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
EMB_A_SUFFIX, EMB_B_SUFFIX = ".lora_embedding_A", ".lora_embedding_B"
MAG_SUFFIXES = (".lora_magnitude_vector.weight", ".lora_magnitude_vector")
BIAS_SUFFIX = ".lora_B.bias"
# LoRA's own tensors are told by OWN_MARKERS (adaptool.adapters.saved), which every family's reading applies.
OWN: tuple[str, ...] = ()


@dataclass
class LoraModule:
    """One adapted module of a LoRA adapter.

    Attributes:
        path (str): module path in the base model, e.g. ``model.layers.0.self_attn.q_proj``.
        kind (str): "linear", "embedding" or "conv".
        rank (int): r as the config states it (rank_pattern resolved).
        scaling (float): alpha / r, or alpha / sqrt(r) for rsLoRA.
    """

    adapter: Adapter
    path: str
    kind: str
    a_key: str
    b_key: str
    rank: int
    scaling: float
    bias_key: str | None = None
    magnitude_key: str | None = None

    def factors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) as float32 on ``device``: B (out, r), A (r, in) for linear; embeddings (dim, r), (r, num);
        convs B (out, r, 1…), A (r, in, k…)."""
        a = self.adapter.load(self.a_key).to(device=device, dtype=torch.float32)
        b = self.adapter.load(self.b_key).to(device=device, dtype=torch.float32)
        return b, a

    def delta(self, device, weight_shape: tuple[int, ...], fifo: bool) -> torch.Tensor:
        """ΔW in the base weight's layout (``weight_shape``), float32."""
        return self.delta_rows(device, weight_shape, fifo)(0, weight_shape[0])

    def delta_rows(self, device, weight_shape: tuple[int, ...], fifo: bool):
        """``(start, stop) -> ΔW[start:stop]`` (base layout: ``(stop - start, *weight_shape[1:])``, float32), in
        PEFT's order of operations: matmul, transpose, scale. Each row block is the same dot products PEFT
        computes, so blocks are exact."""
        b, a = self.factors(device)
        s = self.scaling
        if self.kind == "conv":
            full = _conv_delta(b, a, weight_shape).mul_(s)
            return lambda start, stop: full[start:stop].clone()
        if self.kind == "embedding" or fifo:
            return lambda start, stop: (b @ a[:, start:stop]).T.mul_(s)
        return lambda start, stop: (b[start:stop] @ a).mul_(s)


def _conv_delta(b: torch.Tensor, a: torch.Tensor, weight_shape) -> torch.Tensor:
    """A conv's ΔW (out, in, k…) from B (out, r, 1…) and A (r, in, k…), as PEFT computes it (unscaled)."""
    if tuple(weight_shape[2:4]) == (1, 1):
        # PEFT's 1x1 shortcut (also taken by Conv3d (1,1,k), see PEFT #3768)
        return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[len(weight_shape)]
    return conv(a.transpose(0, 1), b).transpose(0, 1)


def scaling_for(settings: AdapterConfig, path: str) -> tuple[int, float]:
    """(r, scaling) of module ``path`` under PEFT's first-match pattern rule (r is positive: the config says so)."""
    r, alpha = settings.rank_for(path), settings.alpha_for(path)
    return r, (alpha / math.sqrt(r) if settings.use_rslora else alpha / r)


def lora_modules(adapter: Adapter, base: Checkpoint | None = None) -> list[LoraModule]:
    """Every module a LoRA adapter adapts, with its resolved rank and scaling.

    ``base``: the checkpoint the modules will be folded into; a ``layer_replication`` adapter needs the
    expanded view of it (:func:`adaptool.plan.replication.replicate`), anything else refuses it.
    """
    settings = adapter.settings
    _refuse_variants(adapter, settings, base)
    names = set(adapter.names)
    modules, used = [], set()
    for name in adapter.names:
        if name.endswith(A_SUFFIX):
            path, kind, b_key = name[: -len(A_SUFFIX)], "linear", name[: -len(A_SUFFIX)] + B_SUFFIX
        elif name.endswith(EMB_A_SUFFIX):
            path, kind, b_key = name[: -len(EMB_A_SUFFIX)], "embedding", name[: -len(EMB_A_SUFFIX)] + EMB_B_SUFFIX
        else:
            continue
        if b_key not in names:
            raise AdaptoolError(f"{adapter.source}: {name} has no matching {b_key}", "the adapter file is incomplete; re-save it")
        a_shape, b_shape = tuple(adapter.shape(name)), tuple(adapter.shape(b_key))
        _check_factor_shapes(adapter, path, kind, name, a_shape, b_key, b_shape)
        if kind == "linear" and len(a_shape) > 2:
            kind = "conv"
        r, scaling = scaling_for(settings, path)
        rank_on_disk = a_shape[0]
        if r != rank_on_disk:
            raise AdaptoolError(
                f"{adapter.source}: {path} has rank {rank_on_disk} on disk but its config says r={r}",
                "fix r/rank_pattern in adapter_config.json",
            )
        mag = next((path + s for s in MAG_SUFFIXES if path + s in names), None)
        if settings.use_dora and mag is None:
            raise AdaptoolError(f"{adapter.source}: use_dora is set but {path} has no lora_magnitude_vector",
                                "the adapter file is incomplete; re-save it")
        bias = path + BIAS_SUFFIX if path + BIAS_SUFFIX in names else None
        used.update(k for k in (name, b_key, mag, bias) if k)
        modules.append(LoraModule(adapter, path, kind, name, b_key, r, scaling, bias, mag))
    _refuse_strays(adapter, used)
    return modules


def _check_factor_shapes(adapter, path, kind, a_key, a_shape, b_key, b_shape) -> None:
    """A (r, in[, k…]) and B (out, r[, 1…]) as PEFT saves them; embeddings (r, num) and (dim, r)."""
    ndim_ok = len(a_shape) == len(b_shape) and (len(a_shape) == 2 if kind == "embedding" else 2 <= len(a_shape) <= 5)
    if not ndim_ok or b_shape[1] != a_shape[0] or any(d != 1 for d in b_shape[2:]):
        raise AdaptoolError(f"{adapter.source}: {path} has {a_key} {a_shape} and {b_key} {b_shape}, which do not fit "
                            "together", "the adapter file is inconsistent; re-save it")


def _refuse_strays(adapter, used: set) -> None:
    """A LoRA tensor that belongs to no complete module (a lora_B without its lora_A, a magnitude vector or
    lora bias of no module, a name PEFT would not load) is an incomplete adapter, never silently dropped."""
    for name in adapter.names:
        if name in used or name.endswith(TOKENS_SUFFIX) or not any(m in name for m in OWN_MARKERS):
            continue
        for own in (B_SUFFIX, EMB_B_SUFFIX, BIAS_SUFFIX, *MAG_SUFFIXES):
            if name.endswith(own):
                a_key = name[: -len(own)] + (EMB_A_SUFFIX if own == EMB_B_SUFFIX else A_SUFFIX)
                raise AdaptoolError(f"{adapter.source}: {name} has no matching {a_key}",
                                    "the adapter file is incomplete; re-save it")
        raise AdaptoolError(f"{adapter.source}: {name} is no tensor of a LoRA module (PEFT would not load it)",
                            "re-save the adapter with PEFT's save_pretrained")


def _refuse_variants(adapter, settings: AdapterConfig, base=None) -> None:
    """Refuse LoRA variants whose merged weight is not the plain/DoRA formula, and a ``layer_replication``
    adapter outside the replicated view of its base."""
    for key in settings.variants:
        raise AdaptoolError(f"{adapter.source}: LoRA variant '{key}' cannot be folded into a base by adaptool yet",
                            "merge it with PEFT, or train a plain LoRA/DoRA adapter")
    # Its keys use the expanded layer indices: only the replicated view of the base gives them their meaning.
    ranges = settings.layer_replication
    if ranges and getattr(base, "layer_replication", None) != [list(r) for r in ranges]:
        raise AdaptoolError(f"{adapter.source}: a LoRA adapter with layer_replication can only be folded by "
                            "`adaptool unload BASE+ADAPTER` (alone)", "unload it into its base first")


def lora_edits(adapter: Adapter, base: Checkpoint) -> list:
    """Edits of a LoRA adapter against checkpoint ``base`` (names resolved, shapes checked)."""
    resolve = TensorResolver(base, adapter)
    linear_only = base_layout(base) is False
    fifo_default = effective_fan_in_fan_out(adapter, base)
    # Saved base-layer tensors replace the base first (as PEFT loads them), then the deltas apply on top.
    edits = aux_edits(adapter, base, resolve)
    for m in lora_modules(adapter, base):
        target = resolve.tensor(m.path, "weight")
        w_shape = base.tensors[target].shape
        fifo = _check_and_layout(adapter, m, w_shape, fifo_default, linear_only=linear_only)
        if m.magnitude_key:
            _check_magnitude(adapter, m, w_shape, fifo)
        edits.append(_module_edit(adapter, m, target, w_shape, fifo, base.tensors[target].dtype))
        if m.bias_key:
            bias = resolve.tensor(m.path, "bias", why="lora_bias=True needs a bias in the base layer")
            b_shape, bias_shape = tuple(adapter.shape(m.bias_key)), tuple(base.tensors[bias].shape)
            if b_shape != bias_shape:
                raise AdaptoolError(f"{adapter.source}: {m.bias_key} has shape {b_shape}, base {bias} has {bias_shape}",
                                    "the adapter file is inconsistent; re-save it")
            edits.append(AddDelta(bias, adapter.source, _bias_delta(adapter, m.bias_key, m.scaling), row_wise=False))
    return edits


def _check_magnitude(adapter, m: LoraModule, w_shape, fifo: bool) -> None:
    """DoRA's magnitude holds one number per output feature: (out,) for Linear, (1, out, 1, 1) for a conv."""
    w_shape = tuple(w_shape)
    features = w_shape[1] if (fifo or m.kind == "embedding") else w_shape[0]
    shape = tuple(adapter.shape(m.magnitude_key))
    ok = shape == (features,) if m.kind == "linear" and not fifo else (
        numel(shape) == features and sum(d != 1 for d in shape) <= 1)
    if not ok:
        raise AdaptoolError(f"{adapter.source}: {m.magnitude_key} has shape {shape}, but {m.path} has {features} "
                            "output features", "the adapter file is inconsistent; re-save it")


def _module_edit(adapter, m: LoraModule, target, w_shape, fifo, base_dtype):
    """The edit of base weight ``target`` (``w_shape``): ``W + ΔW``, or DoRA's rescale when the module has a
    magnitude vector (one number per output feature)."""
    delta = lambda device, m=m: m.delta_rows(device, w_shape, fifo)  # noqa: E731
    if m.magnitude_key is None:
        if m.kind == "embedding":  # PEFT: W += Δ.to(W.dtype), a rounding we repeat to give its numbers
            return AddDelta(target, adapter.source, delta, round_delta_to=torch_dtype(base_dtype))
        return AddDelta(target, adapter.source, delta, row_wise=m.kind != "conv")
    layout = "conv" if m.kind == "conv" else "embedding" if m.kind == "embedding" else "fifo" if fifo else "linear"
    key = m.magnitude_key
    magnitude = lambda device: adapter.load(key).to(device=device, dtype=torch.float32)  # noqa: E731
    return DoraRescale(target, adapter.source, delta, magnitude, layout)


def _bias_delta(adapter, key, scaling):
    """``device -> ((start, stop) -> Δbias[start:stop])``: lora_B's bias (out,) times the module's scaling."""
    def rows(device):
        d = adapter.load(key).to(device=device, dtype=torch.float32) * scaling
        return lambda start, stop: d[start:stop].clone()

    return rows


def layout_in(adapter: Adapter, m: LoraModule, base: Checkpoint, w_shape) -> bool:
    """Check A/B against ``base``'s weight of shape ``w_shape``; return whether it is stored (in, out) (GPT-2
    Conv1D), with ``fan_in_fan_out`` as PEFT applies it to this base."""
    return _check_and_layout(adapter, m, w_shape, effective_fan_in_fan_out(adapter, base),
                             linear_only=base_layout(base) is False)


def _check_and_layout(adapter, m: LoraModule, w_shape, fifo_default: bool, linear_only: bool = False) -> bool:
    """Check A/B against the base weight; return whether the weight is stored (in, out) (GPT-2 Conv1D).

    ``linear_only``: the base is a model whose 2-D weights are all ``nn.Linear`` (see
    :func:`adaptool.adapters.layout.base_layout`), so no weight is stored (in, out) whatever the config says.
    """
    a_shape, b_shape = adapter.shape(m.a_key), adapter.shape(m.b_key)
    if m.kind == "embedding":
        expected = (a_shape[1], b_shape[0])
        fifo = False
    elif m.kind == "conv":
        expected = (b_shape[0], a_shape[1], *a_shape[2:])
        fifo = False
    else:
        out_f, in_f = b_shape[0], a_shape[1]
        expected = (out_f, in_f)
        if not linear_only and tuple(w_shape) == (in_f, out_f) and (out_f != in_f or fifo_default):
            return True
        fifo = False
    if tuple(w_shape) != tuple(expected) or (m.kind != "conv" and b_shape[1] != a_shape[0]):
        raise AdaptoolError(
            f"{adapter.source}: {m.path} does not fit the base: adapter implies {tuple(expected)}, base has {tuple(w_shape)}",
            "check that the adapter was trained on this base model",
        )
    return fifo


# What the registry (adaptool.adapters.registry) knows of this family.
FAMILY = Family("LORA", lora_edits, OWN, additive=True)
