"""adaptool: merge LoRA-family adapters and fold them into base checkpoints.

The public API is imported lazily so that ``adaptool --help`` never pays for torch.
"""

from adaptool.version import __version__

__all__ = ["__version__", "unload", "merge", "inspect", "resize", "extract", "align", "edit", "convert", "verify", "push",
           "AdaptoolError"]


def __getattr__(name):
    if name == "unload":
        from adaptool.commands.unload import unload

        return unload
    if name == "merge":
        from adaptool.commands.merge import merge

        return merge
    if name == "inspect":
        from adaptool.commands.inspect import inspect

        return inspect
    if name == "resize":
        from adaptool.commands.resize import resize

        return resize
    if name == "extract":
        from adaptool.commands.extract import extract

        return extract
    if name == "align":
        from adaptool.commands.align import align

        return align
    if name == "edit":
        from adaptool.commands.edit import edit

        return edit
    if name == "convert":
        from adaptool.commands.convert import convert

        return convert
    if name == "verify":
        from adaptool.commands.verify import verify

        return verify
    if name == "push":
        from adaptool.commands.push import push

        return push
    if name == "AdaptoolError":
        from adaptool.errors import AdaptoolError

        return AdaptoolError
    raise AttributeError(f"module 'adaptool' has no attribute {name!r}")
