"""Property: whatever value any params key holds, loading the config raises nothing but `ConfigError`, and a single
bad key is named in it."""

import contextlib
import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, load_config, read_params
from tests.defaults import ROOT

PARAMS = read_params(ROOT / "params.yaml")
KEYS = [("", "seed")] + [
    (section, key) for section, values in PARAMS.items() if isinstance(values, dict) for key in values
]
# The edges of every bound and of every type.
EDGES = [None, True, False, 0, -1, 1, 2, 0.5, 1.5, -0.0, float("nan"), float("inf"), "", "x", "auto", [], {}]
# Every YAML type, the edge numbers, and the words that switch rules on (a sampled Literal, a numeric string).
VALUES = st.one_of(
    st.sampled_from(EDGES), st.none(), st.booleans(), st.integers(), st.integers(min_value=-3, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["auto", "3e-4", "1e999", "scratch", "grpo", "rloo", "robust", "loss", "adaptive", "classifier",
                     "reward_model", "dataset", "fail", "-1", "nan"]),
)  # fmt: skip


def _with(changes: dict) -> dict:
    raw = copy.deepcopy(PARAMS)
    for (section, key), value in changes.items():
        if section:
            raw[section][key] = value
        else:
            raw[key] = value
    return raw


def test_every_edge_value_of_every_key_raises_only_the_config_error_naming_the_key():
    for key in KEYS:
        name = ".".join(part for part in key if part)
        for value in EDGES:
            try:
                load_config(_with({key: value}))
            except ConfigError as error:
                assert name in str(error), (name, value, str(error))


@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
@settings(max_examples=400, deadline=None)
def test_any_values_of_any_keys_raise_only_the_config_error(changes):
    with contextlib.suppress(ConfigError):  # anything else fails the test
        load_config(_with(changes))


@given(st.sampled_from(KEYS), VALUES)
@settings(max_examples=400, deadline=None)
def test_a_single_bad_key_is_named(key, value):
    name = ".".join(part for part in key if part)
    try:
        load_config(_with({key: value}))
    except ConfigError as error:
        assert name in str(error)


@given(st.sampled_from([s for s in PARAMS if isinstance(PARAMS[s], dict)]), VALUES)
@settings(max_examples=100, deadline=None)
def test_a_section_of_any_shape_raises_only_the_config_error(section, value):
    raw = copy.deepcopy(PARAMS)
    raw[section] = value
    try:
        load_config(raw)
    except ConfigError as error:
        assert section in str(error)
