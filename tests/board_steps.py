"""Train and infer exported artifacts as a board does; run on x86 and on emulated aarch64.

Not a test module: ``tests/test_aarch64.py`` runs this script once with the machine's own
Python and once per emulated core (``.ci/aarch64-env.sh``), with the same artifacts and
the same batches, and compares what the runs wrote. It imports only what a board has
(``edge_runtime`` and ``toolkit.core``): no exporter, no eager model.

    python tests/board_steps.py SPEC.json OUT.pt

``SPEC.json``: ``{"cases": [{"name": ..., "artifacts": DIR, "inputs": FILE.pt}]}``, each
inputs file holding ``x`` ``[steps, batch, C, H, W]``, ``y`` ``[steps, batch]`` and
``infer_x`` ``[k, 1, C, H, W]``. ``OUT.pt`` gets, per case: the loss of every step, the
gradients of every step (the program's ``named_gradients``), the cut and exit logits of the
last step, the state after the last step, the inference program's cut and exit logits on
``infer_x`` with that state, and the seconds each part took.
"""

from __future__ import annotations

import json
import platform
import sys
import time

import torch


def run_case(case: dict) -> dict:
    from edge_runtime.backends import make_backend
    from edge_runtime.infer import InferEngine
    from toolkit.core.artifacts.manifest import load_manifest

    t0 = time.monotonic()
    manifest = load_manifest(case["artifacts"])
    inputs = torch.load(case["inputs"], weights_only=True)
    backend = make_backend("executorch", manifest)
    t_load = time.monotonic() - t0
    losses, grads, res = [], [], None
    t0 = time.monotonic()
    for x, y in zip(inputs["x"], inputs["y"], strict=True):
        res = backend.step(x, y)
        losses.append(res.loss)
        grads.append({k: v.detach().clone() for k, v in backend.program.named_gradients().items()})
    t_steps = time.monotonic() - t0
    state = backend.state_dict()
    engine = InferEngine("executorch", manifest, state)
    t0 = time.monotonic()
    outs = [engine.run(x) for x in inputs["infer_x"]]
    t_infer = time.monotonic() - t0
    return {
        "losses": losses, "grads": grads, "cut": res.cut.clone(),
        "exit_logits": res.exit_logits.clone(), "state": state,
        "infer_cut": torch.cat([o[0] for o in outs]),
        "infer_logits": torch.cat([o[1] for o in outs]),
        "seconds": {"load": t_load, "steps": t_steps, "infer": t_infer},
    }


def main(argv: list[str]) -> int:
    spec = json.loads(open(argv[0]).read())
    torch.set_num_threads(1)
    t0 = time.monotonic()
    out = {"machine": platform.machine(), "cases": {}}
    for case in spec["cases"]:
        out["cases"][case["name"]] = run_case(case)
    out["seconds"] = time.monotonic() - t0
    torch.save(out, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
