"""What a person sees while a run goes: one live view on a terminal, plain lines elsewhere, and
every line any library printed in the run directory's ``run.log``.

    capture.py   RunLog: the process's stdout and stderr (every library, Ray's worker logs)
                 into a timestamped run.log, echoed with -v; the terminal kept for the view
    view.py      RunState (the run as the server's events tell it), LiveView (rich) and
                 plain_lines (fedllama's log lines only)

Only the ``fedllama`` command uses this package; the ServerApp of a deployment logs plain
lines, as it always did.
"""

from fedllama.console.capture import RunLog
from fedllama.console.view import LiveView, RunState, plain_lines

__all__ = ["LiveView", "RunLog", "RunState", "plain_lines"]
