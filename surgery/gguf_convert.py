"""A GGUF file (llama.cpp's format) converted into a Hugging Face folder: config.json, the tokenizer's files and
safetensors shards, streamed tensor by tensor so that memory does not grow with the model.

    GGUFReader (memory-mapped) -> per tensor: gguf's dequantize (row chunks, into one array) -> transformers'
    TensorProcessor fix-up (Llama's q/k permutation ...) -> transformers' GGUF -> HF name -> the dtype asked
    -> appended to the current shard's body; a full shard gets its safetensors header and is closed

The names and fix-ups are transformers' own (`modeling_gguf_pytorch_utils`: `load_gguf_checkpoint` for the config,
`TENSOR_PROCESSORS` and `get_gguf_hf_weights_map` for the tensors), called, not copied, so the folder holds what
`from_pretrained(gguf_file=...)` loads (tests/surgery/test_gguf_convert.py holds them equal tensor by tensor). The
architectures transformers reads through its newer GGUF path (`integrations/gguf`: Qwen3.5, LFM2) are refused.

Peak memory is about twice the largest tensor in fp32 (for a 151936 x 1536 embedding, 0.93 GB each) plus the
libraries; the OS's page cache holds the mapped file and the shards, which are not the process's. The folder is
written under a temporary name beside the target and renamed when complete: never half-written.

`auto` dtype: the GGUF's own float type where every tensor of more than one dimension is stored in F16 (fp16) or in
BF16 (bf16); else fp32, what the dequantized values are computed in and what transformers' GGUF load gives.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from surgery.errors import SurgeryError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
SHARD = 2_000_000_000  # bytes per safetensors shard
CHUNK = 1 << 24  # elements dequantized at a time
INDEX = "model.safetensors.index.json"

Progress = Callable[[int, int], None]  # (tensors converted, of how many)


@dataclass(frozen=True)
class Converted:
    """What `convert_gguf` wrote."""

    folder: Path
    model_type: str
    dtype: str
    tensors: int
    parameters: int
    bytes: int
    shards: int
    tokenizer: bool  # the GGUF held a tokenizer, saved as tokenizer.json and its companions
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "model_type": self.model_type,
            "dtype": self.dtype,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "bytes": self.bytes,
            "shards": self.shards,
            "tokenizer": self.tokenizer,
            "seconds": round(self.seconds, 2),
        }


def _reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise SurgeryError(f"{path}: converting a GGUF file needs the gguf package; pip install gguf") from exc
    if not path.is_file():
        raise SurgeryError(f"{path}: no such file; give the .gguf file to convert")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SurgeryError(f"{path}: not a GGUF file (it does not start with GGUF); give a llama.cpp .gguf file")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeryError(f"{path}: a damaged GGUF file ({reason}); fetch it again") from exc


def _auto_dtype(reader: Any) -> str:
    from gguf import GGMLQuantizationType as T

    types = {t.tensor_type for t in reader.tensors if len(t.shape) > 1}
    if types == {T.F16}:
        return "fp16"
    if types == {T.BF16}:
        return "bf16"
    return "fp32"


def _model_class(config: Any) -> Any:
    """The class transformers would load the GGUF into for generation: its causal LM, else its seq2seq LM."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    for auto in (AutoModelForCausalLM, AutoModelForSeq2SeqLM):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    return AutoModel._model_mapping[type(config)]


def _dequantized(tensor: Any) -> np.ndarray:
    """One GGUF tensor as floats (gguf's dequantize), in row chunks written into one array: the dequantizer's
    temporaries stay the size of a chunk."""
    from gguf import dequantize

    data = tensor.data
    if data.ndim < 2 or data.size <= CHUNK:
        return dequantize(data, tensor.tensor_type)
    rows = max(1, CHUNK // (data.size // data.shape[0]))
    first = dequantize(data[:rows], tensor.tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:rows] = first
    del first
    for i in range(rows, data.shape[0], rows):
        out[i : i + rows] = dequantize(data[i : i + rows], tensor.tensor_type)
    return out


class _Shards:
    """Safetensors shards written one tensor at a time: each shard's tensors go to a body file, and a full shard
    becomes header + body (a safetensors header must precede data whose size it states)."""

    def __init__(self, folder: Path, limit: int = SHARD):
        self.folder, self.limit = folder, limit
        self.done: list[tuple[str, list[str]]] = []  # (file name, tensor names)
        self.entries: dict[str, dict[str, Any]] = {}
        self.size = 0
        self.body = None
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.entries or any(name in names for _, names in self.done):
            raise SurgeryError(f"GGUF tensor {name} written twice; the file maps two tensors to one name")
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        if self.entries and self.size + raw.nbytes > self.limit:
            self.close()
        if self.body is None:
            self.body = open(self.folder / f".shard-{len(self.done)}.body", "wb")
        self.body.write(memoryview(raw))
        self.entries[name] = {
            "dtype": ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.size, self.size + raw.nbytes],
        }
        self.size += raw.nbytes
        self.total += raw.nbytes

    def close(self) -> None:
        """The current shard: its header, then its body copied after it."""
        if self.body is None:
            return
        self.body.close()
        body = Path(self.body.name)
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        name = f".shard-{len(self.done)}.safetensors"
        with open(self.folder / name, "wb") as dst, open(body, "rb") as src:
            dst.write(len(header).to_bytes(8, "little"))
            dst.write(header)
            shutil.copyfileobj(src, dst, 1 << 24)
        body.unlink()
        self.done.append((name, list(self.entries)))
        self.entries, self.size, self.body = {}, 0, None

    def finish(self) -> int:
        """Final names (model.safetensors, or model-0000k-of-0000n.safetensors and the index); the shard count."""
        self.close()
        n = len(self.done)
        if n == 1:
            os.replace(self.folder / self.done[0][0], self.folder / "model.safetensors")
            return 1
        weight_map = {}
        for k, (tmp, names) in enumerate(self.done):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return n


