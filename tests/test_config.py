"""DMSConfig (docs/design.md, "Losses and schedule" and the settings): defaults, errors, the CR schedule."""

import pytest

from dms_flex.config import DMSConfig, DMSConfigError


def test_config_defaults_match_released_checkpoint():
    cfg = DMSConfig()
    assert (cfg.alpha_scale, cfg.alpha_offset, cfg.window, cfg.tau) == (100.0, 5.0, 512, 0.1)
    assert DMSConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("window", -1, "window=-1"),
        ("window", 2.5, "integer >= 0"),
        ("decision", "neuron", "borrowed"),
        ("tau", 0.0, "> 0"),
        ("alpha_scale", float("nan"), "finite"),
        ("scope", "token", "head"),
        ("initial_cr", 0.5, ">= 1"),
        ("final_step", -3, "final_step=-3"),
    ],
)
def test_config_errors_name_field_value_range(field, value, needle):
    with pytest.raises(DMSConfigError) as e:
        DMSConfig(**{field: value})
    assert f"DMSConfig.{field}=" in str(e.value) and needle in str(e.value)


def test_config_final_cr_below_initial_and_unknown_field():
    with pytest.raises(DMSConfigError, match="final_cr=2.0.*>= initial_cr"):
        DMSConfig(initial_cr=4.0, final_cr=2.0)
    with pytest.raises(DMSConfigError, match="unknown DMSConfig field"):
        DMSConfig().replace(windw=3)
    with pytest.raises(DMSConfigError, match="lacks the DMS keys"):
        DMSConfig.from_hf({"dms_cr": 8})


def test_cr_schedule_endpoints_and_linearity():
    cfg = DMSConfig(initial_cr=1, final_cr=16, final_step=510)
    assert cfg.target_cr(0) == 1 and cfg.target_cr(510) == 16 and cfg.target_cr(10_000) == 16
    assert cfg.target_cr(255) == pytest.approx(8.5)
    assert cfg.alpha_target(0) == 0 and cfg.alpha_target(510) == pytest.approx(1 - 1 / 16)
    assert abs(cfg.target_cr(238) - 8.0) < 0.03  # docs/design.md, "Losses and schedule": CR 8 at about step 238
    assert cfg.replace(immediate_eviction=True).effective_window == 0
