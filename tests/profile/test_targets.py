"""Built-in devices and the fit rule."""

import pytest

from compactml.errors import CompactMLError
from compactml.profile.targets import Target, check_fit, get_target, load_targets

KB = 1024
MB = 1024 * KB
GB = 1024 * MB


def test_builtin_table_has_the_documented_sizes():
    targets = load_targets()
    assert targets["stm32f746"].ram_bytes == 320 * KB
    assert targets["stm32f746"].flash_bytes == 1 * MB
    assert targets["stm32h743"].ram_bytes == 1 * MB and targets["stm32h743"].flash_bytes == 2 * MB
    assert targets["arduino-nano-33-ble"].ram_bytes == 256 * KB
    assert targets["esp32-s3"].flash_bytes == 8 * MB
    assert targets["raspberry-pi-4"].ram_bytes == 4 * GB
    assert targets["x86-server"].ram_bytes == 64 * GB
    assert targets["stm32f746"].on_chip and not targets["x86-server"].on_chip


def test_lookup_is_case_insensitive_and_accepts_underscores():
    assert get_target("STM32F746").name == "stm32f746"
    assert get_target("arduino_nano_33_ble").name == "arduino-nano-33-ble"
    own = Target("mine", "my board", ram_bytes=10, flash_bytes=20)
    assert get_target(own) is own


def test_unknown_device_names_the_known_ones():
    with pytest.raises(
        CompactMLError, match=r"unknown device 'pdp-11'; known devices: .*stm32f746"
    ):
        get_target("pdp-11")


def test_microcontroller_keeps_weights_in_flash():
    fit = check_fit(get_target("stm32f746"), stored_bytes=200 * KB, peak_activation_bytes=50 * KB)
    assert fit.needs_flash_bytes == 200 * KB
    assert fit.needs_ram_bytes == 50 * KB
    assert fit.flash_margin_bytes == 1 * MB - 200 * KB
    assert fit.ram_margin_bytes == 320 * KB - 50 * KB
    assert fit.fits


def test_ram_overflow_does_not_fit():
    fit = check_fit(get_target("stm32f746"), stored_bytes=10 * KB, peak_activation_bytes=400 * KB)
    assert fit.ram_margin_bytes == 320 * KB - 400 * KB < 0
    assert not fit.fits


def test_device_without_separate_flash_loads_weights_into_ram():
    fit = check_fit(get_target("raspberry-pi-4"), stored_bytes=3 * GB, peak_activation_bytes=2 * GB)
    assert fit.needs_ram_bytes == 5 * GB
    assert fit.ram_margin_bytes == -1 * GB
    assert not fit.fits
    assert set(fit.to_dict()) == {
        "name",
        "description",
        "flash_bytes",
        "ram_bytes",
        "needs_flash_bytes",
        "needs_ram_bytes",
        "flash_margin_bytes",
        "ram_margin_bytes",
        "fits",
    }
