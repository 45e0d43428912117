"""A real Triton Inference Server (the one bundled in nvidia-pytriton) on repositories `surgery export --triton-repo`
writes, started here as a deployment would start it: the `tritonserver` binary itself (not `surgery serve`), the
Python-backend stub of this Python beside the backend, that Python's libpython on the loader's path, and the models
in a Python environment that holds only numpy<2 and onnxruntime (made here with pip; no torch, no surgery), named by
each model's EXECUTION_ENV_PATH: an unpacked venv for two models, the same packed with venv-pack for the third.
Per-request adapters over HTTP and gRPC, mixed-adapter batches, packs added at run time, errors that stay with their
request, a client that disconnects, a model whose environment lacks a package. `make test-triton` (pytest -m
triton); needs the `serve` extra.

Four MiniLM models with distinct random adapters (a, b, c, d). The routed model serves a, b, c and the base; the
swappable one packs a and b, and whatever is added to its adapters/ folder; the plain one is model a, baked. Every
expected output comes from the adapted model in torch (surgery/parity.py's tolerance, unpadded positions).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.parity import compare, outputs_of
from surgery.adapters import AdapterSpec
from surgery.pipeline import stand_in_adapted
from tests.conftest import ROOT, SURGERY

from exporters.triton_server import bundled, free_ports, model_env

try:  # the serve extra; without it the `world` fixture skips (and make test, which deselects these, stays quiet)
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
except ImportError:
    grpcclient = httpclient = None
    InferenceServerException = Exception

pytestmark = pytest.mark.triton

NAMES = ["a", "b", "c", "d"]
ROUTED, SWAP, PLAIN = "routed-python", "a-python", "plain-python"
SEQ = 24
OUTPUTS = ["last_hidden_state", "pooler_output"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([*SURGERY, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


@pytest.fixture(scope="session")
def python_env(tmp_path_factory):
    """The models' Python environment: a venv of this Python with numpy<2 and onnxruntime from PyPI, nothing else
    of this project's, and the same packed into a relocatable archive (venv-pack)."""
    if httpclient is None:
        pytest.skip("the Triton clients are not installed: pip install 'surgery[serve]'")
    folder = tmp_path_factory.mktemp("python-env")
    env = model_env(folder / "env")
    code = "import json, pkgutil; print(json.dumps([m.name for m in pkgutil.iter_modules()]))"
    run = subprocess.run([str(env / "bin" / "python3"), "-c", code], capture_output=True, text=True, cwd=folder)
    listed = set(json.loads(run.stdout))
    assert {"numpy", "onnxruntime"} <= listed and not {"torch", "surgery", "exporters", "transformers"} & listed
    venv_pack = Path(sys.executable).parent / "venv-pack"
    pack = subprocess.run(
        [str(venv_pack), "-p", str(env), "-o", str(folder / "env.tar.gz")], capture_output=True, text=True
    )
    assert pack.returncode == 0, pack.stderr
    return {"dir": env, "packed": folder / "env.tar.gz", "folder": folder}


def _write_models(base, folder: Path, env) -> dict:
    """Four adapted models with distinct random non-zero adapters; the repository, written by the CLI; the packs."""
    models = {}
    for i, name in enumerate(NAMES):
        path = folder / f"{name}.adapted.pt2"
        models[name] = stand_in_adapted(base, AdapterSpec("houlsby", r=8), path, 20 + i, 120 + i)
    for args in (
        ["a.adapted.pt2", "b.adapted.pt2", "c.adapted.pt2", "--route", "-o", "routed.onnx",
         "--triton-env", str(env["dir"])],
        ["a.adapted.pt2", "--swappable", "-o", "a.swappable.onnx", "--triton-env", str(env["dir"])],
        ["a.adapted.pt2", "-o", "plain.onnx", "--triton-env", str(env["packed"])],
    ):  # fmt: skip
        done = _cli("export", *args, "--triton-repo", "repo", cwd=folder)
        assert done.returncode == 0, done.stderr
    for name in NAMES:
        packed = _cli("pack", f"{name}.adapted.pt2", "-o", f"{name}.onnx_adapter", cwd=folder)
        assert packed.returncode == 0, packed.stderr
    shutil.copyfile(folder / "b.onnx_adapter", folder / "repo" / SWAP / "adapters" / "b.onnx_adapter")  # two packs
    return models


