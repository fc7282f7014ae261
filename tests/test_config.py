"""The one config schema: round trips, overrides, clear errors naming the field, the CLI form."""

import shlex

import pytest

from lycotrain.engine.config import Config, apply_overrides, config_to_cli, field_help, load_config
from lycotrain.errors import ConfigError

EXAMPLE = """
task = "image"
run_dir = "runs/x"
seed = 7
[model]
path = "builtin:tiny-sd1"
[dataset]
path = "data"
resolution = 256
min_bucket_resolution = 128
[network]
method = "lokr"
rank = 16
factor = 4
overrides = { "*attn2*" = { rank = 4 } }
[training]
max_steps = 100
lr = 1e-4
scheduler = "cosine"
[[sample.prompts]]
prompt = "a cat"
seed = 3
"""


def test_load_roundtrip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(EXAMPLE)
    config = load_config(path)
    assert config.network.method == "lokr" and config.network.rank == 16
    assert config.sample.prompts[0].prompt == "a cat" and config.sample.prompts[0].steps == 20
    assert config.network.overrides == {"*attn2*": {"rank": 4}}
    again = tmp_path / "again.toml"
    config.write_toml(again)
    assert load_config(again) == config
    assert Config.from_dict(config.to_dict(only_changed=True)) == config


def test_overrides_parse_toml_values(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(EXAMPLE)
    config = load_config(path, ["training.lr=3e-4", "network.train_text_encoder=true", "save.output_name=my lora",
                                "network.include=a,b", "network.overrides.*mid*.rank=2"])
    assert config.training.lr == 3e-4 and config.network.train_text_encoder is True
    assert config.save.output_name == "my lora" and config.network.include == ["a", "b"]
    assert config.network.overrides["*mid*"] == {"rank": 2}


@pytest.mark.parametrize("override, words", [
    ("network.rank=0", ["network.rank", "[1, 4096]"]),
    ("network.method=dora", ["network.method", "loha"]),
    ("training.optimizer=sgd", ["training.optimizer", "adafactor", "prodigy"]),
    ("network.rnak=4", ["network.rnak", "network.rank"]),
    ("training.lr=0", ["training.lr", "(0, 10]"]),
    ("network.dropout=1.0", ["network.dropout", "[0, 1)"]),
    ("training.batch_size=two", ["training.batch_size", "integer"]),
    ("dataset.resolution=260", ["dataset.resolution", "multiple of 8"]),
    ("dataset.resolution=2048", ["dataset.resolution", "max_bucket_resolution"]),
    ("network.method=adalora", ["network.method", "text method"]),
    ("sample.prompts=[{prompt='x', steps=0}]", ["sample.prompts[0].steps", "[1, 1000]"]),
    ("sample.prompts=[{prompt='x', colour=1}]", ["sample.prompts[0].colour"]),
    ("bogus.key=1", ["bogus"]),
])
def test_errors_name_the_field_and_the_allowed_values(override, words):
    with pytest.raises(ConfigError) as info:
        Config().replace([override])
    for word in words:
        assert word in str(info.value)


def test_text_rules():
    config = Config.from_dict({"task": "text"})
    assert config.network.method == "lora"  # the text default, not the image default
    with pytest.raises(ConfigError, match="network.experts"):
        Config.from_dict({"task": "text", "network": {"method": "xlora", "experts": ["a"]}})
    with pytest.raises(ConfigError, match="network.target_r"):
        Config.from_dict({"task": "text", "network": {"method": "adalora", "init_r": 4, "target_r": 8}})
    with pytest.raises(ConfigError, match="image method"):
        Config.from_dict({"task": "text", "network": {"method": "loha"}})


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("task = \n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["training.lr"])


def test_cli_command_reproduces_the_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(EXAMPLE)
    config = load_config(path, ["save.output_name=it's mine"])
    words = shlex.split(config_to_cli(config))
    assert words[:2] == ["lycotrain", "train"]
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert load_config(None, sets) == config


def test_field_help_for_widgets():
    assert field_help("network", "method")["choices"][0] == "lora"
    assert field_help("training", "lr")["lo_open"] is True
    with pytest.raises(ConfigError):
        field_help("network", "nope")


def test_hra_needs_an_even_rank_to_start_from_the_unchanged_model():
    with pytest.raises(ConfigError, match=r"network.rank \(5\) must be even for HRA"):
        Config.from_dict({"task": "image", "run_dir": "r", "network": {"method": "hra", "rank": 5}})
    Config.from_dict({"task": "image", "run_dir": "r", "network": {"method": "hra", "rank": 5, "hra_apply_gs": True}})
