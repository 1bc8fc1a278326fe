"""The self-contained HTML report."""

import base64
import re

from compactml.report import render_html

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _images(html: str) -> list[bytes]:
    return [
        base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    ]


def test_charts_are_embedded_as_png_data_uris(report, reference):
    report["reference_metrics"] = reference
    html = render_html(report)
    images = _images(html)
    assert len(images) == 2
    assert all(image.startswith(PNG_SIGNATURE) for image in images)


def test_no_external_resources(report):
    report["notes"].append("see https://example.com/details")
    html = render_html(report)
    links = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html, flags=re.I)
    assert links and all(link.startswith("data:image/png;base64,") for link in links)
    assert "<link" not in html and "<script" not in html and "@import" not in html
    assert "https://example.com/details" in html  # a note is shown as text, not loaded
    assert "default-src 'none'" in html


def test_user_text_is_escaped(report):
    report["model"] = "<script>alert(1)</script>"
    report["title"] = 'Title "quoted" & <b>bold</b>'
    report["profile"]["layers"][0]["name"] = "<img src=x onerror=alert(1)>"
    html = render_html(report)
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "<img src=x" not in html
    assert "<title>Title &quot;quoted&quot; &amp; &lt;b&gt;bold&lt;/b&gt;</title>" in html


def test_html_shows_the_same_tables_as_markdown(report, reference):
    report["reference_metrics"] = reference
    html = render_html(report)
    assert '<td>Top-1 accuracy</td><td class="num">95.00%</td>' in html
    assert '<td class="num">-1.25 pp</td>' in html
    assert "<td>features.2</td><td>Conv2d</td>" in html
    assert '<td class="num">50.00%</td>' in html


def test_html_of_title_and_model_only_has_no_images():
    html = render_html({"title": "Only", "model": "m"})
    assert html.startswith("<!DOCTYPE html>")
    assert "<h1>Only</h1>" in html and "Model: m" in html
    assert "<img" not in html


def test_given_charts_are_used_as_they_are(report):
    fake = PNG_SIGNATURE + b"fake"
    html = render_html(report, charts={"per_layer_size.png": fake})
    assert _images(html) == [fake]  # the noise chart was not given, so it is not drawn
