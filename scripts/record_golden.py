"""On a GPU: run the conformance kernel for every arch-layer instruction on the test cases of
tests/conformance.py and record what every lane holds, as tests/golden/conformance_<gpu>.json
(or under --out). tests/test_emu_conformance.py then holds the emulator to it on every commit.

    python scripts/record_golden.py [--out DIR]
"""

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import resnet_fused  # noqa: E402
from conformance import OPS, expected, make_case  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "golden"))
    args = ap.parse_args()
    if not resnet_fused.cuda_available():
        sys.exit("no GPU, or resnet_fused built without CUDA kernels")
    name = torch.cuda.get_device_name()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    cases, differ = [], []
    for op in OPS:
        for seed in (0, 1):
            inputs, tile = make_case(op, seed)
            out = torch.ops.resnet_fused._conformance(torch.from_numpy(inputs.view(np.int32)).cuda(),
                                                      torch.from_numpy(tile.view(np.int32)).cuda(), OPS[op])
            got = out.cpu().numpy().view(np.uint32)
            if not np.array_equal(got, expected(op, inputs, tile)):
                differ.append(f"{op} (seed {seed})")
            cases.append({"op": op, "seed": seed, "inputs": inputs.tolist(), "tile": tile.tolist(), "out": got.tolist()})
    golden = {"gpu": name, "capability": list(torch.cuda.get_device_capability()), "commit": commit,
              "torch": torch.__version__, "cuda": torch.version.cuda, "cases": cases}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "conformance_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() + ".json")
    with open(path, "w") as f:
        json.dump(golden, f)
    print(f"recorded {len(cases)} cases on {name} to {path}")
    print("the GPU differs from the PTX table on: " + ", ".join(differ) if differ else "the GPU agrees with the PTX table on every case")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
