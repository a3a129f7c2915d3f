"""``python -m archiver`` and the ``archiver`` command: the CLI (``cli.main``).

The CLI imports Trio, Quart and Hypercorn first (~0.5 s): a Ctrl-C meanwhile
ends it as one afterwards does, without a traceback.
"""

import sys


def run() -> None:
    try:
        from .cli import main
    except KeyboardInterrupt:
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
