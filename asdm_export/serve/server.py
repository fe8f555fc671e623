"""Run NVIDIA Triton Inference Server on a model repository, with the server that the ``nvidia-pytriton`` wheel
carries (``tritonserver``, its Python backend and one backend stub per Python version).

PyTriton binds Python callables to that server, but answers a failed batch with one error (a traceback) for
every request in it; a text-to-image server must refuse one bad request and serve the others of its batch.
So the project writes a standard model repository (``repo.py``) whose Python-backend model answers each
request on its own (``model.py``), and starts the same server binary on it here, as one would on a GPU node.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, MissingBackendError, StageError, first_line
from ..limits import EXIT_TIMEOUT_MAX
from . import procs

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'asdm-export[serve]' (the nvidia-pytriton wheel: Linux x86_64 or aarch64)"


# What Triton logs as errors on a machine without a GPU although nothing is wrong (not the cause of a failure).
CPU_NOTICES = ("CudaDriverHelper", "Unable to allocate pinned system memory", "Failed to set cuda device")
# What the ``asdm`` model logs around each batch it runs, "... N request(s) on INSTANCE" (``model.py``), counted
# by ``TritonServer.drained`` and ``wait``.
EXECUTING, EXECUTED = "asdm: executing", "asdm: executed"
EXPIRED = "Exit timeout expired"  # Triton's log when a stop ran out of time
SHM_PREFIX = "triton_python_backend_shm_region_"  # a Python-backend stub's shared memory, in /dev/shm
STUB = "triton_python_backend_stub"  # the process that runs one instance of a Python-backend model
WATCH_SECONDS = 1.0  # how often ``wait`` looks at the backend stubs


def triton_distribution() -> tuple[Path, Path, Path]:
    """(tritonserver binary, its Python backend folder, the backend stub for this Python) from nvidia-pytriton."""
    try:
        from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path
    except ImportError:
        raise MissingBackendError(f"serving needs NVIDIA Triton Inference Server; install it with {INSTALL_HINT}") \
            from None
    root = get_root_module_path() / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    binary, stub = root / "bin" / "tritonserver", Path(get_stub_path(version))
    if not binary.is_file() or not stub.is_file():
        raise MissingBackendError(f"nvidia-pytriton has no Triton server for Python {version} on this platform "
                                  f"({binary if not binary.is_file() else stub} is missing); {INSTALL_HINT}")
    return binary, root / "backends" / "python", stub


def server_env(libs: Path) -> dict[str, str]:
    """The server's environment. The backend stub embeds libpython: it must load this interpreter's own
    (e.g. pyenv's, found through LIBDIR), not an older system one of the same minor version, whose
    stdlib would not match (seen: Debian's 3.11.2 library with pyenv's 3.11.7 stdlib fails in
    multiprocessing). The stub finds this environment's packages through the python on PATH."""
    env = os.environ.copy()
    paths = [str(libs)]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and any(Path(libdir).glob(f"libpython{sys.version_info[0]}.{sys.version_info[1]}*.so*")):
        paths.insert(0, libdir)
    env["LD_LIBRARY_PATH"] = ":".join(paths + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")  # instances share the cores; each sets its own thread count
    return env


def _die_with_parent():
    """A ``preexec_fn`` that makes the kernel SIGTERM the server when the thread that started it dies (Linux
    ``PR_SET_PDEATHSIG``), so a killed ``asdm-export serve`` leaves no server holding its ports. libc is
    loaded here, in the parent: between fork and exec the child only makes the call. (The server has its own
    session, so a terminal's Ctrl-C reaches only ``serve``, which forwards it as a drain.) Only from the main
    thread: the signal follows the thread, so a server started from a worker thread (a web app's start-up
    hook, a thread pool) would stop when that thread ends; there ``stop()`` is the caller's to call."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: no such call
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _stubs(pgid: int) -> dict[int, tuple[str, str | None]]:
    """The backend stubs of a server's process group: pid -> (model instance, shared-memory region), read from
    their command lines (python_backend's stub launcher: stub, model.py, region, two sizes, parent pid, backend
    folder, IPC handle, instance name, runtime)."""
    found = {}
    for pid in procs.group_members(pgid):
        args = procs.command_line(pid)
        if args and Path(args[0]).name == STUB:
            region = next((a for a in args if a.startswith(SHM_PREFIX)), None)
            found[pid] = (args[8] if len(args) > 8 else "?", region)
    return found


def _batches_open(log_text: str, ignore: set[str] = frozenset()) -> int:
    """Batches of the ``asdm`` model that a server's log shows started and not ended, but for those of the
    instances in ``ignore`` (dead ones: theirs never end)."""
    open_ = {}
    # only where a log message starts (after Triton's "file:line] ", quoted by recent releases): a request id
    # that a cancelled request's line quotes cannot count as a batch
    for kind, instance in re.findall(rf'\] "?({EXECUTING}|{EXECUTED}) \d+ request\(s\)(?: on ([^\s"]+))?', log_text):
        open_[instance] = open_.get(instance, 0) + (1 if kind == EXECUTING else -1)
    return sum(n for instance, n in open_.items() if instance not in ignore)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> "Ports":
        return cls(free_port(), free_port(), free_port())


class TritonServer:
    """``tritonserver`` on ``repo`` as a child process: ``start()`` returns once every model is ready (or
    raises with the server's reason), ``stop()`` sends SIGTERM, which makes Triton refuse new requests,
    finish the ones in flight (up to ``exit_timeout`` seconds) and exit."""

    def __init__(self, repo: Path, ports: Ports | None = None, host: str = "127.0.0.1", exit_timeout: int = 60,
                 log_file: Path | None = None, verbose: bool = False, owns_repo: bool = False,
                 batch_delay: float = 0.0):
        """``batch_delay``: the longest the ``asdm`` model's batcher holds a request (``wait``)."""
        self.repo, self.ports, self.host = Path(repo), ports or Ports(), host
        self.batch_delay = batch_delay
        self.exit_timeout, self.verbose = exit_timeout, verbose
        self.log_file = Path(log_file) if log_file is not None else None
        self.owns_repo = owns_repo  # a repository written for this server only: removed when it stops
        self.process: subprocess.Popen | None = None
        self._work: Path | None = None
        self.stubs: dict[int, tuple[str, str | None]] = {}  # backend stubs once ready: pid -> (instance, region)
        self.lost: str | None = None  # a model instance that died while serving (``wait``)
        self._dead: set[str] = set()  # its name
        self._draining = False

    @property
    def url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    def command(self, binary: Path, backends: Path) -> list[str]:
        return [str(binary), f"--model-repository={self.repo.resolve()}", f"--backend-directory={backends}",
                f"--http-port={self.ports.http}", f"--grpc-port={self.ports.grpc}",
                f"--metrics-port={self.ports.metrics}", f"--http-address={self.host}",
                f"--grpc-address={self.host}", "--allow-metrics=true", "--allow-gpu-metrics=false",
                f"--exit-timeout-secs={self.exit_timeout}", "--strict-readiness=true",
                f"--log-verbose={1 if self.verbose else 0}"]

    def start(self, timeout: float = 300.0) -> "TritonServer":
        binary, python_backend, stub = triton_distribution()
        from pytriton.utils.distribution import get_libs_path

        # the Python backend's folder with the stub for this Python (the wheel keeps one stub per version)
        self._work = Path(tempfile.mkdtemp(prefix="asdm-triton-"))
        backend = self._work / "backends" / "python"
        backend.mkdir(parents=True)
        for item in python_backend.iterdir():
            if item.is_file():
                (backend / item.name).symlink_to(item)
        shutil.copy(stub, backend / "triton_python_backend_stub")
        self.log_file = self.log_file or self._work / "tritonserver.log"
        try:
            out = open(self.log_file, "wb")
        except OSError as err:
            self.stop()
            raise InputError(f"cannot write Triton's log '{self.log_file}' ({err.strerror}); pass a writable "
                             "--log path") from None
        with out:
            # in its own folder: the backend stubs' Python puts the current folder first on its path, and a
            # checkout's asdm_export there would be run instead of the one installed (model.check_package)
            self.process = subprocess.Popen(self.command(binary, self._work / "backends"), stdout=out,
                                            stderr=subprocess.STDOUT, env=server_env(Path(get_libs_path())),
                                            start_new_session=True, preexec_fn=_die_with_parent(), cwd=self._work)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    said = self.failure()
                    error = InputError if self.failed_on_input(said) else StageError
                    raise error(f"Triton Inference Server exited with code {self.process.returncode} while "
                                f"starting: {said}")
                if self.ready():
                    self.stubs = _stubs(self.process.pid)
                    return self
                time.sleep(0.25)
            raise StageError(f"Triton Inference Server was not ready after {timeout:.0f} s: {self.failure()}")
        except BaseException as err:  # a failed start, Ctrl-C or SIGTERM while loading: no server left behind
            self.stop(timeout=10, failed=isinstance(err, (StageError, InputError)))
            raise

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, OSError):
            return 0

    def ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def live(self) -> bool:
        return self._get("/v2/health/live") == 200

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.host}:{self.ports.metrics}/metrics", timeout=5) as r:
            return r.read().decode()

    def pending(self) -> int | None:
        """Requests Triton holds for the ``asdm`` model that no instance has taken yet (its metrics); None where
        they cannot be read."""
        try:
            text = self.metrics()
        except (OSError, ValueError):
            return None
        return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                   if line.startswith('nv_inference_pending_request_count{model="asdm"'))

    def failure(self) -> str:
        """The line of the server's log that says why it stopped (the log holds the rest): a batch cut off at
        the exit timeout, a model that failed to load, else the first error that is not one of the notices a
        CPU-only server logs."""
        if self.lost:
            return f"{self.lost} (log: {self.log_file})"
        text = self._log_text()
        if EXPIRED in text and _batches_open(text) > 0:
            return (f"the exit timeout ({self.exit_timeout} s) ran out while a batch was running: its requests were "
                    f"cut off; allow longer with --exit-timeout (log: {self.log_file})")
        errors = [line.strip() for line in text.splitlines()
                  if (line.startswith("E") or "error" in line.lower()) and not any(n in line for n in CPU_NOTICES)]
        line = next((e for e in errors if "failed to load" in e), errors[0] if errors else None)
        line = line and line.split("\\n")[0].rstrip('.\"')  # a Python error's escaped traceback follows its message
        return f"{line[:400]} (log: {self.log_file})" if line else f"see {self.log_file}"

    def failed_on_input(self, said: str | None = None) -> bool:
        """Whether the model failed to load on bad input (our InputError, raised in the model's ``initialize``);
        ``said``: ``failure()``'s line when the caller has it already (the log is read once)."""
        return "InputError" in (said if said is not None else self.failure())

    def drained(self) -> bool:
        """Whether a server that exited 1 on "Exit timeout expired" had finished every inference. Triton waits
        for its HTTP connections to close before it drains the models (triton-inference-server/server#6986):
        a client that keeps an idle keep-alive connection open, as tritonclient's does, uses up the exit
        timeout, and Triton then reports a failed stop though no request was lost. Triton's count of
        in-flight inferences stays 0 for a Python-backend model while it runs a batch, so the ``asdm``
        model's own log lines around each batch say whether one was cut off."""
        text = self._log_text()
        in_flight = re.findall(r"Found (\d+) model versions that have in-flight inferences", text)
        return EXPIRED in text and bool(in_flight) and in_flight[-1] == "0" and _batches_open(text) == 0

    def _log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file and self.log_file.is_file() else ""

    def stop(self, timeout: float | None = None, failed: bool | None = None) -> int | None:
        """SIGTERM, then wait for the drain; the server's exit code, 0 also where the only thing left at the
        exit timeout was idle client connections (``drained``). What the server leaves running (backend stubs
        it abandoned at the exit timeout) is killed, and its temporary folders go, except a temporary log of a
        server that failed (``failed``; None: an exit code other than 0 or a lost instance; the error names the
        log). A server that lost an instance (``lost``, seen by ``wait``) may still exit 0: check ``lost``."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.drain()
                try:
                    self.process.wait(timeout=timeout or self.exit_timeout + 30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self._kill_group()
            code = self.process.returncode
            if code not in (0, None) and not failed and not self.lost and self.drained():
                log.info("client connections were still open when the exit timeout ran out; every request had "
                         "finished")
                code = 0
        if self._work is not None:
            temporary_log = self.log_file is not None and self._work in self.log_file.parents
            failed = failed if failed is not None else code not in (0, None) or bool(self.lost)
            keep_log = temporary_log and failed
            shutil.rmtree(self._work / "backends" if keep_log else self._work, ignore_errors=True)
        if self.owns_repo:
            shutil.rmtree(self.repo, ignore_errors=True)
        return code

    def _kill_group(self) -> None:
        """SIGKILL what is left of the server's process group (it leads its own session): the backend stubs
        of a server that exited on "Exit timeout expired" keep running (and holding memory) after it, and
        ignore SIGTERM. A stub's shared-memory region (its command line names it) outlives a SIGKILL: unlinked
        here. Nothing is left after a clean exit."""
        regions = {arg for pid in procs.group_members(self.process.pid) for arg in procs.command_line(pid)
                   if arg.startswith(SHM_PREFIX)}
        regions |= {region for _, region in self.stubs.values() if region}  # a dead stub's command line is empty
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for region in regions:
            (Path("/dev/shm") / region).unlink(missing_ok=True)

    def drain(self) -> None:
        """SIGTERM, once: Triton refuses new requests, finishes those in flight (up to the exit timeout), unloads
        the models and exits; ``wait`` or ``stop`` collects it."""
        if not self._draining and self.process is not None and self.process.poll() is None:
            self._draining = True
            self.process.send_signal(signal.SIGTERM)

    def wait(self, poll: float = WATCH_SECONDS) -> int:
        """Until the server exits; its exit code. Meanwhile its backend stubs are watched, through a drain too:
        Triton does not restart one that dies (killed, out of memory, a crash in native code) and goes on
        sending it its share of the requests, each answered 500, while it reports ready. So a dead stub drains
        the server, and ``lost`` says which instance died and how, for a supervisor to restart the server.
        Triton's drain then waits out its exit timeout for the dead instance: once the live instances have had
        no batch open and Triton no request waiting (it still takes them on connections open before the drain)
        for longer than the batcher holds a request, the server is killed instead."""
        idle_since = None
        while True:
            try:
                return self.process.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                pass
            self._watch()
            if not self.lost:
                continue
            if _batches_open(self._log_text(), ignore=self._dead) > 0 or self.pending() != 0:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > self.batch_delay + poll:
                log.info("nothing left to finish but the dead instance's unload: stopping the server now")
                self._kill_group()

    def _watch(self) -> None:
        """Record a stub that died: killed by a signal or failed (a zombie Triton has not reaped keeps its wait
        status), or gone while the server is ready; one that exits 0 as its server unloads has not died."""
        ready = None  # asked once per look, and only about a stub that is gone
        for pid, (instance, _) in self.stubs.items():
            if instance in self._dead:
                continue
            ended, status = procs.ended(pid)
            if not ended or status == 0:
                continue
            if status is None:
                ready = self.ready() if ready is None else ready
                if not ready:  # a server that is stopping: its stubs end as they should
                    continue
            self._dead.add(instance)
            self.lost = self.lost or (f"model instance {instance} (pid {pid}) {procs.death(status)} while serving; "
                                      "Triton does not restart an instance: start the server again")
            log.warning("model instance %s died; stopping the server (its requests in flight finish)", instance)
            self.drain()

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(engines: Path | str, *, port: int | None = None, host: str = "127.0.0.1", backend: str | None = None,
          provider: str | None = None, device: str | None = None, dtype: str | None = None,
          scheduler: str | None = None, instances: int = 1, max_batch: int | None = None, delay_us: int | None = None,
          threads: int = 0, exit_timeout: int = 60, max_queue: int = 0, queue_timeout_us: int = 0,
          log_file: Path | None = None, start_timeout: float = 600.0) -> TritonServer:
    """Serve ``engines`` (an engine folder or a bundle) as the ``asdm`` model on a started Triton server:
    HTTP on ``port`` (gRPC port + 1, metrics port + 2; free ports when None). Stop it with ``stop()``.
    ``delay_us``: the batcher's hold, ``repo.SERVE_DELAY_US`` when None; ``scheduler``: a sampler of
    ``runtime.schedulers.SCHEDULERS`` in place of the folder's own."""
    from .repo import SERVE_DELAY_US, write_serving_repo

    delay_us = SERVE_DELAY_US if delay_us is None else delay_us
    triton_distribution()  # a missing server is said before anything is written
    if log_file is not None:
        check_log_file(Path(log_file), Path(engines))
    if not 1 <= exit_timeout <= EXIT_TIMEOUT_MAX:  # Triton's flag is an int32: more printed its usage text
        raise InputError(f"--exit-timeout must be 1 to {EXIT_TIMEOUT_MAX} s, not {exit_timeout}")
    host = resolve_host(host)
    if port is None:
        ports = Ports.free()
    else:
        for p in (port, port + 1, port + 2):
            check_port(p, host)
        ports = Ports(port, port + 1, port + 2)
    repo = Path(tempfile.mkdtemp(prefix="asdm-serve-repo-"))
    try:
        write_serving_repo(engines, repo, backend=backend, max_batch=max_batch, instances=instances,
                           delay_us=delay_us, provider=provider, device=device, dtype=dtype, scheduler=scheduler,
                           threads=threads,
                           max_queue=max_queue, queue_timeout_us=queue_timeout_us)
    except BaseException:
        shutil.rmtree(repo, ignore_errors=True)
        raise
    server = TritonServer(repo, ports, host=host, exit_timeout=exit_timeout, log_file=log_file, owns_repo=True,
                          batch_delay=delay_us / 1e6)
    return server.start(start_timeout)


