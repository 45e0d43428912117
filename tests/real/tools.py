"""Steps of the real tier that have no CLI command, run as `python -m tests.real.tools STEP ...` so each is
timed and measured (peak RSS) on its own, like the CLI steps. Plain torch where the tool's answer is checked.

  stand-in SRC DST SEED   SRC's adapters get distinct random non-zero weights (surgery.adapters.stand_in_weights,
                          as training would), saved to DST with SRC's manifest; the graph is not traced again
  reference PT2 NPZ OUT   torch's outputs of PT2 (torch.export.load, nothing of this tool) on the inputs in NPZ,
                          and the base model's (every adapter's last factor zeroed, so each adapter is the
                          identity), written to OUT as out.NAME / base.NAME
"""

from __future__ import annotations

import sys

import numpy as np
import torch

MANIFEST = "surgery.json"
LAST_FACTORS = ("up_w", "up_b", "lora_B")  # zero these and a bottleneck or LoRA adds nothing


def stand_in(src: str, dst: str, seed: int) -> None:
    from surgery.adapters import stand_in_weights

    extra = {MANIFEST: ""}
    program = torch.export.load(src, extra_files=extra)
    stand_in_weights(program.module(), seed=seed)  # the module's parameters are the program's tensors
    torch.export.save(program, dst, extra_files=extra)


def reference(pt2: str, inputs: str, out: str) -> None:
    program = torch.export.load(pt2)
    module = program.module()
    with np.load(inputs) as data:
        feeds = {k: torch.from_numpy(data[k]) for k in data.files}
    results = {}
    with torch.no_grad():
        for tag in ("out", "base"):
            if tag == "base":
                for name, p in module.named_parameters():
                    if name.startswith("adapters.") and name.endswith(LAST_FACTORS):
                        p.zero_()
            outputs = module(**feeds)
            for i, t in enumerate(outputs if isinstance(outputs, (tuple, list)) else [outputs]):
                if isinstance(t, torch.Tensor):
                    results[f"{tag}.{i}"] = t.numpy()
    np.savez(out, **results)


if __name__ == "__main__":
    step, *args = sys.argv[1:]
    if step == "stand-in":
        stand_in(args[0], args[1], int(args[2]))
    elif step == "reference":
        reference(*args)
    else:
        sys.exit(f"unknown step {step!r}")
