"""OFT (orthogonal fine-tuning) as PEFT 0.21.2 merges it (``tuners/oft/layer.py``).

Each module saves ``oft_R.weight`` (n, b(b-1)/2): per block the upper triangle of a b × b matrix ``M``,
``Q = M - Mᵀ`` skew-symmetric. The rotation block is the Cayley–Neumann series (PEFT's default,
``num_cayley_neumann_terms`` = 5: ``R = I + 2Q + 2Q² + 2Q³ + Q⁴``) or, with ``use_cayley_neumann: false``, the
exact Cayley transform ``(I - Q)(I + Q)⁻¹``. ``R = diag(R_1 … R_n)`` over the input features (n·b = in;
Conv2d: in·k·k, its kernel flattened), and the merge is ``W ← W Rᵀ`` (PEFT: ``(R @ Wᵀ)ᵀ``); an Embedding
(``oft_embedding_R``) rotates its embedding dimension, ``W ← W R``. ``block_share`` saves one block used n
times; ``coft`` first projects each block onto an eps-ball around zero, as PEFT does at merge time.
The blocks are computed with PEFT's own operations in float32, so they are PEFT's bits; the product with
the weight is taken block by block (see :class:`adaptool.ops.edits.Rotate`), which PEFT's dense product matches
bit for bit on the CPUs we measured for blocks of up to 64, and to float32 summation order beyond.
"""

from __future__ import annotations

import math

import torch

from adaptool.adapters.common import inconsistent, loader, module_keys, refuse_layer
from adaptool.adapters.config import AdapterConfig
from adaptool.adapters.family import Family
from adaptool.adapters.saved import aux_edits
from adaptool.adapters.source import Adapter
from adaptool.ops.edits import Rotate
from adaptool.errors import AdaptoolError
from adaptool.io.checkpoint import Checkpoint
from adaptool.plan.resolve import TensorResolver

R_LINEAR, R_EMBEDDING = ".oft_R.weight", ".oft_embedding_R.weight"
OWN = (R_LINEAR, R_EMBEDDING)


def oft_edits(adapter: Adapter, base: Checkpoint) -> list:
    """Edits of an OFT adapter against checkpoint ``base`` (names resolved, shapes checked)."""
    settings = adapter.settings
    if settings.oft_block_size is None:
        # PEFT refuses these too: OFT's parametrisation changed in 0.14.0.
        raise AdaptoolError(f"{adapter.source}: an OFT adapter from before PEFT 0.14 (no oft_block_size in its config)",
                            "retrain it with PEFT >= 0.14, or merge it with PEFT 0.13")
    resolve = TensorResolver(base, adapter)
    edits = aux_edits(adapter, base, resolve, OWN)
    for path, keys in module_keys(adapter, OWN).items():
        if len(keys) != 1:
            raise AdaptoolError(f"{adapter.source}: {path} has both {R_LINEAR[1:]} and {R_EMBEDDING[1:]}",
                                "the adapter file is inconsistent; re-save it")
        (suffix, key), = keys.items()
        embedding = suffix == R_EMBEDDING
        target = resolve.tensor(path, "weight")
        w_shape = tuple(base.tensors[target].shape)
        features = _rotated_features(adapter, path, w_shape, embedding)
        if len(adapter.shape(key)) != 2:
            raise inconsistent(adapter, path, adapter.shape(key))
        n_saved, n_elements = tuple(adapter.shape(key))
        b = _block_size(adapter, path, n_elements)
        n_blocks = features // b if settings.block_share else n_saved
        if (settings.block_share and n_saved != 1) or n_blocks * b != features:
            raise AdaptoolError(f"{adapter.source}: {path} does not fit the base: {key} {(n_saved, n_elements)} holds "
                                f"{n_saved} {b}x{b} rotation blocks{' (shared)' if settings.block_share else ''}, "
                                f"the base weight {w_shape} has {features} input features",
                                "check that the adapter was trained on this base model")
        edits.append(Rotate(target, adapter.source, _blocks(loader(adapter, key), b, n_blocks, settings),
                            transpose=not embedding))
    return edits


