"""The export plan: what `surgery export` is asked to write, built from the command's options and validated once.

`ExportOptions` holds the options as given (the deprecated spellings already read). `ExportPlan.from_options` walks
`REFUSALS`, the table of impossible combinations, in order, and raises the first that applies as one `SurgeryError`
line; what passes becomes a typed `ExportPlan`: the format, how the adapters are written (baked, swappable,
routed), the dtype, the quantization, streaming, and the extra outputs (a TensorRT engine, a Triton repository).
`exporters.pipeline.run_plan` carries a plan out.

Each refusal names the pipelines it guards (`Mode`): an option that a pipeline does not read is left alone there, as
`--fp16` is by a streamed export. Torch-free: a plan is checked before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from exporters.quantization import Quantization
from surgery.errors import SurgeryError

Format = Literal["onnx", "fused-pt2"]  # an ONNX model (and engine), or a torch.export program with fused kernels
AdapterMode = Literal["baked", "swappable", "routed"]  # initializers, slots filled per run, stacks chosen per row
Precision = Literal["fp32", "fp16", "bf16"]
Mode = Literal["onnx", "stream", "trt", "fused-pt2"]  # the pipeline that carries a plan out
MODES: frozenset[Mode] = frozenset(("onnx", "stream", "trt", "fused-pt2"))
IN_MEMORY: frozenset[Mode] = MODES - {"stream"}


@dataclass(frozen=True)
class ExportOptions:
    """The options of `surgery export` as given; the defaults are the command's."""

    sources: tuple[str | None, ...] = (None,)
    onnx: bool = False
    swappable: bool = False
    route: bool = False
    fused_pt2: bool = False
    output: str | None = None
    atol: float | None = None
    rtol: float | None = None
    trt: bool = False
    engine_shapes: tuple[str, ...] | None = None
    fp16: bool = False
    bf16: bool = False
    max_r: int | None = None
    timing_cache: str | None = None
    triton_repo: str | None = None
    triton_env: str | None = None
    external_data: bool = False
    stream: bool = False
    method: str | None = None
    r: str = "8"
    act: str = "relu"
    targets: str | None = None
    alpha: float | None = None
    trust: bool = False
    input_shape: tuple[str, ...] | None = None
    input_dtype: str = "float32"
    dtype: str = "auto"
    task: str | None = None
    quantize: str | None = None
    block_size: int = 32
    accuracy_level: int = 0
    asymmetric: bool = False
    quant_algorithm: str = "default"
    float_head: bool = False

    @property
    def mode(self) -> Mode:
        """The pipeline these options ask for: --stream first, then --trt, then --fused-pt2, else ONNX."""
        return "stream" if self.stream else "trt" if self.trt else "fused-pt2" if self.fused_pt2 else "onnx"

    @property
    def count(self) -> int:
        return len(self.sources)

    @property
    def quant_options_set(self) -> bool:
        """Whether an option of `--quantize` differs from its default."""
        defaults = {f.name: f.default for f in fields(self)}
        return any(getattr(self, name) != defaults[name] for name in QUANT_OPTIONS)

    @property
    def engine_options_set(self) -> bool:
        return bool(self.engine_shapes or self.fp16 or self.bf16 or self.max_r is not None or self.timing_cache)

    @property
    def archive(self) -> bool:
        """Whether the (first) source is a file: a .pt2 a streamed export opens without its weights."""
        return self.sources[0] is not None and Path(self.sources[0]).is_file()


QUANT_OPTIONS = ("block_size", "accuracy_level", "asymmetric", "quant_algorithm", "float_head")


@dataclass(frozen=True)
class Refusal:
    """One impossible combination: where it is checked (`modes`), when it applies, and what the user reads
    (`says`, formatted with the options as `o`)."""

    modes: frozenset[Mode]
    when: Callable[[ExportOptions], bool]
    says: str

    def check(self, o: ExportOptions) -> None:
        if o.mode in self.modes and self.when(o):
            raise SurgeryError(self.says.format(o=o))


