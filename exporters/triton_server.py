"""Start and stop the Triton Inference Server bundled in the `nvidia-pytriton` wheel on a repository `surgery` wrote.

The wheel ships `pytriton/tritonserver/bin/tritonserver`, its libraries in `nvidia_pytriton.libs/`, the Python
backend and one backend stub per Python version (3.8-3.13). `start_server` copies the Python backend with the stub
of this Python into a temporary folder, points the loader at the wheel's libraries and this Python's libpython,
passes this environment's import path to the models (`SURGERY_SYS_PATH`: the stub ignores PYTHONPATH), and starts
the server on free loopback ports in explicit model-control mode with the repository's Python-backend models
loaded (the bundled server has no ONNX Runtime or TensorRT backend: those models are listed as skipped).

    with start_server("models") as server:
        print(server.http, server.grpc, server.models)

pytriton itself is installed without its dependencies (`pip install --no-deps nvidia-pytriton==0.7.0`): it pins
numpy<2, and only its server files are used here. The clients come with `pip install 'surgery[serve]'`.
CudaDriverHelper, NVML and DCGM errors in the server log are expected on a machine without a GPU.

The stub's compiled tensor conversion reads numpy 1.x's dtype layout: with numpy 2 it sizes tensors wrongly
("output tensor shape does not match size of output", then a crash on a string input; seen with
nvidia-pytriton 0.7.0, Triton 2.51). Where this environment has numpy 2, the models get numpy 1.26 first on their
path, from `$SURGERY_CACHE/triton-stub` (default `~/.cache/surgery`), installed there with pip on first use;
ONNX Runtime and torch import with it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError

INSTALL = "pip install --no-deps nvidia-pytriton==0.7.0 && pip install 'surgery[serve]'"
STUB_NUMPY = "numpy==1.26.4"


def stub_numpy() -> Path | None:
    """A folder with numpy 1.x for the stub when this environment has numpy 2 (pip-installed on first use)."""
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return None
    folder = Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery")) / "triton-stub"
    if (folder / "numpy" / "__init__.py").is_file():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=".triton-stub.", dir=folder.parent if folder.parent.is_dir() else None))
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run([*pip, "--target", str(staging), STUB_NUMPY], capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SurgeryError(
            f"the Triton stub needs numpy<2 and pip could not install {STUB_NUMPY} into {folder} ({tail}); "
            f"install it there yourself: pip install --no-deps --target {folder} {STUB_NUMPY}"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(staging, folder)
    except OSError:  # another process got there first
        shutil.rmtree(staging, ignore_errors=True)
    return folder


@dataclass(frozen=True)
class Bundled:
    server: Path  # bin/tritonserver
    python_backend: Path  # backends/python
    stub: Path  # the stub for this Python
    libs: Path  # nvidia_pytriton.libs


def bundled() -> Bundled:
    """The server files of the installed nvidia-pytriton wheel, or a SurgeryError with the install line."""
    spec = importlib.util.find_spec("pytriton")  # does not import it (its numpy<2 pin is not met here)
    if spec is None or not spec.submodule_search_locations:
        raise SurgeryError(f"the Triton server is not installed: {INSTALL}")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    files = Bundled(
        root / "bin" / "tritonserver",
        root / "backends" / "python",
        root / "python_backend_stubs" / version / "triton_python_backend_stub",
        root.parent.parent / "nvidia_pytriton.libs",
    )
    if not files.server.is_file() or not files.python_backend.is_dir():
        raise SurgeryError(f"{root}: the nvidia-pytriton wheel holds no server here; reinstall it: {INSTALL}")
    if not files.stub.is_file():
        raise SurgeryError(f"nvidia-pytriton has no Python-backend stub for Python {version}; use Python 3.8-3.13")
    return files


def python_models(repo: Path) -> tuple[list[str], list[str]]:
    """The repository's models the bundled server can load (backend python) and the others (ONNX Runtime, TensorRT)."""
    served, skipped = [], []
    for config in sorted(repo.glob("*/config.pbtxt")):
        if config.parent.name.startswith("."):
            continue
        text = config.read_text()
        (served if re.search(r'^\s*backend:\s*"python"', text, re.M) else skipped).append(config.parent.name)
    return served, skipped


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (free when asked; the server's start retries on a clash)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _environment(files: Bundled) -> dict[str, str]:
    env = dict(os.environ)
    libs = [str(files.libs)]
    libdir = sysconfig.get_config_var("LIBDIR")
    if (
        libdir
        and sysconfig.get_config_var("LDLIBRARY")
        and (Path(libdir) / sysconfig.get_config_var("LDLIBRARY")).exists()
    ):
        libs.append(libdir)  # the stub links libpython3.X: this Python's, not whichever the loader finds first
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    first = [str(stub_numpy() or "")]
    env["SURGERY_SYS_PATH"] = os.pathsep.join(p for p in first + sys.path if p and Path(p).is_dir())
    return env


@dataclass
class TritonServer:
    """A running server: its URLs, the models it loaded, the ones it skipped, and its log file."""

    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    models: list[str]
    skipped: list[str]
    log: Path
    workdir: Path
    _log_file: object = field(default=None, repr=False)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (the server finishes in-flight requests and unloads its models), SIGKILL after `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
        shutil.rmtree(self.workdir / "backends", ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_server(
    repo: str | Path,
    models: list[str] | None = None,
    ports: tuple[int, int, int] | None = None,
    timeout: float = 180,
    workdir: str | Path | None = None,
) -> TritonServer:
    """Start the bundled server on `repo` with its Python-backend models (or `models`), wait until it is ready."""
    repo = Path(repo)
    if not (repo.is_dir() and any(repo.glob("*/config.pbtxt"))):
        raise SurgeryError(
            f"{repo}: not a Triton model repository (no NAME/config.pbtxt); write one with --triton-repo"
        )
    files = bundled()
    served, skipped = python_models(repo)
    if models:
        unknown = [m for m in models if m not in served]
        if unknown:
            raise SurgeryError(f"{repo}: no Python-backend model {unknown[0]!r}; it has {', '.join(served) or 'none'}")
        skipped += [m for m in served if m not in models]
        served = list(models)
    if not served:
        raise SurgeryError(
            f"{repo}: no Python-backend model (only {', '.join(skipped)}); export with --triton-repo again to add one"
        )
    work = Path(workdir or tempfile.mkdtemp(prefix="surgery-triton-"))
    backends = work / "backends"
    env = _environment(files)
    attempts = 1 if ports else 3
    for attempt in range(attempts):
        shutil.copytree(files.python_backend, backends / "python", dirs_exist_ok=True)
        shutil.copy(files.stub, backends / "python" / "triton_python_backend_stub")
        http, grpc, metrics = ports or free_ports(3)
        log = work / f"tritonserver-{attempt}.log"
        log_file = open(log, "w")
        cmd = [
            str(files.server),
            f"--model-repository={repo.resolve()}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in served],
            "--http-address=127.0.0.1",
            f"--http-port={http}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={metrics}",
            "--exit-timeout-secs=10",
            f"--backend-config=python,shm-region-prefix-name=surgery{os.getpid()}x{attempt}x{http}_",
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
        ]
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        server = TritonServer(process, http, grpc, metrics, served, skipped, log, work, log_file)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and server.alive() and not _ready(server.http):
            time.sleep(0.3)
        if server.alive() and _ready(server.http):
            return server
        server.stop(timeout=10)
        text = log.read_text(errors="replace")
        clash = "address already in use" in text.lower() or "failed to start" in text.lower()
        if clash and attempt + 1 < attempts:
            continue
        reason = next((line for line in text.splitlines() if line.startswith("E") and "Cuda" not in line), "")
        raise SurgeryError(
            f"the Triton server did not become ready on {repo} ({'timed out' if server.alive() else 'it exited'})"
            f"{': ' + reason.strip() if reason else ''}; its log: {log}"
        )
    raise SurgeryError(f"the Triton server found no free ports in {attempts} attempts; its log: {log}")
