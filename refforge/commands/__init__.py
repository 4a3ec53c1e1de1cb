"""CLI commands that live outside refforge/cli.py, one module each; each module has ``register(app)``.

Modules import their heavy dependencies inside the command function so ``refforge --help`` stays fast.
"""
