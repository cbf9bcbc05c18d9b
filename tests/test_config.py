"""Config: dataclasses = TOML schema = --set keys; unknown keys list the valid ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import RunConfig, load_config, method_config
from fedtune.errors import ConfigError
from fedtune.methods.peft import LoraConfig, PtuningConfig


def test_defaults_and_round_trip() -> None:
    cfg = RunConfig()
    assert cfg.method_name == "lora" and isinstance(cfg.method, LoraConfig)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_toml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        'name = "x"\n[data]\nagreement = "50"\n[method]\nname = "ptuning"\n'
        "num_virtual_tokens = 10\n[train]\nepochs = 2\n"
    )
    cfg = load_config(path, ["train.epochs=5", "method.lr=0.02", "model.name=gpt2",
                             "data.labels=neg,neu,pos", "train.progress=false"])  # fmt: skip
    assert isinstance(cfg.method, PtuningConfig)
    assert cfg.method.num_virtual_tokens == 10 and cfg.method.lr == 0.02
    assert cfg.train.epochs == 5.0 and cfg.train.progress is False
    assert cfg.model.name == "gpt2" and cfg.data.agreement == "50"
    assert cfg.data.labels == ("neg", "neu", "pos")


def test_method_switch_by_set() -> None:
    cfg = load_config(None, ["method.name=ia3", "method.lr=0.1"])
    assert cfg.method_name == "ia3" and cfg.method.lr == 0.1


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.epoch=3"], r"unknown config key train\.epoch; valid keys: .*train\.epochs"),
        (["method.rank=3"], r"unknown config key method\.rank; valid keys: .*method\.r\b"),
        (["bogus=1"], r"unknown config key bogus; valid keys: .*seed"),
        (["method.name=nope"],
         r"unknown method 'nope'; choose one of: icl, knn, features, head, full, lora"),
        (["data.agreement=42"], r"data\.agreement = '42' is not one of"),
        (["train.batch_size=big"], r"train\.batch_size = 'big' must be a whole number"),
        (["train.progress=maybe"], r"must be true or false"),
        (["noequals"], r"expected key=value"),
        (["train=3"], r"train must be a table"),
    ],
)
def test_bad_overrides(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_example_configs_parse() -> None:
    examples = sorted((Path(__file__).parents[1] / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        if path.name.endswith("_variants.toml"):  # icl prompt variants, not a run config
            from fedtune.methods.icl import Variant, load_variants

            assert load_variants(path, Variant.from_config(method_config("icl")))
            continue
        cfg = load_config(path)
        assert cfg.name and cfg.method_name in ("lora", "full", "ptuning", "icl", "reward")


def test_set_values_keep_text_for_string_fields() -> None:
    """String fields take the text as typed; a quoted TOML string gives escapes."""
    cfg = load_config(
        None,
        [
            r'model.template="News: {text}\nTone:"',
            "data.text_column=true",
            r"data.path=C:\temp\new.csv",
            'name=a"b',
            "data.agreement=50",
            'method.name="prompt"',
        ],
    )
    assert cfg.model.template == "News: {text}\nTone:"
    assert cfg.data.text_column == "true" and cfg.data.path == r"C:\temp\new.csv"
    assert cfg.name == 'a"b' and cfg.data.agreement == "50" and cfg.method_name == "prompt"


def test_set_lists_take_comma_separated_items_of_their_type() -> None:
    cfg = load_config(None, ["federated.sizes=600,500", "federated.site_paths=a.csv, b.csv"])
    assert cfg.federated.sizes == (600, 500)
    assert cfg.federated.site_paths == ("a.csv", "b.csv")
    assert load_config(None, ["federated.sizes=[1, 2]"]).federated.sizes == (1, 2)
    with pytest.raises(ConfigError, match=r"federated\.sizes.*whole number"):
        load_config(None, ["federated.sizes=600,x"])
