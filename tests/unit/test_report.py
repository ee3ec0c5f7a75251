import re

from tasks.config import QualityConfig
from tasks.quality import run_quality
from tasks.report import html_report, markdown_report
from tests.unit.test_quality import frame


def _decided():
    df = frame([
        ("Explain photosynthesis in plants.", "", "Plants make sugar from light, water and carbon dioxide."),
        ("Explain photosynthesis in plants!", "", "Plants make sugar from light, water and carbon dioxide!"),
        ("Say <b>hi</b> & bye", "", "<script>alert(1)</script> hi & bye."),
        ("Name it.", "", ""),
    ])
    return run_quality(df, QualityConfig(min_total=0.0))


def test_html_report_is_self_contained_and_escaped():
    decided, stats = _decided()
    page = html_report(decided, stats, "score_total", 2, "Report <test>")
    assert page.startswith("<!doctype html>") and "<title>Report &lt;test&gt;</title>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert not re.search(r"(src|href)=['\"]?https?:", page)  # nothing fetched from anywhere
    # One histogram per score column, the drops per reason, the duplicate pair, best and worst examples.
    assert page.count("<svg") == 5
    assert "<td>empty_output</td><td class='num'>1</td>" in page
    assert "<td>near_duplicate</td><td class='num'>1</td>" in page
    assert "Best kept examples by score_total" in page and "Worst kept examples by score_total" in page
    assert "1 clusters holding 2 rows" in page


def test_markdown_report_has_the_same_figures():
    decided, stats = _decided()
    md = markdown_report(decided, stats, "score_total", 2, "Report")
    assert "4 rows scored, **2 kept**, 2 dropped." in md
    assert "| empty_output | 1 |" in md and "| near_duplicate | 1 |" in md
    assert "**score_relevance**" in md and "| score_total | 4 |" in md
