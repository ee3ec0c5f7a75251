from pathlib import Path

import pytest
import yaml

from flows.cli import main
from tasks.config import Config, ConfigError, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def set_values(node, path: str = ""):
    """Every value a parsed YAML mapping sets, as (dotted key, value)."""
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, dict) and value:
            yield from set_values(value, where)
        else:
            yield where, value


def value_at(cfg: Config, dotted: str):
    node = cfg.model_dump(mode="json")
    for key in dotted.split("."):
        node = node[key]
    return node


def read_back(path: Path) -> dict[str, tuple]:
    """(set in the file, loaded) for every value the profile sets that the loaded config does not hold."""
    cfg = load_config(path)
    return {key: (value, value_at(cfg, key)) for key, value in set_values(yaml.safe_load(path.read_text()))
            if value_at(cfg, key) != value}


@pytest.mark.parametrize("profile", ["default.yaml", "tiny.yaml", "gpu.yaml"])
def test_profiles_load(profile):
    cfg = load_config(ROOT / "configs" / profile)
    assert cfg.llm.model == "bundled"
    assert read_back(ROOT / "configs" / profile) == {}


def test_every_profile_in_configs_loads():
    profiles = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert {"default.yaml", "gpu.yaml", "openai.yaml", "tiny.yaml"} <= set(profiles)
    for name in profiles:
        assert read_back(ROOT / "configs" / name) == {}, name
    # Values that differ from the built-in defaults, so the profile is what was read.
    assert (Config().self_instruct.num_instructions, Config().evol_instruct.rounds) != (8, 1)
    default = load_config(ROOT / "configs" / "default.yaml")
    assert (default.self_instruct.num_instructions, default.evol_instruct.rounds) == (8, 1)
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert (tiny.run.name, tiny.run.seed, tiny.seeds.limit, tiny.mix.total) == ("tiny", 7, 40, 16)
    gpu = load_config(ROOT / "configs" / "gpu.yaml")
    assert (gpu.finetune.device, gpu.finetune.dtype, gpu.evol_instruct.rounds) == ("cuda", "bfloat16", 3)
    openai = load_config(ROOT / "configs" / "openai.yaml")
    assert (openai.llm.backend, openai.llm.mode, openai.mix.cap) == ("openai", "chat", 5000)


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


# --- what a deployment's caller may override -------------------------------------------------------------

@pytest.fixture
def profiles(tmp_path, monkeypatch):
    folder = tmp_path / "profiles"
    folder.mkdir()
    monkeypatch.setenv("INSTRUCTFLOW_PROFILE_DIRS", str(folder))
    openai = (ROOT / "configs" / "openai.yaml").read_text()

    def make(name: str, extra: str = "") -> Path:
        path = folder / name
        path.write_text(openai + "\n" + extra)
        return path
    return make


@pytest.mark.parametrize("override", [
    "llm.base_url=http://attacker.example/v1", "llm.api_key_env=AWS_SECRET_ACCESS_KEY", "llm.api_key_secret=other",
    "llm.backend=transformers", "run.artifacts_dir=/", "run.runs_dir=/etc", "seeds.path=/etc/passwd",
    "finetune.base_model=/root", "quality.scorer_model=/root", "llm.model=other-model", "run.overridable=[llm.*]",
    "llm={base_url: 'http://attacker.example/v1', model: served-model-name}",  # a whole section at once
])
def test_a_caller_cannot_move_the_endpoint_its_key_or_a_path(profiles, override):
    from tasks.config import load_for_caller

    path = profiles("p.yaml", "run: {overridable: ['llm.*', 'run.*', 'seeds.*', 'quality.*', 'finetune.*']}")
    with pytest.raises(ConfigError) as err:
        load_for_caller(path, [override])
    key = override.split("=")[0]
    named = "llm.base_url" if key == "llm" else key
    assert "a flow-run parameter may not override " in str(err.value) and f"`{named}` (" in str(err.value)
    assert "fixed by the profile" in str(err.value) or "what callers may change" in str(err.value)
    # The command line (the machine's own user) may, and the value it gives is the one loaded.
    mine = load_config(path, [override])
    key, value = override.split("=", 1)
    expected = dict(set_values({key: yaml.safe_load(value)}))
    assert {k: value_at(mine, k) for k in expected} == expected


