"""``python -m ckpttool``: set up the process first (the signals), then import the command line
and run it."""

from ckpttool import program

program.start()  # a signal during the imports below is raised once main() runs

from ckpttool.cli import main  # noqa: E402

main()
