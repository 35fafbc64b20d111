"""The run configuration: one order of sources, one tiling resolver, a hashable resume key."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from wsiengine.config import (
    TILING_TOLERANCE,
    EncoderConfig,
    MILTrainConfig,
    ModelTiling,
    RunConfig,
    TilingConfig,
    set_defaults,
    tiling_differences,
    tiling_mismatch_message,
)
from wsiengine.errors import ConfigError

HEAD = ModelTiling(0.972, 96, "MIL head 'default'")
ENCODER = ModelTiling(0.5, 224, "encoder 'default'")


def test_sources_apply_in_order_defaults_file_env_code_cli(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[tiling]\ntarget_mpp = 1.0\ntile_px = 128\nmin_tissue = 0.4\n\noverlap_px = 0\n"
                    "[encoder]\nproviders = 'cpu'\n")
    env = {"WSIENGINE_TILE_PX": "112", "WSIENGINE_MIN_TISSUE": "0.3", "WSIENGINE_BATCH_SIZE": "16"}
    assert RunConfig.load(env={}).tiling.target_mpp is None  # defaults: unset, resolved from the models
    config = RunConfig.load(toml, env=env)
    assert (config.tiling.target_mpp, config.tiling.tile_px, config.tiling.min_tissue) == (1.0, 112, 0.3)
    assert config.source("tiling.target_mpp") == f"file {toml}"
    assert config.source("tiling.tile_px") == "env WSIENGINE_TILE_PX"
    assert config.stream.batch_size == 16 and config.encoder.providers == "cpu"
    with set_defaults(tile_px=100, min_tissue=0.6):  # code beats the environment, as in dask
        coded = RunConfig.load(toml, env=env, min_tissue=0.7)  # explicit arguments beat set_defaults
        assert coded.tiling.tile_px == 100 and coded.source("tiling.tile_px") == "code (set_defaults)"
        assert coded.tiling.min_tissue == 0.7 and coded.source("tiling.min_tissue") == "code"
        flags = RunConfig.load(toml, env=env, min_tissue=0.7, cli={"min_tissue": "0.8"}, cli_text=True)
        assert flags.tiling.min_tissue == 0.8 and flags.source("tiling.min_tissue") == "command line --min-tissue"
    assert RunConfig.load(toml, env=env).tiling.tile_px == 112  # set_defaults is undone on exit


def test_config_file_from_the_environment_and_dotted_variables(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("tile_threshold = 0.7\n")
    config = RunConfig.load(env={"WSIENGINE_CONFIG": str(toml), "WSIENGINE_TILING__TARGET_MPP": "2",
                                 "WSIENGINE_REPORT": "false", "WSIENGINE_HEATMAPS": "attention,tissue_fraction"})
    assert config.mil.tile_threshold == 0.7 and config.tiling.target_mpp == 2.0
    assert config.outputs.report is False and config.outputs.heatmaps == ("attention", "tissue_fraction")


@pytest.mark.parametrize("env, message", [
    ({"WSIENGINE_TILE_PX": "big"}, "tile_px: 'big' is not a valid integer"),
    ({"WSIENGINE_MIN_TISSUE": "2"}, "env WSIENGINE_MIN_TISSUE"),
    ({"WSIENGINE_REJECT_PEN": "maybe"}, "boolean"),
    ({"WSIENGINE_PARALLEL": "threads"}, "parallel must be one of"),
])
def test_bad_values_name_the_setting_and_where_they_came_from(env, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.load(env=env)


def test_unknown_settings_are_refused_in_files_and_code(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text("[tiling]\ntarget_mp = 0.5\n")
    with pytest.raises(ConfigError, match="unknown setting 'tiling.target_mp'"):
        RunConfig.load(toml, env={})
    with pytest.raises(ConfigError, match="unknown setting 'tile_size'"):
        RunConfig.load(env={}, tile_size=224)
    with pytest.raises(ConfigError, match="unknown option"):
        with set_defaults(tile_size=224):
            pass
    with pytest.raises(ConfigError, match="must be integer"):
        RunConfig.load(env={}, tile_px="224")  # code values are checked, never guessed
    unrelated = {"WSIENGINE_TEST_DATA": "/x", "WSIENGINE_VLM_API_KEY": "k"}  # other variables are not settings
    assert RunConfig.load(env=unrelated) == RunConfig.load(env={})


def test_every_setting_has_one_flat_name_and_help_text():
    fields = RunConfig.fields()  # raises when two sections share a field name
    assert fields["target_mpp"].section == "tiling" and fields["tile_threshold"].section == "mil"
    missing = [name for name, info in fields.items() if not info.help]
    assert not missing, f"settings without help text in their section's docstring: {missing}"
    assert {"on_no_tissue", "on_no_tiles"} <= set(fields)  # not one 'on_empty' setting both stages read


def test_config_is_frozen_hashable_picklable_and_round_trips():
    config = RunConfig.load(env={}, target_mpp=0.5, tile_px=224, heatmaps=["attention"])
    again = pickle.loads(pickle.dumps(config))
    assert again == config and hash(again) == hash(config) and again.sources == config.sources
    assert RunConfig.from_dict(config.to_dict()) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tiling.tile_px = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown setting"):
        RunConfig.from_dict({"tiling": {"nonsense": 1}})


def test_resume_key_follows_results_not_speed():
    base = RunConfig.load(env={}).resolve_tiling(HEAD, ENCODER)
    same = {"batch_size": 8, "num_workers": 3, "workers": 2, "providers": "cpu", "threads": 1, "top_k": 3,
            "vlm_url": "http://127.0.0.1:9/v1"}
    for name, value in same.items():
        assert base.replace(**{name: value}).key() == base.key(), name
    for name, value in {"min_tissue": 0.5, "tile_threshold": 0.6, "mask_mpp": 4.0, "overlap_px": 8,
                        "geojson": False}.items():
        assert base.replace(**{name: value}).key() != base.key(), name
    hashed = base.with_models(encoder_sha256="a" * 64, mil_sha256="b" * 64, slide_threshold=0.5)
    assert hashed.key() != base.with_models(encoder_sha256="c" * 64, mil_sha256="b" * 64, slide_threshold=0.5).key()


def test_tiling_comes_from_settings_then_head_then_encoder_then_defaults():
    config = RunConfig.load(env={})
    head = config.resolve_tiling(HEAD, ENCODER)
    assert (head.tiling.target_mpp, head.tiling.tile_px) == (0.972, 96)
    assert head.source("tiling.tile_px") == "MIL head 'default'"
    encoder = config.resolve_tiling(None, ENCODER)
    assert (encoder.tiling.target_mpp, encoder.tiling.tile_px) == (0.5, 224)
    assert encoder.source("tiling.target_mpp") == "encoder 'default'"
    default = config.resolve_tiling(None, None)
    assert (default.tiling.target_mpp, default.tiling.tile_px) == (0.5, 224)
    assert default.source("tiling.target_mpp") == "default"
    explicit = RunConfig.load(env={}, target_mpp=1.0).resolve_tiling(HEAD, ENCODER)
    assert (explicit.tiling.target_mpp, explicit.tiling.tile_px) == (1.0, 96)
    assert explicit.source("tiling.target_mpp") == "code"
    assert explicit.resolve_tiling(HEAD, ENCODER) == explicit  # resolving twice changes nothing
    assert TilingConfig().with_defaults().target_mpp == 0.5  # a stage given an unresolved tiling


def test_one_tolerance_and_one_message_for_a_different_tiling(caplog):
    near = 0.972 * (1 + TILING_TOLERANCE * 0.9)
    assert tiling_differences(0.972, 96, near, 96) == []
    assert tiling_differences(0.972, 96, 0.5, 224) == ["0.5 µm/px instead of 0.972", "224-px tiles instead of 96"]
    message = tiling_mismatch_message(HEAD, 0.5, 224)
    assert message.startswith("the MIL head 'default' was trained on tiles of 96 px at 0.972 µm/px")
    with caplog.at_level("WARNING", logger="wsiengine"):
        RunConfig.load(env={}, target_mpp=0.5, tile_px=224).resolve_tiling(HEAD, ENCODER)
    assert [r.getMessage() for r in caplog.records] == [message]
    caplog.clear()
    with caplog.at_level("WARNING", logger="wsiengine"):
        RunConfig.load(env={}).resolve_tiling(HEAD, ENCODER)
    assert not caplog.records


def test_the_head_the_report_and_the_encoder_use_the_same_rule():
    import inspect

    import wsiengine.aggregate
    import wsiengine.encode
    import wsiengine.report.findings

    for module in (wsiengine.aggregate, wsiengine.encode, wsiengine.report.findings):
        source = inspect.getsource(module)
        assert "tiling_differences" in source or "tiling_mismatch_message" in source, module.__name__
        assert "rtol=0.05" not in source and "> 0.10" not in source, module.__name__


def test_sections_validate_and_encoder_options_parse():
    with pytest.raises(ConfigError, match="overlap_px"):
        TilingConfig(tile_px=64, overlap_px=64)
    assert EncoderConfig(providers="tensorrt, cuda").provider_list == ["tensorrt", "cuda"]
    assert RunConfig.load(env={}, mil="none").mil.mil is None
    assert RunConfig.load(env={}, mpp="0.25").slide.mpp == (0.25, 0.25)
    # a scheduler from a later source wins over workers from an earlier one (run_batch logs it)
    assert RunConfig.load(env={"WSIENGINE_WORKERS": "2"}, scheduler="tcp://h:8786").batch.scheduler == "tcp://h:8786"


def test_training_config_takes_file_env_code_in_order_and_its_own_names(monkeypatch, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nseed = 2\nfolds = 3\n[tiling]\nmin_tissue = 0.4\n")
    assert MILTrainConfig.from_env(toml).seed == 2 and RunConfig.load(toml, env={}).tiling.min_tissue == 0.4
    monkeypatch.setenv("WSIENGINE_SEED", "9")  # not a training variable: too ambiguous without the section
    monkeypatch.setenv("WSIENGINE_THREADS", "1")  # the encoder's threads, not torch's
    monkeypatch.setenv("WSIENGINE_TRAIN__SEED", "3")
    trained = MILTrainConfig.from_env(toml)
    assert (trained.seed, trained.folds, trained.threads) == (3, 3, 0)
    with set_defaults(**{"train.seed": 4}):
        assert MILTrainConfig.from_env().seed == 4
        assert MILTrainConfig.from_env(seed=5).seed == 5
        assert RunConfig.load(env={}).tiling.min_tissue == 0.25  # training names never reach a run


def test_file_paths_are_relative_to_the_file_and_model_names_stay(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "heads" / "x").mkdir(parents=True)
    toml = tmp_path / "conf" / "run.toml"
    toml.write_text('mpp_csv = "mpp.csv"\n[mil]\nmil = "heads/x"\n[encoder]\nencoder = "default"\n')
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # a folder named like a model does not capture the name
    config = RunConfig.load(toml, env={}).with_absolute_paths()
    assert config.mil.mil == str(tmp_path / "conf" / "heads" / "x")
    assert config.slide.mpp_csv == str(tmp_path / "conf" / "mpp.csv") and config.encoder.encoder == "default"


def test_changing_a_model_forgets_what_came_from_the_old_one():
    resolved = RunConfig.load(env={}).resolve_tiling(HEAD, ENCODER).with_models(
        encoder_sha256="a" * 64, mil_sha256="b" * 64, slide_threshold=0.5)
    other = resolved.replace(mil="other/")
    assert other.tiling.target_mpp is None and other.mil.mil_sha256 is None and other.encoder.encoder_sha256 is None
    assert resolved.replace(min_tissue=0.5).tiling.target_mpp == 0.972  # other changes keep it
    kept = RunConfig.load(env={}, target_mpp=1.0).resolve_tiling(HEAD, ENCODER).replace(mil="other/")
    assert kept.tiling.target_mpp == 1.0 and kept.tiling.tile_px is None  # explicit settings stay
    with pytest.raises(ConfigError, match="unknown setting"):
        resolved.set("tiling.nosuch", 1)


def test_bad_file_values_are_config_errors(tmp_path):
    for text in ('[slide]\nmpp = ["x"]\n', "[slide]\nmpp = [[1]]\n", "[outputs]\nheatmaps = [1]\n"):
        toml = tmp_path / "bad.toml"
        toml.write_text(text)
        with pytest.raises(ConfigError):
            RunConfig.load(toml, env={})


def test_to_toml_reads_back_as_the_same_settings(tmp_path):
    config = RunConfig.load(env={}, target_mpp=0.5, heatmaps=["attention"], vlm_url="http://127.0.0.1:1/v1",
                            mpp="0.25,0.3").resolve_tiling(HEAD, ENCODER)
    path = tmp_path / "shown.toml"
    path.write_text(config.to_toml())
    again = RunConfig.load(path, env={})
    assert again.to_dict() == config.to_dict()


def test_paths_become_absolute_and_names_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mpp.csv").write_text("slide,mpp\n")
    config = RunConfig.load(env={}, mpp_csv="mpp.csv", encoder="default", tile_bank="missing.npz").with_absolute_paths()
    assert config.slide.mpp_csv == str(tmp_path / "mpp.csv") and config.source("slide.mpp_csv") == "code"
    assert config.encoder.encoder == "default" and config.report.tile_bank == "missing.npz"
