from pathlib import Path

import pytest

from flows.cli import main
from tasks.config import Config, ConfigError, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("profile", ["default.yaml", "tiny.yaml", "gpu.yaml"])
def test_profiles_load(profile):
    cfg = load_config(ROOT / "configs" / profile)
    assert isinstance(cfg, Config)
    assert cfg.llm.model == "bundled"


def test_every_profile_in_configs_loads():
    profiles = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert {"default.yaml", "gpu.yaml", "openai.yaml", "tiny.yaml"} <= set(profiles)
    for name in profiles:
        assert isinstance(load_config(ROOT / "configs" / name), Config)


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, "mix:\n  seed: 1\n"),
                      ["mix.seed=2", "quality.min_total=0.25", "mix.replace=true", "mix.weights={qa: 2}"])
    assert cfg.mix.seed == 2 and cfg.quality.min_total == 0.25 and cfg.mix.replace is True
    assert cfg.mix.weights == {"qa": 2.0}


def test_unknown_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "mix:\n  sed: 2\n"))
    message = str(err.value)
    assert "`mix.sed`" in message and "seed" in message and "eval_fraction" in message


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key `mixx`; allowed here: run, llm"):
        load_config(write(tmp_path, "mixx: {}\n"))


def test_bad_value_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"key `finetune.batch_size`: .*greater than or equal to 1.*got 0"):
        load_config(write(tmp_path, "finetune:\n  batch_size: 0\n"))


def test_bad_literal_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"`llm.device`.*'auto', 'cpu' or 'cuda'"):
        load_config(write(tmp_path, "llm:\n  device: tpu\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")


def test_yaml_syntax_error_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:4: not valid YAML"):
        load_config(write(tmp_path, "mix:\n  seed: 1\n  total: [1,\n"))


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_override_syntax_and_through_value():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_overrides({}, ["mix.seed"])
    with pytest.raises(ConfigError, match="`mix.seed` is a value, not a section"):
        apply_overrides({"mix": {"seed": 1}}, ["mix.seed.x=2"])


def test_cli_exits_2_before_any_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--config", str(ROOT / "configs/default.yaml"), "--set", "mix.sed=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key `mix.sed`" in err
    assert not (tmp_path / "data").exists()


def test_openai_backend_needs_a_model_name_and_a_model_to_tune():
    with pytest.raises(ConfigError, match=r"key `llm`: .*`llm.model` must name the model the endpoint serves"):
        load_config(ROOT / "configs" / "default.yaml", ["llm.backend=openai"])
    with pytest.raises(ConfigError, match=r"openai.yaml: finetune.base_model: with llm.backend `openai`"):
        load_config(ROOT / "configs" / "openai.yaml", ["finetune.base_model=null"])
    cfg = load_config(ROOT / "configs" / "openai.yaml", ["llm.max_concurrency=2"])
    assert cfg.llm.mode == "chat" and "max_concurrency" not in cfg.llm.identity()
    assert cfg.llm.identity() == load_config(ROOT / "configs" / "openai.yaml").llm.identity()


def test_a_cost_budget_needs_prices_and_budgets_stay_out_of_artifact_keys(tmp_path):
    base = ["llm.backend=openai", "llm.model=m", "finetune.base_model=bundled"]
    with pytest.raises(ConfigError, match=r"c.yaml: llm.max_cost_usd needs prompt_price_per_1m and completion_price_per_1m"):
        load_config(write(tmp_path, ""), [*base, "llm.max_cost_usd=5"])
    cheap = load_config(write(tmp_path, ""), [*base, "llm.max_cost_usd=5", "llm.prompt_price_per_1m=0.1",
                                              "llm.completion_price_per_1m=0.4", "llm.requests_per_minute=60"])
    assert cheap.llm.identity() == load_config(write(tmp_path, ""), base).llm.identity()
