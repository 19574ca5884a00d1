"""Stopping on SIGINT (Ctrl-C) or SIGTERM (a spot machine's preemption notice) at a point where a checkpoint
can be saved.

The first signal only sets a flag; the training loop looks at it after each optimizer step, saves a
checkpoint and exits with 130 or 143. A second Ctrl-C means "now": the process exits at once with 130,
leaving the last complete checkpoint as it was.
"""

import os
import signal
import sys
from typing import Optional


class StopRequest:
    """While entered, records the first SIGINT or SIGTERM in `signal_number` instead of dying of it."""

    def __init__(self, announce: bool = True):
        self.signal_number: Optional[int] = None
        self.announce = announce  # with several processes, process 0 alone says what happens next
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    def __enter__(self) -> "StopRequest":
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.signal_number is None:
            self.signal_number = number
            if not self.announce:
                return
            sys.stderr.write(f"\n{signal.Signals(number).name} received: saving a checkpoint after this step "
                             "(Ctrl-C again to quit at once).\n")
            sys.stderr.flush()
            return
        if number == signal.SIGINT:
            sys.stderr.write("\nSecond Ctrl-C: quitting now; the last saved checkpoint is kept.\n")
            sys.stderr.flush()
            os._exit(130)
