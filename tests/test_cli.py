import re

import pytest

from agents.cli import COMMANDS, main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_lists_valid_ones(capsys):
    assert main(["pretrian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'pretrian' (did you mean pretrain" in err and "sample" in err
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "did you mean train" in err and "valid commands: pretrain, prompts, sample" in err and "train ppo" in err


def test_unknown_flag_gets_our_message_with_close_matches(capsys):
    assert main(["sample", "--temprature", "0.5"]) == 2
    assert capsys.readouterr().err.strip() == "textgym sample: unknown flag --temprature; did you mean --temperature?"
    assert main(["train", "ppo", "--lr-rate", "3", "--whiten-advantagez"]) == 2
    err = capsys.readouterr().err
    assert "unknown flag --lr-rate; did you mean --lr" in err and "did you mean --whiten-advantages" in err
    assert "HfArgumentParser" not in err and "'3'" not in err, "a value after an unknown flag is not reported again"
    assert main(["train", "trpo", "--group-size", "4"]) == 2  # another algorithm's flag: say whose
    assert "unknown flag --group-size; it is a flag of textgym train grpo" in capsys.readouterr().err


def test_version_and_the_help_of_off_switches(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("textgym 0.1")
    with pytest.raises(SystemExit):
        main(["train", "ppo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--no_whiten_advantages, --no-whiten-advantages turn --whiten-advantages off (normalise advantages to mean 0, std 1 " \
           "per rollout); it is on by default" in help_text
    assert "(default: False)" not in help_text.split("--no-whiten-advantages")[1].split("--max")[0]


def test_eta_comes_from_the_measured_rate_of_this_session():
    from types import SimpleNamespace

    from pretrain.progress import eta_seconds, format_seconds

    task = SimpleNamespace(total=10, completed=3, elapsed=90.0, fields={"start_completed": 0})
    assert eta_seconds(task) == pytest.approx(210.0)  # 3 updates in 90 s: 30 s each, 7 to go
    resumed = SimpleNamespace(total=10, completed=8, elapsed=60.0, fields={"start_completed": 5})
    assert eta_seconds(resumed) == pytest.approx(40.0)
    assert eta_seconds(SimpleNamespace(total=10, completed=0, elapsed=5.0, fields={"start_completed": 0})) is None
    assert format_seconds(3725) == "1:02:05" and format_seconds(None) == "-:--:--"


def test_a_run_whose_output_is_not_a_terminal_prints_plain_progress_lines(tmp_path, capsys):
    assert main(["train", "ppo", "--env", "TextGenToy-v0", "--num-envs", "8", "--max-new-tokens", "4", "--total-steps", "96",
                 "--num-minibatches", "2", "--device", "cpu", "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    assert "ppo" not in captured.out and "━" not in captured.out  # stdout is for results, the display is on stderr
    lines = [line for line in captured.err.splitlines() if line.startswith("ppo ")]
    assert lines and re.match(r"ppo 3/3 \(100%\)  elapsed \d:\d\d:\d\d  eta 0:00:00", lines[-1]), lines
    assert " rm " in lines[-1] and " gold " in lines[-1] and " kl " in lines[-1]


def test_what_runs_inside_a_live_bar_prints_to_stdout_stays_on_stdout(capsys, monkeypatch):
    """The bar draws on stderr; a line the code inside it prints must reach stdout (a redirected
    stdout is a results file), not the bar's stream."""
    from pretrain.progress import progress_bar

    monkeypatch.setenv("FORCE_COLOR", "1")  # stderr counts as a terminal: the live bar runs
    with progress_bar("x") as bar:
        assert bar.live.is_started
        task = bar.add_task("x", total=1)
        print("RESULT-INSIDE")
        bar.update(task, advance=1)
    captured = capsys.readouterr()
    assert "RESULT-INSIDE" in captured.out and "RESULT-INSIDE" not in captured.err


def test_bad_value_is_a_clean_error(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--temperature", "0"])
    assert "temperature must be > 0, got 0.0" in capsys.readouterr().err
    assert main(["sample", "--model", "/no/such/dir"]) == 1
    assert "/no/such/dir" in capsys.readouterr().err


def test_sample_end_to_end(capsys):
    assert main(["sample", "--prompt", "The acting", "--num-samples", "2", "--max-new-tokens", "8"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 2 and all("The acting" in line for line in lines)


def float_fields():
    from dataclasses import fields

    from agents.cli import TRAIN

    for name, command in [*COMMANDS.items(), *(("train " + k, v) for k, v in TRAIN.items())]:
        for f in fields(command.config):
            if isinstance(f.default, float):
                yield name, command.config, f.name


@pytest.mark.parametrize("command, config, field", list(float_fields()), ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_hyperparameter_must_be_finite(command, config, field, value):
    """``--kl-coef nan`` used to pass (the check was ``< 0``) and silently switch the KL shaping off."""
    required = {"runs": ["runs/x"]} if "runs" in {f for f in config.__dataclass_fields__} else {}
    with pytest.raises(ValueError, match=f"{field} must be"):
        config(**required, **{field: value})


def test_nan_flag_from_the_command_line_is_a_clean_error(capsys):
    with pytest.raises(SystemExit):
        main(["train", "ppo", "--kl-coef", "nan"])
    assert "kl_coef must be a finite number, got nan" in capsys.readouterr().err
