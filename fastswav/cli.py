"""How every ``python -m fastswav.*`` command ends on bad input: one ``error:`` line on
stderr and exit status 2, whether argparse, a missing path or an unreadable file found it."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_USAGE = 2


class UsageParser(argparse.ArgumentParser):
    """argparse whose errors are one ``error: ...`` line (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:  # argparse's hook
        fail(message)


def fail(message) -> NoReturn:
    """Print ``error: <first line of message>`` on stderr and exit with status 2."""
    text = str(message).strip().splitlines()
    print(f"error: {text[0] if text else 'bad input'}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def load_error_detail(err: Exception) -> str:
    """One line out of torch.load's error: the weights-only unpickler's actual complaint,
    not the paragraph of advice around it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if "WeightsUnpickler error" in line:
            return f"torch.load: {lines[i + 1]}"
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