@pytest.fixture(scope="session")
def world(minilm_base, python_env, tmp_path_factory):
    """The models, the repository (written by the CLI), the expected outputs (torch), and inputs."""
    try:
        bundled()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    folder = tmp_path_factory.mktemp("triton")
    models = _write_models(minilm_base, folder, python_env)
    rng = np.random.default_rng(0)
    pool = []
    for rows in (1, 2, 1, 3, 1, 2):
        ids = rng.integers(1000, 30000, size=(rows, SEQ), dtype=np.int64)
        mask = np.ones((rows, SEQ), dtype=np.int64)
        mask[0, SEQ - 5 :] = 0  # a padded row
        pool.append({"input_ids": ids, "attention_mask": mask})
    sig = minilm_base.signature

    def torch_outputs(module, x):
        return [t.numpy() for t in outputs_of(module, sig, [torch.from_numpy(x[n]) for n in sig.names])]

    modules = {name: m.gm for name, m in models.items()} | {None: minilm_base.gm}
    expected = {a: [torch_outputs(m, x) for x in pool] for a, m in modules.items()}
    for i in range(len(pool)):  # the adapters really differ, from each other and from the base
        outs = [expected[a][i][1] for a in [*NAMES, None]]
        assert min(np.abs(p - q).max() for j, p in enumerate(outs) for q in outs[j + 1 :]) > 1e-3
    return {
        "folder": folder, "repo": folder / "repo", "pool": pool, "expected": expected, "env": python_env,
        "torch": lambda adapter, x: torch_outputs(modules[adapter], x),
    }  # fmt: skip


CLIENTS: list = []  # closed before the server stops: an open connection holds its shutdown up


