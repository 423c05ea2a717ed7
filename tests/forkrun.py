"""Many ``ablate`` command lines from one interpreter: the heavy modules (torch, Hydra, PIL) are imported once,
then each command line runs in a forked child, a fresh copy of that process as ``ablate`` would start it (its
``main(argv)`` is the console script's entry point), with its own stdout, stderr and exit status. Trying a hundred
hostile inputs then costs a fork each instead of an interpreter and a torch import each.

``run_batch(argvs, cwd)`` is what tests call; run as a script, this file is the forking side.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Outcome:
    argv: tuple[str, ...]
    returncode: int  # negative: killed by that signal (-14: it ran past the per-command time limit)
    stdout: str
    stderr: str
    seconds: float


def run_batch(argvs: list[list[str]], cwd: Path, timeout_each: int = 120, env: dict | None = None) -> list[Outcome]:
    """Run each ``ablate <argv>`` (forked from one interpreter, in ``cwd``) and return its outcome."""
    with tempfile.TemporaryDirectory() as tmp:
        cases, results = Path(tmp) / "cases.json", Path(tmp) / "results.json"
        cases.write_text(json.dumps({"argvs": argvs, "timeout": timeout_each}))
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
        proc = subprocess.run([sys.executable, __file__, str(cases), str(results)], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=timeout_each * len(argvs) + 120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [Outcome(tuple(r["argv"]), r["returncode"], r["stdout"], r["stderr"], r["seconds"])
                for r in json.loads(results.read_text())]


def _child(argv: list[str], out: int, err: int, timeout: int) -> None:
    """In the forked child: the command line with fd 1 and 2 redirected; never returns."""
    os.dup2(out, 1)
    os.dup2(err, 2)
    signal.alarm(timeout)  # a command that blocks (on a FIFO, say) is killed, and shows as -SIGALRM
    code = 1
    try:
        from imnet_ablate.cli import main

        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - an uncaught exception is what the caller looks for
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _fork_each(argvs: list[list[str]], timeout: int) -> list[dict]:
    import hydra  # noqa: F401 - imported once here, inherited by every child
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    from PIL import Image  # noqa: F401

    import imnet_ablate.cli  # noqa: F401

    results = []
    for argv in argvs:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                _child(argv, out.fileno(), err.fileno(), timeout)
            _, status = os.waitpid(pid, 0)
            seconds = time.perf_counter() - t0
            code = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            results.append({"argv": argv, "returncode": code, "seconds": seconds,
                            "stdout": out.read().decode("utf-8", "backslashreplace"),
                            "stderr": err.read().decode("utf-8", "backslashreplace")})
    return results


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(_fork_each(spec["argvs"], spec["timeout"])))
