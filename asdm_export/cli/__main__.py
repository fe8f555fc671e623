"""``python -m asdm_export.cli``: the same command line as ``asdm-export``."""

from .group import main

main()
