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
    assert "unknown command 'pretrian'" in err and "pretrain" in err and "sample" in err


def test_unknown_flag_is_named(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--temprature", "0.5"])
    assert exc.value.code == 2
    assert "--temprature" in capsys.readouterr().err


def test_bad_value_is_a_clean_error(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--temperature", "0"])
    assert "temperature must be > 0, got 0.0" in capsys.readouterr().err
    assert main(["sample", "--model", "/no/such/dir"]) == 1
    assert "/no/such/dir" in capsys.readouterr().err


def test_sample_end_to_end(capsys):
    assert main(["sample", "--prompt", "The acting", "--num-samples", "2", "--max-new-tokens", "8"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
    assert len(lines) == 2 and all("The acting" in l for l in lines)


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
