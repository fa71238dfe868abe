"""progress.bar: tqdm on a terminal, plain lines (no carriage returns or cursor escapes) in a log."""
import io
import sys

from fgvce_jax import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_plain_lines_and_the_final_count(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress.bar(range(3), desc="pass x", unit="it", leave=False):
        progress.write("a message")
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines.count("a message") == 3 and all(line.strip() for line in lines)
    assert lines[-1].startswith("pass x: 100%") and "3/3" in lines[-1]  # the end is kept, even with leave=False


def test_a_terminal_gets_tqdm_redraws(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    for _ in progress.bar(range(3), desc="pass y", leave=False):
        pass
    assert "\r" in term.getvalue()
