"""Start and stop the Triton Inference Server bundled in the `nvidia-pytriton` wheel on a repository `surgery` wrote.

The wheel ships `pytriton/tritonserver/bin/tritonserver`, its libraries in `nvidia_pytriton.libs/`, the Python
backend and one backend stub per Python version (3.8-3.13). `start_server` copies the Python backend with the stub
of the models' Python into a temporary folder, points the loader at the wheel's libraries and that Python's
libpython, and starts the server on free loopback ports in explicit model-control mode with the repository's
Python-backend models loaded (the bundled server has no ONNX Runtime or TensorRT backend: those models are listed as
skipped).

    with start_server("models") as server:
        print(server.http, server.grpc, server.models)

The models run their own code (`1/surgery_model.py`) and need numpy and onnxruntime, nothing of this tool. The stub
runs in a Python environment: a model's EXECUTION_ENV_PATH where its config names one, else `python_env`, which
goes first on the server's PATH (the stub's embedded Python takes its prefix, and so its site-packages, from the
`python3` it finds there, as in an activated environment). By default that is `model_env()`: a venv with numpy<2
and onnxruntime under `$SURGERY_CACHE` (default `~/.cache/surgery`), made with pip on first use. The stub's
compiled tensor conversion reads numpy 1.x's dtype layout: with numpy 2 it sizes tensors wrongly ("output tensor
shape does not match size of output", then a crash on a string input; seen with nvidia-pytriton 0.7.0,
Triton 2.51), hence numpy<2 there.

pytriton itself is installed without its dependencies (`pip install --no-deps nvidia-pytriton==0.7.0`): it pins
numpy<2, and only its server files are used here. The clients come with `pip install 'surgery[serve]'`.
CudaDriverHelper, NVML and DCGM errors in the server log are expected on a machine without a GPU.
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
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError

INSTALL = "pip install --no-deps nvidia-pytriton==0.7.0 && pip install 'surgery[serve]'"
MODEL_PACKAGES = ("numpy<2", "onnxruntime")  # what the models' code needs (exporters/triton_model.py)


def model_env(folder: str | Path | None = None) -> Path:
    """A Python environment for the models: a venv of this Python with numpy<2 and this environment's onnxruntime
    version, at `folder` (default `$SURGERY_CACHE/triton-env-py3.X`), made with pip on first use."""
    import onnxruntime

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    cache = Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))
    folder = Path(folder) if folder else cache / f"triton-env-py{version}"
    if (folder / "bin" / "python3").exists() and (folder / ".complete").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # an environment left half-made (no .complete) is made again
    folder.parent.mkdir(parents=True, exist_ok=True)
    packages = [MODEL_PACKAGES[0], f"onnxruntime=={onnxruntime.__version__}"]
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter itself, not this venv's
    steps = [  # made in place: a venv's activate script names its own folder
        [base, "-m", "venv", "--without-pip", str(folder)],
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--prefix", str(folder),
         "--ignore-installed", "--no-warn-script-location", *packages],
    ]  # fmt: skip
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SurgeryError(
                f"could not make the models' Python environment {folder} ({tail}); make one yourself "
                f"(python -m venv ENV && ENV/bin/pip install {' '.join(repr(p) for p in packages)}) "
                "and pass it with --python-env"
            )
    (folder / ".complete").write_text(" ".join(packages) + "\n")
    return folder


def env_python(env: str | Path) -> tuple[str, Path]:
    """The Python version (3.X) of an environment and the folder of its libpython (what the stub links)."""
    python = Path(env) / "bin" / "python3"
    if not python.exists():
        raise SurgeryError(f"{env}: not a Python environment (no bin/python3); make one with python -m venv")
    code = "import sys, sysconfig; print('%d.%d' % sys.version_info[:2]); print(sysconfig.get_config_var('LIBDIR'))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise SurgeryError(f"{python} does not run: {done.stderr.strip()[-200:]}")
    version, libdir = done.stdout.split()
    return version, Path(libdir)


@dataclass(frozen=True)
class Bundled:
    server: Path  # bin/tritonserver
    python_backend: Path  # backends/python
    stub: Path  # the stub for this Python
    libs: Path  # nvidia_pytriton.libs


def bundled(version: str | None = None) -> Bundled:
    """The server files of the installed nvidia-pytriton wheel, with the stub for Python `version` (default this
    one's), or a SurgeryError with the install line."""
    spec = importlib.util.find_spec("pytriton")  # does not import it (its numpy<2 pin is not met here)
    if spec is None or not spec.submodule_search_locations:
        raise SurgeryError(f"the Triton server is not installed: {INSTALL}")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    version = version or f"{sys.version_info.major}.{sys.version_info.minor}"
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


def _environment(files: Bundled, env: Path, libdir: Path) -> dict[str, str]:
    """The server's environment: the wheel's libraries and the models' libpython on the loader's path, the models'
    Python environment first on PATH (as an activated one would be); nothing of this tool's own import path."""
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    libs = [str(files.libs), str(libdir)] + [p for p in base.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    base["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    base["PATH"] = os.pathsep.join([str(env / "bin"), base.get("PATH", "")])
    base["VIRTUAL_ENV"] = str(env)
    return base


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
    python_env: str | Path | None = None,
) -> TritonServer:
    """Start the bundled server on `repo` with its Python-backend models (or `models`), wait until it is ready.
    `python_env`: the Python environment the models run in unless their config names one (default `model_env()`)."""
    repo = Path(repo)
    if not (repo.is_dir() and any(repo.glob("*/config.pbtxt"))):
        raise SurgeryError(
            f"{repo}: not a Triton model repository (no NAME/config.pbtxt); write one with --triton-repo"
        )
    bundled()  # the server is installed (else the install line), before any environment is made
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
    env = Path(python_env) if python_env else model_env()
    version, libdir = env_python(env)
    files = bundled(version)
    work = Path(workdir or tempfile.mkdtemp(prefix="surgery-triton-"))
    backends = work / "backends"
    environ = _environment(files, env, libdir)
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
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=environ, start_new_session=True)
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
