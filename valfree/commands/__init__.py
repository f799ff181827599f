"""The ``valfree`` commands, one module each (score, select, report, tpv, prune, demo).

Each module has ``add_parser(sub)``, which declares its arguments, ``run(args)``, which the CLI calls,
and the runner that does the work for the library as well (``score_checkpoints``, ``run_tpv``, ...).
The commands are the top layer: they may import every other part of valfree, and within valfree only
:mod:`valfree.cli` imports them (and the deprecated alias ``valfree.io.scoring``, lazily).
"""

# Exit codes. A user mistake (a ValfreeError) exits 2; a command that ran but recorded some failed
# items (a corrupt checkpoint among many) exits 1, after writing everything it could.
EXIT_PARTIAL_FAILURE = 1
EXIT_USER_ERROR = 2
