"""The two pieces of Hydra's private API that lmforge uses, behind one door, for the Hydra it was tested with.

- Applying value overrides to a composed config: what `compose` does, without composing again (a sweep of
  1000 configurations composes once per set of group choices; lmforge.config.load_many).
- Expanding sweep overrides into their cartesian product, as Hydra's BasicSweeper does for a multirun.

Both are internal to Hydra and may change in any release, so importing this module on another minor version
fails, saying which versions work; pyproject.toml pins hydra-core to the same range.
"""

from __future__ import annotations

import hydra

TESTED = "1.3"  # hydra-core 1.3.x

if not hydra.__version__.startswith(f"{TESTED}."):
    raise ImportError(
        f"lmforge uses internals of hydra-core {TESTED}.x, but hydra-core {hydra.__version__} is installed: "
        f"pip install 'hydra-core>={TESTED},<1.4' (env/requirements.txt pins the tested version)."
    )

from hydra._internal.config_loader_impl import ConfigLoaderImpl  # noqa: E402
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # noqa: E402


def apply_overrides(overrides: list, cfg) -> None:
    """Apply parsed value overrides (`train.lr=1e-3`, `+x=1`, `~y`) to a composed config, in place."""
    ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)


def sweep_grid(parsed: list) -> list[list[str]]:
    """The configurations of parsed sweep overrides: one list of plain overrides each, in Hydra's order."""
    [grid] = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return grid
