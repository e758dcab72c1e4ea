"""``inspect``: what an adapter or a model holds, read from headers and adapter tensors only.

For an adapter (a PEFT folder of any supported type, or a kohya/LyCORIS file mapped onto ``--base``): the type,
and per module the rank, alpha, effective scale (rsLoRA, rank/alpha patterns by PEFT's first-match rule),
``shape`` ``[out, in]`` in Linear terms (also for GPT-2 Conv1D), ``‖ΔW‖_F`` and a short spectrum summary
(stable rank ``‖ΔW‖_F² / σ₁²``, the share of ``‖ΔW‖_F²`` kept by the best rank 1/4/16). Every number comes from
the factors without forming ΔW where the family allows it (LoRA, AdaLoRA: from the R x R Gram matrices of the
factors; LoHa: its Hadamard product as a rank-r₁r₂ Khatri-Rao pair; LoKr: the singular values of a Kronecker
product are the products of its factors'). IA3 and OFT scale or rotate the base weight, so their ΔW depends on
W: their measures are null. With ``--base``, whether every module fits that base (shapes from its headers; no
base weight is ever read). For a model: tensors, parameters, dtypes, shards, bytes.

Inspect reports rather than refuses: tensors holding NaN/Inf are listed in ``non_finite`` (their modules get
null measures), a base that does not fit gives ``fits_base: false``. Input it cannot read at all is an error.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch

from adaptool.adapters import FAMILIES_BY_TYPE, edits_for
from adaptool.adapters.adalora import OWN as ADALORA_OWN
from adaptool.adapters.common import incomplete, inconsistent, lycoris_scaling, module_keys
from adaptool.adapters.ia3 import OWN as IA3_OWN
from adaptool.adapters.ia3 import is_feedforward
from adaptool.adapters.layout import numel
from adaptool.adapters.loha import FACTORS as LOHA_FACTORS
from adaptool.adapters.loha import OWN as LOHA_OWN
from adaptool.adapters.loha import T1, T2 as LOHA_T2
from adaptool.adapters.lokr import OWN as LOKR_OWN
from adaptool.adapters.lokr import T2, W1, W1A, W1B, W2, W2A, W2B
from adaptool.adapters.lora import lora_modules
from adaptool.adapters.oft import OWN as OFT_OWN
from adaptool.adapters.oft import R_EMBEDDING
from adaptool.errors import AdaptoolError
from adaptool.io.adapter_folder import is_adapter_folder
from adaptool.io.checkpoint import Checkpoint
from adaptool.io.hub import ADAPTER_PATTERNS, resolve
from adaptool.io.inputs import open_adapter, open_base
from adaptool.io.kohya import KohyaAdapter, kohya_file, looks_kohya
from adaptool.io.safetensors_file import read_header
from adaptool.plan.replication import replicate, replication_ranges
from adaptool.plan.resolve import TensorResolver

ENERGY_RANKS = (1, 4, 16)
# safetensors dtype codes as torch (and --dtype) names them.
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
               "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}
NEITHER_HINT = ("give a PEFT adapter folder (with adapter_config.json), a kohya/LyCORIS .safetensors file, "
                "or a model folder")


@dataclass
class ModuleView:
    """One adapted module before it is measured.

    Attributes:
        record (dict): the contract fields (module, rank, alpha, scale, shape), None where they do not apply.
        keys (tuple[str, ...]): the adapter tensors the module reads (a NaN in one nulls its measures).
        spectrum (Callable[[], torch.Tensor] | None): the singular values of ΔW (scale included, float64), or
            None where ΔW depends on the base weight (IA3, OFT) or cannot be built without the base.
        fits (Callable[[tuple], bool]): whether a base weight of that shape can take the module.
        extra (dict): family-specific fields shown after the measures.
    """

    record: dict
    keys: tuple[str, ...]
    spectrum: Callable[[], torch.Tensor] | None
    fits: Callable[[tuple], bool]
    extra: dict = field(default_factory=dict)


def inspect(path: str, *, base: str | None = None) -> dict:
    """Summarise the adapter or model at ``path`` (a folder, a ``.safetensors`` file or a hub id).

    Args:
        path (str): a PEFT adapter folder, a kohya/LyCORIS ``.safetensors`` file (needs ``base``), a model folder
            or ``.safetensors`` file, or a hub id ``org/name[@revision]``.
        base (str | None): a base model (headers only): names a kohya file's modules, and checks that every
            module fits it.

    Returns:
        dict: ``{"kind": "adapter", "peft_type", "modules": [{"module", "rank", "alpha", "scale", "shape",
        "delta_norm", …}], …}`` or ``{"kind": "model", "tensors", "parameters", "dtype", …}`` (see
        ``docs/inspect.md``).

    Raises:
        AdaptoolError: a path that is neither an adapter nor a model, a kohya file without ``base``, an
            adapter or base adaptool cannot read (one line).
    """
    kind = input_kind(path)
    if kind == "model":
        if base is not None:
            raise AdaptoolError(f"{path} is a model, and --base only applies to adapters", "drop --base")
        return model_summary(path)
    if kind == "kohya" and base is None:
        raise AdaptoolError(f"{path}: a kohya/LyCORIS file names its modules only by flattened paths, so inspect "
                            "needs the base model to map them", f"add --base BASE: adaptool inspect {path} --base BASE")
    checkpoint = open_base(base) if base is not None else None
    adapter = open_adapter(path, checkpoint)
    return adapter_summary(adapter, path, base, checkpoint)


def input_kind(path: str) -> str:
    """"adapter" (a PEFT folder), "kohya" (a kohya/LyCORIS file) or "model" (anything else; checked when opened)."""
    local = Path(path).expanduser()
    if not local.exists():
        root = resolve(path, "adapter or model", ADAPTER_PATTERNS)  # a hub id (else a one-line "not found")
        return "adapter" if is_adapter_folder(root) else "model"
    if is_adapter_folder(local):
        return "adapter"
    single = kohya_file(local)
    if single is not None and looks_kohya(single):
        return "kohya"
    if single is not None and _peft_weights(single):
        raise AdaptoolError(f"{path} is a PEFT adapter's weights file, which means nothing without its config",
                            "point at the adapter's folder (with adapter_config.json)")
    return "model"


def _peft_weights(file: Path) -> bool:
    """Whether a ``.safetensors`` file holds PEFT LoRA tensors (an ``adapter_model.safetensors``)."""
    try:
        infos, _ = read_header(file)
    except AdaptoolError:
        return False
    return any(".lora_A." in k or ".lora_B." in k for k in infos)


# ------------------------------------------------------------------------------------------------ models


def model_summary(path: str) -> dict:
    """Tensors, parameters, dtypes, shards and bytes of the model at ``path`` (headers only)."""
    try:
        ckpt = open_base(path)
    except AdaptoolError as e:
        raise AdaptoolError(f"{path} is neither an adapter nor a readable model ({e.message})", NEITHER_HINT) from None
    counts, params = Counter(), Counter()
    for info in ckpt.tensors.values():
        name = DTYPE_NAMES.get(info.dtype, info.dtype.lower())
        counts[name] += 1
        params[name] += info.numel
    return {"kind": "model", "source": path, "tensors": len(ckpt.tensors), "parameters": sum(params.values()),
            "dtype": dominant(params), "dtypes": dict(counts), "shards": len(ckpt.shards), "bytes": ckpt.total_bytes,
            "model_type": ckpt.config.get("model_type")}


def dominant(params: Counter) -> str | None:
    """The dtype holding the most parameters (ties: the first seen)."""
    return max(params, key=params.get) if params else None


# ------------------------------------------------------------------------------------------------ adapters


def adapter_summary(adapter, path: str, base: str | None, checkpoint: Checkpoint | None) -> dict:
    """The summary of an opened adapter (``checkpoint``: the opened ``base``, or None)."""
    settings = adapter.settings
    ranges = replication_ranges([adapter])
    if ranges and checkpoint is not None:  # its module paths count layers of the expanded stack
        checkpoint = replicate(checkpoint, ranges, adapter.source)
    totals, non_finite = scan(adapter)
    views, notes = module_views(adapter, checkpoint)
    fit = check_fit(adapter, checkpoint, views) if checkpoint is not None else None
    modules = [measure(v, non_finite) for v in views]
    family = FAMILIES_BY_TYPE.get(adapter.peft_type)
    summary = {"kind": "adapter", "source": path, "peft_type": adapter.peft_type,
               "format": "kohya" if isinstance(adapter, KohyaAdapter) else "peft", "modules": modules, **totals,
               "base_model_name_or_path": settings.base_model_name_or_path,
               "saved": [n for n in adapter.names if family is not None and not family.is_own(n)],
               "non_finite": non_finite}
    if adapter.peft_type == "LORA":
        summary.update(rslora=settings.use_rslora, dora=settings.use_dora)
    if ranges:
        summary["layer_replication"] = ranges
        notes.append("layer_replication: module paths count the layers of the expanded stack")
    if non_finite:
        notes.append(f"{len(non_finite)} tensor(s) hold NaN/Inf: their modules' measures are null, and unload "
                     "would refuse this adapter")
    if fit is not None:
        summary.update(base=base, **fit)
    summary["notes"] = notes
    return summary


def scan(adapter) -> tuple[dict, list[str]]:
    """Totals over every adapter tensor (tensors, parameters, bytes, dominant dtype, tensors per dtype), and the
    names of the tensors holding NaN or Inf (PEFT-style names, without ``base_model.model.``)."""
    counts, params, nbytes, bad = Counter(), Counter(), 0, []
    for name in adapter.names:
        t = adapter.load(name)
        dtype = str(t.dtype).replace("torch.", "")
        counts[dtype] += 1
        params[dtype] += t.numel()
        nbytes += t.numel() * t.element_size()
        if t.is_floating_point() and t.numel() and not all(map(math.isfinite, map(float, torch.aminmax(t)))):
            bad.append(name)  # aminmax propagates NaN and shows ±Inf, at a fraction of isfinite().all()'s cost
    totals = {"tensors": len(adapter.names), "parameters": sum(params.values()), "bytes": nbytes,
              "dtype": dominant(params), "dtypes": dict(counts)}
    return totals, bad


def module_views(adapter, checkpoint) -> tuple[list[ModuleView], list[str]]:
    """Every module of the adapter, by family, and notes on what its numbers mean."""
    peft_type = adapter.peft_type
    views_of = {"LORA": lora_views, "ADALORA": adalora_views, "LOHA": loha_views, "LOKR": lokr_views,
                "IA3": ia3_views, "OFT": oft_views}.get(peft_type)
    if views_of is None:
        return [], [f"adapter type {peft_type} is not supported by adaptool: its modules are not listed"]
    views = views_of(adapter, checkpoint)
    notes = []
    if peft_type == "LORA" and adapter.settings.use_dora:
        notes.append("DoRA: delta_norm and the spectrum are those of the LoRA part scale·B·A; the magnitude "
                     "rescale depends on the base weight")
    if peft_type in ("IA3", "OFT"):
        what = "scales" if peft_type == "IA3" else "rotates"
        notes.append(f"{peft_type} {what} the base weight, so its ΔW depends on W: delta_norm and the spectrum "
                     "are null")
    if peft_type == "ADALORA":
        notes.append("AdaLoRA: scale = alpha / (init_r + 1e-5), PEFT's divisor; rank is the kept rank")
    return views, notes


# ------------------------------------------------------------------------------------------------ families


def lora_views(adapter, checkpoint) -> list[ModuleView]:
    """LoRA (plain, rsLoRA, patterns, DoRA; Linear, GPT-2 Conv1D, Embedding, convs), PEFT or kohya."""
    settings = adapter.settings
    view = checkpoint
    if settings.layer_replication and checkpoint is None:
        # lora_modules only asks a base which layer stack it is; the expanded stack is the adapter's own.
        view = SimpleNamespace(layer_replication=[list(r) for r in settings.layer_replication])
    views = []
    for m in lora_modules(adapter, view):
        a_shape, b_shape = adapter.shape(m.a_key), adapter.shape(m.b_key)
        # Linear terms: B (out, r) and A (r, in) whatever the weight's layout; Embedding (dim, r), (r, num).
        shape = [b_shape[0], a_shape[1], *a_shape[2:]]
        record = {"module": m.path, "rank": m.rank, "alpha": float(settings.alpha_for(m.path)), "scale": m.scaling,
                  "shape": shape}
        extra = {"layer": m.kind}
        if settings.use_dora:
            extra["dora"] = m.magnitude_key is not None
        views.append(ModuleView(record, (m.a_key, m.b_key), partial(lora_spectrum, m), partial(fits_shape, shape),
                                extra))
    return views


def lora_spectrum(m) -> torch.Tensor:
    """σ(scale · B @ A) from the factors (a conv's kernel flattened into A's columns)."""
    b, a = m.adapter.load(m.b_key).double(), m.adapter.load(m.a_key).double()  # as m.factors, straight to float64
    b = b.reshape(b.shape[0], -1)
    a = a.reshape(a.shape[0], -1)
    return lowrank_singular_values(b * m.scaling, a)


def adalora_views(adapter, checkpoint) -> list[ModuleView]:
    """AdaLoRA: ``ΔW = B @ (A * E) * scaling / (init_r + 1e-5)``, rank = the triplets kept."""
    a_sfx, b_sfx, e_sfx = ADALORA_OWN
    settings = adapter.settings
    views = []
    for path, keys in module_keys(adapter, ADALORA_OWN).items():
        for suffix in ADALORA_OWN:
            if suffix not in keys:
                raise incomplete(adapter, path, suffix)
        a, b, e = (tuple(adapter.shape(keys[s])) for s in ADALORA_OWN)
        if len(a) != 2 or len(b) != 2 or e != (a[0], 1) or b[1] != a[0]:
            raise inconsistent(adapter, path, a, e, b)
        k, alpha = a[0], settings.lora_alpha
        scale = (alpha if alpha > 0 else float(k)) / (settings.init_r + 1e-5)
        shape = [b[0], a[1]]
        record = {"module": path, "rank": k, "alpha": float(alpha), "scale": scale, "shape": shape}
        spectrum = partial(adalora_spectrum, adapter, keys[a_sfx], keys[b_sfx], keys[e_sfx], scale)
        views.append(ModuleView(record, tuple(keys.values()), spectrum, partial(fits_shape, shape),
                                {"init_r": settings.init_r}))
    return views


def adalora_spectrum(adapter, a_key, b_key, e_key, scale) -> torch.Tensor:
    a, b, e = (adapter.load(k).double() for k in (a_key, b_key, e_key))
    if a.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    return lowrank_singular_values(b * scale, a * e)


def loha_views(adapter, checkpoint) -> list[ModuleView]:
    """LoHa: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r`` (CP cores for convs with use_effective_conv2d)."""
    views = []
    for path, keys in module_keys(adapter, LOHA_OWN).items():
        cp = T1 in keys or LOHA_T2 in keys
        for suffix in LOHA_FACTORS + ((T1, LOHA_T2) if cp else ()):
            if suffix not in keys:
                raise incomplete(adapter, path, suffix)
        a1, b1, a2, b2 = (tuple(adapter.shape(keys[s])) for s in LOHA_FACTORS)
        if a1 != a2 or b1 != b2 or len(a1) != 2 or len(b1) != 2:
            raise inconsistent(adapter, path, a1, b1, a2, b2)
        t1 = tuple(adapter.shape(keys[T1])) if cp else ()
        if (cp and (len(t1) != 4 or t1[:2] != (a1[0], b1[0]))) or (not cp and a1[1] != b1[0]):
            raise inconsistent(adapter, path, a1, b1, *((t1,) if cp else ()))
        r, scale = lycoris_scaling(adapter, path)
        shape = [a1[1], b1[1], *t1[2:]] if cp else [a1[0], b1[1]]
        record = {"module": path, "rank": r, "alpha": float(adapter.settings.alpha_for(path)), "scale": scale,
                  "shape": shape}
        views.append(ModuleView(record, tuple(keys.values()), partial(loha_spectrum, adapter, keys, scale, cp),
                                partial(fits_shape, shape)))
    return views


def loha_spectrum(adapter, keys, scale: float, cp: bool) -> torch.Tensor:
    """σ(ΔW) of a LoHa module; without CP cores from the exact rank-r₁r₂ factors of the Hadamard product
    (``(w1_a ∘ w2_a) (w1_b • w2_b)``: row-wise Khatri-Rao on the left, face-splitting on the right)."""
    w1a, w1b, w2a, w2b = (adapter.load(keys[s]).double() for s in LOHA_FACTORS)
    if cp:
        t1, t2 = adapter.load(keys[T1]).double(), adapter.load(keys[LOHA_T2]).double()
        rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
        rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        full = rebuild1 * rebuild2 * scale
        return torch.linalg.svdvals(full.reshape(full.shape[0], -1))
    out_f, in_f, rr = w1a.shape[0], w1b.shape[1], w1a.shape[1] * w2a.shape[1]
    if rr >= min(out_f, in_f):  # the dense delta is no bigger than the factors
        return torch.linalg.svdvals((w1a @ w1b) * (w2a @ w2b) * scale)
    left = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_f, rr)
    right = (w1b[:, None, :] * w2b[None, :, :]).reshape(rr, in_f)
    return lowrank_singular_values(left * scale, right)


def lokr_views(adapter, checkpoint) -> list[ModuleView]:
    """LoKr: ``ΔW = kron(w1, w2) · alpha / r``, each factor whole or a low-rank pair (w2 maybe a CP product)."""
    views = []
    for path, keys in module_keys(adapter, LOKR_OWN).items():
        w1, w2 = lokr_factor_shapes(adapter, path, keys)
        r, scale = lycoris_scaling(adapter, path)
        shape = [w1[0] * w2[0], w1[1] * w2[1], *w2[2:]] if len(w2) in (2, 4) else None
        record = {"module": path, "rank": r, "alpha": float(adapter.settings.alpha_for(path)), "scale": scale,
                  "shape": shape}
        spectrum = partial(lokr_spectrum, adapter, keys, scale) if shape is not None else None
        fits = partial(fits_shape, shape) if shape is not None else (lambda w, n=w1[0] * w2[0]: w[0] == n)
        views.append(ModuleView(record, tuple(keys.values()), spectrum, fits))
    return views


def lokr_factor_shapes(adapter, path, keys) -> tuple[tuple, tuple]:
    """The shapes of w1 and w2 as PEFT rebuilds them (a missing or mis-shaped factor is refused)."""
    def pair(first, second):
        for suffix in (first, second):
            if suffix not in keys:
                raise incomplete(adapter, path, suffix)
        a, b = tuple(adapter.shape(keys[first])), tuple(adapter.shape(keys[second]))
        if len(a) != 2 or len(b) != 2:
            raise inconsistent(adapter, path, a, b)
        return a, b

    if W1 in keys:
        w1 = tuple(adapter.shape(keys[W1]))
    else:
        a, b = pair(W1A, W1B)
        w1 = (a[0], b[1]) if a[1] == b[0] else None
    if W2 in keys:
        w2 = tuple(adapter.shape(keys[W2]))
    else:
        a, b = pair(W2A, W2B)
        t = tuple(adapter.shape(keys[T2])) if T2 in keys else None
        if t is not None:
            w2 = (a[1], b[1], *t[2:]) if len(t) == 4 and t[:2] == (a[0], b[0]) else None
        else:
            w2 = (a[0], b[1]) if a[1] == b[0] else None
    if w1 is None or w2 is None or len(w1) != 2 or not 2 <= len(w2) <= 4:
        raise inconsistent(adapter, path, *(adapter.shape(k) for k in keys.values()))
    return w1, w2


def lokr_spectrum(adapter, keys, scale: float) -> torch.Tensor:
    """σ(kron(w1, w2) · scale) = {σᵢ(w1)·σⱼ(w2)}·|scale| (a conv-shaped w2 flattened: the kron of the flattened
    factors is the flattened kron)."""
    load = lambda s: adapter.load(keys[s]).double()  # noqa: E731
    w1 = load(W1) if W1 in keys else load(W1A) @ load(W1B)
    s1 = torch.linalg.svdvals(w1)
    if W2 in keys:
        w2 = load(W2)
        s2 = torch.linalg.svdvals(w2.reshape(w2.shape[0], -1))
    elif T2 in keys:
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", load(T2), load(W2A), load(W2B))
        s2 = torch.linalg.svdvals(w2.reshape(w2.shape[0], -1))
    else:
        s2 = lowrank_singular_values(load(W2A), load(W2B))
    return (s1[:, None] * s2[None, :]).reshape(-1) * abs(scale)


def ia3_views(adapter, checkpoint) -> list[ModuleView]:
    """IA3: a vector scales the weight's output (or, feedforward, input) features; no ΔW without W."""
    views = []
    for path, keys in module_keys(adapter, IA3_OWN).items():
        (key,) = keys.values()
        l_shape = tuple(adapter.shape(key))
        try:
            ff = is_feedforward(adapter, path, l_shape)
        except AdaptoolError:
            ff = None  # the config does not say, and the vector's shape cannot tell
        n = numel(l_shape)
        record = {"module": path, "rank": None, "alpha": None, "scale": None, "shape": None}
        views.append(ModuleView(record, (key,), None, lambda w, n=n: n in tuple(w)[:2],
                                {"feedforward": ff, "features": n}))
    return views


