"""Write the round-0 model of the digits job (examples/federation.toml) as safetensors.

    python examples/make_model.py --out digits-mlp.safetensors

The aggregator starts the job from this file; every participant builds the same
architecture (:func:`participant.build_model`) so tensor names and shapes match, and
loads the global weights the aggregator signs each round (never this file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from participant import build_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("digits-mlp.safetensors"))
    args = p.parse_args(argv)
    tensors = {name: t.detach().contiguous() for name, t in build_model().state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out))
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
    print(f"wrote {args.out}: {sum(v.numel() for v in tensors.values())} parameters ({shapes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
