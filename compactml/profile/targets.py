"""Devices a model can be checked against: how much flash and RAM each has, and whether it fits.

The built-in table lives in ``targets.yaml`` next to this file (package data), one entry per
device with ``description``, ``ram_bytes``, ``flash_bytes`` and optionally ``cpu_mhz`` and
``on_chip``. Sizes are bytes, with KB = 1024 bytes.

The fit rule (:func:`check_fit`):

- flash (storage) must hold the stored model: ``needs_flash_bytes = stored_bytes``;
- on a microcontroller (``on_chip: true``) the weights are read in place from flash, so RAM
  holds only the activations: ``needs_ram_bytes = peak_activation_bytes``;
- on a device without separate execute-in-place flash (a Raspberry Pi, a server) the weights
  are loaded into RAM next to the activations:
  ``needs_ram_bytes = stored_bytes + peak_activation_bytes``.

Margins are ``available - needed`` (negative when it does not fit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources

import yaml

from compactml.errors import CompactMLError

_FIELDS = {"description", "ram_bytes", "flash_bytes", "cpu_mhz", "on_chip"}


@dataclass(frozen=True)
class Target:
    """A device: its name, a one-line description, RAM and flash in bytes.

    ``on_chip`` marks a microcontroller that runs from internal flash and SRAM (weights stay in
    flash); ``cpu_mhz`` is the core clock, when known.
    """

    name: str
    description: str
    ram_bytes: int
    flash_bytes: int
    cpu_mhz: int | None = None
    on_chip: bool = False


@dataclass(frozen=True)
class Fit:
    """Whether a model fits a target: what it needs, what is left over (bytes), and the verdict."""

    name: str
    description: str
    flash_bytes: int
    ram_bytes: int
    needs_flash_bytes: int
    needs_ram_bytes: int
    flash_margin_bytes: int
    ram_margin_bytes: int
    fits: bool

    def to_dict(self) -> dict:
        """The JSON-able form used by ``Profile.to_dict()["target"]``."""
        return asdict(self)


def _parse_target(name: str, entry: object) -> Target:
    if not isinstance(entry, dict) or not {"description", "ram_bytes", "flash_bytes"} <= set(entry):
        raise CompactMLError(
            f"device {name!r} in targets.yaml needs description, ram_bytes and flash_bytes; "
            "fix the entry"
        )
    unknown = set(entry) - _FIELDS
    if unknown:
        raise CompactMLError(
            f"device {name!r} in targets.yaml has unknown keys {sorted(unknown)}; "
            f"use only {sorted(_FIELDS)}"
        )
    return Target(
        name=name,
        description=str(entry["description"]),
        ram_bytes=int(entry["ram_bytes"]),
        flash_bytes=int(entry["flash_bytes"]),
        cpu_mhz=None if entry.get("cpu_mhz") is None else int(entry["cpu_mhz"]),
        on_chip=bool(entry.get("on_chip", False)),
    )


def load_targets() -> dict[str, Target]:
    """Read the built-in device table (``compactml/profile/targets.yaml``), keyed by name."""
    text = resources.files("compactml.profile").joinpath("targets.yaml").read_text("utf-8")
    table = yaml.safe_load(text) or {}
    return {str(name): _parse_target(str(name), entry) for name, entry in table.items()}


def get_target(name: str | Target) -> Target:
    """Look a device up by name: case-insensitive, ``_`` accepted for ``-``.

    A :class:`Target` is returned unchanged, so callers may pass their own device.
    """
    if isinstance(name, Target):
        return name
    targets = load_targets()
    key = str(name).strip().lower().replace("_", "-")
    if key not in targets:
        raise CompactMLError(
            f"unknown device {name!r}; known devices: {', '.join(sorted(targets))}"
        )
    return targets[key]


def check_fit(target: Target, stored_bytes: int, peak_activation_bytes: int) -> Fit:
    """Compare a model's needs with ``target`` (all sizes in bytes); the rule is in the module doc.

    Args:
        target: the device.
        stored_bytes: size of the stored model artifact (what goes to flash or disk).
        peak_activation_bytes: the most activation memory alive at once during inference.
    """
    needs_flash = int(stored_bytes)
    needs_ram = int(peak_activation_bytes)
    if not target.on_chip:
        needs_ram += int(stored_bytes)
    flash_margin = target.flash_bytes - needs_flash
    ram_margin = target.ram_bytes - needs_ram
    return Fit(
        name=target.name,
        description=target.description,
        flash_bytes=target.flash_bytes,
        ram_bytes=target.ram_bytes,
        needs_flash_bytes=needs_flash,
        needs_ram_bytes=needs_ram,
        flash_margin_bytes=flash_margin,
        ram_margin_bytes=ram_margin,
        fits=flash_margin >= 0 and ram_margin >= 0,
    )
