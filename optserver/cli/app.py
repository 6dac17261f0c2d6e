"""The command-line application and its one error policy."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from typer.exceptions import Abort, TyperException

from optserver.cli import serve, shards, training
from optserver.cli.errors import explain

__all__ = ["app", "main"]

app = typer.Typer(
    help="optserver: a parameter server over plain HTTP.",
    no_args_is_help=True,
    # Locals would print session tokens and the admin key; --debug shows the plain traceback.
    pretty_exceptions_show_locals=False,
)
app.command()(serve.serve)
app.command()(shards.shards)
app.command()(training.demo)
app.command()(training.worker)
app.command("create-session")(training.create_session)
app.command()(training.evaluate)

_debug = False


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an error, not one line.")
    ] = False,
) -> None:
    """optserver: a parameter server over plain HTTP."""
    global _debug
    _debug = debug


def _debugging() -> bool:
    return _debug or os.environ.get("OPTSERVER_LOG_LEVEL", "").lower() == "debug"


def _usage_message(error: TyperException, args: list[str]) -> str:
    """Typer's message for a bad option, with the value given put before the rule it broke
    (the message of a range or type check names only the rule)."""
    message = error.format_message()
    reason = str(getattr(error, "message", ""))
    param = getattr(error, "param", None)
    value = _given(param, args) if param is not None else None
    if value is not None and repr(value) not in reason and message.endswith(reason):
        message = f"{message[: len(message) - len(reason)]}{value!r}: {reason}"
    return message.replace("Value error, ", "")  # pydantic's prefix on a choice's message


def _given(param: Any, args: list[str]) -> str | None:
    """The value ``param`` was given on the command line, else in its environment variable."""
    value = None
    for i, arg in enumerate(args):
        for opt in param.opts:
            if arg == opt and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(opt + "="):
                value = arg[len(opt) + 1 :]
    if value is None and param.envvar:
        value = os.environ.get(param.envvar)
    return value


def main(argv: list[str] | None = None) -> None:
    """Run the command; exit 0, 1 with one line for a mistake, or 2 for a bad option."""
    prog = "optserver"
    args = sys.argv[1:] if argv is None else argv
    try:
        code = app(args=args or ["--help"], prog_name=prog, standalone_mode=False)
    except TyperException as error:  # a bad option or argument: say which, and where to look
        context = getattr(error, "ctx", None)  # usage errors know their command
        command = context.command_path if context is not None else prog
        print(f"{command}: error: {_usage_message(error, args)}", file=sys.stderr)
        if context is not None:
            print(f"Try '{command} --help' for help.", file=sys.stderr)
        code = error.exit_code
    except Abort:
        print("Aborted.", file=sys.stderr)
        code = 130
    except Exception as error:
        message = explain(error)
        if message is None or _debugging():
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
