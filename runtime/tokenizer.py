"""The tokenizer `surgery generate` encodes the prompt with: a model folder's `tokenizer.json` through the
`tokenizers` package (no transformers), and its end-of-sequence token from `config.json`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import SurgeryError
from .files import read_config


@dataclass
class TextTokenizer:
    """A model folder's tokenizer: `tokenizer.json` through `tokenizers`, else a GGUF file's through transformers;
    `stop` is the end-of-sequence token where the folder names one (config.json or the tokenizer)."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    stop: tuple[int, ...] = ()

    @classmethod
    def from_folder(cls, folder: str | Path) -> TextTokenizer:

        path = Path(folder)
        if not path.is_dir():
            raise SurgeryError(f"--tokenizer {folder}: no such folder; give the model folder that holds tokenizer.json")
        stop: tuple[int, ...] = ()
        config = path / "config.json"
        if config.is_file():
            eos = read_config(config, str(config)).get("eos_token_id")
            stop = tuple(eos) if isinstance(eos, list) else (eos,) if isinstance(eos, int) else ()
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            return cls(lambda t: tok.encode(t).ids, lambda ids: tok.decode(ids), stop)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            try:
                from transformers import AutoTokenizer
            except ImportError as exc:
                raise SurgeryError(
                    f"--tokenizer {folder}: reading a GGUF file's tokenizer needs transformers: "
                    "pip install 'surgery[export]', or give a folder with tokenizer.json"
                ) from exc

            hf = AutoTokenizer.from_pretrained(str(path), gguf_file=ggufs[0].name)
            stop = stop or ((hf.eos_token_id,) if hf.eos_token_id is not None else ())
            return cls(lambda t: hf.encode(t), lambda ids: hf.decode(ids, skip_special_tokens=True), stop)
        raise SurgeryError(
            f"--tokenizer {folder}: the folder holds no tokenizer.json (nor one GGUF file to read a tokenizer from); "
            "point at the Hugging Face model folder the model came from"
        )