def check_log_file(log: Path, served: Path) -> None:
    """The log is truncated as the server starts: not a folder, and not in the served folder (it replaced a graph
    with Triton's log). Anything else that can be opened is taken (/dev/null, /dev/fd/2, a pipe)."""
    if log.is_dir():
        raise InputError(f"--log '{log}' is a folder; give the path of a file")
    if not log.parent.is_dir():
        raise InputError(f"--log '{log}': folder '{log.parent}' does not exist")
    target, folder = log.resolve(), served.resolve()
    if folder == target or folder in target.parents:
        raise InputError(f"--log '{log}' is inside the served folder '{served}', which the log would change; give "
                         "a path outside it")


def resolve_host(host: str) -> str:
    """``host`` as the IPv4 address Triton needs (it reads --http-address as an address: given ``localhost``
    it bound to 255.255.255.255 and never became reachable). IPv6 is refused: Triton's gRPC service joins
    address and port without brackets ('::1:8001': "Name or service not known"), and with them its HTTP
    service never answered."""
    try:
        found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:  # UnicodeError: a label IDNA cannot encode
        said = getattr(err, "strerror", None) or first_line(err)
        raise InputError(f"--host '{host}' is not a name or address of this machine ({said}); give an address "
                         "(127.0.0.1, 0.0.0.0 for all)") from None
    ipv4 = [info[4][0] for info in found if info[0] == socket.AF_INET]
    if not ipv4:
        raise InputError(f"--host '{host}' is IPv6 only; serve listens on IPv4 (Triton's services do not take "
                         "IPv6 addresses): give 127.0.0.1, 0.0.0.0 for all, or an IPv4 address of this machine")
    return ipv4[0]


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """A server can listen on ``port`` (InputError if not). Bound as servers bind (SO_REUSEADDR, as Triton's
    HTTP, gRPC and metrics servers do), so the connections a stopped server left in TIME_WAIT do not count
    as a listener for the minute they linger."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise InputError(f"port {port} on {host} is in use; choose another with --port") from None
            raise InputError(f"cannot listen on {host} ({err.strerror or err}); give --host an address of this "
                             "machine (127.0.0.1, 0.0.0.0 for all)") from None
