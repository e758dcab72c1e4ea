"""The ``adaptool`` command line: a thin skin over the Python API.

``app.py`` declares the commands, ``options.py`` the options they share, ``render.py`` turns summaries
into lines, ``main.py`` turns every ending (done, user error, usage error, signal, bug) into its exit code.
Heavy imports (torch, safetensors, huggingface_hub) happen inside the commands, so ``--help`` answers at once.
"""

from adaptool.cli.main import main

__all__ = ["main"]
