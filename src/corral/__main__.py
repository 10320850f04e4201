"""The ``corral`` command's entry point: the console script and ``python -m corral``.

A CLI start is mostly imports (click alone is ~30 ms of CPU). The cyclic GC finds nothing
to collect in them but scans their new objects again and again, so it is off while the
CLI's modules load (~5 ms of ~75 ms), and what they made is then frozen out of every
later collection (gc.freeze), which also keeps those pages shared with a forked owner.
``agents add`` in its plain form skips click altogether (:mod:`.cli.fast_add`).
"""

from __future__ import annotations

import gc


def main() -> None:
    import sys

    if sys.argv[1:3] == ["agents", "add"]:
        from .cli.fast_add import main as fast_add

        fast_add(sys.argv[3:])  # exits, unless this is more than its plain form
    gc.disable()
    try:
        from .cli.main import main as cli_main
    finally:
        gc.freeze()
        gc.enable()
    cli_main()


if __name__ == "__main__":
    main()
