"""The ``corral`` command, thin: each module parses one command group, calls the library
and prints through :mod:`.output` (every table and every ``--json``, one implementation).

:mod:`.main` is the command group with the exit codes and their mapping from the error
tree, in one place; :mod:`.runs` and :mod:`.control` start, list and end runs;
:mod:`.agents`, :mod:`.auth`, :mod:`.sessions`, :mod:`.logs`, :mod:`.top` (with
:mod:`.top_text` and the curses :mod:`.top_screen`) and :mod:`.deploy` are one group each;
:mod:`.params` holds the click types shared by them.

May import: any part of corral. Nothing but ``corral.__main__`` imports this package.
"""
