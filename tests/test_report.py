"""`fedbench report` on a smoke run: one self-contained page with every section, PNGs beside it."""

from __future__ import annotations

import base64
import re

import pytest
from typer.testing import CliRunner

from fedbench.cli import app
from fedbench.reporting.html import SECTIONS
from fedbench.reporting.plots import PLOTS

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset with a FedAvg row and a gated row (pfedmoe, so there is expert usage to show)."""
    results = tmp_path_factory.mktemp("smoke")
    done = runner.invoke(
        app, ["run", "--preset", "smoke", "--methods", "fedavg-lora,pfedmoe", "--results", str(results), "--no-plots"]
    )
    assert done.exit_code == 0, done.output
    return results


@pytest.fixture(scope="module")
def page(smoke):
    out = smoke / "page" / "report.html"
    done = runner.invoke(app, ["report", "--results", str(smoke), "--out", str(out)])
    assert done.exit_code == 0, done.output
    return out


def test_the_page_holds_every_section_and_embeds_its_plots(page):
    text = page.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in text, section
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == len(PLOTS)  # the smoke run has a gated row: every plot, expert usage included
    for name, data in zip(PLOTS, images, strict=True):  # the same plots beside the page
        beside = page.with_name(f"report_{name}.png").read_bytes()
        assert beside.startswith(PNG) and base64.b64decode(data) == beside
    assert 'class="sortable"' in text and "<script>" in text  # the leaderboard sorts by column
    assert "[" in text and "fedavg-lora" in text and "pfedmoe" in text  # rows with their intervals
    assert "entropy" in text and "I(task; expert)" in text
    assert "protocol.toml" in text and "torch" in text and "smoke (" in text  # protocol, versions, hash


def test_the_page_needs_no_network(page):
    text = page.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<link" not in text and "@import" not in text and "url(" not in text


def test_compare_and_terminal_table_on_the_smoke_run(smoke):
    compare = runner.invoke(app, ["compare", "--results", str(smoke), "--target", "0.0"], env={"COLUMNS": "80"})
    assert compare.exit_code == 0, compare.output
    assert "fedavg-lora" in compare.output and "1.00×" in compare.output
    assert max(len(line) for line in compare.output.splitlines()) <= 80
    table = runner.invoke(app, ["leaderboard", "--results", str(smoke)], env={"COLUMNS": "100"})
    assert table.exit_code == 0 and max(len(line) for line in table.output.splitlines()) <= 100


def test_report_bad_input_is_one_line(smoke, tmp_path):
    for args, needle in [
        (["--results", str(tmp_path / "missing")], "results directory"),
        (["--results", str(smoke), "--out", str(tmp_path / "page.txt")], "must name an .html file"),
        (["--results", str(tmp_path)], "no runs/<run_id>/records.jsonl under results directory"),
    ]:
        bad = runner.invoke(app, ["report", *args])
        assert bad.exit_code == 2 and "Traceback" not in bad.output, bad.output
        assert needle in " ".join(bad.output.split())