class Server:
    """tritonserver, started as a deployment would: the binary, a backend folder with the Python backend and the
    stub of this Python, this Python's libpython on the loader's path, and none of this tool's import path."""

    def __init__(self, repo: Path, models: list[str], work: Path):
        files = bundled()
        backend = work / "backends" / "python"
        shutil.copytree(files.python_backend, backend, dirs_exist_ok=True)
        shutil.copy(files.stub, backend / "triton_python_backend_stub")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SURGERY_SYS_PATH", "VIRTUAL_ENV")}
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(files.libs), sysconfig.get_config_var("LIBDIR")])
        self.http_port, self.grpc_port, metrics = free_ports(3)
        self.log = work / "tritonserver.log"
        cmd = [
            str(files.server), f"--model-repository={repo}", f"--backend-directory={work / 'backends'}",
            "--model-control-mode=explicit", *[f"--load-model={m}" for m in models],
            "--http-address=127.0.0.1", f"--http-port={self.http_port}", "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}", "--metrics-address=127.0.0.1", f"--metrics-port={metrics}",
            "--exit-timeout-secs=10", f"--backend-config=python,shm-region-prefix-name=test{os.getpid()}_",
            "--backend-config=python,shm-default-byte-size=16777216",
        ]  # fmt: skip
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.http, self.grpc = f"http://127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.alive():
            try:
                if httpclient.InferenceServerClient(self.http[7:]).is_server_ready():
                    return
            except Exception:  # noqa: BLE001  not listening yet
                pass
            time.sleep(0.3)
        raise AssertionError(f"tritonserver did not become ready:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture(scope="session")
def server(world, tmp_path_factory):
    started = time.monotonic()
    s = Server(world["repo"], [ROUTED, SWAP, PLAIN], tmp_path_factory.mktemp("server"))
    print(f"tritonserver ready in {time.monotonic() - started:.1f} s")
    yield s
    for client in CLIENTS:
        client.close()
    CLIENTS.clear()  # collected now, not at interpreter exit (where grpc's __del__ fails noisily)
    code = s.stop()
    assert code == 0, s.log_tail()


def _inputs(module, x: dict[str, np.ndarray], adapter_input: str | None = None) -> list:
    inputs = []
    for name, array in x.items():
        i = module.InferInput(name, list(array.shape), "INT64")
        i.set_data_from_numpy(array)
        inputs.append(i)
    if adapter_input is not None:
        i = module.InferInput("adapter", [len(x["input_ids"]), 1], "BYTES")
        i.set_data_from_numpy(np.array([[adapter_input.encode()]] * len(x["input_ids"]), dtype=np.object_))
        inputs.append(i)
    return inputs


def _infer(client, module, model: str, x, adapter: str | None, as_input: bool = False):
    params = {"adapter": adapter} if adapter is not None and not as_input else None
    result = client.infer(model, _inputs(module, x, adapter if as_input else None), parameters=params)
    return [result.as_numpy(n) for n in OUTPUTS]


def _check(world, got, i: int, adapter: str | None, where: str) -> None:
    want = world["expected"][adapter][i]
    parity = compare(want, got, names=OUTPUTS, mask=world["pool"][i]["attention_mask"], where=where)
    assert parity.ok, parity.summary()


def _client(module, server):
    if module is httpclient:
        client = module.InferenceServerClient(url=server.http[len("http://") :])
    else:
        client = module.InferenceServerClient(url=server.grpc)
    CLIENTS.append(client)
    return client


def _at_once(server, model: str, x, adapters: list) -> list:
    """Send one request per adapter at the same moment, each from its own thread and HTTP client; the results (or
    the exceptions), in order."""
    barrier = threading.Barrier(len(adapters))
    results: list = [None] * len(adapters)

    def send(k: int) -> None:
        client = _client(httpclient, server)
        barrier.wait()
        try:
            results[k] = _infer(client, httpclient, model, x, adapters[k])
        except InferenceServerException as exc:
            results[k] = exc

    threads = [threading.Thread(target=send, args=(k,)) for k in range(len(adapters))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model, adapters", [(ROUTED, ["a", "b", "c", None]), (SWAP, ["a", "b", None])])
def test_eight_concurrent_clients_get_their_adapters_output(world, server, protocol, model, adapters):
    module = httpclient if protocol == "http" else grpcclient
    failures: list[str] = []

    def client_thread(seed: int) -> None:
        rnd = random.Random(seed)
        client = _client(module, server)
        for k in range(12):
            i, adapter = rnd.randrange(len(world["pool"])), rnd.choice(adapters)
            try:
                got = _infer(client, module, model, world["pool"][i], adapter, as_input=k % 2 == 1)
                _check(world, got, i, adapter, f"{protocol} {model} adapter {adapter} input {i}")
            except Exception as exc:  # noqa: BLE001  collected, asserted below
                failures.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client_thread, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]


def test_mixed_adapter_requests_are_batched(world, server):
    """Requests for several adapters arrive together; Triton's statistics show executions of batch size > 1."""
    client = _client(httpclient, server)
    before = client.get_inference_statistics(ROUTED)["model_stats"][0]
    while True:  # the earlier tests' requests may still be on their way into the counts: wait until they stay put
        time.sleep(0.5)
        again = client.get_inference_statistics(ROUTED)["model_stats"][0]
        if again["inference_count"] == before["inference_count"]:
            break
        before = again
    adapters = ["a", "b", "c", None] * 8
    results = _at_once(server, ROUTED, world["pool"][0], adapters)
    for k, adapter in enumerate(adapters):
        _check(world, results[k], 0, adapter, f"async request {k}, adapter {adapter}")
    # Triton reports a batch's statistics after its responses are on their way (the Python backend after its stub
    # hands them back), so a client can read them before they are counted: wait for all 32, for 30 s at most.
    deadline = time.monotonic() + 30
    while True:
        after = client.get_inference_statistics(ROUTED)["model_stats"][0]
        inferences = int(after["inference_count"]) - int(before["inference_count"])
        executions = int(after["execution_count"]) - int(before["execution_count"])
        if inferences >= len(adapters) or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    def batched(stats) -> int:  # executions of batch size > 1
        return sum(int(b["compute_infer"]["count"]) for b in stats["batch_stats"] if int(b["batch_size"]) > 1)

    assert inferences == len(adapters) and executions < inferences, (inferences, executions)
    assert batched(after) > batched(before), after["batch_stats"]


def test_unknown_adapter_fails_alone(world, server):
    x = world["pool"][1]
    plan = ["a", "nope", "b", None, "c", "nope", "a", "b"] * 2
    for adapter, got in zip(plan, _at_once(server, ROUTED, x, plan)):
        if adapter == "nope":
            assert isinstance(got, InferenceServerException) and "unknown adapter 'nope'" in str(got), got
        else:
            _check(world, got, 1, adapter, f"beside an unknown adapter, {adapter}")
    with pytest.raises(InferenceServerException, match="unknown adapter 'zz'"):  # over gRPC, as an input
        _infer(_client(grpcclient, server), grpcclient, SWAP, x, "zz", as_input=True)


def test_pack_added_at_run_time_is_served_after_a_reload(world, server):
    client = _client(httpclient, server)
    x = world["pool"][2]
    with pytest.raises(InferenceServerException, match="unknown adapter 'd'"):
        _infer(client, httpclient, SWAP, x, "d")
    packs = world["repo"] / SWAP / "adapters"
    done = _cli("pack", "d.adapted.pt2", "-o", str(packs / "d.onnx_adapter"), cwd=world["folder"])
    assert done.returncode == 0, done.stderr
    client.load_model(SWAP)  # the model-control API: POST /v2/repository/models/a-python/load
    _check(world, _infer(client, httpclient, SWAP, x, "d"), 2, "d", "pack d after reload")
    _check(world, _infer(client, httpclient, SWAP, x, "a"), 2, "a", "pack a after reload")


def _raw_post(server, body: bytes, send: int, read: bool) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        head = f"POST /v2/models/{ROUTED}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        s.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body[:send])
        if read:
            s.recv(1)  # wait for the server to start answering, then hang up mid-response


def test_server_survives_clients_that_disconnect(world, server):
    rows = 4
    big = {
        "input_ids": np.tile(world["pool"][0]["input_ids"][:1], (rows, 4)),
        "attention_mask": np.ones((rows, SEQ * 4), np.int64),
    }
    body = json.dumps(
        {
            "parameters": {"adapter": "b"},
            "inputs": [
                {"name": n, "shape": list(a.shape), "datatype": "INT64", "data": a.reshape(-1).tolist()}
                for n, a in big.items()
            ],
        }
    ).encode()
    _raw_post(server, body, len(body) // 2, read=False)  # half a request, then gone
    for _ in range(3):
        _raw_post(server, body, len(body), read=False)  # a whole request, gone before the answer
    client = _client(httpclient, server)
    _check(world, _infer(client, httpclient, ROUTED, world["pool"][3], "c"), 3, "c", "after disconnects")
    assert server.alive() and client.is_server_live() and client.is_model_ready(ROUTED)


def test_surgery_serve_prints_urls_and_stops_cleanly(world):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    python_env = str(world["env"]["dir"])  # for models whose config names none (their own is used here)
    p = subprocess.Popen([*SURGERY, "serve", str(world["repo"]), "--model", SWAP, "--python-env", python_env, "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        lines = []
        for line in p.stdout:  # the JSON object, printed once the server is ready
            lines.append(line)
            if line.startswith("}"):
                break
        info = json.loads("".join(lines))
        assert info["models"] == [SWAP] and info["http"].startswith("http://127.0.0.1:")
        client = httpclient.InferenceServerClient(url=info["http"][len("http://") :])
        _check(world, _infer(client, httpclient, SWAP, world["pool"][4], "a"), 4, "a", "surgery serve")
        client.close()
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 0, p.stderr.read()
        with pytest.raises(ProcessLookupError):
            os.kill(info["pid"], 0)  # the server went with it
    finally:
        if p.poll() is None:
            p.kill()


def test_plain_model_in_a_packed_environment(world, server):
    """The plain export (model a, baked) runs in the venv-pack archive its config names; naming an adapter is an
    error of that request alone."""
    client = _client(httpclient, server)
    for i, x in enumerate(world["pool"]):
        want = world["expected"]["a"][i]
        got = _infer(client, httpclient, PLAIN, x, None)
        parity = compare(want, got, names=OUTPUTS, mask=x["attention_mask"], where=f"plain input {i}")
        assert parity.ok, parity.summary()
    with pytest.raises(InferenceServerException, match="--swappable or --route"):
        _infer(client, httpclient, PLAIN, world["pool"][0], "b")
    config = (world["repo"] / PLAIN / "config.pbtxt").read_text()
    assert f'"EXECUTION_ENV_PATH" value: {{ string_value: "{world["env"]["packed"]}" }}' in config


def test_a_model_whose_environment_lacks_a_package_names_it(world, server):
    """A copy of the plain model in a venv with numpy alone (Triton's own backend code imports it) fails its load,
    and the error names the missing package and the tool version that wrote the model; the others keep serving."""
    bare = world["env"]["folder"] / "numpy-only"
    if not bare.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--without-pip", str(bare)], check=True)
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--prefix", str(bare), "--ignore-installed"]
        subprocess.run([*pip, "numpy<2"], check=True)
    folder = world["repo"] / "bare-python"
    shutil.copytree(world["repo"] / PLAIN, folder, dirs_exist_ok=True)
    config = (folder / "config.pbtxt").read_text().replace(f'name: "{PLAIN}"', 'name: "bare-python"')
    config = config.replace(str(world["env"]["packed"]), str(bare))
    (folder / "config.pbtxt").write_text(config)
    client = _client(httpclient, server)
    with pytest.raises(InferenceServerException) as failed:
        client.load_model("bare-python")
    message = str(failed.value)
    assert "needs the Python package(s) onnxruntime," in message and "written by surgery 0." in message, message
    _check(world, _infer(client, httpclient, ROUTED, world["pool"][0], "b"), 0, "b", "beside a failed load")


def test_inspect_shows_the_routed_adapter_table(world):
    done = _cli("inspect", "routed.onnx", "--json", cwd=world["folder"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["adapter_ids"] == {"0": "a", "1": "b", "2": "c"}
    config = (world["repo"] / "routed" / "config.pbtxt").read_text()  # the ONNX Runtime backend's model
    assert (
        'platform: "onnxruntime_onnx"' in config
        and '"surgery.adapters" value: { string_value: "[\\"a\\", \\"b\\", \\"c\\"]" }' in config
    )


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_examples_name_an_adapter_per_request(world, server, protocol, tmp_path):
    """The documented client examples, run as programs against this server: each adapter's outputs are the adapted
    model's in torch."""
    url = server.http[len("http://") :] if protocol == "http" else server.grpc
    out = tmp_path / "out.npz"
    args = ["--url", url, "--model", ROUTED, "--adapter", "a", "--adapter", "c", "--seq", "20", "-o", str(out)]
    done = subprocess.run([sys.executable, "-m", f"benchmarks.triton_{protocol}_client", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = np.load(out)
    x = {"input_ids": got["ids"], "attention_mask": np.ones_like(got["ids"])}
    for adapter in ("a", "c"):
        parity = compare(world["torch"](adapter, x), [got[f"{adapter}/{n}"] for n in OUTPUTS], names=OUTPUTS)
        assert parity.ok, parity.summary()
    assert done.stdout.count("pooler_output") == 2  # one line per adapter and output


def test_load_benchmark_against_a_server_it_did_not_start(server, tmp_path):
    args = ["--url", server.grpc, "--model", ROUTED, "--adapters", "a,b,c,", "--clients", "2", "--seconds", "1",
            "--repeats", "1", "--seq", "16", "-o", str(tmp_path)]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "benchmarks.serve", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "serve.json").read_text())
    (run,) = report["runs"].values()
    assert run[0]["requests"] > 0 and run[0]["errors"] == 0 and report["settings"]["url"] == server.grpc
