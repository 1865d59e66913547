"""The old name of the command line (`python -m omniguard_edge.runtime.cli`, `omniguard_edge.runtime.cli.main`),
kept for invocations that use it. MARKED EXCEPTION: the one runtime module that imports above the runtime (the
package's command line, omniguard_edge/cli.py); tests/test_layers.py allows exactly this import."""

import sys

from ..cli import build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
