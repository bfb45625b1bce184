"""The scripts' flags: generated from the configurations, so the CLI and the Python
API run the same study from the same preset; bad flags are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import EXPERIMENTS, ROOT, run_script

SCRIPTS = ("transferability", "off_the_shelf", "autoencoder")

CHECK = textwrap.dedent(
    """
    import dataclasses, json, sys
    sys.path.insert(0, {experiments!r})
    sys.argv = ["script"]
    import common
    module = __import__({script!r})
    from absl import flags
    from transfer_tf.studies import config as config_lib
    FLAGS = flags.FLAGS
    out = {{}}
    default = module.STUDY.config_class()
    # Every flag's default is the library's default of its field.
    FLAGS(["script"])
    out["defaults"] = {{
        flag: [str(FLAGS[flag].default), str(config_lib.get(default, path))]
        for flag, path in module.FLAG_TABLE.items()
    }}
    for preset in sorted(module.STUDY.presets):
        for extra in ([], ["--seeds=4,5", "--learning_rate=0.003"]):
            FLAGS.unparse_flags()
            FLAGS(["script", f"--preset={{preset}}", *extra])
            cli = common.config_from_flags(module.STUDY, module.FLAG_TABLE)
            api = module.STUDY.preset(preset)
            if extra:
                api = config_lib.override(
                    api, {{"seeds": (4, 5), "training.learning_rate": 0.003}}
                )
            out[f"{{preset}} {{extra}}"] = config_lib.differences(cli, api)
    print(json.dumps(out, default=str))
    """
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_cli_and_the_api_build_the_same_config_from_a_preset(script):
    code = CHECK.format(experiments=str(EXPERIMENTS), script=script)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    defaults = out.pop("defaults")
    assert len(out) == 6  # three presets, with and without overrides
    for name, differences in out.items():
        assert differences == {}, f"{script} {name}: {differences}"
    for flag, (flag_default, field_default) in defaults.items():
        if flag_default.startswith("["):  # list flags show their elements
            continue
        assert flag_default == field_default, flag


@pytest.mark.slow
def test_bad_flags_are_one_line_errors_that_name_the_flag(tmp_path):
    work = tmp_path / "w"
    for args, message in (
        (["--seeds=-1"], "seeds=[-1]: seeds must be integers >= 0"),
        (["--seeds=a"], "--seeds=a: 'a' is not a int"),
        (["--layers=9"], "n=9 is out of range"),
        (["--dataset=cifar11"], "unknown dataset 'cifar11'"),
        (["--probe_learning_rate=0"], "Unknown command line flag"),
    ):
        proc = run_script(
            "transferability", "--preset=smoke", f"--workdir={work}", *args, check=False
        )
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not work.exists()  # nothing claimed
    proc = run_script(
        "off_the_shelf",
        "--preset=smoke",
        f"--workdir={work}",
        "--budgets=0,all",
        check=False,
    )
    assert "budgets=['0', 'all'] must be positive integers or 'all'" in proc.stderr
    proc = run_script(
        "off_the_shelf",
        "--preset=smoke",
        f"--workdir={work}",
        f"--grid_workdir={tmp_path / 'no_such_grid'}",
        check=False,
    )
    assert proc.returncode != 0 and "is not a transfer-grid work directory" in (
        proc.stderr
    )
    assert not work.exists()
    (tmp_path / "file").write_text("x")
    proc = run_script(
        "transferability",
        "--preset=smoke",
        f"--workdir={tmp_path / 'file'}",
        check=False,
    )
    assert proc.returncode != 0 and "is not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
