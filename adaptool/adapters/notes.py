"""Notes: what PEFT would have warned about while loading an adapter, collected for a command's summary.

A family raises an :class:`AdapterNote` warning where PEFT warns and goes on (the result follows PEFT); a
command runs the families inside :func:`collected_notes` and reports each note once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


class AdapterNote(UserWarning):
    """Something PEFT would have warned about while loading the adapter (the result follows PEFT)."""


@contextmanager
def collected_notes() -> Iterator[list[str]]:
    """Collect the :class:`AdapterNote` warnings raised inside (each once, in order) for a summary's notes;
    other warnings pass through."""
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AdapterNote)
        yield notes
    for w in caught:
        if issubclass(w.category, AdapterNote):
            if str(w.message) not in notes:
                notes.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
