"""aet.config: flags, a TOML file and defaults merge into one typed, validated config."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from aet.config import ConfigError, add_config_arguments, config_from_args, config_from_mapping


@dataclasses.dataclass
class ExampleConfig:
    code_size: int = dataclasses.field(default=8, metadata={"help": "embedding size"})
    hidden_sizes: list[int] = dataclasses.field(default_factory=lambda: [256, 64])
    noise: str = dataclasses.field(default="none", metadata={"choices": ["none", "masking"]})
    learning_rate: float = 1e-3
    tied: bool = False
    data_path: Path | None = None

    def __post_init__(self):
        if self.code_size <= 0:
            raise ConfigError(f"code_size must be positive, got {self.code_size}")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ExampleConfig)
    return config_from_args(ExampleConfig, parser.parse_args(argv))


def test_defaults_when_no_flags():
    assert parse([]) == ExampleConfig()


def test_flags_map_onto_typed_fields():
    config = parse(
        [
            "--code-size",
            "16",
            "--hidden-sizes",
            "128",
            "32",
            "--tied",
            "--noise",
            "masking",
            "--data-path",
            "x/y",
        ]
    )
    assert config == ExampleConfig(
        code_size=16, hidden_sizes=[128, 32], tied=True, noise="masking", data_path=Path("x/y")
    )


def test_toml_file_supplies_fields_and_flags_win(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("code-size = 4\nlearning_rate = 0.01\nhidden_sizes = [32]\n")
    config = parse(["--config", str(toml), "--code-size", "6"])
    assert (config.code_size, config.learning_rate, config.hidden_sizes) == (6, 0.01, [32])


def test_unknown_key_lists_valid_fields():
    with pytest.raises(ConfigError, match="unknown field 'code_sise'.*code_size"):
        config_from_mapping(ExampleConfig, {"code_sise": 3})


def test_wrong_type_in_file_names_the_field():
    with pytest.raises(ConfigError, match="ExampleConfig.code_size"):
        config_from_mapping(ExampleConfig, {"code_size": 2.5})


def test_validation_runs_on_every_path():
    with pytest.raises(ConfigError, match="code_size must be positive"):
        parse(["--code-size", "0"])


def test_unreadable_config_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("code-size = = 3")
    with pytest.raises(ConfigError, match="cannot read config file"):
        parse(["--config", str(bad)])


def test_invalid_choice_exits_with_usage_error():
    with pytest.raises(SystemExit):
        parse(["--noise", "pink"])
