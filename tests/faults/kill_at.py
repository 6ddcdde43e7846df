"""Run ``python -m shield_db ...`` and SIGKILL it at its K-th file-system step (fault harness helper).

    python tests/faults/kill_at.py K LOG -- build FOLDER --vae ... (the CLI's own arguments)

A step is a call of ``os.write``, ``os.fsync``, ``os.replace`` or ``os.remove`` (what shield_db's commits are made
of). Each step appends ``<n> <call> <phase>`` to LOG before it runs; at step K the process kills itself instead
(K = 0: never, to count the steps). ``phase`` is ``finish`` inside the writer's finish (merge, index refit and
write, final manifest, cleanup), ``maintenance`` inside a finish owed by an earlier run, else ``commit``.
"""
import os
import runpy
import signal
import sys
import traceback

FINISH = {"finish", "_merge_small_shards", "_refresh_index", "remove_unreferenced_files", "_rewrite"}


def phase() -> str:
    names = {frame.name for frame in traceback.extract_stack()}
    if "finish_pending" in names:
        return "maintenance"
    return "finish" if names & FINISH else "commit"


def install(kill_at: int, log_path: str) -> None:
    log = open(log_path, "a", buffering=1)
    count = [0]

    def hooked(name, real):
        def call(*args, **kw):
            count[0] += 1
            log.write(f"{count[0]} {name} {phase()}\n")
            if count[0] == kill_at:
                log.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kw)
        return call

    for name in ("write", "fsync", "replace", "remove"):
        setattr(os, name, hooked(name, getattr(os, name)))


if __name__ == "__main__":
    k, log_file, sep, *cli = sys.argv[1:]
    assert sep == "--", "usage: kill_at.py K LOG -- <shield_db arguments>"
    install(int(k), log_file)
    sys.argv = ["shield_db", *cli]
    runpy.run_module("shield_db", run_name="__main__", alter_sys=True)
