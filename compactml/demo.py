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


def _signed_artifact(model, task, folder: Path, metrics: dict) -> dict:
    """Save ``model`` signed, load it back with the public key, compare outputs bit for bit."""
    from compactml.export.artifact import load, save
    from compactml.export.signing import key_id, load_public_key

    private, public = _keys(folder)
    path = save(model, folder / "digits-cnn.cml", sign_key=private, metrics=metrics)
    loaded = load(path, verify_key=public)
    if not _bit_exact(model, loaded, task):
        raise RuntimeError("the reloaded artifact's outputs differ from the original model")
    data = path.read_bytes()
    return {
        "path": str(path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "signed": True,
        "verified": True,
        "key_id": key_id(load_public_key(public)),
        "public_key": str(public),
    }


def run_demo(folder: str | Path, target: str = "stm32f746", out: Any = None) -> dict:
    """Run the demo into ``folder`` and return the report dict (also written there)."""
    from compactml import examples
    from compactml.cli import Output
    from compactml.evaluate import evaluate
    from compactml.profile import profile
    from compactml.profile.targets import get_target
    from compactml.report import write_report
    from compactml.report.build import new_report
    from compactml.report.console import console_blocks

    out = out or Output(quiet=True)
    folder = Path(folder)
    get_target(target)  # an unknown device fails before any work is done
    model, task = examples.load("digits-cnn", progress=out.human)  # trains once, then cached
    status = out.console.status if out.human else lambda _: contextlib.nullcontext()
    with status(f"profiling against {target}"):
        prof = profile(model, task.example_input(), target=target).to_dict()
    metrics = dict(evaluate(model, task, progress=out.human))
    with status("saving the signed artifact and verifying it"):
        artifact = _signed_artifact(model, task, folder, metrics)
    notes = [
        "The reloaded artifact's outputs are bit-identical to the original model's.",
        f"Verify it with: compactml verify {artifact['path']} --key {artifact['public_key']}",
        "Profile's stored size is the artifact without metrics or signature; the saved "
        "artifact also carries both.",
    ]
    report = new_report(
        "compactml demo: digits-cnn",
        "digits-cnn",
        profile=prof,
        metrics=metrics,
        artifact=artifact,
        notes=notes,
    )
    paths = write_report(report, folder)
    out.print(*console_blocks(report, skip=("Overview", "Layers")))
    out.print(f"report: {paths['html']}")
    return report
