"""`tools/report.py --html`: one self-contained page with the runs' table and embedded plots."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report_tool():
    spec = importlib.util.spec_from_file_location("tool_report", ROOT / "tools" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PageParser(HTMLParser):
    """The table's rows (cell texts), the images' (alt, src), every tag seen and the folded configs' text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[tuple[str, str]] = []
        self.tags: list[str] = []
        self.pres: list[str] = []
        self.table_layout: str | None = None
        self._cell: list[str] | None = None
        self._pre: list[str] | None = None
        self._in_table = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "table" and a.get("id") == "runs":
            self._in_table, self.table_layout = True, a.get("data-layout")
        elif tag == "tr" and self._in_table:
            self.rows.append([])
        elif tag in ("td", "th") and self._in_table:
            self._cell = []
        elif tag == "img":
            self.images.append((a.get("alt") or "", a.get("src") or ""))
        elif tag == "pre":
            self._pre = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._in_table = False
        elif tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "pre" and self._pre is not None:
            self.pres.append("".join(self._pre))
            self._pre = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._pre is not None:
            self._pre.append(data)


def parse(text: str) -> PageParser:
    parser = PageParser()
    parser.feed(text)
    parser.close()
    return parser


def _write_run(run: Path, k: int, note: str, results: dict) -> None:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"out_dir: {run}\nmethod:\n  name: invp\n  k: {k}\nnote: '{note}'\n")
    (run / "results.json").write_text(json.dumps(results))
    lines = [{"step": s, "epoch": s / 4, "loss": 9.0 - s / k, "loss_ins": 8.0, "loss_inv": 1.0, "lr": 0.03,
              "hp_purity": 0.1 * s / 8, "graph_purity": 0.2, "time": 0.0} for s in range(1, 9)]
    lines += [{"step": s, "epoch": s // 4, "epoch_knn_top1": 0.4 + 0.01 * s, "epoch_knn_backbone_top1": 0.5,
               "time": 0.0} for s in (0, 4, 8)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Two run directories (real files as training writes them) and their page, written once by the tool."""
    root = tmp_path_factory.mktemp("html") / "sweep"
    _write_run(root / "0", 4, "plain", {"knn_top1": 0.6266, "knn_backbone_top1": 0.7012, "train_wall_s": 78.6})
    _write_run(root / "1", 8, "<b>bold & raw</b>", {"knn_top1": 0.61, "train_wall_s": 80.2})
    assert _report_tool().main([str(root), "--html"]) == 0
    return root


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def check_page(page: PageParser, sweep: Path) -> None:
    """What both the file and Chromium's DOM must show: the table per key and the three plots."""
    assert page.table_layout == "keys"  # two runs: a column per run
    assert page.rows == [["key", "0", "1"],
                         ["method.k", "4", "8"],
                         ["note", "plain", "<b>bold & raw</b>"],  # escaped: text, not markup
                         ["knn_top1", "62.7%", "61.0%"],
                         ["knn_backbone_top1", "70.1%", "-"],
                         ["train_wall_s", "79", "80"]]
    assert [alt for alt, _ in page.images] == ["losses", "knn", "purity"]
    for alt, src in page.images:
        assert src.startswith("data:image/png;base64,"), alt
        width, height = png_size(base64.b64decode(src.split(",", 1)[1]))
        assert width >= 600 and height >= 300, alt


def test_html_page_has_the_table_and_embedded_plots(sweep: Path) -> None:
    out = sweep / "report.html"
    assert not (sweep / "losses.png").exists()  # the plots live in the page only
    text = out.read_text()
    page = parse(text)
    check_page(page, sweep)
    assert "b" not in page.tags and not {"script", "link"} & set(page.tags)  # no markup injected, nothing fetched
    assert page.pres == [(sweep / r / "config.yaml").read_text() for r in ("0", "1")]
    assert not list(sweep.glob(".report.html.*"))  # the temporary file was renamed


def test_html_layout_runs_has_a_row_per_run(sweep: Path) -> None:
    from invprop.report.html import table_html
    from invprop.report.table import find_run_dirs, table_rows

    page = parse(table_html(*table_rows(find_run_dirs(sweep)), layout="runs"))
    assert page.table_layout == "runs"
    assert page.rows == [["run", "method.k", "note", "knn_top1", "knn_backbone_top1", "train_wall_s"],
                         ["0", "4", "plain", "62.7%", "70.1%", "79"],
                         ["1", "8", "<b>bold & raw</b>", "61.0%", "-", "80"]]


def test_report_cli_html_into_out(tmp_path: Path, capsys) -> None:
    """--out chooses the folder; a bad --layout is argparse's one-line error."""
    run = tmp_path / "run"
    _write_run(run, 4, "x", {"knn_top1": 0.5})
    (run / "metrics.jsonl").write_text("")  # no curves: the page says so instead of showing empty plots
    assert _report_tool().main([str(run), "--html", "--out", str(tmp_path / "pages")]) == 0
    assert f"wrote {tmp_path / 'pages' / 'report.html'}" in capsys.readouterr().out
    page = parse((tmp_path / "pages" / "report.html").read_text())
    assert page.table_layout == "keys" and page.rows == [["key", "run"], ["knn_top1", "50.0%"]]
    assert page.images == [] and "no metrics.jsonl records to plot" in (tmp_path / "pages" / "report.html").read_text()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_html_page_opens_in_headless_chromium(sweep: Path, tmp_path: Path) -> None:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    proc = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           (sweep / "report.html").resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = parse(proc.stdout)
    check_page(dom, sweep)
    assert "tbody" in dom.tags and "b" not in dom.tags
