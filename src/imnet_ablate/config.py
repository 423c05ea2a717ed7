"""Where the config tree is, composing a command's config as the CLI would, and locating ``_target_`` code.

Shared by the CLI and by every stage that composes another command's config (``ablate run`` plans pre-trainings
and transfers; the 1000-way probe composes ``subset=full``), so no stage imports the CLI back.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from .errors import UserError


def conf_dir() -> Path:
    """The config tree: shipped inside the package when installed, ``conf/`` at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "base.yaml").is_file():
            return candidate
    raise UserError(f"config tree not found (looked in {here / 'conf'} and {here.parents[1] / 'conf'})")


def one_line(exc: BaseException) -> str:
    """Hydra's composition errors span several lines, end in its config search path, may advise ``+key`` and
    quote the override as typed: one line, control characters escaped (an override can hold a terminal escape)."""
    from .inputs import shown

    text = " ".join(str(exc).split())
    return shown(text.split(" Config search path")[0].split(" To append to your config use")[0], 400)


def compose(config_name: str, overrides: list[str], hydra: bool = False) -> DictConfig:
    """Compose a command's config exactly as ``ablate <command> <overrides>`` would (inside a running Hydra app
    too, where Hydra's global state already points at the right search path); ``hydra=True`` keeps Hydra's node,
    which records the group choices. Hydra's own errors become one-line ``UserError``s."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if GlobalHydra.instance().is_initialized():
            return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=hydra)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise UserError(one_line(e)) from e


def app_overrides() -> list[str]:
    """The running command's overrides as typed (one job's, in a sweep) and its ``hydra.searchpath`` (where a user's
    own presets live): what composing one of its configs again needs. Empty outside a running command."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    typed = HydraConfig.get().overrides
    return [*typed.task, *(o for o in typed.hydra if o.startswith("hydra.searchpath="))]


def locate(target: str, key: str) -> Any:
    """The object a ``_target_`` names: ``package.module.name`` (Hydra's form) or ``package.module:name``.

    Plug-ins (tasks, backbones) from a user's own package are found the same way as the built-in ones; ``key`` is
    the config key that named it, for the error."""
    module, sep, name = target.partition(":") if ":" in target else target.rpartition(".")
    if not module or not name:
        raise UserError(f"{key}={target}: expected a dotted path to a class or function, e.g. mypkg.tasks.MyTask")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise UserError(f"{key}={target}: cannot import {module} ({e}); is its package installed or on "
                        "PYTHONPATH?") from e
    except AttributeError as e:
        raise UserError(f"{key}={target}: {module} has no {name!r}") from e
