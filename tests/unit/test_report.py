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


def _with_conversations():
    import pyarrow as pa

    from tasks.conversation import from_messages, messages_array

    chat = [{"role": "user", "content": "Explain photosynthesis in plants."},
            {"role": "assistant", "content": "Plants make sugar from light, water and carbon dioxide."},
            {"role": "user", "content": "Where does it <happen>?"},
            {"role": "assistant", "content": "In the chloroplasts of leaf cells."}]
    dropped = chat[:3] + [{"role": "assistant", "content": "  "}]
    rows = [from_messages(chat), {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour.",
                                  "messages": None}, from_messages(dropped)]
    table = pa.table({"id": ["c0", "r1", "c2"], **{k: [r[k] for r in rows] for k in ("instruction", "input", "output")},
                      "messages": messages_array(r["messages"] for r in rows), "origin": ["seed"] * 3})
    decided, stats = run_quality(table, QualityConfig(min_total=0.0))
    return decided.to_pandas(), stats


def test_reports_count_conversations_and_show_every_turn():
    decided, stats = _with_conversations()
    assert stats["multi_turn"] == {"rows": 2, "kept": 1} and stats["dropped"] == {"empty_output": 1}
    page = html_report(decided, stats, "score_total", 2, "Report")
    assert "3 rows scored, <b>2 kept</b>, 1 dropped. 2 multi-turn conversations (1 kept).</p>" in page
    # The kept conversation, every turn escaped, in one cell across instruction, input and output.
    assert ("<td colspan='3'>2 assistant turns<b>User</b><pre>Explain photosynthesis in plants.</pre>"
            "<b>Assistant</b><pre>Plants make sugar from light, water and carbon dioxide.</pre>"
            "<b>User</b><pre>Where does it &lt;happen&gt;?</pre>"
            "<b>Assistant</b><pre>In the chloroplasts of leaf cells.</pre></td>") in page
    assert "<td><pre>Name a colour.</pre></td><td><pre></pre></td><td><pre>Blue is a colour.</pre></td>" in page
    md = markdown_report(decided, stats, "score_total", 2, "Report")
    assert "3 rows scored, **2 kept**, 1 dropped.\n2 multi-turn conversations (1 kept)." in md
    assert ("| **User:** Explain photosynthesis in plants. **Assistant:** Plants make sugar from light, water and "
            "carbon dioxide. **User:** Where does it <happen>? **Assistant:** In the chloroplasts of leaf cells. | "
            "(2 assistant turns) |") in md
    assert "| Name a colour. | Blue is a colour. |" in md
