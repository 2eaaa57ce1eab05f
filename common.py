"""
What every script needs around its work, apart from its settings (configurator.py): one-line errors
and interrupts, writes that land whole, progress lines, the device and its processes (torchrun),
torch.compile with a way back, and the numbers a run reports about its machine (peak memory, MFU).
It imports nothing of the project.
"""

import os
import re
import sys
import time


def error(msg):  # one line and exit status 1; under torchrun rank 0 alone prints it
    raise SystemExit(msg if int(os.environ.get("RANK", 0)) == 0 else 1)


def die(msg):
    """SCRIPT: error: msg, and exit status 1: the one way every script stops on bad input (no
    traceback)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    error(f"{os.path.basename(sys.argv[0]) or 'config'}: error: {msg}")


def check_writable(folder, setting):
    """die() unless folder is, or can be made, a writable folder; creates nothing (a failed run
    leaves no empty folder behind)."""
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    probe = os.path.join(parent, f".write-probe-{os.getpid()}")
    try:
        if not os.path.isdir(parent):
            raise NotADirectoryError(f"{parent} is a file")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        die(f"cannot write to {setting} {folder} ({e.strerror or e}); choose another --{setting}")


def one_line_errors(what="rerun the same command"):
    """From here on the script ends with one line on stderr, not a traceback, when: Ctrl-C or
    SIGTERM come (status 130: for phases that rename their files into place only when whole, so
    nothing half-written is taken as complete); a write fails (WriteError: a full disk, a quota, a
    read-only folder; status 1); memory runs out (status 1: the phase, the peak, what to change, as
    phase() set them). what: the way on after an interrupt or a failed write, or a function that
    says it at that moment."""
    import signal

    def hook(kind, value, tb):
        way_on = what() if callable(what) else what
        if issubclass(kind, KeyboardInterrupt):
            msg, status = f"interrupted; nothing half-written is taken as complete: {way_on}", 130
        elif issubclass(kind, WriteError):
            msg, status = f"error: {write_failed(value)}; make room, then {way_on}", 1
        elif out_of_memory(value):
            msg, status = f"error: {memory_message(value)}", 1
        else:
            return sys.__excepthook__(kind, value, tb)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{os.path.basename(sys.argv[0])}: {msg}", file=sys.stderr, flush=True)
        os._exit(status)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    sys.excepthook = hook
    signal.signal(signal.SIGTERM, interrupt)


def stop_requests(what):
    """From here on Ctrl-C and SIGTERM (what torchrun sends its workers) only ask to stop: the
    returned function says whether one came, for a loop to stop after its step. A second Ctrl-C
    aborts as one_line_errors(what) does, a second SIGTERM at once."""
    import signal

    requests = []

    def request(signum, frame):
        requests.append(signum)
        again = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, again)

    one_line_errors(what)
    signal.signal(signal.SIGINT, request)
    signal.signal(signal.SIGTERM, request)
    return lambda: bool(requests)


# -----------------------------------------------------------------------------
# writes that land whole, or fail in one line


class WriteError(OSError):
    """A write that failed (a full disk, a quota, a read-only folder, an I/O error), its temporary
    file removed and the earlier file whole; need: the bytes it wanted, where known. Scripts under
    one_line_errors() end on it with one line (write_failed)."""

    def __init__(self, e, path, need=None):
        super().__init__(e.errno, e.strerror or str(e), path)
        self.need = need


class _Remembered:
    # a file whose failed writes are remembered: torch.save reports them as "unexpected pos"
    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_write(path, write, mode="wb", need=None):
    """write(f) fills a temporary file beside path, opened in mode, which then is renamed over
    path: never half a file, and the earlier one whole until the new one is complete. A failed
    write (OSError, or one that torch.save turns into a RuntimeError) removes the temporary file
    and raises WriteError naming path; need: the bytes it takes, for the message."""
    tmp = path + ".tmp"
    f = None
    try:
        with open(tmp, mode) as raw:
            f = _Remembered(raw)
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else f.error if f is not None else None
        if cause is None:
            raise
        raise WriteError(cause, path, need) from None


def disk_free(path):  # free bytes where path is, or would be created
    import shutil

    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def check_room(folder, ckpt_bytes, log=print):
    """die() unless folder's disk holds a checkpoint of ckpt_bytes; a warning unless it holds what
    a run writes at most: a checkpoint, the next one beside it before it replaces it, the export
    (the weights again, a third of a checkpoint)."""
    free, most = disk_free(folder), 2.4 * ckpt_bytes
    if free < ckpt_bytes:
        die(f"{folder} has {gb(free)} free; a checkpoint of this student takes ~{gb(ckpt_bytes)} "
            f"(its weights and AdamW's moments): make room, or choose another --out_dir")
    if free < most:
        log(f"warning: {folder} has {gb(free)} free; this run writes up to ~{gb(most)} (a "
            f"checkpoint, the next one beside it, the export)")


def gb(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.1f} MB"


def write_failed(e):
    """The one line for a write that failed: the file, the error, the bytes needed and free."""
    free = disk_free(os.path.dirname(os.path.abspath(e.filename or ".")))
    need = getattr(e, "need", None)
    space = (f"it needs ~{gb(need)}, " if need else "") + f"{gb(free)} free there"
    return f"cannot write {e.filename}: {e.strerror} ({space})"


# -----------------------------------------------------------------------------
# running out of memory: the phase, the peak, what to change

_phase = {"name": "the run", "hint": "lower batch_size", "device": "cpu"}


def phase(name, hint, device):
    """From here on an out-of-memory error names this phase and suggests hint (one_line_errors)."""
    _phase.update(name=name, hint=hint, device=device)


def out_of_memory(e):
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"


def memory_message(e):
    peak, _ = peak_mem_gb(_phase["device"])
    if _phase["device"].startswith("cuda"):
        import torch

        total = torch.cuda.get_device_properties(_phase["device"]).total_memory / 1e9
        where = f"GPU memory ({peak:.2f} GB at the peak of {total:.1f} GB)"
    else:
        where = f"memory ({peak:.2f} GB resident at the peak)"
    return f"out of {where} in {_phase['name']}: {_phase['hint']}"


def first_line(e):
    return (str(e).splitlines() or [type(e).__name__])[0]


def check_device(device):
    import torch

    if device.startswith("cuda") and (torch.device(device).index or 0) >= torch.cuda.device_count():
        die(f"device={device}, but this machine has {torch.cuda.device_count() or 'no'} CUDA "
            f"device(s); use --device=cpu")


def init_processes(device):
    """torchrun's processes (RANK in the environment) or this one alone -> (ddp, rank, local_rank,
    world_size, device). Under torchrun a cuda device becomes the local rank's GPU and the process
    group starts: NCCL on GPUs, gloo on CPUs. die() if the device is not there (check_device)."""
    import torch
    import torch.distributed as dist

    ddp = "RANK" in os.environ  # launched by torchrun / torch.distributed.run
    rank, local_rank, world_size = (0, 0, 1)
    if ddp:
        env = os.environ
        rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
        world_size = int(env["WORLD_SIZE"])
    if ddp and device.startswith("cuda"):
        device = f"cuda:{local_rank}"
    check_device(device)
    if ddp:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return ddp, rank, local_rank, world_size, device


def end_processes():
    """The end of a torchrun run: each process waits for the others (rank 0's last files), then the
    process group goes. The caller drops its DDP wrapper first: one still alive holds the group,
    and at exit gloo then aborts a process now and then (SIGABRT)."""
    import gc

    import torch.distributed as dist

    gc.collect()  # the dropped wrapper and its reducer, which hold the group
    dist.barrier()
    dist.destroy_process_group()


def check_bfloat16(device, **dtypes):
    """die() if a setting (given as name=dtype) asks for bfloat16 on a GPU before sm80, where
    model.auto_dtype picks float16: such a GPU only emulates bfloat16."""
    import torch

    which = next((name for name, dtype in dtypes.items() if dtype == "bfloat16"), None)
    if device.startswith("cuda") and which and torch.cuda.get_device_capability(device) < (8, 0):
        sm = "".join(map(str, torch.cuda.get_device_capability(device)))
        die(f"{which}=bfloat16, but this GPU (sm{sm}) only emulates bfloat16, slowly, and its "
            f"fused attention does not take it: use float16")


# MFU: dense peak FLOP/s per dtype (float32 means TF32 where the GPU has it; a T4's float16 tensor
# cores are 8x its float32). The first entry whose words are all in the GPU's name wins.
PEAK_FLOPS = [
    (("H200",), {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    (("H100", "PCIe"), {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    (("H100",), {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    (("A100",), {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    (("L4",), {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12}),
    (("A10G",), {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12}),  # A10's data sheet
    (("A10",), {"bfloat16": 125e12, "float16": 125e12, "float32": 62.5e12}),
    (("V100",), {"float16": 125e12, "float32": 15.7e12}),
    (("T4",), {"float16": 65e12, "float32": 8.1e12}),
]


def peak_mem_gb(device):
    """(allocated, reserved): on CUDA the most held by tensors and by its cache; on a CPU the peak
    RSS and None."""
    import resource

    import torch

    if device.startswith("cuda"):
        return (torch.cuda.max_memory_allocated(device) / 1e9,
                torch.cuda.max_memory_reserved(device) / 1e9)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, None  # Linux: KiB


def clock(device):  # a point in time, read later without a wait: a CUDA event on a GPU
    import torch

    if not str(device).startswith("cuda"):
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds(a, b):  # between two clock() points, once a sync has passed both
    return b - a if isinstance(a, float) else a.elapsed_time(b) / 1e3


def time_at_peak(device, parts):
    """The seconds that parts, [(FLOPs, dtype name)], would take at the device's dense peaks, each
    at its dtype's. None (MFU null, not a wrong number) on CPUs and GPUs not in PEAK_FLOPS."""
    import torch

    if not device.startswith("cuda"):
        return None
    words = torch.cuda.get_device_name(device).replace("-", " ").split()
    peaks = next((p for names, p in PEAK_FLOPS if all(w in words for w in names)), {})
    if not all(d in peaks for _, d in parts):
        return None
    return sum(f / peaks[d] for f, d in parts)


# loss._add_grad_w: torch.addmm(float32 grad_w, half G.T, half h, out_dtype=torch.float32,
# out=grad_w), a half head's gradient accumulated in float32 on CUDA. 2.8 and 2.9 refuse a float32
# self with half operands; 2.10 takes it (docs/benchmarks.md: how this was checked)
TORCH_FLOOR = (2, 10)


def check_torch():
    """A torch below the floor (requirements.txt) stops a run at its first line, not with a
    TypeError mid-run."""
    import torch

    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        die(f"torch {torch.__version__} is installed; this code needs torch >= {floor} "
            f"(pip install 'torch>={floor}')")


class progress:
    """A long phase's progress: tqdm (on stderr) when stdout and stderr are a terminal; elsewhere
    (Colab's !python, a log file, a pipe), where tqdm would print nothing or a wall of carriage
    returns, a plain line on stdout, with the script's other lines, after the first update and then
    every `every` seconds: done, rate, ETA. stderr keeps only errors, so a failure or an interrupt
    is still one line there.

        bar = progress(total, "teacher cache", unit="tokens")
        bar.update(n); ...; bar.close()
    """

    def __init__(self, total, desc, unit="it", every=30.0, enabled=True, file=None):
        self.total, self.desc, self.unit, self.every, self.n = total, desc, unit, every, 0
        terminal = file is None and sys.stdout.isatty() and sys.stderr.isatty()
        self.file, self.clock, self.bar = file or sys.stdout, time.monotonic, None
        self.start = self.last = self.clock()
        if not enabled:
            self.update = self.close = lambda *a, **k: None
        elif terminal:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=" " + unit, file=sys.stderr,
                            unit_scale=True)

    def update(self, n=1):
        first, self.n = self.n == 0, self.n + n
        if self.bar is not None:
            return self.bar.update(n)
        if first or self.clock() - self.last >= self.every:  # the first line: a rough ETA, early
            self.last = self.clock()
            self.line()

    def line(self, end=""):
        took = self.clock() - self.start
        rate = self.n / took if took > 0 else 0.0
        # the last line (end): a total that was an estimate leaves nothing "left"
        going = rate and self.total and self.n < self.total and not end
        eta = f", {(self.total - self.n) / rate:.0f} s left" if going else ""
        done = f"{self.n:,}/{self.total:,}" if self.total else f"{self.n:,}"
        print(f"{self.desc}: {done} {self.unit}, {rate:,.1f} {self.unit}/s{eta}{end}",
              file=self.file, flush=True)

    def close(self):  # done: a total that was an estimate becomes the count
        self.total = self.n
        if self.bar is not None:
            self.bar.total = self.n
            return self.bar.close()
        self.line(end=f", done in {self.clock() - self.start:.0f} s")


def compiled(module, what):
    """torch.compile(module), or the module itself where compiling fails (no C++ compiler, no
    Triton for the GPU): a warning naming `what`, then eager from there on. An nn.Module that DDP
    can wrap; its attributes are the module's. A compile runs at the first call (and again at a
    new shape), so that is where it can fail: the call is then repeated eagerly."""
    import torch

    class CompiledOrEager(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = module
            self.fast = [torch.compile(module)]  # a list: not a second registered submodule

        def forward(self, *args, **kwargs):
            if self.fast:
                try:
                    return self.fast[0](*args, **kwargs)
                except torch.OutOfMemoryError:  # not a compile failure: the caller reports it
                    raise
                except Exception as e:  # noqa: BLE001 (torch.compile's failures have many types)
                    self.fast.clear()
                    first = (str(e).strip().splitlines() or [""])[0][:200]
                    import warnings
                    warnings.warn(f"{what}: torch.compile failed ({type(e).__name__}: {first}); "
                                  f"it runs eager instead", stacklevel=2)
            return self.module(*args, **kwargs)

        def __getattr__(self, name):  # lm_head, config, flops_per_token, ...: the module's
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return CompiledOrEager()
