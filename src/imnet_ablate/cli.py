"""``ablate <command> [hydra overrides...]``: pick the command's config, compose it with Hydra, run the stage.

Each command is a function ``run(cfg) -> Path`` in its own module and a primary config ``conf/<config>.yaml``.
``--help`` is the command's own page (``help.py``); Hydra's flags (``--cfg job``, ``-m``/``--multirun``,
``--hydra-help``, ``hydra/launcher=...``) work as usual. Overrides are checked before Hydra runs (``overrides.py``).
The last line a command prints on stdout is ``run_dir: <path>`` of the folder it wrote.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import NamedTuple

from . import __version__, help, overrides
from .config import conf_dir, locate
from .errors import UserError
from .overrides import did_you_mean

# Our hydra/launcher configs list every key of the submitit plugin's schema themselves (a config cannot extend
# the plugin's config of the same name); Hydra validates them against that schema and warns each time.
warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema with the same name",
                        category=UserWarning)


class Command(NamedTuple):
    config: str  # primary config name in conf/
    target: str  # "module:function", imported only when the command runs
    help: str
    examples: tuple[str, ...] = ()  # shown by `ablate <command> --help`; the tests check that each one composes
    sized: bool = False  # on the demo data, its task and subset are demo-sized (sizing.py)
    many_tasks: bool = False  # runs every task of `tasks`: task.<key>=... go to each (overrides.fold_task_keys)


COMMANDS: dict[str, Command] = {
    "subset": Command("subset", "imnet_ablate.subsets:run", "build a pre-training subset's index files", (
        "ablate subset subset=250pc",
        "ablate subset subset=wordnet-127 data=imagenet data.root=/data/imagenet",
        "ablate subset subset=250pc subset.images_per_class=100 subset.seed=1",
        "ablate subset -m subset=500pc,250pc,125pc",
    ), sized=True),
    "classes": Command("classes", "imnet_ablate.subsets:show_classes",
                       "list a subset's classes and exclusions by name", (
                           "ablate classes subset=wordnet-127",
                           "ablate classes subset=nopascal-771",
                           "ablate classes subset.grouping=depth-5 show.groups=null show.members=null",
                       )),
    "data demo": Command("data_demo", "imnet_ablate.datasets:generate_demo", "generate the built-in demo data pair", (
        "ablate data demo",
        "ablate data demo data.demo.train_per_class=12 data.demo.voc_trainval=500",
    )),
    "data check": Command("data_check", "imnet_ablate.datacheck:run", "validate a dataset copy, write a report", (
        "ablate data check",
        "ablate data check data=imagenet data.root=/data/imagenet data.voc_root=/data/VOCdevkit",
        "ablate data check data=imagenet data.root=/data/imagenet data.voc_root=/data/VOCdevkit check.what=voc",
    )),
    "pack": Command("pack", "imnet_ablate.pack:run", "pack a training set into one fast-loading store", (
        "ablate pack",
        "ablate pack data=imagenet data.root=/data/imagenet pack.short_side=256 pack.quality=90",
    ), sized=True),
    "pretrain": Command("pretrain", "imnet_ablate.pretrain:run", "pre-train a network on a subset", (
        "ablate pretrain subset=250pc",
        "ablate pretrain -m subset=500pc,250pc,125pc",
        "ablate pretrain subset=wordnet-127 model=alexnet train=caffe data=imagenet data.root=/data/imagenet",
        "ablate pretrain train.devices=4 loader=packed",
    ), sized=True),
    "probe": Command("probe", "imnet_ablate.probe:run", "the 1000-way ImageNet top-1 of a reduced-class network", (
        "ablate probe subset=wordnet-127",
        "ablate probe subset=nopascal-771 model=alexnet train=caffe data=imagenet data.root=/data/imagenet",
    )),
    "transfer": Command("transfer", "imnet_ablate.transfer:run", "transfer a pre-trained network to a task", (
        "ablate transfer task=voc-cls-demo subset=250pc",
        "ablate transfer task=voc-det-demo pretrain=scratch",
        "ablate transfer task=voc-cls task.protocol=finetune",
        "ablate transfer pretrain=results/runs/pretrain/250pc-alexnet_small-0123456789ab",
        "ablate transfer -m seed=0,1,2",
        "ablate transfer task=voc-det demo_sized=false",
    ), sized=True),
    "evaluate": Command("evaluate", "imnet_ablate.rescore:run", "score a task's results files (devkit format)", (
        "ablate evaluate task=voc-det detections=my_detections/ data.voc_root=/data/VOCdevkit",
        "ablate evaluate task=voc-cls detections=my_scores/ data.voc_root=/data/VOCdevkit metric=area",
    )),
    "run": Command("run", "imnet_ablate.experiments:run", "run an experiment: every stage not done yet, then report", (
        "ablate run experiment=demo",
        "ablate run experiment=demo pretrain_seeds=3 transfer_seeds=1 jobs=2",
        "ablate run experiment=images-per-class budget=both",
        "ablate run experiment=images-per-class plan=true",
        "ablate run experiment=images-per-class tasks=[voc-det] task.iterations=2400 'task.optimizer.steps=[1800]'",
    ), many_tasks=True),
    "report": Command("report", "imnet_ablate.experiments:report", "collect finished runs into tables and plots", (
        "ablate report experiment=demo",
        "ablate report experiment=demo pretrain_seeds=3 transfer_seeds=1",
    ), many_tasks=True),
    "bench": Command("bench", "imnet_ablate.bench:run", "time the loader, the model and the train step", (
        "ablate bench what=loader",
        "ablate bench what=train bench.model=alexnet_small bench.steps=10",
    )),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: ablate <command> [key=value ...] [--help] [--cfg job] [-m]", "       ablate --version", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", "`ablate <command> --help` shows the command's groups, keys (with what each does) and examples."]
    return "\n".join(lines)


def family(word: str) -> dict[str, str]:
    """The commands named ``<word> ...`` (``data`` -> ``data demo``, ``data check``) with their summaries."""
    return {name: cmd.help for name, cmd in COMMANDS.items() if name.startswith(word + " ")}


def split_command(argv: list[str]) -> tuple[str, list[str]]:
    """Longest command name made of the leading words of argv (e.g. ``data demo``), and the rest."""
    for n in (2, 1):
        name = " ".join(argv[:n])
        if len(argv) >= n and name in COMMANDS:
            return name, argv[n:]
    typed = " ".join(argv[:2]) if family(argv[0]) and len(argv) > 1 else argv[0]
    hint = did_you_mean(typed, list(COMMANDS)) or "; run `ablate --help` for the list"
    raise UserError(f"unknown command '{typed}'{hint}")


def page(text: str) -> None:
    """Print a help page; a reader that stops early (``ablate run --help | head``) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit


