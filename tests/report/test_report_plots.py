"""Charts: PNG bytes drawn without pyplot."""

import struct
import subprocess
import sys

from compactml.report import render_charts
from compactml.report.plots import accuracy_vs_noise_png, byte_unit, per_layer_size_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_SIGNATURE)
    return struct.unpack(">II", png[16:24])  # width, height from the IHDR chunk


def test_byte_unit_is_the_unit_the_tables_use():
    assert byte_unit(1023) == (1.0, "B")
    assert byte_unit(1536) == (1024.0, "KiB")
    assert byte_unit(1024**2 - 1) == (1024.0**2, "MiB")  # as human_bytes rounds: "1.00 MiB"
    assert byte_unit(-2048) == (1024.0, "KiB")
    assert byte_unit(5 * 1024**4) == (1024.0**4, "TiB")
    assert byte_unit(1024**7) == (1024.0**5, "PiB")


def test_per_layer_chart_grows_with_layers_up_to_the_top_25(make_report):
    heights = {
        n: _size(per_layer_size_png(make_report(n)["profile"]["layers"]))[1] for n in (5, 25, 40)
    }
    assert heights[5] < heights[25] == heights[40]


def test_labels_with_dollar_signs_are_drawn_literally():
    layers = [{"name": "$\\frac{a", "type": "x$", "stored_bytes": 10}, {"name": "b", "type": "y"}]
    assert _size(per_layer_size_png(layers))[0] == 800


def test_noise_chart_with_and_without_reference():
    points = [{"sigma": 0.0, "top1": 0.9}, {"sigma": 0.2, "top1": 0.5}]
    ours = accuracy_vs_noise_png(points)
    both = accuracy_vs_noise_png(
        points, [{"sigma": 0.0, "top1": 0.95}, {"sigma": 0.2, "top1": 0.8}]
    )
    assert _size(ours) == _size(both) == (600, 400)
    assert ours != both


def test_render_charts_draws_only_what_has_data(report):
    assert set(render_charts(report)) == {"per_layer_size.png", "accuracy_vs_noise.png"}
    del report["metrics"]["noise"]
    assert set(render_charts(report)) == {"per_layer_size.png"}
    assert render_charts({"title": "t", "model": "m"}) == {}


def test_drawing_leaves_pyplot_and_the_backend_alone(tmp_path):
    code = (
        "import matplotlib, sys\n"
        "matplotlib.use('svg')\n"
        "from compactml.report.plots import per_layer_size_png\n"
        "per_layer_size_png([{'name': 'a', 'type': 'Linear', 'stored_bytes': 4}])\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
