"""The `imat` command: a click group whose subcommands are thin calls into the library.

Subcommands are imported lazily so that `imat --help` or `imat search` never
pays for (or requires) the training stack.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from imat import __version__
from imat.errors import ImatError
from imat.hugepages import reexec_with_hugepages

# name -> "module:attribute"; the module is imported only when the command runs.
COMMANDS = {
    "data": "imat.cli.data:data",
    "train": "imat.cli.train:train",
    "export": "imat.cli.export:export",
    "embed": "imat.cli.embed:embed",
    "index": "imat.cli.engine:index",
    "search": "imat.cli.engine:search",
    "eval": "imat.cli.engine:evaluate",
    "serve": "imat.cli.serve:serve",
    "demo": "imat.cli.demo:demo",
}

HELP = {
    "data": "Synthesise, check, explore and prepare Kaggle-layout datasets.",
    "train": "Train a model (bce, triplet or rotation objective).",
    "export": "Export a trained run to a single model.onnx.",
    "embed": "Embed a folder of images into resumable parts (one process or --ray).",
    "index": "Embed a folder of images (or index an embeddings folder) into a FAISS index.",
    "search": "Search an index with one image or a folder of queries.",
    "eval": "Leave-one-out retrieval evaluation on a labelled folder.",
    "serve": "Serve search, add and delete over HTTP, with a search page.",
    "demo": "Run the whole pipeline on synthetic data (the default main job).",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # A missing optional dependency (extra not installed) is a user-level problem.
            if e.name and not e.name.startswith("imat"):
                return _missing_extra_command(name, e.name)
            raise
        return getattr(module, attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, HELP[name]) for name in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _missing_extra_command(name: str, missing: str) -> click.Command:
    @click.command(name, context_settings={"ignore_unknown_options": True}, add_help_option=False)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def _cmd(args):
        raise ImatError(
            f"`imat {name}` needs the Python package '{missing}', which is not installed; "
            "install the extra it belongs to, e.g. pip install 'imat[all]'"
        )

    return _cmd


def configure_logging(verbose: int, quiet: int) -> None:
    level = logging.INFO + 10 * (quiet - verbose)
    logging.basicConfig(
        level=max(logging.DEBUG, min(logging.CRITICAL, level)),
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # Third-party libraries are noisy at INFO; keep them at WARNING unless -vv.
    if verbose < 2:
        for noisy in ("absl", "jax", "orbax", "tensorflow_datasets", "matplotlib", "PIL", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="imat")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug and library logs).")
@click.option("-q", "--quiet", count=True, help="Less logging (-qq for errors only).")
def cli(verbose: int, quiet: int) -> None:
    """imat: fashion image retrieval (iMaterialist Fashion 2020).

    data -> train -> export -> [embed ->] index -> search, each stage a command.
    """
    configure_logging(verbose, quiet)


def main(argv=None) -> int:
    """Console entry point: user mistakes end as one clear line, never a traceback.

    Started as the ``imat`` command (``argv`` None), it first re-executes itself once with
    glibc's huge-page tunable (``imat.hugepages``: faster CPU training steps)."""
    if argv is None:
        reexec_with_hugepages(["-m", "imat.cli.main", *sys.argv[1:]])
    try:
        cli.main(args=argv, prog_name="imat", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.ClickException as e:  # usage errors: exit code 2
        e.show()
        return e.exit_code
    except ImatError as e:
        click.echo(f"imat: error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
