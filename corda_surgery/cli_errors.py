"""How a command ends when something goes wrong: the product's own errors and the operating system's as one
line naming the file or the option (by its flag), anything else as a bug with its traceback."""

from __future__ import annotations

import functools
import sys
import traceback

import click

from corda_surgery import __version__
from corda_surgery.distributed import launched
from corda_surgery.errors import CordaSurgeryError
from corda_surgery.paths import os_error_line

BUG_EXIT = 2


def fail_cleanly(command):
    """The product's own errors and file-system errors: one line, exit 1 (``--debug``: the traceback with its
    causes). Anything else is a bug: its traceback, a line asking for a report, exit 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug")
        try:
            return command(*args, **kwargs)
        except (CordaSurgeryError, OSError) as exc:
            if debug:
                raise
            if isinstance(exc, CordaSurgeryError):
                line = exc.named(flags(click.get_current_context()))
            else:
                line = os_error_line(exc)
            click.echo(f"error: {launched().label}{' '.join(line.split())}", err=True)
            sys.exit(1)
        except Exception:
            traceback.print_exc()
            click.echo(
                f"error: {launched().label}this is a bug in corda-surgery {__version__}; please report it with the "
                "traceback above",
                err=True,
            )
            sys.exit(BUG_EXIT)

    return wrapper


def flags(context: click.Context) -> dict[str, str]:
    """Each option's field name → its flag: errors name fields, the command line shows flags (this command's
    first, then any other command's)."""
    root = context.find_root().command
    commands = [*getattr(root, "commands", {}).values(), context.command]
    return {
        param.name: param.opts[0]
        for command in commands
        for param in command.params
        if isinstance(param, click.Option) and param.name and param.opts[0].startswith("--")
    }


def terminated(signum: int, frame: object) -> None:
    """SIGTERM stops a run as Ctrl-C does: staging folders, spill files and locks are removed on the way out
    (a calibration's partial store stays for --resume, as after a kill)."""
    raise KeyboardInterrupt(f"stopped by signal {signum}")
