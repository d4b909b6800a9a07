"""Every ```python block of the README runs as written (offline, on the CPU).

A block that cannot run here carries the marker ``<!-- readme-test: skip: REASON -->`` on the line before its
fence, and the test reports REASON as the skip. ```bash blocks are shell commands (train.py, validate.py,
pip): the tests of those scripts run them; they are not collected here.
"""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'
_BLOCK = re.compile(r'^(?:<!-- readme-test: skip: (?P<skip>.+?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)^```', re.S | re.M)


def python_blocks(text: str):
    """(line of the fence, code, skip reason or None) of every ```python block."""
    return [(text.count('\n', 0, m.start('lang')) + 1, m.group('code'), m.group('skip'))
            for m in _BLOCK.finditer(text) if m.group('lang') == 'python']


BLOCKS = python_blocks(README.read_text())


def test_the_readme_block_reader_sees_markers_and_fences():
    text = 'a\n```python\nx = 1\n```\n<!-- readme-test: skip: needs the Hub -->\n```python\ny\n```\n```bash\nls\n```\n'
    assert python_blocks(text) == [(2, 'x = 1\n', None), (6, 'y\n', 'needs the Hub')]
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize('line,code,skip', BLOCKS, ids=[f'README.md:{line}' for line, _, _ in BLOCKS])
def test_readme_python_block_runs_as_written(line, code, skip, tmp_path, monkeypatch, one_thread):
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    exec(compile(code, f'README.md:{line}', 'exec'), {'__name__': '__readme__'})
