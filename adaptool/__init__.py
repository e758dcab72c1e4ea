"""adaptool: merge LoRA-family adapters and fold them into base checkpoints.

The public API is imported lazily so that ``adaptool --help`` never pays for torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "unload", "merge", "AdaptoolError"]


def __getattr__(name):
    if name == "unload":
        from adaptool.unload import unload

        return unload
    if name == "merge":
        from adaptool.merge import merge

        return merge
    if name == "AdaptoolError":
        from adaptool.errors import AdaptoolError

        return AdaptoolError
    raise AttributeError(f"module 'adaptool' has no attribute {name!r}")