def _rotated_features(adapter, path, w_shape, embedding: bool) -> int:
    """How many features R turns: in (Linear), embedding_dim (Embedding), in·k·k (Conv2d, square kernels)."""
    if len(w_shape) == 2:
        return w_shape[1]
    if len(w_shape) == 4 and not embedding:
        if w_shape[2] != w_shape[3]:
            # PEFT flattens the kernel as in·k[0]·k[0], which cannot hold a non-square kernel.
            raise AdaptoolError(f"{adapter.source}: OFT on {path}, a Conv2d with a non-square kernel {w_shape[2:]}, "
                                "cannot be folded", "PEFT cannot merge it either; retrain with square kernels")
        return w_shape[1] * w_shape[2] * w_shape[3]
    raise refuse_layer(adapter, path, "OFT", w_shape, "Linear, Embedding and Conv2d layers")


def _block_size(adapter, path, n_elements: int) -> int:
    """b with b(b-1)/2 = n_elements (the saved upper triangle of one block)."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    if b * (b - 1) // 2 != n_elements or b < 2:
        raise AdaptoolError(f"{adapter.source}: {path}{R_LINEAR} has {n_elements} entries per block, "
                            "which is no upper triangle of a square block", "the adapter file is inconsistent; re-save it")
    return b


def _blocks(load, b: int, n_blocks: int, s: AdapterConfig):
    """``device -> (n_blocks, b, b)`` rotation blocks, computed as ``OFTRotationModule.get_weight`` does from the
    saved (n_saved, b(b-1)/2) upper triangles."""
    def blocks(device):
        vec = load(device)
        rows, cols = torch.triu_indices(b, b, 1, device=device)
        if s.coft:
            vec = _project(vec, b, rows, cols, s.eps)
        r = _cayley(_skew(vec, b, rows, cols), b, s.use_cayley_neumann, s.num_cayley_neumann_terms)
        # PEFT's _block_diagonal: a shared block (one saved row) repeats; otherwise block i is row i.
        return r[:1].expand(n_blocks, b, b) if r.shape[0] == 1 else r[:n_blocks]

    return blocks


def _skew(vec, b, rows, cols):
    """(n, b(b-1)/2) upper triangles -> (n, b, b) skew-symmetric blocks ``M - Mᵀ``."""
    m = torch.zeros(vec.shape[0], b, b, device=vec.device, dtype=vec.dtype)
    m[:, rows, cols] = vec
    return m - m.transpose(-2, -1)


def _cayley(q, b: int, neumann: bool, terms: int):
    """PEFT's ``_cayley_batch`` on the skew blocks ``q`` (n, b, b) -> rotations (n, b, b) (same operations,
    same order)."""
    n = q.shape[0]
    if neumann:
        r = torch.eye(b, device=q.device, dtype=q.dtype).repeat(n, 1, 1)
        if terms > 1:
            r.add_(q, alpha=2.0)
            if terms > 2:
                q_squared = torch.bmm(q, q)
                r.add_(q_squared, alpha=2.0)
                q_power = q_squared
                for _ in range(3, terms - 1):
                    q_power = torch.bmm(q_power, q)
                    r.add_(q_power, alpha=2.0)
                q_power = torch.bmm(q_power, q)
                r.add_(q_power)  # the last term has weight 1 (PEFT >= 0.18)
        return r
    eye = torch.eye(b, device=q.device).unsqueeze(0).expand(n, b, b)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def _project(vec, b, rows, cols, eps: float):
    """COFT's projection (PEFT ``_project_batch``): blocks farther than eps/sqrt(n) from zero are pulled back;
    (n, b(b-1)/2) in, the same shape out."""
    q = _skew(vec, b, rows, cols)
    eps = eps * 1 / torch.sqrt(torch.tensor(q.shape[0]))
    zero = torch.zeros((b, b), device=q.device, dtype=q.dtype).unsqueeze(0).expand_as(q)
    diff = q - zero
    norm = torch.norm(q - zero, dim=(1, 2), keepdim=True)
    out = torch.where((norm <= eps).bool(), q, zero + eps * (diff / norm))
    return out[:, rows, cols]


# What the registry (adaptool.adapters.registry) knows of this family.
FAMILY = Family("OFT", oft_edits, OWN, additive=False)
