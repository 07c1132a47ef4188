"""docs/grpo.md quotes the code: its line links and its code blocks must match the code; keep them true.

Two conventions hold the page to the code:
- a link [`snippet`](../path.py#L42) names a line: line 42 of path.py must contain `snippet`;
- a fenced block whose info string is `python <path>` (```` ```python grpo/loss.py ````) quotes
  that file: each of its lines, without its trailing `# comment`, is a line of the file (also
  without its comment; leading and trailing spaces ignored). Every python block names its file.
  Blocks without `python` (the equations, the pseudocode, the worked example) are not code.

After the code moves, `python tests/test_docs.py --fix` rewrites the line numbers of the links whose
snippet is found on exactly one line of their file; a quoted block that no longer matches is
rewritten by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "grpo.md"
LINK = re.compile(r"\[`([^`]+)`\]\(\.\./([\w/.]+\.py)#L(\d+)\)")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def _code(line: str) -> str:
    """A line without its trailing comment (`  # ...`) and its surrounding spaces."""
    return re.split(r"\s+#\s", " " + line.strip(), maxsplit=1)[0].strip() if "#" in line else line.strip()


def _is_in(quoted: str, code: set[str], whole: set[str]) -> bool:
    """A quoted line is in the file: its code is a line's code, or (a comment line) it is a whole line."""
    return (_code(quoted) or quoted.strip()) in (code if _code(quoted) else whole)


def _quoted_blocks(text: str) -> list[tuple[str, str, list[str]]]:
    """(info string, file named, quoted lines) of each fenced block whose language is python."""
    blocks = []
    for info, body in FENCE.findall(text):
        words = info.split()
        if words and words[0] == "python":
            blocks.append((info, words[1] if len(words) > 1 else "", [line for line in body.splitlines() if line.strip()]))
    return blocks


def test_every_line_link_lands_on_the_code_it_names():
    text = PAGE.read_text()
    links = LINK.findall(text)
    assert len(links) >= 20, "the term and loop tables should link their code"
    for snippet, path, line in links:
        lines = (REPO / path).read_text().splitlines()
        assert int(line) <= len(lines), f"{path}#L{line} is past the end of the file"
        assert snippet in lines[int(line) - 1], (
            f"{path}#L{line} no longer holds `{snippet}`: update docs/grpo.md (python tests/test_docs.py --fix)"
        )


def test_every_quoted_code_line_is_in_the_file_it_names():
    blocks = _quoted_blocks(PAGE.read_text())
    assert blocks, "docs/grpo.md should quote the loss's lines in a ```python <file> block"
    missing = []
    for info, path, quoted in blocks:
        assert path, f"docs/grpo.md: the block ```{info} quotes code but names no file: write ```python <path>"
        assert (REPO / path).is_file(), f"docs/grpo.md: the block ```{info} names {path}, which does not exist"
        lines = (REPO / path).read_text().splitlines()
        code, whole = {_code(line) for line in lines}, {line.strip() for line in lines}
        missing += [f"{path} has no line `{line.strip()}`" for line in quoted if not _is_in(line, code, whole)]
    assert not missing, "docs/grpo.md quotes code that is not in its file (copy the current line):\n" + "\n".join(missing)


def test_the_quote_check_sees_a_drifted_line():
    # A block names its file; a line that is not in it (here an old `kl_k3` call) is reported. The
    # file is written here, so the check's own test does not move when the loss's lines do.
    source = "ratio = torch.exp(log_ratio)  # [R, T]\n# the k3 estimator\nkl = kl_estimate(logprobs, ref)\n"
    text = "```python some/file.py\nratio = torch.exp(log_ratio)  # ρ\nkl = kl_k3(logprobs, ref_logprobs)\n```\n"
    (info, path, quoted), = _quoted_blocks(text)
    assert path == "some/file.py"
    lines = source.splitlines()
    code, whole = {_code(line) for line in lines}, {line.strip() for line in lines}
    assert [_is_in(line, code, whole) for line in quoted] == [True, False]
    assert _is_in("# the k3 estimator", code, whole)
    assert not _is_in("# a comment the file does not have", code, whole)
    assert _code("x = f(a)  # [R, T] why") == "x = f(a)" and _code("y = '#'") == "y = '#'"
    assert _quoted_blocks("```\nA = [1.0]\n```\n") == []  # not python: not a quote


def fix_line_numbers() -> list[str]:
    """Point every link at the one line of its file that holds its snippet; returns what was left."""
    text, left = PAGE.read_text(), []

    def relink(match):
        snippet, path, line = match.groups()
        lines = (REPO / path).read_text().splitlines()
        found = [number for number, code in enumerate(lines, 1) if snippet in code]
        if len(found) != 1:
            left.append(f"{path}: `{snippet}` is on {len(found)} lines; fix its link by hand")
            return match.group(0)
        return f"[`{snippet}`](../{path}#L{found[0]})"

    PAGE.write_text(LINK.sub(relink, text))
    return left


if __name__ == "__main__" and sys.argv[1:] == ["--fix"]:
    print("\n".join(fix_line_numbers()) or "every link points at its line")
