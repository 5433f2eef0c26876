"""Presets (common/fgs_common/presets.py): every value and its source, the override rules of
`fgs-client balance --preset`, and GET /v1/presets serving the same table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fgs_client.cli import app
from fgs_common.presets import PRESETS, get_preset
from fgs_common.wire import GenerationParams

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# (preset, field, value, a phrase its source must name). "target" is the balance target.
EXPECTED = [
    ("paper-imagenet-lt", "criterion", "entropy", "generate_csvs_offline.py"),
    ("paper-imagenet-lt", "omega", 0.03, "generate_csvs_offline.py"),
    ("paper-imagenet-lt", "gamma", 5.0, "generate_csvs_offline.py"),
    ("paper-imagenet-lt", "steps", 30, "App. G and J"),
    ("paper-imagenet-lt", "guidance_every", 5, "App. G and J"),
    ("paper-imagenet-lt", "feedback_input", "released", "fg_pipe.py"),
    ("paper-imagenet-lt", "gradient_path", "unet", "fg_pipe.py"),
    ("paper-imagenet-lt", "feedback_resolution", "full", "fg_pipe.py"),
    ("paper-imagenet-lt", "dropout_p", None, "Digits-LT validation"),
    ("paper-imagenet-lt", "dropout_scaling", None, "not measured"),
    ("paper-imagenet-lt", "target", 1300, "App. J.1"),
    ("paper-nicopp", "target", 811, "App. J.2"),
    ("paper-nicopp", "criterion", "entropy", "Table 1"),
    ("paper-nicopp", "omega", 0.03, "generate_csvs_offline.py"),
    ("paper-nicopp", "gamma", 5.0, "generate_csvs_offline.py"),
    ("digits", "target", "max", "bench/digits_lt.py"),
]


@pytest.mark.parametrize("preset, field, value, source", EXPECTED, ids=[f"{p}-{f}" for p, f, _, _ in EXPECTED])
def test_preset_value_and_its_source(preset, field, value, source):
    item = get_preset(preset).target if field == "target" else get_preset(preset).params[field]
    if value is not None:
        assert item.value == value
    assert source in item.source


def test_every_preset_value_has_a_source_and_is_a_valid_generation():
    for preset in PRESETS.values():
        assert preset.target.source
        for name, item in preset.params.items():
            assert name in GenerationParams.model_fields and len(item.source) > 20, (preset.name, name)
        preset.generation_params()  # validates


def test_digits_preset_is_the_setting_chosen_on_validation():
    """The digits preset (and the paper presets' dropout values) are what bench/digits_lt.py selected: the best
    guided variant on validation of its latest run with one (`preset_selection`)."""
    summary = json.loads((REPO / "bench" / "digits_lt.json").read_text())
    chosen = summary["preset_selection"]
    digits = get_preset("digits")
    for field in ("criterion", "omega", "gamma", "dropout_p", "dropout_scaling", "feedback_input"):
        assert digits.params[field].value == chosen[field], field
    for name in ("paper-imagenet-lt", "paper-nicopp"):
        assert get_preset(name).params["dropout_p"].value == chosen["dropout_p"]


def dry_run(*flags: str) -> str:
    result = runner.invoke(
        app, ["balance", "--dataset", "imagenet-lt", "--counts", "builtin", "--dry-run", *flags], terminal_width=400
    )
    assert result.exit_code == 0, result.output
    return result.output


def row(output: str, name: str) -> tuple[str, str]:
    """(value, source) of a parameter in the printed generation table."""
    match = re.search(rf"│ {name}\s+│ (\S+)\s+│ (.+?)\s+│", output)
    assert match, (name, output[-3000:])
    return match.group(1), match.group(2)


def test_acceptance_imagenet_lt_dry_run_prints_the_total_and_the_sources():
    output = dry_run("--preset", "paper-imagenet-lt")
    assert "1,184,154 images to add" in output
    value, source = row(output, "gamma")  # the source column wraps: its first line
    assert value == "5.0"
    assert ("preset paper-imagenet-lt: " + get_preset("paper-imagenet-lt").params["gamma"].source).startswith(source)
    assert "generate_csvs_offline.py" in output
    assert row(output, "target")[0] == "1300"


def test_preset_sets_what_no_flag_gives():
    output = dry_run("--preset", "paper-imagenet-lt")
    assert row(output, "omega")[0] == "0.03" and row(output, "criterion")[0] == "entropy"


def test_an_explicit_flag_overrides_the_preset():
    output = dry_run("--preset", "paper-imagenet-lt", "--gamma", "4")
    assert row(output, "gamma") == ("4.0", "--gamma (given)")


def test_an_explicit_flag_equal_to_the_default_still_overrides_the_preset():
    default = GenerationParams.model_fields["omega"].default
    assert default != get_preset("paper-imagenet-lt").params["omega"].value
    output = dry_run("--preset", "paper-imagenet-lt", "--omega", str(default))
    assert row(output, "omega") == (str(default), "--omega (given)")
    output = dry_run("--preset", "paper-imagenet-lt", "--steps", "35", "--guidance-every", "1")
    assert row(output, "steps") == ("35", "--steps (given)") and row(output, "guidance_every")[0] == "1"


def test_an_explicit_target_overrides_the_preset_target():
    output = dry_run("--preset", "paper-imagenet-lt", "--target", "1280")
    assert "1,300,000 after" not in output and row(output, "target") == ("1280", "--target (given)")


def test_fields_a_preset_does_not_set_keep_their_defaults():
    output = dry_run("--preset", "paper-imagenet-lt")
    assert row(output, "noise_level") == ("0", "default (fgs_common/wire/generation.py)")


def test_without_a_preset_the_defaults_apply():
    output = dry_run()
    assert row(output, "gamma") == (str(GenerationParams().gamma), "default (fgs_common/wire/generation.py)")


def test_an_unknown_preset_is_a_clear_error():
    result = runner.invoke(
        app, ["balance", "--dataset", "imagenet-lt", "--counts", "builtin", "--dry-run", "--preset", "paper"]
    )
    assert result.exit_code == 2 and "unknown preset 'paper'" in result.output and "paper-imagenet-lt" in result.output


def test_an_override_that_breaks_the_preset_is_refused_by_name():
    result = runner.invoke(
        app,
        [
            "balance",
            "--dataset",
            "imagenet-lt",
            "--counts",
            "builtin",
            "--dry-run",
            "--preset",
            "paper-imagenet-lt",
            "--steps",
            "3",
        ],
    )
    assert result.exit_code == 2 and "guidance_every" in result.output


def test_nicopp_preset_dry_run_on_the_packaged_list_prints_its_total():
    result = runner.invoke(
        app,
        ["balance", "--dataset", "nico++", "--counts", "builtin", "--dry-run", "--preset", "paper-nicopp"],
        terminal_width=400,
    )
    assert result.exit_code == 0, result.output
    assert "360 groups; 291,960 images after balancing every group to 811" in result.output
    assert "229,303 images to add" in result.output  # 291,960 - 62,657 (App. J.2): the paper's "229k" (Table 1)


def test_api_lists_the_same_presets(redis_server, tmp_path):
    from fastapi.testclient import TestClient

    from fgs_service.app import create_app
    from support.service_settings import service_settings
    from support.stack import TENANT_KEYS

    headers = {"Authorization": f"Bearer {TENANT_KEYS['alpha']}"}
    with TestClient(create_app(service_settings(redis_server, tmp_path / "data"))) as client:
        listed = client.get("/v1/presets", headers=headers).json()["presets"]
        one = client.get("/v1/presets/paper-imagenet-lt", headers=headers).json()
        missing = client.get("/v1/presets/nope", headers=headers)
        anonymous = client.get("/v1/presets")
    assert [p["name"] for p in listed] == list(PRESETS)
    assert listed[0] == json.loads(PRESETS[listed[0]["name"]].model_dump_json())
    assert one["params"]["gamma"]["value"] == 5.0 and "generate_csvs_offline.py" in one["params"]["gamma"]["source"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert anonymous.status_code == 401
