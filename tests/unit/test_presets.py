"""Every preset applies cleanly to params.yaml (comments kept) and validates; a bad preset key is named."""

import pytest
from ruamel.yaml import YAML

from pipeline.config import ConfigError, load_config
from tests.defaults import ROOT
from tools.preset import PRESETS, apply_preset


@pytest.mark.parametrize("preset", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_applies_and_validates(preset):
    text, changed = apply_preset((ROOT / "params.yaml").read_text(), preset)
    assert changed and "# Every knob of the pipeline" in text  # the file's comments survive
    load_config(YAML().load(text))


def test_unknown_preset_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: sft\.learning_rate is not a params key"):
        apply_preset((ROOT / "params.yaml").read_text(), bad)
