"""``fsc.Config.from_options``: defaults, every validation error, pipeline strings."""

from __future__ import annotations

import dataclasses
import math

import pytest

import fsc
from fsc.analysis.cost_model import DEVICE_PROFILES
from fsc.config import INNER_COMPILERS, ON_ERROR, Config
from fsc.errors import OptionError
from fsc.pass_manager import format_pipeline, parse_pipeline
from fsc.passes import REGISTRY, OverlapSchedule


def option_error(options: dict, *fragments: str) -> fsc.OptionError:
    """from_options(options) must raise OptionError whose message holds every fragment."""
    with pytest.raises(fsc.OptionError) as info:
        Config.from_options(options)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


# ----------------------------------------------------------------------------- defaults


def test_config_defaults_to_inductor_on_cpu_profile():
    config = Config.from_options()
    assert config.inner == "inductor"
    assert config.device_profile == "cpu"
    assert config.memory_budget_gb is None
    assert config.verify is False
    assert config.dump_dir is None
    assert config.on_error == "fallback"


def test_config_none_and_empty_options_are_the_same_as_defaults():
    assert Config.from_options(None) == Config.from_options({}) == Config.from_options()


def test_config_default_pipeline_is_every_registered_pass_not_opt_in_in_registry_order():
    config = Config.from_options()
    default = [name for name, cls in REGISTRY.items() if cls.in_default_pipeline]
    assert 0 < len(default) < len(REGISTRY)  # some passes are opt-in
    assert [p.name for p in config.passes] == default
    assert config.passes == tuple(REGISTRY[name]() for name in default)
    assert config.pipeline == ",".join(default)


def test_config_is_frozen():
    config = Config.from_options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.inner = "eager"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.passes = ()  # type: ignore[misc]
    assert config.inner == "inductor"


def test_config_accepts_every_valid_value():
    for inner in INNER_COMPILERS:
        assert Config.from_options({"inner": inner}).inner == inner
    for profile in DEVICE_PROFILES:
        assert Config.from_options({"device_profile": profile}).device_profile == profile
    for on_error in ON_ERROR:
        assert Config.from_options({"on_error": on_error}).on_error == on_error
    config = Config.from_options({"memory_budget_gb": 2, "verify": True, "dump_dir": "/tmp/fsc-dump"})
    assert config.memory_budget_gb == 2.0 and isinstance(config.memory_budget_gb, float)
    assert config.verify is True
    assert config.dump_dir == "/tmp/fsc-dump"


# ------------------------------------------------------------------------ option errors


def test_config_rejects_unknown_option_listing_valid_options():
    option_error({"passes": "", "memory_budget": 2}, "'memory_budget'", *Config.option_names())


def test_config_rejects_bad_inner_listing_valid_compilers():
    option_error({"inner": "tvm"}, "'inner'", "'tvm'", *INNER_COMPILERS)


def test_config_rejects_bad_device_profile_listing_valid_profiles():
    option_error({"device_profile": "tpu"}, "'device_profile'", "'tpu'", *DEVICE_PROFILES)


def test_config_rejects_unhashable_device_profile_with_option_error():
    # A list is a plausible typo (["h100"]); it must be an OptionError, not a TypeError
    # from the dict lookup.
    option_error({"device_profile": ["h100"]}, "'device_profile'", *DEVICE_PROFILES)


@pytest.mark.parametrize("budget", [0, 0.0, -1, -0.5, True, False, "2", math.inf, -math.inf, math.nan])
def test_config_rejects_non_positive_or_non_numeric_memory_budget(budget):
    option_error({"memory_budget_gb": budget}, "'memory_budget_gb'", repr(budget), "positive number or None")


@pytest.mark.parametrize("verify", [1, 0, "true", None])
def test_config_rejects_non_bool_verify(verify):
    option_error({"verify": verify}, "'verify'", repr(verify), "True, False or 'warn'")


def test_config_accepts_verify_warn():
    assert Config.from_options({"verify": "warn"}).verify == "warn"


@pytest.mark.parametrize("dump_dir", [123, b"/tmp/x", ["/tmp"]])
def test_config_rejects_non_str_dump_dir(dump_dir):
    option_error({"dump_dir": dump_dir}, "'dump_dir'", "path string or None")


def test_config_rejects_bad_on_error_listing_valid_choices():
    option_error({"on_error": "ignore"}, "'on_error'", "'ignore'", *ON_ERROR)


@pytest.mark.parametrize("spec", [42, 1.5, {"overlap-schedule": {}}, {"overlap-schedule"}])
def test_config_rejects_passes_of_wrong_type(spec):
    option_error({"passes": spec}, "'passes'", "pipeline string", "list of pass names/instances")


@pytest.mark.parametrize("item", [42, OverlapSchedule, object(), None])
def test_config_rejects_passes_list_holding_non_pass(item):
    option_error({"passes": [OverlapSchedule(), item]}, "'passes'", repr(item), "pass name or an fsc.Pass instance")


# ---------------------------------------------------------------------- pipeline errors


