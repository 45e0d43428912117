"""Example: ask a Triton server for one adapter per request over HTTP (tritonclient), as an application would.

    python -m benchmarks.triton_http_client --url 127.0.0.1:8000 --model routed-python --adapter a --adapter b

Sends one request per `--adapter` (an empty name, or none given, is the base model) with the same token ids, the
adapter named in the request parameter `adapter`, and prints each output's shape and a checksum; `-o out.npz`
keeps the outputs (`<adapter>/<output>`). The model is a Python-backend model `surgery export --triton-repo` wrote
(NAME-python); the same request to the ONNX Runtime-backend routed model names its adapter by `adapter_id` instead
(see triton_grpc_client.py). Needs `pip install 'tritonclient[http]'` and nothing of surgery.
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.http as httpclient


def token_inputs(ids: np.ndarray) -> list:
    """input_ids and attention_mask, (batch, seq) int64, as HTTP inputs."""
    inputs = []
    for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
        tensor = httpclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP address, host:port")
    parser.add_argument("--model", default="routed-python", help="the model's name in the repository")
    parser.add_argument("--adapter", action="append", help="an adapter to ask for (repeatable; '' is the base)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token ids")
    parser.add_argument("-o", "--output", help="write the outputs here (.npz)")
    args = parser.parse_args(argv)
    ids = np.random.default_rng(args.seed).integers(1000, 20000, size=(1, args.seq), dtype=np.int64)
    client = httpclient.InferenceServerClient(url=args.url)
    metadata = client.get_model_metadata(args.model)
    outputs = [o["name"] for o in metadata["outputs"]]
    got: dict[str, np.ndarray] = {}
    try:
        for adapter in args.adapter or [""]:
            params = {"adapter": adapter} if adapter else None  # no parameter: the base model
            result = client.infer(args.model, token_inputs(ids), parameters=params)
            for name in outputs:
                array = result.as_numpy(name)
                got[f"{adapter}/{name}"] = array
                print(f"{adapter or '(base)':>8}  {name}: {list(array.shape)} sum {float(array.sum()):.6g}")
    finally:
        client.close()
    if args.output:
        np.savez(args.output, ids=ids, **got)
    return got


if __name__ == "__main__":
    main()
