"""The command line (``asdm-export``): takes the user's words, calls the stage functions of the folders below
and prints what they produced. group.py holds the Click group ``main`` and the pipeline's own commands,
options.py the options several commands share, and each other file one family of commands."""

from .group import main

__all__ = ["main"]