def oft_views(adapter, checkpoint) -> list[ModuleView]:
    """OFT: block-diagonal rotations of the input features; no ΔW without W."""
    share = adapter.settings.block_share
    views = []
    for path, keys in module_keys(adapter, OFT_OWN).items():
        if len(keys) != 1 or len(adapter.shape(next(iter(keys.values())))) != 2:
            raise inconsistent(adapter, path, *(adapter.shape(k) for k in keys.values()))
        (suffix, key), = keys.items()
        n_saved, n_elements = adapter.shape(key)
        b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
        record = {"module": path, "rank": None, "alpha": None, "scale": None, "shape": None}
        extra = {"layer": "embedding" if suffix == R_EMBEDDING else "linear", "blocks": n_saved, "block_size": b,
                 "block_share": share}
        views.append(ModuleView(record, (key,), None, partial(oft_fits, n_saved * b, b, share), extra))
    return views


def oft_fits(features: int, b: int, share: bool, w_shape) -> bool:
    """Whether the rotated features (in; embedding dim; in·k·k; GPT-2 Conv1D's rows) match a base weight."""
    w = tuple(w_shape)
    candidates = {w[0], w[1] if len(w) > 1 else w[0], numel(w[1:])}
    return any(f % b == 0 for f in candidates) if share else features in candidates


