"""``python -m ckpttool``: take the signals first, then import the command line and run it."""

from ckpttool import signals

signals.install(defer=True)  # a signal during the imports below is raised once main() runs

from ckpttool.cli import main  # noqa: E402

main()
