"""The README's first command must not rot: the demo's Qwen3-VL part end to end (the MLA part's pieces are
covered by tests/test_mla*.py)."""

from jaxlm import demo


def test_qwen3_vl_demo_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXLM_CACHE", str(tmp_path))
    assert demo.run_qwen3_vl(max_new_tokens=4)
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "warm call" in out
    assert (tmp_path / "qwen3-vl-demo-random-0" / "model.safetensors").is_file()
