"""The scripts' flags: generated from the configurations, so the CLI and the Python
API run the same study from the same preset; bad flags are clear errors; and each
study script's command line once in a fresh process."""

from __future__ import annotations

import importlib

import pytest

from conftest import load_script, run_main, run_script, text_flags
from transfer_tf.studies import config as config_lib

SCRIPTS = (
    "transferability",
    "off_the_shelf",
    "autoencoder",
    "fine_tuning",
    "what_transfers",
    "domain_adaptation",
    "word_embeddings",
    "self_supervised",
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_cli_and_the_api_build_the_same_config_from_a_preset(script):
    from absl import flags

    module = load_script(script)
    common = importlib.import_module("common")
    registry = flags.FLAGS
    default = module.STUDY.config_class()
    # Every flag's default is the library's default of its field.
    registry([script])
    for flag, path in module.FLAG_TABLE.items():
        flag_default, field_default = (
            registry[flag].default,
            config_lib.get(default, path),
        )
        if isinstance(flag_default, list):  # list flags show their elements
            shown = [] if field_default is None else [str(v) for v in field_default]
            assert flag_default == [s.replace("None", "all") for s in shown], flag
        else:
            assert flag_default == field_default, flag
    assert module.STUDY.presets, script
    for preset in sorted(module.STUDY.presets):
        for extra in ([], ["--seeds=4,5", "--learning_rate=0.003"]):
            registry.unparse_flags()
            registry([script, f"--preset={preset}", *extra])
            cli = common.config_from_flags(module.STUDY, module.FLAG_TABLE)
            api = module.STUDY.preset(preset)
            if extra:
                api = config_lib.override(
                    api, {"seeds": (4, 5), "training.learning_rate": 0.003}
                )
            assert config_lib.differences(cli, api) == {}, (preset, extra)
            if extra:  # the overrides took effect (the comparison can fail)
                assert cli.seeds == (4, 5) and cli != module.STUDY.preset(preset)
    registry.unparse_flags()


def test_bad_flags_are_one_line_errors_that_name_the_flag(tmp_path):
    work = tmp_path / "w"
    for args, message in (
        (["--seeds=-1"], "seeds=[-1]: seeds must be integers >= 0"),
        (["--seeds=a"], "--seeds=a: 'a' is not a int"),
        (["--layers=9"], "9 is not an integer in 1..7"),
        (["--dataset=cifar11"], "unknown dataset 'cifar11'"),
        (["--probe_learning_rate=0"], "Unknown command line flag"),
        (["--num_shards=2"], "--num_shards and --shard_index go together"),
        (["--workers=0"], "--workers=0 must be an integer >= 1"),
        (["--max_retries=3"], "--max_retries needs --executor=ray"),
        (["extra"], "unexpected arguments ['extra']"),
    ):
        proc = run_main(
            "transferability", "--preset=smoke", f"--workdir={work}", *args, check=False
        )
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not work.exists()  # nothing claimed
    proc = run_main(
        "off_the_shelf",
        "--preset=smoke",
        f"--workdir={work}",
        "--budgets=0,all",
        check=False,
    )
    assert "budgets=['0', 'all'] must be positive integers or 'all'" in proc.stderr
    proc = run_main(
        "off_the_shelf",
        "--preset=smoke",
        f"--workdir={work}",
        f"--grid_workdir={tmp_path / 'no_such_grid'}",
        check=False,
    )
    assert proc.returncode == 1 and "is not a transfer-grid work directory" in (
        proc.stderr
    )
    assert not work.exists()
    (tmp_path / "file").write_text("x")
    proc = run_main(
        "transferability",
        "--preset=smoke",
        f"--workdir={tmp_path / 'file'}",
        check=False,
    )
    assert proc.returncode == 1 and "is not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


# transferability's command line is tested by killing it mid-study
# (test_study_transferability.py), train_base's and benchmark's in their own files.
@pytest.mark.slow
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "transferability"])
def test_each_study_script_starts_from_its_command_line(script, tmp_path):
    """In a fresh process, as a user runs it: the flags parse, the data load and
    the study lists its runs (a dry run writes nothing)."""
    module = importlib.import_module(f"transfer_tf.studies.{script}")
    work = tmp_path / "study"
    extra = text_flags(tmp_path / "text") if script == "word_embeddings" else []
    proc = run_script(
        script, "--preset=smoke", "--dry_run", f"--workdir={work}", *extra
    )
    pending = [line for line in proc.stdout.splitlines() if " pending " in line]
    runs = module.STUDY.expand(module.STUDY.preset("smoke"))
    assert [line.split()[-1] for line in pending] == [r.key for r in runs]
    assert not work.exists()
