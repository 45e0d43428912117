"""`surgery serve DIR`: the Triton Inference Server bundled in nvidia-pytriton, on a repository `--triton-repo` wrote.

Loopback only, free ports unless given; prints the URLs and the models, serves until Ctrl-C or SIGTERM, then stops
the server cleanly (in-flight requests finish, models unload).
"""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Optional

import typer

from cli.common import emit_json, out, step
from cli.options import Json
from exporters.triton_server import start_server
from surgery.errors import SurgeryError


def serve(
    repo: Annotated[str, typer.Argument(help="A Triton model repository written by `surgery export --triton-repo`.")],
    model: Annotated[
        Optional[list[str]], typer.Option("--model", help="Load only this Python-backend model (repeatable).")
    ] = None,
    http_port: Annotated[int, typer.Option("--http-port", help="HTTP port (0: a free one).")] = 0,
    grpc_port: Annotated[int, typer.Option("--grpc-port", help="gRPC port (0: a free one).")] = 0,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Metrics port (0: a free one).")] = 0,
    python_env: Annotated[
        Optional[str],
        typer.Option(
            "--python-env",
            help="The Python environment (a venv with numpy<2 and onnxruntime) the models run in, unless their "
            "config names one (EXECUTION_ENV_PATH); default: one made under ~/.cache/surgery on first use.",
        ),
    ] = None,
    json: Json = False,
) -> None:
    """Serve a model repository on the bundled Triton server (127.0.0.1) until interrupted."""
    ports = (http_port, grpc_port, metrics_port)
    if any(ports) and not all(ports):
        raise SurgeryError("give all three of --http-port, --grpc-port and --metrics-port, or none (free ports)")
    with step(f"start Triton on {repo}"):
        server = start_server(repo, models=model, ports=ports if all(ports) else None, python_env=python_env)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    info = {
        "http": server.http,
        "grpc": server.grpc,
        "metrics": server.metrics,
        "models": server.models,
        "skipped": server.skipped,
        "log": str(server.log),
        "pid": server.process.pid,
    }
    if json:
        emit_json(info)
    else:
        out.print(f"HTTP    {server.http}\ngRPC    {server.grpc}\nmetrics {server.metrics}")
        out.print(
            f"serving {', '.join(server.models)}"
            + (f"; skipped {', '.join(server.skipped)} (no such backend bundled)" if server.skipped else "")
        )
        out.print(f"log     {server.log}")
        out.print(
            f"try:    curl -s {server.http}/v2/models/{server.models[0]}/infer -d @request.json   (Ctrl-C stops)",
            soft_wrap=True,
        )
    try:
        while not stop.wait(0.5):
            if not server.alive():
                raise SurgeryError(
                    f"the Triton server exited (code {server.process.returncode}); its log: {server.log}"
                )
    finally:
        code = server.stop()
        if not json:
            out.print(f"stopped (exit code {code})")
