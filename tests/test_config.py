import pytest

from viscodex_lite import config


def test_default_mode_is_tiny_under_ci_and_lab_elsewhere():
    assert config.current(env={"CI": "true"}).mode == "tiny"
    cfg = config.current(env={})  # lab asked, no model root: falls back with a note
    assert (cfg.requested_mode, cfg.mode) == ("lab", "tiny")
    assert any("VISCODEX_LITE_MODELS" in note for note in cfg.notes)


def test_lab_mode_with_existing_models_root(tmp_path):
    cfg = config.current(env={"VISCODEX_LITE_MODE": "lab", "VISCODEX_LITE_MODELS": str(tmp_path)})
    assert cfg.mode == "lab" and cfg.models_root == tmp_path and not cfg.notes
    assert cfg.pick(tiny=1, lab=2, full=3) == 2


def test_missing_models_root_falls_back_with_message(tmp_path):
    cfg = config.current(env={"VISCODEX_LITE_MODE": "full", "VISCODEX_LITE_MODELS": str(tmp_path / "nope")})
    assert cfg.mode == "tiny" and "does not exist" in cfg.notes[0]


def test_bad_mode_and_seed_are_explained():
    with pytest.raises(config.ConfigError, match="not one of tiny, lab, full"):
        config.current(env={"VISCODEX_LITE_MODE": "huge"})
    with pytest.raises(config.ConfigError, match="VISCODEX_LITE_SEED"):
        config.current(env={"VISCODEX_LITE_SEED": "abc"})


def test_model_path_errors_tell_what_to_do(tmp_path):
    cfg = config.current(env={"VISCODEX_LITE_MODE": "lab", "VISCODEX_LITE_MODELS": str(tmp_path)})
    with pytest.raises(config.ConfigError, match="no checkpoint at"):
        cfg.model_path("Qwen2.5-VL-7B-Instruct")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert cfg.model_path("m") == tmp_path / "m"
    with pytest.raises(config.ConfigError, match="VISCODEX_LITE_DATA"):
        cfg.data_path("MCD")


def test_pick_defaults_cascade():
    cfg = config.current(mode="tiny", env={})
    assert cfg.pick(tiny="t") == "t"


def test_static_widgets_under_ci():
    assert config.current(env={"CI": "1"}).static_widgets
    assert not config.current(env={}).static_widgets


def test_seed_everything_repeats():
    import torch

    config.seed_everything(3)
    a = torch.rand(3)
    config.seed_everything(3)
    assert torch.equal(a, torch.rand(3))


def test_secret_reads_one_variable_and_treats_empty_as_unset(monkeypatch):
    monkeypatch.setenv("VL_TEST_SECRET_KEY", "sk-abc")
    assert config.secret("VL_TEST_SECRET_KEY") == "sk-abc"
    assert config.secret("VL_TEST_SECRET_KEY", env={"VL_TEST_SECRET_KEY": ""}) is None
    assert config.secret("") is None and config.secret("VL_TEST_UNSET_KEY_XYZ") is None


def test_only_config_reads_environment_variables():
    import re

    package = config.REPO_ROOT / "viscodex_lite"
    reads = re.compile(r"os\.getenv|environ\.get\(|environ\[|environ\.copy\(|dict\(os\.environ")
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if p.name != "config.py" and reads.search(p.read_text())]
    assert offenders == []
