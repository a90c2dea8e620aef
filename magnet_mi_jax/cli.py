"""What every entry point (``train/``, ``eval/``) shares: the dataset, data and checkpoint flags, the command line
as it was typed, and the provenance every result records.

Example::

    parser = argparse.ArgumentParser()
    cli.add_data_flags(parser)                  # --dataset, --data-dir, --source, --checkpoints
    args = parser.parse_args(argv)
    ds = cli.load_data(args)
    result = {..., **cli.provenance(cli.command_line("eval.my_study", argv), ds)}
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import jax

from magnet_mi_jax import checkpoint, data, datasets
from magnet_mi_jax.utils import device_description, git_commit


class OverwriteError(RuntimeError):
    """The output folder holds results of another configuration (a run never silently replaces them)."""


def add_data_flags(parser: argparse.ArgumentParser, *, checkpoints_help: str | None = None,
                   checkpoints: bool = True) -> argparse.ArgumentParser:
    """Adds ``--dataset`` (a registered name), ``--data-dir``, ``--source`` and (with ``checkpoints``)
    ``--checkpoints``."""
    parser.add_argument("--dataset", choices=datasets.names(), required=True)
    parser.add_argument("--data-dir", default=None,
                        help=f"folder with the dataset's files (default ${data.DATA_DIR_ENV}, else the download cache)")
    parser.add_argument("--source", default="auto", choices=data.SOURCES,
                        help="auto: --data-dir if given, else the official files downloaded once into "
                             "$MAGNET_MI_CACHE (default ~/.cache/magnet_mi_jax) and checked by md5")
    if checkpoints:
        parser.add_argument("--checkpoints", default=None,
                            help=checkpoints_help or "trained weights (default: the repository's checkpoints/)")
    return parser


def add_overwrite_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--overwrite``, the only way past :func:`refuse_to_overwrite`."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that already exist (default: refuse before computing anything, "
                             "so a rerun never silently replaces committed results)")
    return parser


def refuse_to_overwrite(paths: Iterable[str | Path | None], overwrite: bool) -> None:
    """Raises :class:`OverwriteError` naming every output file in ``paths`` that exists already, unless
    ``overwrite``. Entry points call it right after parsing their flags, so a refused run costs nothing.
    ``None`` entries (optional outputs not asked for) are skipped.

    Example::

        cli.refuse_to_overwrite([args.json], args.overwrite)
    """
    existing = [str(p) for p in paths if p is not None and Path(p).exists()]
    if existing and not overwrite:
        raise OverwriteError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass "
                             f"--overwrite to replace {'it' if len(existing) == 1 else 'them'}, or write elsewhere")


def load_data(args: argparse.Namespace) -> data.Dataset:
    """The dataset the flags of :func:`add_data_flags` name."""
    return data.load_dataset(args.dataset, data_dir=args.data_dir, source=args.source)


def command_line(module: str, argv: list[str] | None = None) -> str:
    """``python -m <module> <args>``, each argument shell-quoted (``argv`` None: this process's own)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, argv)])


_commit_at_start: str | None = None


def pin_commit() -> str:
    """Reads the git commit once, as a command starts (:func:`run_main` calls it), for every later
    :func:`provenance` of the process: a command that runs for hours records the code it ran, not what HEAD has
    become by the time it writes its result."""
    global _commit_at_start
    _commit_at_start = git_commit()
    return _commit_at_start


def provenance(command: str, ds: data.Dataset | None = None, *, commit: str | None = None) -> dict[str, Any]:
    """What every result records about how it was made: the command, the git commit (``commit`` if the caller
    read it when it started, else the one :func:`pin_commit` read as the command started, else HEAD now), the
    device, the JAX version and, with ``ds``, the data files' md5s and source."""
    commit = commit if commit is not None else _commit_at_start if _commit_at_start is not None else git_commit()
    out = {"command": command, "git_commit": commit,
           "device": device_description(), "jax": jax.__version__}
    if ds is not None:
        out.update(data_md5=ds.md5, data_source=ds.source)
    return out


def run_main(main: Callable[[], Any], errors: tuple[type[BaseException], ...] = ()) -> None:
    """Runs an entry point's ``main`` as a command: expected failures (bad data, a missing or corrupt checkpoint,
    an output of another configuration, and ``errors``) print one line naming the problem and exit with status 2
    instead of a traceback."""
    pin_commit()
    try:
        main()
    except (data.DataError, checkpoint.CheckpointError, OverwriteError, *errors) as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None
