"""Generation over a causal LM exported with its KV cache (`surgery insert --task causal-lm`, then an export):
`Generator` runs the loop on ONNX Runtime, baked, swappable or routed; `Generation` is what it produced."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .adapted import AdaptedSession
from .errors import SurgeryError
from .files import check_onnx_data
from .session import CPU, ort_session, session_device
from .slots import SlotsMeta


@dataclass
class Generation:
    """What `Generator.generate` produced: the new tokens of each row (up to and including a stop token), the
    logits each step chose from (with `keep_logits`), and the times: to the first token and for the rest."""

    tokens: list[list[int]]
    logits: list[np.ndarray] = field(default_factory=list)  # per step, (B, vocab)
    ttft_s: float = 0.0  # prefill and the first token
    decode_s: float = 0.0  # every later step
    steps: int = 0

    def count_step(self, seconds: float) -> None:
        """One more step, which took `seconds`: the first is the time to the first token, the rest decode."""
        if self.steps == 0:
            self.ttft_s = seconds
        else:
            self.decode_s += seconds
        self.steps += 1

    @staticmethod
    def last_of(steps: Iterator[Generation]) -> Generation:
        """The whole generation: the Generation after the last of `steps` (`Generator.steps`, or a peer's)."""
        out = Generation(tokens=[])
        for out in steps:
            pass
        return out

    @property
    def tokens_per_s(self) -> float:
        """Decode speed of one stream: steps after the first, per second."""
        return (self.steps - 1) / self.decode_s if self.steps > 1 and self.decode_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "steps": self.steps,
            "ttft_ms": round(self.ttft_s * 1e3, 2),
            "decode_tokens_per_s": round(self.tokens_per_s, 2),
        }


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """One token per row of `logits` (B, V): greedy where temperature is 0, else sampled from the tempered
    distribution cut to its top-k tokens and then to the smallest set whose probability reaches top-p."""
    if temperature <= 0:
        return logits.argmax(-1)
    x = logits.astype(np.float64) / temperature
    if 0 < top_k < x.shape[-1]:
        kth = np.sort(x, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        drop = np.cumsum(sorted_p, -1) - sorted_p >= top_p  # tokens after the set reached top_p; the first stays
        sorted_p[drop] = 0
        p = np.zeros_like(p)
        np.put_along_axis(p, order, sorted_p, -1)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


class Generator:
    """A generation loop over an ONNX causal LM with its KV cache: baked, swappable (a pack per request, `adapter`)
    or routed (an adapter per row, `adapter_ids`).

        gen = Generator("smollm.swappable.onnx")
        gen.load("task_a", "task_a.onnx_adapter")
        out = gen.generate([prompt_ids], max_new_tokens=32, adapter="task_a", on_token=print)

    Prompts of different lengths are padded on the left; one graph runs the prefill (past length 0) and each
    decode step (one token, the cache of the step before). `use_cache=False` runs the whole sequence every step
    instead (the reference the cache is checked against).

    `providers` picks ONNX Runtime's execution providers (runtime/session.py CPU, CUDA). With `io_binding` the
    steps run through ORT's IO binding: each step's `present.N.key/value` stay where the session computed them
    (OrtValues on its device) and are bound as the next step's `past_key_values.N.*`, so on a GPU the cache never
    crosses to the host; only the last position's logits do, for sampling. None (the default): on where the
    session's first provider is not the CPU one. On the CPU the two paths compute the same thing.
    """

    def __init__(
        self,
        model: str | Path | AdaptedSession,
        threads: int = 2,
        spinning: bool = True,
        providers: tuple[str, ...] = CPU,
        io_binding: bool | None = None,
    ):
        if isinstance(model, AdaptedSession):
            self.adapted: AdaptedSession | None = model
        else:
            check_onnx_data(Path(model))
            self.adapted = None
            session = ort_session(model, threads=threads, spinning=spinning, providers=providers)
            if SlotsMeta.FINGERPRINT in session.get_modelmeta().custom_metadata_map:
                del session  # a second session on a GPU would hold a second copy of the weights there
                self.adapted = AdaptedSession(model, threads=threads, spinning=spinning, providers=providers)
            else:
                self.session = session
        if self.adapted is not None:
            self.session = self.adapted.session
        where = str(getattr(self.adapted, "path", model))
        inputs = {i.name: i for i in self.session.get_inputs()}
        meta = self.session.get_modelmeta().custom_metadata_map
        if "past_key_values.0.key" not in inputs or "position_ids" not in inputs:
            raise SurgeryError(
                f"{where}: not a causal LM exported with its KV cache (no past_key_values.0.key input); "
                "capture it with `surgery insert --task causal-lm` and export that"
            )
        self.layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        _, self.kv_heads, _, self.head_dim = inputs["past_key_values.0.key"].shape
        self.max_positions = int(meta.get("surgery.max_positions", 0)) or None
        self.routed = "adapter_id" in inputs
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.where = where
        self.device = session_device(self.session)
        self.io_binding = self.device[0] != "cpu" if io_binding is None else io_binding

    def load(self, name: str, pack: str | Path) -> None:
        """Make a pack available as `name` (a swappable export only)."""
        if self.adapted is None:
            raise SurgeryError(f"{self.where}: not a swappable export, so it takes no pack; export it with --swappable")
        self.adapted.load(name, pack)

    def _run(self, feeds: dict[str, np.ndarray], options: Any) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, feeds, options)))

    def _run_bound(self, feeds: dict[str, Any], options: Any) -> dict[str, Any]:
        """One step through IO binding: numpy feeds are bound from the host, OrtValues (the cache of the step
        before) where they lie; the present key/values stay on the session's device as OrtValues, and only the
        logits come to the host (numpy, the last position)."""
        binding = self.session.io_binding()  # a fresh one per step: a bound output of the last step's shape would
        for name, value in feeds.items():  # be reused as is, and the cache grows by a position every step
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, *(("cpu", 0) if name == "logits" else self.device))
        self.session.run_with_iobinding(binding, options)
        result = dict(zip(self.outputs, binding.get_outputs()))  # in the order bound
        result["logits"] = result["logits"].numpy()[:, -1:, :].copy()  # numpy() is a view of ORT's buffer
        return result

    def generate(self, prompts: list[list[int]] | list[int], max_new_tokens: int = 32, **options: Any) -> Generation:
        """Up to `max_new_tokens` per row (fewer where the model's positions run out, or every row has met a stop
        token); `on_token(step, tokens)` gets each step's tokens (B,) as they come. The options are `steps`'."""
        return Generation.last_of(self.steps(prompts, max_new_tokens, **options))

    def steps(
        self,
        prompts: list[list[int]] | list[int],
        max_new_tokens: int = 32,
        *,
        adapter: str | None = None,
        adapter_ids: list[int] | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_tokens: tuple[int, ...] | list[int] = (),
        on_token: Callable[[int, np.ndarray], None] | None = None,
        keep_logits: bool = False,
        use_cache: bool = True,
        pad_token: int = 0,
    ) -> Iterator[Generation]:
        """`generate` one step at a time: the Generation so far after each step (the same object, growing), so a
        caller can interleave the steps of several generations (benchmarks/generate.py times two in lockstep).
        Its times are those of the steps alone: the wall-clock time the caller spends between steps is left out."""
        rows = [list(prompts)] if prompts and isinstance(prompts[0], (int, np.integer)) else [list(p) for p in prompts]
        if not rows or any(not r for r in rows):
            raise SurgeryError("generate: give at least one prompt of at least one token")
        longest = max(len(r) for r in rows)
        if self.max_positions is not None and longest > self.max_positions:
            raise SurgeryError(
                f"prompt of {longest} tokens is longer than the model's {self.max_positions} positions; "
                "shorten the prompt"
            )
        if self.max_positions is not None:
            max_new_tokens = min(max_new_tokens, self.max_positions - longest)
        options, pack = None, {}
        if adapter is not None:
            if self.adapted is None:
                raise SurgeryError(f"{self.where}: --adapter needs a swappable export (this one has no slots)")
            options = self.adapted.run_options(adapter)
            if self.io_binding:
                pack = self.adapted.adapter_values(adapter, self.device)
        if self.routed != (adapter_ids is not None):
            raise SurgeryError(
                f"{self.where}: "
                + ("a routed export needs adapter_ids, one per row (-1: none)" if self.routed else "not routed")
            )
        B = len(rows)
        if adapter_ids is not None and len(adapter_ids) != B:
            raise SurgeryError(f"adapter_ids: {len(adapter_ids)} ids for {B} prompts; give one per prompt")
        ids = np.full((B, longest), pad_token, dtype=np.int64)
        mask = np.zeros((B, longest), dtype=np.int64)
        for b, r in enumerate(rows):  # left padding: every row's last token is at the end
            ids[b, longest - len(r) :] = r
            mask[b, longest - len(r) :] = 1
        empty = np.zeros((B, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        past = {f"past_key_values.{i}.{k}": empty for i in range(self.layers) for k in ("key", "value")}
        rng = np.random.default_rng(seed)
        stops = set(int(t) for t in stop_tokens)
        out = Generation(tokens=[[] for _ in range(B)])
        done = np.zeros(B, dtype=bool)
        step_ids, all_ids = ids, ids
        if max_new_tokens <= 0:  # the prompt fills the model's positions: nothing to generate
            yield out
            return
        for step in range(max_new_tokens):
            start = time.perf_counter()
            positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
            feeds = {"attention_mask": mask}
            if use_cache:
                feeds.update(input_ids=step_ids, position_ids=positions[:, -step_ids.shape[1] :], **past)
            else:
                feeds.update(input_ids=all_ids, position_ids=positions, **{k: empty for k in past})
            if adapter_ids is not None:
                feeds["adapter_id"] = np.asarray(adapter_ids, dtype=np.int64)
            if self.io_binding:
                feeds.update(pack)
                result = self._run_bound(feeds, None)  # the pack is bound itself (`adapter_values`)
            else:
                result = self._run(feeds, options)
            logits = result["logits"][:, -1, :]
            token = _sample(logits, rng, temperature, top_k, top_p).astype(np.int64)
            token = np.where(done, pad_token, token)
            if keep_logits:
                out.logits.append(logits.copy())
            for b in np.flatnonzero(~done):
                out.tokens[b].append(int(token[b]))
            done |= np.isin(token, list(stops)) if stops else False
            if on_token is not None:
                on_token(step, token)
            last = done.all() or step + 1 == max_new_tokens
            if not last:  # this step's token and cache are the next one's input
                past = {n.replace("present.", "past_key_values.", 1): v for n, v in result.items() if n != "logits"}
                step_ids = token[:, None]
                if not use_cache:  # the whole sequence runs again: only then is it needed
                    all_ids = np.concatenate([all_ids, step_ids], 1)
                mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], 1)
            out.count_step(time.perf_counter() - start)
            yield out
            if last:
                break
