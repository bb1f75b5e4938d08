"""The persistent compilation cache's directory and its switches (gradflow.compilation_cache)."""

from gradflow.compilation_cache import ENV, cache_directory, enable_compilation_cache


def test_cache_lives_in_the_user_cache_directory_unless_turned_off(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_directory() == tmp_path / "gradflow" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_directory() == tmp_path / "home" / ".cache" / "gradflow" / "jax"
    monkeypatch.setenv(ENV, str(tmp_path / "elsewhere"))
    assert cache_directory() == tmp_path / "elsewhere"
    for off in ("0", "off", "False"):
        monkeypatch.setenv(ENV, off)
        assert cache_directory() is None
        assert enable_compilation_cache(True) is None


def test_config_switch_turns_the_cache_off(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path))
    assert enable_compilation_cache(False) is None
