"""The commands of refforge's CLI, one module per command (or pair of related commands).

Each module has ``register(app)``, prints through :mod:`refforge.commands._ui` and never imports
:mod:`refforge.cli`, which only assembles the app. Project modules are imported at module top; only
the build flow (it imports Prefect) is imported inside its command, so ``refforge --help`` stays fast.
"""
