"""The commands share one run configuration: the same grid, the same options, the same grammar."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from wsiengine.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def sample_folder(tmp_path, cmu_small) -> Path:
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(cmu_small, folder / cmu_small.name)
    return folder


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def _summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("flags", [[], ["--target-mpp", "0.5", "--tile-px", "224"]], ids=["defaults", "explicit"])
def test_doctor_tiles_and_run_agree_on_n_tiles(sample_folder, tmp_path, capsys, flags):
    slide = next(sample_folder.iterdir())
    assert main(["doctor", str(sample_folder), "--json", *flags]) == 0
    (doctor,) = _json(capsys)
    assert main(["tiles", str(slide), "--json", *flags]) == 0
    tiles = _json(capsys)
    out = tmp_path / "out"
    assert main(["run", str(sample_folder), "-o", str(out), "--no-report", "--no-overlay", *flags]) == 0
    capsys.readouterr()
    (row,) = _summary(out)
    assert doctor["n_tiles"] == tiles["n_tiles"] == int(row["n_tiles"]) > 0
    expected = (0.5, 224) if flags else (0.972, 96)  # without flags: the default head's training tiling
    assert (doctor["target_mpp"], doctor["tile_px"]) == (tiles["target_mpp"], tiles["tile_px"]) == expected
    from wsiengine import open_result

    grid = open_result(out / "cmu-1-small-region.zarr").grid
    assert (grid["target_mpp"], grid["tile_px"]) == expected


def test_embed_then_predict_with_the_default_head_needs_no_tiling_flags(cmu_small, tmp_path, capsys, caplog):
    store = tmp_path / "x.zarr"
    with caplog.at_level("WARNING", logger="wsiengine"):
        assert main(["embed", str(cmu_small), "-o", str(store)]) == 0
        assert main(["predict", str(store), "--mil", "default", "--json"]) == 0
    assert not [r for r in caplog.records if "trained on tiles" in r.getMessage()]
    assert "96 px at 0.972" in capsys.readouterr().out.splitlines()[0]


def test_environment_changes_what_tiles_plans(cmu_small, capsys, monkeypatch):
    assert main(["tiles", str(cmu_small), "--json", "--mil", "none"]) == 0
    encoder = _json(capsys)
    monkeypatch.setenv("WSIENGINE_TARGET_MPP", "1.5")
    assert main(["tiles", str(cmu_small), "--json", "--mil", "none"]) == 0
    coarser = _json(capsys)
    assert (encoder["target_mpp"], coarser["target_mpp"]) == (0.972, 1.5)  # the default encoder's own 0.972
    assert coarser["tiling_source"]["target_mpp"] == "env WSIENGINE_TARGET_MPP"
    assert coarser["n_tiles"] < encoder["n_tiles"]
    assert main(["tiles", str(cmu_small), "--json", "--mil", "none", "--target-mpp", "2"]) == 0  # a flag beats it
    assert _json(capsys)["target_mpp"] == 2.0


def test_run_with_mpp_processes_a_slide_without_resolution(no_mpp_slide, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(no_mpp_slide, folder / no_mpp_slide.name)
    out = tmp_path / "out"
    assert main(["run", str(folder), "-o", str(out), "--no-report"]) == 1
    assert "MissingMppError" in _summary(out)[0]["error"]
    assert main(["run", str(folder), "-o", str(out), "--mpp", "0.5", "--no-report"]) == 0  # retried: mpp given
    (row,) = _summary(out)
    assert row["status"] == "done" and int(row["n_tiles"]) > 0
    assert main(["run", str(folder), "-o", str(out), "--mpp", "0.5", "--no-report"]) == 0
    assert _summary(out)[0]["status"] == "skipped"  # resumes: the same mpp
    csv_file = tmp_path / "mpp.csv"
    csv_file.write_text(f"slide,mpp\n{no_mpp_slide.name},0.25\n")
    assert main(["run", str(folder), "-o", str(out), "--mpp", "0.5", "--mpp-csv", str(csv_file), "--no-report"]) == 0
    assert _summary(out)[0]["status"] == "done"  # the slide's CSV row beats --mpp: a new mpp, redone
    from wsiengine import open_result

    store = open_result(out / f"{row['slide_id']}.zarr")
    assert store.slide["mpp"] == [0.25, 0.25] and store.slide["mpp_source"].startswith("user")


@pytest.mark.parametrize("where", ["after", "before"])
def test_quiet_works_before_or_after_the_command(sample_folder, tmp_path, capsys, where):
    args = ["run", str(sample_folder), "-o", str(tmp_path / "out"), "--no-report"]
    argv = [*args, "--quiet"] if where == "after" else ["-q", *args]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("1 slides: 1 done")  # no per-slide table when quiet
    assert (tmp_path / "out" / "wsiengine.log").read_text().count("INFO") > 0  # the log file keeps INFO


def test_options_are_not_abbreviated(cmu_small, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "x", "-o", "y", "--mpp-c", "a.csv"])
    assert "unrecognized arguments: --mpp-c" in capsys.readouterr().err
    args = build_parser().parse_args(["run", "x", "-o", "y", "--mpp", "0.5"])
    assert args.config__mpp == "0.5"


@pytest.mark.parametrize("command", ["info", "tiles", "embed", "run", "doctor"])
def test_every_slide_command_takes_the_mpp_options(command):
    text = build_parser()._subparsers._group_actions[0].choices[command].format_help()
    for flag in ("--mpp", "--mpp-csv", "--force-mpp", "--backend"):
        assert re.search(rf"\s{flag}[\s,]", text), (command, flag)


def test_shared_options_show_help_default_and_variable():
    choices = build_parser()._subparsers._group_actions[0].choices
    run = choices["run"].format_help()
    assert "--tile-threshold" in choices["report"].format_help() and "--tile-threshold" in run
    assert "--tile-threshold" in choices["geojson"].format_help() and "--threshold " not in run
    for flag in ("--providers", "--precision", "--device-id", "--trt-cache-dir", "--threads", "--batch-size"):
        assert flag in run, flag  # encoder provider options reach a batch
    options = " ".join(run[run.index("tiling settings"):].split())
    block = options[options.index("--target-mpp X"):options.index("--tile-px N")]
    assert "else 0.5. (default: unset; env WSIENGINE_TARGET_MPP)" in block
    for name in ("train-mil", "export-encoder"):
        assert "[train] extra" in choices[name].format_help()


def test_config_show_prints_values_and_their_sources(tmp_path, capsys, monkeypatch):
    toml = tmp_path / "run.toml"
    toml.write_text("[report]\ntop_k = 4\n")
    monkeypatch.setenv("WSIENGINE_MIN_TISSUE", "0.3")
    assert main(["config", "show", "--json", "--config", str(toml), "--overlap-px", "8"]) == 0
    shown = _json(capsys)
    assert shown["config"]["report"]["top_k"] == 4 and shown["sources"]["report.top_k"] == f"file {toml}"
    assert shown["sources"]["tiling.min_tissue"] == "env WSIENGINE_MIN_TISSUE"
    assert shown["sources"]["tiling.overlap_px"] == "command line --overlap-px"
    assert shown["sources"]["tiling.tile_px"] == "MIL head 'default'" and shown["config"]["tiling"]["tile_px"] == 96
    assert main(["config", "show", "--config", str(toml), "--overlap-px", "8"]) == 0
    text = capsys.readouterr().out
    assert "[tiling]" in text and "# MIL head 'default'" in text
    saved = tmp_path / "shown.toml"  # what config show prints is a TOML file that loads back
    saved.write_text(text)
    from wsiengine.cli import build_parser, resolved_config

    again = resolved_config(build_parser().parse_args(["config", "show", "--config", str(saved)]))
    assert again.key() == shown["key"] != ""


def test_config_show_gives_the_key_the_run_resumes_by(capsys):
    import wsiengine as we

    assert main(["config", "show", "--json"]) == 0
    assert _json(capsys)["key"] == we.Pipeline(report=False).config.key()


def test_report_from_another_directory_finds_the_slide(sample_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(sample_folder.parent)
    assert main(["run", "slides", "-o", "results", "--no-report"]) == 0  # relative paths, as users type them
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store = sample_folder.parent / "results" / "cmu-1-small-region.zarr"
    assert main(["report", str(store), "-o", str(elsewhere), "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert "evidence_unavailable" not in document["flags"] and len(document["images"]["evidence"]) == 8


def test_report_follows_a_results_tree_moved_with_its_slides(sample_folder, tmp_path, monkeypatch, capsys):
    tree = sample_folder.parent
    assert main(["run", str(sample_folder), "-o", str(tree / "results"), "--no-report"]) == 0
    capsys.readouterr()
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.move(str(tree), str(moved))
    try:
        store = moved / "results" / "cmu-1-small-region.zarr"
        assert main(["report", str(store), "--format", "json"]) == 0
        document = json.loads(capsys.readouterr().out)
        assert "evidence_unavailable" not in document["flags"]
    finally:
        shutil.rmtree(moved, ignore_errors=True)


def _readme_command_lines() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```(?:bash|console|sh)\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"\s*(?:&&|\|\||;)\s*", line):
                part = re.split(r" #| \d?>", part)[0].strip()  # comments and shell redirections
                if part.startswith("wsiengine "):
                    lines.append(part)
    return lines


@pytest.mark.parametrize("line", _readme_command_lines())
def test_every_readme_command_parses(line):
    """The README's synopsis is checked against the parser: every command it shows is valid."""
    argv = shlex.split(line)[1:]
    build_parser().parse_args(argv)


def test_readme_lists_every_command():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = build_parser()._subparsers._group_actions[0].choices
    missing = [name for name in commands if f"wsiengine {name}" not in text]
    assert not missing, f"commands the README never shows: {missing}"



def _readme_block(name: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split(f"<!-- {name}:begin -->\n", 1)[1].split(f"\n<!-- {name}:end -->", 1)[0]


def test_readme_synopsis_and_settings_table_match_the_parser():
    from wsiengine.cli import settings_reference, synopsis

    assert _readme_block("synopsis") == f"```text\n{synopsis()}\n```"
    assert _readme_block("settings") == settings_reference()


def test_every_option_of_every_command_has_help():
    from wsiengine.cli import _subcommands

    missing = []
    for name, sub in _subcommands(build_parser()).items():
        for label, parser in (_subcommands(sub) or {name: sub}).items():
            for action in parser._actions:
                if not action.help and not isinstance(action, type(build_parser()._subparsers._group_actions[0])):
                    missing.append((label, action.option_strings or action.dest))
    assert not missing
