"""The README's promises that can be checked on any machine: its "Use" snippet runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_use_snippet_runs_as_written(one_thread):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Use"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(snippet, "README.md (Use)", "exec"), scope)
    assert scope["out"].shape == (2, 16, 1024, 128) and scope["q"].grad is not None
    assert scope["loss"].ndim == 0 and scope["logp"].shape == (8, 256)