def check_target(out: str | Path) -> Path:
    """Fail before any work when the output folder cannot be made where asked."""
    out = Path(out)
    if out.exists():
        raise SurgeryError(f"output {out}: already exists; name a new folder (convert does not overwrite)")
    if not out.parent.is_dir():
        raise SurgeryError(f"output {out}: folder {out.parent} does not exist; create it or choose another")
    return out


def convert_gguf(
    source: str | Path, out: str | Path, dtype: str = "auto", progress: Progress | None = None, shard: int = SHARD
) -> Converted:
    """Write `source` (a .gguf file) as the Hugging Face folder `out` (which must not exist), weights in `dtype`
    (auto, fp32, fp16 or bf16), tensor by tensor."""
    start = time.perf_counter()
    path = Path(source)
    if dtype != "auto" and dtype not in DTYPES:
        raise SurgeryError(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}")
    out = check_target(out)
    reader = _reader(path)
    from transformers.integrations.gguf.utils import is_gguf_arch_supported
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    architecture = read_field(reader, "general.architecture")
    architecture = architecture[0] if architecture else "?"
    if is_gguf_arch_supported(architecture):
        raise SurgeryError(
            f"{path}: transformers reads {architecture} GGUF files through its newer loader, which this streamed "
            "conversion does not follow; load it with transformers (from_pretrained(gguf_file=...)) and save_pretrained"
        )
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        # what AutoConfig.from_pretrained(gguf_file=...) builds from the same dict, without reading the file again
        config = CONFIG_MAPPING[parsed["config"]["model_type"]].from_dict(dict(parsed["config"]))
    except (ValueError, OSError, KeyError, RuntimeError) as exc:  # an unsupported architecture, a damaged file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeryError(
            f"{path}: transformers cannot read this GGUF file ({reason}); it reads GGUF files of the architectures "
            "its GGUF support lists (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, GPT-2, T5 ...)"
        ) from exc
    dtype = _auto_dtype(reader) if dtype == "auto" else dtype
    target = DTYPES[dtype]
    cls = _model_class(config)
    config.architectures = [cls.__name__]
    config.dtype = target
    with torch.device("meta"):
        skeleton = cls(config)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    expected = set(skeleton.state_dict())
    del skeleton

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # a folder like any other, not mkdtemp's private one
    try:
        config.save_pretrained(tmp)
        has_tokenizer = "tokenizer.ggml.model" in reader.fields
        if has_tokenizer:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
        shards = _Shards(tmp, shard)
        side: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}  # tensors a processor sets itself (MoE, GPT-2)
        written, parameters = 0, 0
        for i, tensor in enumerate(reader.tensors):
            result = processor.process(
                weights=_dequantized(tensor), name=tensor.name, tensor_key_mapping=mapping, parsed_parameters=side
            )
            if result.name in mapping:
                w = result.weights
                w = w if w.flags.writeable and w.flags.c_contiguous else np.array(w)  # not the mapped file
                t = torch.from_numpy(w).to(target)
                del w
                shards.add(mapping[result.name], t)
                written, parameters = written + 1, parameters + t.numel()
                del t
            del result
            if progress is not None:
                progress(i + 1, len(reader.tensors))
        for name, t in side["tensors"].items():  # held to the end: a processor may fill them in parts
            t = t.to(target)
            shards.add(name, t)
            written, parameters = written + 1, parameters + t.numel()
        side.clear()
        n = shards.finish()
        names = set(json.loads((tmp / INDEX).read_text())["weight_map"]) if n > 1 else _names(tmp / "model.safetensors")
        missing = expected - names - _tied(config, expected)
        if missing:
            raise SurgeryError(
                f"{path}: {len(missing)} weights of the {config.model_type} model are not in the GGUF file (first: "
                f"{sorted(missing)[0]}); the file is incomplete or not what its metadata says"
            )
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Converted(
        out, config.model_type, dtype, written, parameters, shards.total, n, has_tokenizer, time.perf_counter() - start
    )


def _names(path: Path) -> set[str]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return {k for k in json.loads(f.read(size)) if k != "__metadata__"}


def _tied(config: Any, expected: set[str]) -> set[str]:
    """The LM head where the config ties it to the embedding: the GGUF holds it once, as transformers saves it."""
    if not getattr(config, "tie_word_embeddings", False):
        return set()
    return {n for n in expected if re.search(r"(^|\.)lm_head\.weight$", n)}
