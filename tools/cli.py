"""How every entry point ends: a user mistake is one line on stderr and exit 2, a run that cannot
go on exit 1, Ctrl-C a one-line message and exit 130; ``--debug`` shows the traceback instead."""
from __future__ import annotations

import sys

from tools.errors import RunError, UserError


def guarded(prog: str, func, args, outdir=None) -> int:
    """Call ``func(args)`` and turn the expected failures into an exit status."""
    debug = getattr(args, "debug", False)
    try:
        func(args)
    except (UserError, RunError) as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UserError) else 1
    except KeyboardInterrupt:
        if debug:
            raise
        where = f"; files already written under {outdir} are complete" if outdir else ""
        print(f"{prog}: interrupted{where}", file=sys.stderr)
        return 130
    return 0