# In the order they are checked: where two apply, the user reads the first.
REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        MODES,
        lambda o: o.quantize is not None and (o.trt or o.fused_pt2 or bool(o.triton_repo)),
        "--quantize writes a baked, --swappable, --route or --stream ONNX; drop --trt, --fused-pt2 and "
        "--triton-repo, or drop --quantize",
    ),
    Refusal(
        MODES,
        lambda o: o.quantize is None and o.quant_options_set,
        "--block-size, --accuracy-level, --asymmetric, --quant-algorithm and --float-head set --quantize; add "
        "--quantize int4 (or int8)",
    ),
    Refusal(
        frozenset({"stream"}),
        lambda o: o.route,
        "--stream --route: routing stacks the adapters of several .adapted.pt2 files, which --stream cannot open (it "
        "reads one Hugging Face folder); export --stream --swappable and load a pack per request, or drop --stream",
    ),
    Refusal(
        frozenset({"stream"}),
        lambda o: o.trt or o.fused_pt2 or bool(o.triton_repo) or o.count > 1,
        "--stream writes a baked or --swappable ONNX of one Hugging Face folder or .pt2; --trt, --fused-pt2 and "
        "--triton-repo take models in memory: drop them, or drop --stream",
    ),
    Refusal(
        IN_MEMORY,
        lambda o: o.method is not None,
        "--method {o.method}: export inserts adapters with --stream only; run `surgery insert` first",
    ),
    Refusal(
        IN_MEMORY, lambda o: o.swappable and o.route, "--swappable and --route are two kinds of export; choose one"
    ),
    Refusal(
        IN_MEMORY,
        lambda o: o.count > 1 and not o.route,
        "{o.count} models given; export takes one, or several with --route",
    ),
    Refusal(
        frozenset({"trt"}),
        lambda o: o.route,
        "--route exports ONNX only; TensorRT engines are baked or --swappable",
    ),
    Refusal(frozenset({"trt"}), lambda o: o.fp16 and o.bf16, "--fp16 and --bf16 are two precisions; choose one"),
    Refusal(
        frozenset({"trt"}),
        lambda o: o.swappable != (o.max_r is not None),
        "a refittable engine takes both --swappable and --max-r R (the largest adapter rank it will hold)",
    ),
    Refusal(
        frozenset({"fused-pt2", "onnx"}),
        lambda o: o.engine_options_set,
        "--engine-shape, --fp16, --bf16, --max-r and --timing-cache are engine options; add --trt",
    ),
    Refusal(
        frozenset({"fused-pt2"}),
        lambda o: o.onnx,
        "--onnx and --fused-pt2 are two output formats; choose one",
    ),
    Refusal(
        frozenset({"fused-pt2"}),
        lambda o: o.swappable or o.route or bool(o.triton_repo),
        "--fused-pt2 writes a torch program; --swappable, --route and --triton-repo are ONNX exports",
    ),
    Refusal(
        frozenset({"onnx"}),
        lambda o: bool(o.triton_env) and not o.triton_repo,
        "--triton-env names the Triton models' Python environment; give --triton-repo too",
    ),
    Refusal(
        frozenset({"onnx"}),
        lambda o: bool(o.triton_repo) and Path(o.triton_repo).exists() and not Path(o.triton_repo).is_dir(),
        "--triton-repo {o.triton_repo}: exists and is not a folder; name a folder (it is created)",
    ),
)

# What a streamed export needs of its source, checked after `REFUSALS` and again when an export streams by itself
# (a model past memory, `ExportPlan.streamed`).
STREAMED: tuple[Refusal, ...] = (
    Refusal(
        frozenset({"stream"}),
        lambda o: o.sources[0] is None,
        "--stream takes a Hugging Face folder (config.json and safetensors weights) or a .pt2; name it",
    ),
    Refusal(
        frozenset({"stream"}),
        lambda o: o.swappable and o.method is None and not o.archive,
        "--stream --swappable makes slots for the adapters it inserts; add --method houlsby (or pfeiffer)",
    ),
)


@dataclass(frozen=True)
class Insert:
    """The adapters a streamed export inserts first (`--stream --method`), as `surgery insert` takes them."""

    method: str
    r: str = "8"
    act: str = "relu"
    targets: str | None = None
    alpha: float | None = None


@dataclass(frozen=True)
class Engine:
    """A TensorRT engine built from the TensorRT-ready ONNX (`--trt`)."""

    precision: Precision = "fp32"
    shapes: tuple[str, ...] | None = None  # --engine-shape profiles, MIN:OPT:MAX per axis
    max_r: int | None = None  # refittable (swappable) engines: the largest adapter rank they hold
    timing_cache: str | None = None


