"""``switchdit launch --nproc N -- train ...``: N ranks on this machine through torchrun's agent.

Processes: this launcher -> torchrun's elastic agent (a child running this module, in a session
of its own so that a Ctrl-C reaches the launcher alone) -> N ranks (one session each, as torchrun
starts them). The agent watches the ranks: when one dies (even by SIGKILL) it stops the others, so
a crashed job ends instead of hanging in a collective.

Before any rank starts, a ``train`` command is checked here in full (config values, the run
directory writable and free, the data readable, the settings a resume may not change) and a
problem is printed once.

Signals. SIGINT, SIGTERM and SIGUSR2 are passed to the agent as they are, and every other signal
that would end the launcher (SIGHUP, SIGQUIT, SIGUSR1, SIGALRM, SIGXCPU) as SIGTERM. The agent
passes it to every rank; the ranks agree on a step, checkpoint and exit (``train/signals.py``), and
ranks still running ``--stop-timeout`` seconds later are killed. A second signal kills every rank
at once (``latest`` stays on the previous checkpoint). ``launch`` exits with the ranks' code: the
earliest non-zero one (130 after SIGINT, 143 after SIGTERM, 3 after SIGUSR2, 2 after a
configuration error), or 0 when every rank finished; the ranks record it in a folder of the
launcher's (``EXIT_DIR_ENV``), since torchrun reports its own status instead.

No process is left behind: the launcher is the subreaper of its process tree, so ranks orphaned by
a dying agent become its children, and whatever is still alive when the agent has ended is
stopped (SIGTERM, then SIGKILL after the stop timeout). A SIGKILL of the launcher cannot be caught:
the kernel then sends the agent SIGTERM (a parent-death signal), which stops the ranks with a
checkpoint as above, but no exit code reaches the caller; if the agent is SIGKILLed too, each rank
gets SIGTERM the same way.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from switchdit_dist.errors import UserError

EXIT_DIR_ENV = "SWITCHDIT_EXIT_DIR"  # where each rank writes rank-R.exit: "CODE TIME_NS"
FOLLOW_ENV = "SWITCHDIT_FOLLOW_PID"  # the parent whose death ends this process (see follow_launcher)
DEFAULT_STOP_TIMEOUT = 120
# Signals the launcher passes on; those not listed but caught are passed on as SIGTERM.
_AS_IS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
_CAUGHT = (*_AS_IS, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGALRM, signal.SIGXCPU)
# torchrun's agent turns these into a shutdown that passes the same signal to every rank.
_AGENT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
# The agent starts before the launcher's checks and waits on this pipe for _GO (see _Launch.run).
_GO_FD_ENV, _GO = "SWITCHDIT_AGENT_GO_FD", b"go"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc", type=int, required=True, help="number of ranks (processes) on this machine"
    )
    parser.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: a free one)")
    parser.add_argument(
        "--stop-timeout",
        type=int,
        default=DEFAULT_STOP_TIMEOUT,
        help=f"seconds ranks get to checkpoint and exit after a signal or a failed rank (default "
        f"{DEFAULT_STOP_TIMEOUT}), then they are killed",
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="-- SUBCOMMAND ARGS (e.g. -- train --config ...)"
    )


def _strip(command: list[str]) -> list[str]:
    return command[1:] if command and command[0] == "--" else command


def build_command(nproc: int, command: list[str], port: int = 0, stop_timeout: int = DEFAULT_STOP_TIMEOUT):
    """The agent's command line: this module, given torchrun's arguments."""
    command = _strip(command)
    if not command:
        raise UserError(
            "launch: nothing to run; usage: switchdit launch --nproc N -- train --config ... --run-dir ..."
        )
    if nproc < 1:
        raise UserError(f"launch: --nproc must be >= 1, got {nproc}")
    if stop_timeout < 1:
        raise UserError(f"launch: --stop-timeout must be >= 1 second, got {stop_timeout}")
    rdzv = [f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-backend=c10d"] if port else ["--standalone"]
    return [
        sys.executable,
        "-m",
        "switchdit_dist.launch.local",
        *rdzv,
        f"--nproc-per-node={nproc}",
        "--max-restarts=0",
        f"--shutdown-timeout={stop_timeout}",
        f"--signals-to-handle={_AGENT_SIGNALS}",
        "-m",
        "switchdit_dist.cli",
        *command,
    ]


def run(args: argparse.Namespace) -> int:
    cmd = build_command(args.nproc, list(args.command), args.master_port, args.stop_timeout)
    command = _strip(list(args.command))
    env = dict(os.environ)
    # One thread per rank unless the user chose otherwise: ranks oversubscribe small machines.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    exit_dir = Path(tempfile.mkdtemp(prefix="switchdit-launch-"))
    env.update({EXIT_DIR_ENV: str(exit_dir), FOLLOW_ENV: str(os.getpid())})

    def precheck() -> None:
        if command[0] == "train":
            _check_train(command[1:], args.nproc)

    try:
        return _Launch(cmd, env, args.nproc, args.stop_timeout, exit_dir).run(precheck)
    except KeyboardInterrupt:  # Ctrl-C during the checks, before any rank started
        return 128 + signal.SIGINT
    finally:
        shutil.rmtree(exit_dir, ignore_errors=True)  # this launcher's own folder; its ranks are gone


def _check_train(argv: list[str], nproc: int) -> None:
    """Every check of ``train`` that needs no process group, once, before any rank starts."""
    from switchdit_dist.cli import parse_args
    from switchdit_dist.train.command import precheck

    precheck(parse_args(["train", *argv]), nproc)


class _Launch:
    def __init__(self, cmd: list[str], env: dict[str, str], nproc: int, stop_timeout: int, exit_dir: Path):
        self.cmd, self.env, self.nproc = cmd, env, nproc
        self.stop_timeout, self.exit_dir = stop_timeout, exit_dir
        self.proc: subprocess.Popen | None = None
        self.first: int | None = None  # the first signal received
        self.deadline: float | None = None  # when to stop waiting for the agent after a signal

    def run(self, precheck: Callable[[], None]) -> int:
        """Start the agent, run ``precheck`` while it imports torch (seconds that would otherwise
        come one after the other), then let it start the ranks; if ``precheck`` raises, the agent
        ends without starting any."""
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        go_read, go_write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                env={**self.env, _GO_FD_ENV: str(go_read)},
                pass_fds=(go_read,),
                start_new_session=True,
            )
        finally:
            os.close(go_read)
        try:
            precheck()
        except BaseException:
            os.close(go_write)  # end of file: the agent exits without a word
            self.proc.wait()
            raise
        for sig in _CAUGHT:
            signal.signal(sig, self._on_signal)
        try:
            os.write(go_write, _GO)
            os.close(go_write)
            agent_code = self._wait()
        finally:
            self._end_leftovers()
        return self._exit_code(agent_code)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.first is None:
            self.first = signum
            self.deadline = time.monotonic() + self.stop_timeout + 30
            passed = signal.Signals(signum if signum in _AS_IS else signal.SIGTERM).name
            _say(
                f"received {name}: passing {passed} to the ranks, which checkpoint and stop "
                "(a second signal stops them at once, without a checkpoint)"
            )
            if self.proc is not None:
                self._forward(signum)
        else:
            _say(f"received {name}, a second signal: stopping the ranks now, without a checkpoint")
            _kill_tree(signal.SIGKILL)

    def _forward(self, signum: int) -> None:
        assert self.proc is not None
        try:
            os.kill(self.proc.pid, signum if signum in _AS_IS else signal.SIGTERM)
        except ProcessLookupError:
            pass

    def _wait(self) -> int:
        assert self.proc is not None
        while True:
            try:
                return self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    _say(f"the ranks did not stop within {self.stop_timeout} s; killing them")
                    _kill_tree(signal.SIGKILL)
                    self.deadline = None

    def _end_leftovers(self) -> None:
        """Stop what outlived the agent (ranks it orphaned reparent to this subreaper)."""
        left = _descendants()
        if left:
            _signal_all(left, signal.SIGTERM)
            end = time.monotonic() + self.stop_timeout
            while _descendants() and time.monotonic() < end:
                _reap()
                time.sleep(0.1)
            _kill_tree(signal.SIGKILL)
        _reap()

    def _exit_code(self, agent_code: int) -> int:
        records = []
        for file in self.exit_dir.glob("rank-*.exit"):
            try:
                code, when = file.read_text().split()
                records.append((int(when), int(code)))
            except (OSError, ValueError):
                continue
        failed = sorted(r for r in records if r[1] != 0)
        if failed:
            return failed[0][1]
        if len(records) == self.nproc:
            return 0
        return 128 - agent_code if agent_code < 0 else agent_code  # < 0: the agent died of a signal


def _say(text: str) -> None:
    try:
        print(f"switchdit launch: {text}", file=sys.stderr, flush=True)
    except OSError:  # the terminal is gone (SIGHUP)
        pass


# --- processes ----------------------------------------------------------------------------------


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> live child pids, from /proc (zombies left out)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _descendants(root: int | None = None) -> list[int]:
    children = _children_map()
    found, todo = [], [os.getpid() if root is None else root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_tree(sig: int) -> None:
    for _ in range(3):  # again, for children forked while the first pass ran
        _signal_all(_descendants(), sig)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def follow_launcher() -> None:
    """In a process started by ``switchdit launch`` (its agent, or a rank started by the agent):
    receive SIGTERM when that parent dies, even by SIGKILL, so that nothing outlives it."""
    pid = int(os.environ.get(FOLLOW_ENV) or 0)
    if pid <= 0 or not _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM):
        return
    if os.getppid() != pid and not _alive(pid):  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def record_exit(code: int) -> None:
    """A rank of ``switchdit launch`` writes its exit code for the launcher (see the docstring)."""
    folder, rank = os.environ.get(EXIT_DIR_ENV), os.environ.get("RANK")
    if not folder or rank is None or str(os.getppid()) != os.environ.get(FOLLOW_ENV):
        return  # not a rank the agent started (e.g. a process a rank started)
    try:
        Path(folder, f"rank-{int(rank)}.exit").write_text(f"{code} {time.time_ns()}\n")
    except (OSError, ValueError):
        pass


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# --- the agent ----------------------------------------------------------------------------------


def agent_main(argv: list[str]) -> int:
    """torchrun's agent, with its exit status as a code instead of a traceback: 128 + the signal
    that stopped it, or the first failed rank's code."""
    follow_launcher()
    os.environ[FOLLOW_ENV] = str(os.getpid())  # the ranks follow the agent
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not _wait_for_go():
        return 0  # the launcher's checks failed and it said why
    try:
        run(parse_args(argv))
    except SignalException as err:
        return 128 + int(err.sigval)
    except KeyboardInterrupt:  # SIGINT before the agent installed its handler
        return 128 + signal.SIGINT
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        return failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode
    return 0


def _wait_for_go() -> bool:
    fd = os.environ.pop(_GO_FD_ENV, None)
    if fd is None:  # started by hand, not by the launcher
        return True
    with os.fdopen(int(fd), "rb") as pipe:
        return pipe.read() == _GO


if __name__ == "__main__":
    code = agent_main(sys.argv[1:])
    gc.freeze()  # see switchdit_dist.cli.console_main
    sys.exit(code)
