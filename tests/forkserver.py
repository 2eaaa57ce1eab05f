"""conftest.run_script's fork server: it imports what the scripts import (torch, transformers:
~2 s a process), then forks a child per request, which runs the script as `python SCRIPT ARGS`
does, in the given working directory, with stdout and stderr to the given files and the server's
environment (conftest.ENV): the interpreter itself prints a SystemExit's message or a traceback,
and the child's exit status is the script's. A child skips the interpreter's start and, once its
atexit handlers have run and stdout and stderr are flushed, its teardown (os._exit). Requests:
one JSON line on stdin, [script, args, cwd, stdout path, stderr path]; replies: the child's pid,
then its exit status (as subprocess gives it), a line each. Only for runs that get no signal:
tests that send one start a fresh process.
"""

import atexit
import gc
import json
import os
import runpy
import sys

import numpy  # noqa: F401
import safetensors.torch  # noqa: F401
import torch  # noqa: F401
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

gc.freeze()  # the imports' objects: their pages stay shared with the children
for line in sys.stdin:
    script, args, cwd, out, err = json.loads(line)
    sys.stdout.flush()  # nothing of ours left for a child to write
    pid = os.fork()
    if pid == 0:
        break
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
else:
    sys.exit()

# the child, at the top level of this file as a script is at the top level of its own process
os.chdir(cwd)
for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT),
                        (2, err, os.O_WRONLY | os.O_CREAT)):
    f = os.open(path, flags)
    os.dup2(f, fd)
    os.close(f)
sys.argv, sys.path[0] = [script, *args], os.path.dirname(script)
status = 1  # an exception: the interpreter prints its traceback, and the status is 1


def leave():  # registered first, run last: after the script's own atexit handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


atexit.register(leave)
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
    status = 0
except SystemExit as e:  # the interpreter prints a message that is not a number
    status = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    raise