@dataclass(frozen=True)
class TritonRepo:
    """A Triton model repository written beside the export (`--triton-repo`, `--triton-env`)."""

    repo: str
    env: str | None = None


@dataclass(frozen=True)
class Reading:
    """How the model is read (`surgery.pipeline.open_model`)."""

    trust: bool = False
    input_shape: tuple[str, ...] | None = None
    input_dtype: str = "float32"
    task: str | None = None


@dataclass(frozen=True)
class ExportPlan:
    """One export, validated: `ExportPlan.from_options` is the way to make one from the command's options."""

    sources: tuple[str | None, ...] = (None,)
    format: Format = "onnx"
    adapters: AdapterMode = "baked"
    dtype: str = "auto"
    quantization: Quantization | None = None
    stream: bool = False
    insert: Insert | None = None  # --stream only
    engine: Engine | None = None
    triton: TritonRepo | None = None
    output: str | None = None
    atol: float | None = None  # None: the dtype's default
    rtol: float | None = None
    external_data: bool = False
    reading: Reading = field(default_factory=Reading)
    options: ExportOptions = field(default_factory=ExportOptions, repr=False, compare=False)

    @classmethod
    def from_options(cls, o: ExportOptions) -> ExportPlan:
        """The plan of `o`, or the `SurgeryError` of its first impossible combination."""
        quantization = None
        if o.quantize is not None:
            quantization = Quantization.named(
                o.quantize,
                block_size=o.block_size,
                accuracy_level=o.accuracy_level,
                symmetric=not o.asymmetric,
                algorithm=o.quant_algorithm,
                head=not o.float_head,
            )
        for refusal in (*REFUSALS, *STREAMED):
            refusal.check(o)
        mode = o.mode
        engine = None
        if mode == "trt":
            precision: Precision = "fp16" if o.fp16 else "bf16" if o.bf16 else "fp32"
            engine = Engine(precision, o.engine_shapes, o.max_r, o.timing_cache)
        return cls(
            sources=o.sources,
            format="fused-pt2" if mode == "fused-pt2" else "onnx",
            adapters="routed" if o.route else "swappable" if o.swappable else "baked",
            dtype=o.dtype,
            quantization=quantization,
            stream=o.stream,
            insert=Insert(o.method, o.r, o.act, o.targets, o.alpha) if mode == "stream" and o.method else None,
            engine=engine,
            triton=TritonRepo(o.triton_repo, o.triton_env) if o.triton_repo and mode in ("onnx", "trt") else None,
            output=o.output,
            atol=o.atol,
            rtol=o.rtol,
            external_data=o.external_data,
            reading=Reading(o.trust, o.input_shape, o.input_dtype, o.task),
            options=o,
        )

    @property
    def mode(self) -> Mode:
        """The pipeline that carries this plan out."""
        if self.stream:
            return "stream"
        if self.engine is not None:
            return "trt"
        return "fused-pt2" if self.format == "fused-pt2" else "onnx"

    @property
    def source(self) -> str | None:
        return self.sources[0]

    @property
    def suffix(self) -> str:
        """The default output's suffix after the model's name."""
        if self.mode == "trt":
            return ".refit.plan" if self.adapters == "swappable" else ".plan"
        if self.mode == "fused-pt2":
            return ".fused.pt2"
        return {"routed": ".routed.onnx", "swappable": ".swappable.onnx", "baked": ".onnx"}[self.adapters]

    @property
    def may_stream(self) -> bool:
        """Whether this export streams by itself where the model would not fit in memory: a plain or swappable
        ONNX of one named model, with no Triton repository and no --input-shape."""
        return (
            self.mode == "onnx"
            and self.adapters != "routed"
            and self.triton is None
            and self.reading.input_shape is None
            and self.source is not None
        )

    def streamed(self) -> ExportPlan:
        """This plan as a streamed export (the model does not fit in memory), or the `SurgeryError` of what a
        streamed export cannot take; a quantization is carried out block by block as the weights are written."""
        for refusal in STREAMED:
            if refusal.when(self.options):
                raise SurgeryError(refusal.says.format(o=self.options))
        return replace(self, stream=True, options=replace(self.options, stream=True))
