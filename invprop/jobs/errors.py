"""How a job's top level reports a failure: one line on stderr (shared by the launcher and the rank bodies)."""

from __future__ import annotations

import os
import sys
import traceback


def fail(exc: BaseException) -> None:
    """Print `exc` as one line (the traceback only with INVPROP_VERBOSE=1) and exit with status 1."""
    if os.environ.get("INVPROP_VERBOSE", "") not in ("", "0"):
        traceback.print_exc()
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"error: {message} ({type(exc).__name__}; INVPROP_VERBOSE=1 shows the traceback)", file=sys.stderr,
          flush=True)
    sys.exit(1)
