"""What `mixq` does with an error: a user error (a MixqError) is one line and exit 2, anything
else is a bug and keeps its traceback; MIXQ_DEBUG=1 shows the traceback of user errors too."""
import pytest

from mixq import cli, inspect
from mixq.errors import MixqError


def test_a_user_error_is_one_line(tmp_path, cli_error):
    err = cli_error(["inspect", str(tmp_path / "missing")])
    assert err.startswith("mixq inspect: error: ") and "no such file" in err


def test_every_stage_error_is_a_user_error():
    from mixq.compile.build import CompileError
    from mixq.data import DataError
    from mixq.freeze import FreezeError
    from mixq.graph import GraphError
    from mixq.runtime.deploy import DeployError
    from mixq.runtime.session import BoardError
    from mixq.train.errors import ConfigError, TrainError
    for error in (CompileError, DataError, FreezeError, GraphError, DeployError, BoardError, ConfigError, TrainError):
        assert issubclass(error, MixqError), error


def test_any_other_error_is_a_bug_and_keeps_its_traceback(tmp_path, monkeypatch):
    # e.g. TVM's InternalError, a RuntimeError: not the user's mistake, so not one line and exit 2
    def broken(frozen_dir):
        raise RuntimeError("InternalError: Check failed: something inside")
    monkeypatch.setattr(inspect, "layer_rows", broken)
    with pytest.raises(RuntimeError, match="Check failed"):
        cli.main(["inspect", str(tmp_path)])


def test_mixq_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXQ_DEBUG", "1")
    capsys.readouterr()
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "GraphError" in err
    assert err.rstrip("\n").splitlines()[-1].startswith("mixq inspect: error: ")
