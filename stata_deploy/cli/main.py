"""The ``stata-deploy`` command line. Every command: --help with examples, --json for machine-readable output,
exit 0 on success, one clear line and a non-zero exit on failure (set STATA_DEBUG=1 for tracebacks)."""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys

import click

from ..errors import StataError

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 3


def emit(obj: dict, as_json: bool, human: str | None = None) -> None:
    """Print one strict JSON object (--json) or a human-readable text.

    Strict: JSON parsers reject NaN and Infinity, so a non-finite number is printed as null and its path is listed in
    ``null_reasons`` (e.g. {"energy_ratio": "NaN (not a finite number)"}) unless the command gave its own reason."""
    from ..fileio import dumps, strict

    reasons: dict = {}
    clean = strict(json.loads(dumps_loose(obj)), reasons)
    if reasons and isinstance(clean, dict):
        given = clean.get("null_reasons") or {}
        clean["null_reasons"] = {**{k: f"{v} (not a finite number)" for k, v in reasons.items()}, **given}
    if as_json:
        click.echo(dumps(clean))
    else:
        click.echo(human if human is not None else dumps(clean, indent=2))


def dumps_loose(obj) -> str:
    """json.dumps that knows numpy scalars/arrays and paths (non-finite numbers still as NaN/Infinity)."""
    from ..fileio import json_default

    return json.dumps(obj, default=json_default)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C (every ``finally`` / ``except BaseException`` cleanup runs:
    child process groups are killed, temporary files removed), then the CLI exits with 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def install_signal_handlers() -> None:
    """SIGTERM (``kill``, ``timeout``) and SIGHUP (closed terminal) clean up as Ctrl-C does (main thread only)."""
    for s in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(s, _raise_terminated)
        except ValueError:  # not the main thread (e.g. inside a test runner's worker thread)
            pass


def fail(msg: str, code: int = EXIT_USER_ERROR):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


class Group(click.Group):
    """Turns every expected failure into one line on stderr and a non-zero exit."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Click's usage errors (unknown option, bad value) as one ``error: ...`` line, exit 2, like every failure."""
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # `stata-deploy` alone: the help text
            click.echo(e.format_message())
            sys.exit(0)
        except click.UsageError as e:
            cmd = e.ctx.command_path if e.ctx is not None else (prog_name or "stata-deploy")
            fail(f"{e.format_message()} (see: {cmd} --help)", e.exit_code)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        install_signal_handlers()
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except StataError as e:
            if os.environ.get("STATA_DEBUG"):
                raise
            fail(str(e))
        except Terminated as e:
            click.echo(f"terminated ({e})", err=True)
            sys.exit(128 + e.signum)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            fail("out of memory (try a smaller --batch-size or preset)")
        except OSError as e:
            if os.environ.get("STATA_DEBUG"):
                raise
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            fail(f"{e.strerror or e}{where}")
        except Exception as e:  # a bug: still one line, with a hint how to get the traceback
            if os.environ.get("STATA_DEBUG"):
                raise
            fail(f"internal error: {type(e).__name__}: {e} (set STATA_DEBUG=1 for a traceback)", EXIT_INTERNAL)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="stata-deploy")
def main():
    """stata-deploy: train token-pruned spiking transformers, export them to NIR / ONNX, run them on Lava or
    ONNX Runtime, and count their synaptic operations and energy.

    \b
    Typical flow:
      stata-deploy train --dataset digits --model spikformer-tiny --prune stata --keep 0.5 --out runs/a
      stata-deploy calibrate runs/a
      stata-deploy export runs/a --to onnx
      stata-deploy run runs/a/model.onnx --runtime onnxruntime --dataset digits
      stata-deploy energy runs/a --hardware 45nm --baseline runs/base
    """


class FiniteFloat(click.ParamType):
    """A finite float in an open/closed range: NaN and infinity are refused (click.FloatRange lets NaN through)."""

    name = "number"

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def convert(self, value, param, ctx):
        import math

        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            self.fail(f"{v:g} must be {'>' if self.lo_open else '>='} {self.lo:g}", param, ctx)
        if self.hi is not None and v > self.hi:
            self.fail(f"{v:g} must be <= {self.hi:g}", param, ctx)
        return v


def threads_option(f):
    return click.option("--threads", type=click.IntRange(1, 256), default=None, help="torch CPU threads.")(f)


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# Commands live in their own modules and register themselves on ``main``.
COMMAND_MODULES = [
    "stata_deploy.cli.train",
    "stata_deploy.cli.export",
    "stata_deploy.cli.run",
    "stata_deploy.cli.energy",
    "stata_deploy.cli.inspect",
    "stata_deploy.cli.kept",
]
for _m in COMMAND_MODULES:
    try:
        importlib.import_module(_m)
    except ModuleNotFoundError as _e:
        if _e.name != _m:  # a missing dependency inside an existing command module is a real error
            raise