def test_the_profile_says_what_callers_may_change(profiles):
    from tasks.config import load_for_caller

    default = profiles("default-open.yaml")
    assert load_for_caller(default, ["mix.seed=3", "self_instruct.num_instructions=5"]).mix.seed == 3
    same = load_for_caller(default, ["llm.base_url=http://127.0.0.1:8000/v1"])  # unchanged: nothing to refuse
    assert same.llm.base_url == "http://127.0.0.1:8000/v1"
    with pytest.raises(ConfigError, match=r"`llm.max_cost_usd` \(not in the profile's run.overridable"):
        load_for_caller(default, ["llm.max_cost_usd=1000", "llm.prompt_price_per_1m=1",
                                  "llm.completion_price_per_1m=1"])
    closed = profiles("closed.yaml", "run: {overridable: []}")
    with pytest.raises(ConfigError, match=r"`mix.seed` \(not in the profile's run.overridable: none\)"):
        load_for_caller(closed, ["mix.seed=3"])
    llm_open = profiles("llm-open.yaml", "run: {overridable: ['llm.*']}")
    assert load_for_caller(llm_open, ["llm.max_concurrency=64"]).llm.max_concurrency == 64
    with pytest.raises(ConfigError, match="run.overridable: `llm.base_url` cannot be opened to callers"):
        load_config(profiles("bad.yaml", "run: {overridable: ['llm.base_url']}"))


def test_a_caller_takes_profiles_from_the_profile_directories_only(profiles, tmp_path):
    from tasks.config import load_for_caller

    outside = tmp_path / "elsewhere.yaml"
    outside.write_text((ROOT / "configs" / "openai.yaml").read_text())
    link = profiles("inside.yaml").with_name("link.yaml")
    link.symlink_to(outside)
    for path in (outside, link, profiles("x.yaml").parent / ".." / "elsewhere.yaml"):
        with pytest.raises(ConfigError, match="a deployment run takes its profile from .*profiles only"):
            load_for_caller(path, [])


def test_endpoint_scoring_needs_an_openai_completions_llm_and_uses_it():
    from tasks.stages import _scorer_llm

    with pytest.raises(ConfigError, match="quality.scorer: `endpoint` .* llm.backend: openai and llm.mode: completions"):
        load_config("configs/tiny.yaml", ["quality.scorer=endpoint"])
    with pytest.raises(ConfigError, match="quality.scorer"):
        load_config("configs/openai.yaml", ["quality.scorer=endpoint", "quality.ifd.enabled=true"])  # chat mode
    cfg = load_config("configs/openai.yaml", ["quality.scorer=endpoint", "quality.ifd.enabled=true",
                                              "llm.mode=completions"])
    assert _scorer_llm(cfg) == cfg.llm  # DEITA and IFD ask the run's endpoints
    local = load_config("configs/openai.yaml", ["quality.ifd.enabled=true"])
    assert _scorer_llm(local).backend == "transformers" and _scorer_llm(local).model == local.finetune.base_model


def test_ray_settings_are_checked_and_operational():
    with pytest.raises(ConfigError, match="run.executor"):
        load_config("configs/tiny.yaml", ["run.executor=dask"])
    with pytest.raises(ConfigError, match="finetune.launcher"):
        load_config("configs/tiny.yaml", ["finetune.launcher=slurm"])
    cfg = load_config("configs/tiny.yaml", ["run.executor=ray", "run.ray_num_gpus=1", "finetune.launcher=ray"])
    base = load_config("configs/tiny.yaml")
    assert cfg.finetune.identity() == base.finetune.identity()  # the launcher is not in the artifact key


def test_conversation_keys_are_checked_and_name_the_key(tmp_path):
    cfg = Config.model_validate(apply_overrides({}, ["finetune.template=chat", "seeds.format=sharegpt",
                                                     "self_chat.enabled=true", "self_chat.turns=4"]))
    assert (cfg.finetune.template, cfg.seeds.format, cfg.self_chat.turns) == ("chat", "sharegpt", 4)
    assert Config().self_chat.enabled is False and Config().finetune.template == "alpaca"
    with pytest.raises(ConfigError, match=r"finetune\.template.*'alpaca'.*'chat'"):
        load_config(write(tmp_path, "finetune:\n  template: vicuna\n"))
    with pytest.raises(ConfigError, match=r"self_chat\.turns"):
        load_config(write(tmp_path, "self_chat:\n  turns: 1\n"))
    with pytest.raises(ConfigError, match="min_words must not exceed max_words"):
        load_config(write(tmp_path, "self_chat:\n  min_words: 9\n  max_words: 3\n"))
    # what the stage makes depends on these, not on how often it checkpoints
    assert "turns" in Config().self_chat.identity() and "checkpoint_every" not in Config().self_chat.identity()
