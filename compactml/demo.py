"""``compactml demo``: the whole loop on the built-in digits CNN, in one command.

Load the model, profile it against a microcontroller, evaluate it, save a signed artifact,
load it back with signature verification, check the outputs are bit-identical, and write a
report. Every step is real; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any

import torch


def _bit_exact(original: torch.nn.Module, loaded: torch.nn.Module, task) -> bool:
    with torch.inference_mode():
        for batch in task.batches("eval"):
            inputs = batch[0]
            if not torch.equal(original(inputs), loaded(inputs)):
                return False
    return True


def _keys(folder: Path) -> tuple[Path, Path]:
    """Reuse the demo key pair from an earlier run, or create one."""
    from compactml.export.signing import write_keypair

    private = folder / "keys" / "demo-ed25519.pem"
    public = Path(str(private) + ".pub")
    if private.is_file() and public.is_file():
        return private, public
    return write_keypair(private)


def run_demo(folder: str | Path, target: str = "stm32f746", out: Any = None) -> dict:
    """Run the demo into ``folder`` and return the report dict (also written there)."""
    from compactml import examples
    from compactml.cli import Output
    from compactml.evaluate import evaluate
    from compactml.export.artifact import load, save
    from compactml.export.signing import key_id, load_public_key
    from compactml.profile import profile
    from compactml.profile.targets import get_target
    from compactml.report import write_report
    from compactml.report.build import new_report
    from compactml.report.console import console_blocks

    out = out or Output(quiet=True)
    folder = Path(folder)
    get_target(target)  # an unknown device fails before any work is done

    def step(message: str):
        return out.console.status(message) if out.human else contextlib.nullcontext()

    model, task = examples.load("digits-cnn", progress=out.human)  # trains once, then cached
    with step(f"profiling against {target}"):
        prof = profile(model, task.example_input(), target=target).to_dict()
    metrics = dict(evaluate(model, task, progress=out.human))
    private, public = _keys(folder)
    artifact = folder / "digits-cnn.cml"
    with step("saving the signed artifact and verifying it"):
        save(model, artifact, sign_key=private, metrics=metrics)
        loaded = load(artifact, verify_key=public)
        exact = _bit_exact(model, loaded, task)
    data = artifact.read_bytes()
    report = new_report(
        "compactml demo: digits-cnn",
        "digits-cnn",
        profile=prof,
        metrics=metrics,
        artifact={
            "path": str(artifact),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "signed": True,
            "verified": True,
            "key_id": key_id(load_public_key(public)),
        },
        notes=[
            f"Reloaded artifact outputs bit-identical to the original: {exact}.",
            f"Public key for verification: {public}.",
        ],
    )
    paths = write_report(report, folder)
    out.print(*console_blocks(report, skip=("Overview", "Layers")))
    out.print(
        f"artifact: {artifact} ({len(data)} bytes, signed, verified, bit-exact: {exact})",
        f"report:   {paths['html']}",
    )
    if not exact:
        raise RuntimeError("the reloaded artifact's outputs differ from the original model")
    return report