def pipeline_error(spec: str, *fragments: str) -> fsc.PipelineError:
    with pytest.raises(fsc.PipelineError) as info:
        Config.from_options({"passes": spec})
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    # A PipelineError is also an OptionError: callers that catch option errors get it.
    assert isinstance(info.value, fsc.OptionError)
    return info.value


def test_pipeline_rejects_unknown_pass_listing_registered_passes():
    pipeline_error("overlap-schedule,fuse-everything", "'fuse-everything'", *REGISTRY)


def test_pipeline_rejects_snake_case_pass_name():
    pipeline_error("overlap_schedule", "'overlap_schedule'", "overlap-schedule")


def test_pipeline_list_item_with_unknown_pass_raises_pipeline_error():
    with pytest.raises(fsc.PipelineError, match="'nope'"):
        Config.from_options({"passes": [OverlapSchedule(), "nope"]})


def test_pipeline_rejects_unknown_pass_option_listing_its_options():
    pipeline_error(
        "overlap-schedule{sink_wait=false}",
        "'overlap-schedule'", "'sink_wait'", "raise_collectives", "sink_waits", "memory_budget_gb",
    )


def test_pipeline_rejects_option_without_value():
    pipeline_error("overlap-schedule{sink_waits}", "'overlap-schedule'", "'sink_waits'", "needs a value")


@pytest.mark.parametrize(
    ("spec", "option", "raw", "type_name"),
    [
        ("overlap-schedule{sink_waits=maybe}", "sink_waits", "maybe", "bool"),
        ("overlap-schedule{raise_collectives=2}", "raise_collectives", "2", "bool"),
        ("overlap-schedule{memory_budget_gb=abc}", "memory_budget_gb", "abc", "float"),
    ],
)
def test_pipeline_rejects_unconvertible_option_value(spec, option, raw, type_name):
    pipeline_error(spec, "'overlap-schedule'", option, repr(raw), type_name)


@pytest.mark.parametrize(
    "spec",
    ["!!!", "overlap-schedule{", "overlap-schedule}", ",overlap-schedule", "overlap-schedule overlap-schedule",
     "overlap-schedule{a{b}}"],
)
def test_pipeline_rejects_garbage_that_does_not_parse(spec):
    pipeline_error(spec, "cannot parse pipeline")


# ---------------------------------------------------------------------- pipeline values


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_pipeline_string_means_no_passes(spec):
    config = Config.from_options({"passes": spec})
    assert config.passes == ()
    assert config.pipeline == ""


def test_empty_pass_list_means_no_passes():
    assert Config.from_options({"passes": []}).passes == ()


def test_pipeline_options_parse_into_typed_fields_and_round_trip():
    spec = "overlap-schedule{memory_budget_gb=2,sink_waits=false}"
    config = Config.from_options({"passes": spec})
    (p,) = config.passes
    assert isinstance(p, OverlapSchedule)
    assert p.memory_budget_gb == 2.0 and isinstance(p.memory_budget_gb, float)
    assert p.sink_waits is False
    assert p.raise_collectives is True
    # canonical form: only non-default options, in field order
    canonical = "overlap-schedule{sink_waits=false,memory_budget_gb=2.0}"
    assert config.pipeline == format_pipeline(config.passes) == canonical
    assert parse_pipeline(config.pipeline) == config.passes
    assert Config.from_options({"passes": config.pipeline}) == config


def test_pipeline_option_none_gives_none():
    (p,) = parse_pipeline("overlap-schedule{memory_budget_gb=2}")
    assert p.memory_budget_gb == 2.0
    (p,) = parse_pipeline("overlap-schedule{memory_budget_gb=none}")
    assert p.memory_budget_gb is None
    (p,) = parse_pipeline("overlap-schedule{memory_budget_gb=None}")
    assert p.memory_budget_gb is None


def test_pipeline_tolerates_whitespace_and_trailing_comma():
    passes = parse_pipeline(" overlap-schedule { sink_waits = no } , overlap-schedule ,")
    assert passes == (OverlapSchedule(sink_waits=False), OverlapSchedule())


def test_passes_list_mixes_names_and_instances_in_order():
    spec = ["overlap-schedule{sink_waits=false}", OverlapSchedule(raise_collectives=False)]
    config = Config.from_options({"passes": spec})
    assert config.passes == (OverlapSchedule(sink_waits=False), OverlapSchedule(raise_collectives=False))
    assert config.pipeline == "overlap-schedule{sink_waits=false},overlap-schedule{raise_collectives=false}"


def test_pipeline_rejects_an_option_given_twice():
    with pytest.raises(fsc.PipelineError, match="option 'sink_waits' is given twice"):
        fsc.parse_pipeline("overlap-schedule{sink_waits=false,sink_waits=true}")


@pytest.mark.parametrize("options", ["verify=True", ["verify"], 3])
def test_options_that_are_not_a_dict_get_an_option_error_saying_so(options):
    with pytest.raises(OptionError, match="options must be a dict"):
        Config.from_options(options)


@pytest.mark.parametrize("value", [0, -1.0, "300", True])
def test_agreement_timeout_must_be_a_positive_number(value):
    with pytest.raises(OptionError, match="agreement_timeout_s"):
        Config.from_options({"agreement_timeout_s": value})
