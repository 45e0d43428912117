"""Example: ask a Triton server for one adapter per request over gRPC (tritonclient), as an application would.

    python -m benchmarks.triton_grpc_client --url 127.0.0.1:8001 --model routed-python --adapter a --adapter b
    python -m benchmarks.triton_grpc_client --url 127.0.0.1:8001 --model routed --adapter-id 0 --adapter-id 1

A Python-backend model (NAME-python, written by `surgery export --triton-repo`) takes the adapter's name in the
optional string input `adapter` (one per request row); the routed model on Triton's own ONNX Runtime backend
(NAME, platform onnxruntime_onnx) takes its id in the batched input `adapter_id`, whose table is the config's
parameter `surgery.adapters` (and `surgery inspect NAME.routed.onnx`); an id out of range runs the base model.
Each request is sent on its own, so Triton's dynamic batcher is free to merge them. Prints each output's shape and
a checksum; `-o out.npz` keeps the outputs (`<adapter>/<output>`). Needs `pip install 'tritonclient[grpc]'`.
"""

from __future__ import annotations

import argparse

import numpy as np
import tritonclient.grpc as grpcclient


def request(ids: np.ndarray, adapter: str | None, adapter_id: int | None) -> list:
    """input_ids and attention_mask, (batch, seq) int64, and the adapter: by name (BYTES, (batch, 1)) or by id
    (INT64, (batch, 1)); neither is the base model."""
    rows = len(ids)
    arrays = [("input_ids", ids, "INT64"), ("attention_mask", np.ones_like(ids), "INT64")]
    if adapter:
        arrays.append(("adapter", np.array([[adapter.encode()]] * rows, dtype=np.object_), "BYTES"))
    if adapter_id is not None:
        arrays.append(("adapter_id", np.full((rows, 1), adapter_id, dtype=np.int64), "INT64"))
    inputs = []
    for name, array, dtype in arrays:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="the server's gRPC address, host:port")
    parser.add_argument("--model", default="routed-python", help="the model's name in the repository")
    parser.add_argument("--adapter", action="append", help="an adapter by name (Python-backend models; repeatable)")
    parser.add_argument("--adapter-id", type=int, action="append", help="an adapter by id (the routed ORT model)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token ids")
    parser.add_argument("-o", "--output", help="write the outputs here (.npz)")
    args = parser.parse_args(argv)
    ids = np.random.default_rng(args.seed).integers(1000, 20000, size=(1, args.seq), dtype=np.int64)
    asks = [(a, None) for a in args.adapter or []] + [(None, i) for i in args.adapter_id or []] or [(None, None)]
    client = grpcclient.InferenceServerClient(url=args.url)
    outputs = [o.name for o in client.get_model_metadata(args.model).outputs]
    got: dict[str, np.ndarray] = {}
    try:
        for adapter, adapter_id in asks:
            result = client.infer(args.model, request(ids, adapter, adapter_id))
            label = adapter or ("" if adapter_id is None else f"id{adapter_id}")
            for name in outputs:
                array = result.as_numpy(name)
                got[f"{label}/{name}"] = array
                print(f"{label or '(base)':>8}  {name}: {list(array.shape)} sum {float(array.sum()):.6g}")
    finally:
        client.close()
    if args.output:
        np.savez(args.output, ids=ids, **got)
    return got


if __name__ == "__main__":
    main()
