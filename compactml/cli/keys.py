"""``compactml keygen``, ``sign``, ``verify`` and ``demo``."""

from __future__ import annotations

from pathlib import Path

import typer

from compactml.cli.app import OUT, app


@app.command()
def keygen(
    out: Path = typer.Option(..., "--out", "-o", help="private key path; the public key gets .pub"),
) -> None:
    """Create an ed25519 key pair for signing artifacts."""
    from compactml.export.signing import key_id, load_public_key, write_keypair

    private_path, public_path = write_keypair(out)
    kid = key_id(load_public_key(public_path))
    OUT.emit({"private_key": str(private_path), "public_key": str(public_path), "key_id": kid})
    OUT.print(
        f"private key: {private_path} (keep it secret)",
        f"public key:  {public_path}",
        f"key id:      {kid}",
    )


@app.command()
def sign(
    artifact: Path = typer.Argument(..., help=".cml file to sign"),
    key: Path = typer.Option(..., "--key", "-k", help="private key (from compactml keygen)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="signed copy (default X.signed.cml)"),
) -> None:
    """Write a signed copy of an artifact; the input file is never changed."""
    from compactml.export.artifact import sign_artifact

    out = out or artifact.with_name(artifact.stem + ".signed.cml")
    path = sign_artifact(artifact, out, key)
    OUT.emit({"signed": str(path)})
    OUT.print(f"signed copy written to {path}")


@app.command()
def verify(
    artifact: Path = typer.Argument(..., help=".cml file to verify"),
    key: Path = typer.Option(..., "--key", "-k", help="public key of the signer"),
) -> None:
    """Check an artifact's digests and its signature against a public key (exit 2 if wrong)."""
    from compactml.export.artifact import verify_artifact
    from compactml.export.signing import key_id, load_public_key

    manifest = verify_artifact(artifact, key)
    summary = {
        "artifact": str(artifact),
        "verified": True,
        "key_id": key_id(load_public_key(key)),
        "tensor_sha256": manifest.get("tensor_sha256"),
        "source": manifest.get("source"),
    }
    OUT.emit(summary)
    OUT.print(
        f"[green]verified[/green] {artifact}: signature by key {summary['key_id']}, "
        f"tensor sha256 {summary['tensor_sha256']}"
    )


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="output folder"),
    target: str = typer.Option("stm32f746", help="device to check the fit against"),
) -> None:
    """Load digits-cnn, profile and evaluate it, save a signed artifact, verify it, report."""
    from compactml.demo import run_demo

    report = run_demo(out, target=target, out=OUT)
    OUT.emit(report)
