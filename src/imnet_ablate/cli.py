"""``ablate <command> [hydra overrides...]``: pick the command's config, compose it with Hydra, run the stage.

Each command is a function ``run(cfg) -> Path`` in its own module and a primary config ``conf/<config>.yaml``.
Hydra's own flags (``--help``, ``--cfg job``, ``-m``/``--multirun``, ``hydra/launcher=...``) work as usual.
The last line a command prints on stdout is ``run_dir: <path>`` of the folder it wrote.
"""
from __future__ import annotations

import sys
import warnings
from typing import NamedTuple

from .config import conf_dir, locate, one_line
from .errors import UserError

# Our hydra/launcher configs list every key of the submitit plugin's schema themselves (a config cannot extend
# the plugin's config of the same name); Hydra validates them against that schema and warns each time.
warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema with the same name",
                        category=UserWarning)


class Command(NamedTuple):
    config: str  # primary config name in conf/
    target: str  # "module:function", imported only when the command runs
    help: str


COMMANDS: dict[str, Command] = {
    "subset": Command("subset", "imnet_ablate.subsets:run", "build a pre-training subset's index files"),
    "classes": Command("classes", "imnet_ablate.subsets:show_classes", "show a subset's classes without reading images"),
    "data demo": Command("data_demo", "imnet_ablate.datasets:generate_demo", "generate the built-in demo dataset pair"),
    "data check": Command("data_check", "imnet_ablate.datacheck:run", "validate a dataset copy, write a report"),
    "pack": Command("pack", "imnet_ablate.pack:run", "pack a training set into one fast-loading store"),
    "pretrain": Command("pretrain", "imnet_ablate.pretrain:run", "pre-train a network on a subset"),
    "probe": Command("probe", "imnet_ablate.probe:run", "the 1000-way ImageNet top-1 of a reduced-class network"),
    "transfer": Command("transfer", "imnet_ablate.transfer:run", "transfer a pre-trained network to a task (probe or fine-tune)"),
    "evaluate": Command("evaluate", "imnet_ablate.rescore:run", "score a task's results files (devkit format)"),
    "run": Command("run", "imnet_ablate.experiments:run", "run an experiment: every stage not done yet, then report"),
    "report": Command("report", "imnet_ablate.experiments:report", "collect finished runs into tables and plots"),
    "bench": Command("bench", "imnet_ablate.bench:run", "time the loader, the model and the train step"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: ablate <command> [key=value ...] [--help] [--cfg job] [-m]", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "`ablate <command> --help` shows the command's config groups and options."]
    return "\n".join(lines)


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """Longest command name made of the leading words of argv (e.g. ``data demo``), and the rest."""
    for n in (2, 1):
        name = " ".join(argv[:n])
        if len(argv) >= n and name in COMMANDS:
            return name, argv[n:]
    raise UserError(f"unknown command {' '.join(argv[:1])!r}; run `ablate --help` for the list")


def precheck(config: str, overrides: list[str]) -> None:
    """Compose the config once before Hydra runs, so a bad override or preset is one line and exit 2.

    Skipped for multirun and Hydra's own flags: there Hydra composes each job itself.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            compose(config_name=config, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(one_line(e)) from e


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    try:
        name, rest = split_command(argv)
        cmd = COMMANDS[name]
        hydra_flags = {"-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--resolve"}
        if not hydra_flags.intersection(rest) and not any(a.startswith("--cfg") for a in rest):
            precheck(cmd.config, rest)
    except UserError as e:
        print(f"ablate: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    run_hydra(name, cmd, rest)


def run_hydra(name: str, cmd: Command, overrides: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base=None, config_path=str(conf_dir()), config_name=cmd.config)
    def task(cfg: DictConfig) -> str:
        from .validate import check

        try:
            check(cfg)
            run_dir = locate(cmd.target, f"command {name!r}")(cfg)
        except UserError as e:
            print(f"ablate {name}: error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print(f"ablate {name}: interrupted; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)
        sys.stdout.flush()
        print(f"run_dir: {run_dir}", flush=True)
        return str(run_dir)

    sys.argv = [f"ablate {name}", *overrides]
    task()


if __name__ == "__main__":
    main()
