"""Command line: ``decomp decompose | inspect | export | compress | profile | train | finetune |
evaluate | demo`` and the standalone ``decompose``.

Thin: every command parses its options, calls one library function (:mod:`decomp.recipes`,
:mod:`decomp.evaluate`, :mod:`decomp.export`, :mod:`decomp.demo`) and renders the result with
rich (:mod:`decomp.cli.render`). The commands live in :mod:`decomp.cli.compress` (model files),
:mod:`decomp.cli.staged` (``compress``, in stages) and :mod:`decomp.cli.training`; what they
share (consoles, error handling, option types) in :mod:`decomp.cli.common`. Adding a command:
write a function whose parameters use the shared option types, put its body in
``with command(verbose):`` and register it below.

Exit codes: 0 success; 1 any failure, reported as one line on stderr that says what is wrong and
how to mend it; 2 a malformed command line (unknown option, a value outside the choices, a missing
argument: typer's usage errors). Never a traceback, unless DECOMP_DEBUG=1 is set.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from decomp.cli.common import out
from decomp.cli.compress import decompose_command, export_command, inspect_command
from decomp.cli.latency import profile_command
from decomp.cli.staged import compress_command
from decomp.cli.training import demo_command, evaluate_command, finetune_command, train_command

_APP_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "context_settings": {"help_option_names": ["-h", "--help"]},
}
app = typer.Typer(
    name="decomp",
    help="Compress PyTorch CNNs by tensor decomposition (Tucker-2, CP, SVD; VBMF ranks).",
    no_args_is_help=True,
    **_APP_SETTINGS,
)


def _version(value: bool) -> None:
    if value:
        from decomp import __version__

        out.print(f"decomp {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Compress PyTorch CNNs by tensor decomposition (Tucker-2, CP, SVD; VBMF ranks)."""


app.command("decompose", no_args_is_help=True)(decompose_command)
app.command("inspect", no_args_is_help=True)(inspect_command)
app.command("export", no_args_is_help=True)(export_command)
app.command("compress", no_args_is_help=True)(compress_command)
app.command("profile", no_args_is_help=True)(profile_command)
app.command("train")(train_command)
app.command("finetune", no_args_is_help=True)(finetune_command)
app.command("evaluate", no_args_is_help=True)(evaluate_command)
app.command("demo")(demo_command)

decompose_app = typer.Typer(name="decompose", **_APP_SETTINGS)
decompose_app.command(no_args_is_help=True)(decompose_command)


def main() -> None:
    """Entry point of ``decomp``."""
    app(prog_name="decomp")


def decompose_main() -> None:
    """Entry point of the standalone ``decompose``."""
    decompose_app(prog_name="decompose")
