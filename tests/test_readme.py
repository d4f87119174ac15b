"""The README's Python example runs as written (on a tiny bundle in place of /tmp/spiritlm-bundle)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tiny_base_bundle, tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    code = (
        blocks[0]
        .replace("/tmp/spiritlm-bundle", str(tiny_base_bundle))
        .replace("/tmp/answer.wav", str(tmp_path / "a.wav"))
    )
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "a.wav").stat().st_size > 0
    assert "[St81][Pi13][Hu78][Hu42][Hu81][Hu159][Pi3][Hu316][Hu259]" in capsys.readouterr().out
