"""The `lmforge` command: one subcommand per module.

To add a subcommand, write a module with `add_arguments(parser)` and `main(args) -> int`
(its exit status) and add a line to SUBCOMMANDS.  Every subcommand module is imported to
build the parser, so keep heavy imports (torch, transformers) inside its `main`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("lmforge.workflow", "run the pipeline through Snakemake, with Hydra overrides as separate words"),
    "config": ("lmforge.config", "print the composed configuration (Hydra's --cfg job), or write the stage configs"),
    "doctor": ("lmforge.doctor", "preflight checks of the cluster and a config before submitting"),
    "status": ("lmforge.status", "which stages have run, and which ran older code than today's (with how to rerun)"),
    "runs": ("lmforge.runs", "a sweep's configurations: the params that differ and the key metrics"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="LM research pipeline on Slurm clusters.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=module.__doc__.splitlines()[0])
        module.add_arguments(command)
        command.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
