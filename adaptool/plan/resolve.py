"""Module paths of an adapter resolved to tensor names of the base, and edits grouped by tensor."""

from __future__ import annotations

from collections import defaultdict

from adaptool.errors import AdaptoolError


class TensorResolver:
    """Maps an adapter's module path to a tensor name of the base checkpoint.

    PEFT keys follow the in-memory module tree of the transformers class (``transformer.h.0.attn`` for
    GPT2LMHeadModel), while a checkpoint saved from the bare model has ``h.0.attn``: the prefix that makes the
    first module resolve is kept for the rest.
    """

    def __init__(self, base, adapter):
        self.names = base.tensors
        self.config = base.config
        self.adapter = adapter
        self._strip = None  # number of leading components dropped, once known
        self._add = ""

    def _candidates(self, name: str):
        yield 0, "", name
        parts = name.split(".", 1)
        if len(parts) == 2:
            yield 1, "", parts[1]
        for prefix in ("model.", "transformer."):
            yield 0, prefix, prefix + name

    def tensor(self, module_path: str, param: str, why: str | None = None) -> str:
        name = f"{module_path}.{param}"
        if self._strip is not None:
            cand = self._add + (name.split(".", self._strip)[-1] if self._strip else name)
            if cand in self.names:
                return cand
        else:
            for strip, add, cand in self._candidates(name):
                if cand in self.names:
                    self._strip, self._add = strip, add
                    return cand
        if module_path.split(".")[-1] == "lm_head" and _tied(self.config):
            raise AdaptoolError(f"{self.adapter.source}: adapter changes {module_path}, which this base ties to the input embeddings",
                                "untie the embeddings in the base first (save it with tie_word_embeddings=false)")
        raise AdaptoolError(
            f"{self.adapter.source}: adapter touches {name}, which the base model does not have"
            + (f" ({why})" if why else ""),
            "check that the adapter was trained on this base model",
        )


def group_edits(edits) -> dict[str, list]:
    """Edits grouped by the base tensor they change, each group in the order given (the order they apply)."""
    grouped: dict[str, list] = defaultdict(list)
    for e in edits:
        grouped[e.target].append(e)
    return grouped


def _tied(config: dict) -> bool:
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
