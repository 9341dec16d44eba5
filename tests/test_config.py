from pathlib import Path

import pytest

from propensity.config import ConfigError, load_settings


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "propensity.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_project_file(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, environ={})
    assert settings.horizons.churn_days == 30
    assert settings.horizons.purchase_days == 14
    assert settings.root == tmp_path.resolve()
    assert settings.path(settings.lake_dir) == tmp_path.resolve() / "data" / "lake"


def test_file_values_and_relative_sqlite_uri_resolve_against_root(tmp_path: Path) -> None:
    path = _write(tmp_path, "timezone: Europe/Paris\nmlflow_tracking_uri: sqlite:///x/ml.db\n")
    settings = load_settings(path, environ={})
    assert settings.timezone == "Europe/Paris"
    assert settings.tracking_uri == f"sqlite:///{tmp_path.resolve()}/x/ml.db"


def test_environment_overrides_file_including_nested_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, "horizons:\n  churn_days: 45\n")
    env = {"PROPENSITY_HORIZONS__CHURN_DAYS": "60", "PROPENSITY_ONLINE_STORE__KIND": "redis"}
    settings = load_settings(path, environ=env)
    assert settings.horizons.churn_days == 60
    assert settings.online_store.kind == "redis"


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "lake_dir: a\nhorizon:\n  churn_days: 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'horizon'"):
        load_settings(path, environ={})


def test_unknown_nested_key_in_file_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "horizons:\n  churn: 3\n")
    with pytest.raises(ConfigError, match="horizons.churn"):
        load_settings(path, environ={})


def test_unknown_environment_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PROPENSITY_LAKE"):
        load_settings(tmp_path, environ={"PROPENSITY_LAKE": "x"})


def test_invalid_value_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="horizons.churn_days"):
        load_settings(tmp_path, environ={"PROPENSITY_HORIZONS__CHURN_DAYS": "-1"})


def test_config_env_var_selects_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "seed: 7\n")
    settings = load_settings(environ={"PROPENSITY_CONFIG": str(path)})
    assert settings.seed == 7


def test_repo_project_file_is_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    settings = load_settings(root / "propensity.yaml", environ={})
    assert settings.online_store.kind == "sqlite"


def test_a_named_project_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    typo = tmp_path / "propensty.yaml"
    with pytest.raises(ConfigError, match="propensty.yaml not found"):
        load_settings(typo, environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(environ={"PROPENSITY_CONFIG": str(typo)})
    assert not (tmp_path / "data").exists()


def test_cli_with_a_missing_config_fails_cleanly_and_creates_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "propensity.cli", "features", "build", "--config", "nope.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "nope.yaml not found" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []


def test_importing_the_service_loads_no_settings(tmp_path: Path) -> None:
    # Settings load when the service starts, not when its module is imported.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROPENSITY_")}
    env["PROPENSITY_CONFIG"] = str(tmp_path / "missing.yaml")
    code = "import propensity.serving.service as s; print(s._CURRENT.app is None)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("True")
