"""The ``stata-deploy`` command line. Every command: --help with examples, --json for machine-readable output,
exit 0 on success, one clear line and a non-zero exit on failure (set STATA_DEBUG=1 for tracebacks)."""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import click

from .errors import StataError

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 3


def emit(obj: dict, as_json: bool, human: str | None = None) -> None:
    """Print one JSON object (--json) or a human-readable text."""
    if as_json:
        click.echo(json.dumps(obj, default=_jsonable))
    else:
        click.echo(human if human is not None else json.dumps(obj, indent=2, default=_jsonable))


def _jsonable(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fail(msg: str, code: int = EXIT_USER_ERROR):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


class Group(click.Group):
    """Turns every expected failure into one line on stderr and a non-zero exit."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except StataError as e:
            if os.environ.get("STATA_DEBUG"):
                raise
            fail(str(e))
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


def threads_option(f):
    return click.option("--threads", type=click.IntRange(1, 256), default=None, help="torch CPU threads.")(f)


def set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


# Commands live in their own modules and register themselves on ``main``.
COMMAND_MODULES = [
    "stata_deploy.commands.train_cmds",
    "stata_deploy.commands.export_cmds",
    "stata_deploy.commands.run_cmds",
    "stata_deploy.commands.energy_cmds",
    "stata_deploy.commands.inspect_cmds",
]
for _m in COMMAND_MODULES:
    try:
        importlib.import_module(_m)
    except ModuleNotFoundError as _e:
        if _e.name != _m:  # a missing dependency inside an existing command module is a real error
            raise