def command_args(name: str, rest: list[str]) -> list[str]:
    """A command's arguments as its config takes them: for one that runs every task of ``tasks``, its task keys
    folded into ``task_overrides`` (``overrides.fold_task_keys``)."""
    return overrides.fold_task_keys(name, rest) if COMMANDS[name].many_tasks else rest


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        return page(usage())
    if argv[0] == "--version":
        return page(f"ablate {__version__}")
    label = "ablate"
    try:
        if family(argv[0]) and (len(argv) == 1 or argv[1] in ("-h", "--help")):
            return page(help.render_family(argv[0], family(argv[0])))
        name, rest = split_command(argv)
        cmd, label = COMMANDS[name], f"ablate {name}"
        rest = command_args(name, rest)
        if "--help" in rest or "-h" in rest:
            overrides.check(name, cmd.config, [a for a in rest if a not in ("--help", "-h")])
            return page(help.render(name, cmd.help, cmd.config, cmd.examples, rest, cmd.sized))
        overrides.check(name, cmd.config, rest)
    except UserError as e:
        print(f"{label}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    run_hydra(name, cmd, rest)


def run_hydra(name: str, cmd: Command, overrides: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig

    @hydra.main(version_base=None, config_path=str(conf_dir()), config_name=cmd.config)
    def task(cfg: DictConfig) -> str:
        from . import interrupts, progress, sizing
        from .validate import check

        try:
            check(cfg)
            sized = sizing.in_app(cmd.config, cfg) if cmd.sized else cfg
            if sized is not cfg:
                check(sized)
            progress.configure(sized.get("progress", "auto"))
            run_dir = locate(cmd.target, f"command {name!r}")(sized)
        except UserError as e:
            print(f"ablate {name}: error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            print(f"ablate {name}: interrupted: {interrupts.message(e)}", file=sys.stderr)
            sys.exit(130)
        sys.stdout.flush()
        print(f"run_dir: {run_dir}", flush=True)
        return str(run_dir)

    sys.argv = [f"ablate {name}", *overrides]
    task()


if __name__ == "__main__":
    main()
