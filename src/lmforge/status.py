"""`lmforge status [overrides...]`: which stages of a configuration (or sweep) have run, and on which code.

Stage directories are named by a hash of their config, not of the code that ran them: after a change to
`train_loop.py`, Snakemake finds every result present and reruns nothing. Each stage's manifest records
the lmforge modules it ran and their hashes (stage.code_files); this command compares them with the code
of today and prints the one command that reruns the stages that ran older code (and, as Snakemake does,
everything downstream of them).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from lmforge import config, sweep
from lmforge.stage import sha256_file

PACKAGE = Path(__file__).resolve().parent


def changed_code(manifest: dict) -> list[str] | None:
    """The modules whose code differs from what the stage ran; None when its manifest predates code hashes."""
    ran = manifest.get("code", {}).get("files")
    if ran is None:
        return None
    return [
        name
        for name, digest in ran.items()
        if not (PACKAGE / name).is_file() or sha256_file(PACKAGE / name)[:16] != digest
    ]


def stage_status(stage_dir: str) -> tuple[str, list[str] | None]:
    """('not run' | 'current' | 'older code' | 'unknown code', the changed modules)."""
    path = Path(stage_dir) / "manifest.json"
    if not path.is_file():
        return "not run", None
    changed = changed_code(json.loads(path.read_text()))
    if changed is None:
        return "unknown code", None
    return ("older code" if changed else "current"), changed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="the Hydra overrides the run was given")


def main(args: argparse.Namespace) -> int:
    try:
        planned = sweep.plan(args.overrides)
    except config.ConfigError as err:
        print(f"lmforge status: config error: {err}", file=sys.stderr)
        return 2
    stale = []
    for name, by_key in planned.stages.items():
        for key, stage in by_key.items():
            status, changed = stage_status(stage.dir)
            detail = f" ({', '.join(changed)} changed since)" if changed else ""
            print(f"{name:<13} {key}  {status}{detail}")
            if status in ("older code", "unknown code"):
                stale.append(stage.dir)
    if stale:
        words = " ".join(shlex.quote(word) for word in args.overrides)
        rerun = " ".join(shlex.quote(path) for path in stale)
        print(f"\n{len(stale)} stage(s) ran other code than today's. To rerun them and what depends on them:")
        print(f"  lmforge run {words + ' ' if words else ''}-- --forcerun {rerun}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="lmforge status", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
