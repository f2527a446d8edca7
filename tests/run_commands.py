"""Run many `python main.py ...` (or `python -m resnet_lab.paper ...`) command lines, each in a process of its own,
without paying Python's start and torch's import for each: this process imports the CLI once, then forks one child
per command, which gets the command's argv, working folder, environment and its own stdout / stderr files, and
exits as the interpreter would (a `sys.exit("message")` prints the message and exits 1; an uncaught exception prints
its traceback and exits 1).

    python tests/run_commands.py < commands.json > results.json

Input: {"stages": [[{"argv": [...], "cwd": "...", "env": {...}, "out": "<file prefix>"}, ...], ...]}; the stages run
one after the other, the commands of a stage two at a time. Output: [{"out": ..., "returncode": ...}, ...].
"""

import json
import os
import runpy
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARALLEL = 2


def _child(command: dict) -> None:
    os.chdir(command["cwd"])
    for leftover in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(leftover, None)  # a launcher's, left in the environment of the process that runs us
    os.environ.update(command.get("env", {}))
    for fd, suffix in ((1, ".stdout"), (2, ".stderr")):
        os.dup2(os.open(command["out"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    argv = command["argv"]
    code = 0
    try:
        if argv[:2] == ["-m", "resnet_lab.paper"]:
            sys.argv = ["resnet_lab.paper", *argv[2:]]
            runpy.run_module("resnet_lab.paper", run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            runpy.run_path(str(REPO / argv[0]), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(stages: list[list[dict]]) -> list[dict]:
    results = []
    for stage in stages:
        pending, running = list(stage), {}
        while pending or running:
            while pending and len(running) < PARALLEL:
                command = pending.pop(0)
                pid = os.fork()
                if pid == 0:
                    _child(command)
                running[pid] = command
            pid, status = os.wait()
            command = running.pop(pid)
            results.append({"out": command["out"], "returncode": os.waitstatus_to_exitcode(status)})
    return results


if __name__ == "__main__":
    import resnet_lab.cli  # noqa: F401 - imported once, before the forks
    import resnet_lab.paper  # noqa: F401

    json.dump(run(json.load(sys.stdin)["stages"]), sys.stdout)
