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