# ------------------------------------------------------------------------------------------------ measures


def lowrank_singular_values(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """σ(B @ A), float64, from the R x R Gram matrices, never forming ``B @ A``.

    With ``BᵀB = V diag(λ) Vᵀ`` and ``Rb = diag(√λ) Vᵀ`` (so ``B = Q Rb`` for some orthonormal Q),
    ``σ(B A)² = eig(Rb (A Aᵀ) Rbᵀ)``. Cost O((out + in) R² + R³) like :func:`~adaptool.strategies.lowrank.factor_svd`,
    but without its two tall QRs (0.2-0.5 s each for a 28672 x 64 factor on a small CPU, against 15 ms for the
    Gram matrix). Squaring costs accuracy only in singular values below ~1e-8 σ₁, which the norm, stable rank and
    energies do not see.

    Args:
        B (torch.Tensor): ``(out, R)``.
        A (torch.Tensor): ``(R, in)``.

    Returns:
        torch.Tensor: ``(R,)`` singular values, descending (zeros where the rank is below R).
    """
    B, A = B.double(), A.double()
    if B.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    gram_b, gram_a = B.T @ B, A @ A.T
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LAPACK on an R x R matrix: threads only add overhead (10-100x on a busy CPU)
    try:
        lam, V = torch.linalg.eigh(gram_b)
        rb = lam.clamp(min=0).sqrt()[:, None] * V.T
        core = rb @ gram_a @ rb.T
        s2 = torch.linalg.eigvalsh((core + core.T) / 2).clamp(min=0)
    finally:
        torch.set_num_threads(threads)
    return torch.sort(s2.sqrt(), descending=True).values


def fits_shape(shape, w_shape) -> bool:
    """Whether a module of ``shape`` (``[out, in]`` Linear terms, or a conv's full shape) fits a base weight:
    the same, transposed (GPT-2 Conv1D stores (in, out); an Embedding is (num, dim)), or a conv whose kernel
    the module keeps flattened in its columns."""
    s, w = tuple(shape), tuple(w_shape)
    if s == w:
        return True
    if len(s) == 2 and len(w) == 2:
        return w == (s[1], s[0])
    if len(s) == 2 and len(w) > 2:
        return w[0] == s[0] and numel(w[1:]) == s[1]
    return False


def measure(view: ModuleView, non_finite: list[str]) -> dict:
    """The module's JSON record: contract fields, ‖ΔW‖_F and the spectrum summary, then the family's extras."""
    bad = set(view.keys) & set(non_finite)
    if view.spectrum is None or bad:
        measures = {"delta_norm": None, "stable_rank": None, "energy": None, "sigma_1": None}
    else:
        measures = spectrum_fields(view.spectrum())
    extra = dict(view.extra, **({"non_finite": True} if bad else {}))
    return {**view.record, **measures, **extra}


def spectrum_fields(S: torch.Tensor) -> dict:
    """‖ΔW‖_F = sqrt(Σσ²), stable rank ‖ΔW‖_F²/σ₁², energy at rank k = Σ_{i≤k} σᵢ² / Σσ² (null for ΔW = 0),
    σ₁."""
    e = torch.sort(S.double().abs(), descending=True).values ** 2
    total = float(e.sum())
    if not math.isfinite(total):  # overflow in float64: nothing honest to say
        return {"delta_norm": None, "stable_rank": None, "energy": None, "sigma_1": None}
    if total == 0.0:
        return {"delta_norm": 0.0, "stable_rank": None, "energy": {str(k): None for k in ENERGY_RANKS}, "sigma_1": 0.0}
    cum = torch.cumsum(e, 0)
    energy = {str(k): min(1.0, float(cum[min(k, e.numel()) - 1]) / total) for k in ENERGY_RANKS}
    return {"delta_norm": math.sqrt(total), "stable_rank": total / float(e[0]), "energy": energy,
            "sigma_1": math.sqrt(float(e[0]))}


def check_fit(adapter, checkpoint: Checkpoint, views: list[ModuleView]) -> dict:
    """Mark every module ``fits_base`` (it names a weight of the base, of a shape it fits), then ask the family
    for the adapter's edits, which checks everything unload would check (headers only).

    Returns:
        dict: ``fits_base`` (bool) and ``fit_error`` (the first problem, one line, or None).
    """
    resolver = TensorResolver(checkpoint, adapter)
    problems = []
    for v in views:
        path = v.record["module"]
        try:
            target = resolver.tensor(path, "weight")
        except AdaptoolError as e:
            ok, problem = False, e.line()
        else:
            w_shape = tuple(checkpoint.tensors[target].shape)
            ok = v.fits(w_shape)
            implied = v.record["shape"]
            what = f"adapter implies {tuple(implied)}" if implied else "its tensors do not fit"
            problem = None if ok else f"{adapter.source}: {path} does not fit the base: {what}, {target} is {w_shape}"
        v.extra["fits_base"] = ok
        if problem:
            problems.append(problem)
    try:
        edits_for(adapter, checkpoint)
    except AdaptoolError as e:
        problems.append(e.line())
    return {"fits_base": not problems, "fit_error": problems[0] if problems else None}
