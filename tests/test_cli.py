"""The command-line pattern: the dispatcher, one-line user errors, flags made from TrainConfig,
--stage, --threads, and the train options that must fail cleanly."""
import argparse
import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

import llmkern
from llmkern import cli, train_cli
from llmkern.train import TrainConfig

from conftest import TINY_TRAIN_FLAGS as TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one pattern for every command.\n" * 200)
    return str(path)


def _one_line(capsys, rc, command, *needles, code=2):
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"llmkern {command}: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


# ---- the dispatcher --------------------------------------------------------------------------

def test_version_usage_and_unknown_command(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"llmkern {llmkern.__version__}"
    assert cli.main(["--help"]) == 0 and "train" in capsys.readouterr().out
    assert cli.main([]) == 2 and "usage: llmkern" in capsys.readouterr().err
    assert cli.main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err


def test_console_version_and_one_line_error_in_a_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmkern", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"llmkern {llmkern.__version__}"
    proc = subprocess.run([sys.executable, "-m", "llmkern", "train", "--seed", "-1", "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("llmkern train: error: --seed must be")
    assert not (tmp_path / "o").exists()


def _command(tmp_path, monkeypatch, source):
    """A command module ``fakecmd`` made from ``source``, registered as ``llmkern fake``."""
    (tmp_path / "fakecmd.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fakecmd", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fakecmd", "a test command"))


def test_a_module_that_fails_to_load_is_one_line(tmp_path, monkeypatch, capsys):
    _command(tmp_path, monkeypatch, "raise ValueError('LLMKERN_BACKEND must be one of ...,\\n got x')\n")
    rc = cli.main(["fake"])
    _one_line(capsys, rc, "fake", "LLMKERN_BACKEND must be one of ..., got x")


def test_user_errors_interrupts_and_debug_tracebacks(tmp_path, monkeypatch, capsys):
    _command(tmp_path, monkeypatch, (
        "import os\n"
        "from llmkern.cli import CLIError\n"
        "def add_arguments(p):\n"
        "    p.add_argument('--what')\n"
        "def run(args):\n"
        "    if args.what == 'cli': raise CLIError('--what: bad')\n"
        "    if args.what == 'os': open(os.path.join('/nonexistent', 'f'))\n"
        "    if args.what == 'int': raise KeyboardInterrupt\n"
        "    if args.what == 'bug': raise KeyError('a bug, not a user error')\n"
        "    return 0\n"))
    assert cli.main(["fake", "--what", "ok"]) == 0
    _one_line(capsys, cli.main(["fake", "--what", "cli"]), "fake", "--what: bad")
    _one_line(capsys, cli.main(["fake", "--what", "os"]), "fake", "/nonexistent/f", "No such file")
    assert cli.main(["fake", "--what", "int"]) == 130
    assert "interrupted" in capsys.readouterr().err
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.main(["fake", "--what", "bug"])
    monkeypatch.setenv("LLMKERN_DEBUG", "1")
    assert cli.main(["fake", "--what", "cli"]) == 2
    assert "Traceback" in capsys.readouterr().err


# ---- train: flags from the dataclasses, one place for checks ----------------------------------

def test_every_train_option_is_a_flag_with_its_help():
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    by_dest = {a.dest: a for a in parser._actions}
    for f in fields(TrainConfig):
        action = by_dest[f.name]
        assert f.metadata["help"] in action.help
        flag = "--" + f.name.replace("_", "-")
        assert flag in action.option_strings or "--no-" + flag[2:] in action.option_strings
    for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "dropout", "bias", "threads"):
        assert name in by_dest


def test_stage_dispatch_and_sft_alias(corpus, tmp_path, capsys):
    assert TrainConfig(stage="sft").sft and TrainConfig(sft=True).stage == "sft"
    assert TrainConfig().stage == "pretrain" and not TrainConfig().sft
    with pytest.raises(ValueError, match="--stage must be one of pretrain, sft, .*got 'bogus'"):
        TrainConfig(stage="bogus")
    for flag in (["--stage", "sft"], ["--sft"]):  # both reach the SFT data preparation
        rc = train_cli.main(["--data", corpus, "--out", str(tmp_path / flag[-1])] + flag + TINY)
        _one_line(capsys, rc, "train", "--sft needs JSONL")


@pytest.mark.parametrize("flags,needle", [
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--seed", str(2**64)], "--seed must be below 2**63"),
    (["--device", "foo"], "--device: unknown device 'foo'"),
    (["--device", "meta"], "--device meta: llmkern runs on cpu, cuda or mps"),
    (["--device", "mps"], "--device mps: MPS is not available"),
    (["--beta2", "1.5"], "--beta2 must be a finite number in [0, 1)"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--n-embd", "30", "--n-head", "4"], "n_embd (30) must be a multiple of n_head"),
])
def test_bad_train_options_are_one_line(flags, needle, tmp_path, capsys):
    if "mps" in flags and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    out = tmp_path / "o"
    rc = train_cli.main(["--out", str(out)] + flags)
    _one_line(capsys, rc, "train", needle)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend can run here")
def test_backend_that_cannot_run_is_one_line(corpus, tmp_path, capsys):
    rc = train_cli.main(["--data", corpus, "--out", str(tmp_path / "o"), "--backend", "cuda"] + TINY)
    _one_line(capsys, rc, "train", "--backend cuda cannot run on cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton can run here")
def test_triton_backend_without_a_gpu_in_a_process(corpus, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "llmkern", "train", "--data", corpus, "--out",
                           str(tmp_path / "o"), "--backend", "triton"] + TINY,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("llmkern train: error: --backend triton cannot run on cpu")


def test_progress_bar_is_closed_before_the_error(tmp_path, capsys):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"prompt": "a", "response": "b"}\n' * 50 + "{broken\n")
    rc = train_cli.main(["--sft", "--data", str(pairs), "--out", str(tmp_path / "o")]
                        + [f for f in TINY if f != "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    last = err.rstrip("\n").split("\n")[-1]
    assert last.split("\r")[-1].startswith("llmkern train: error: "), repr(last)
    assert "invalid JSON" in last


# ---- threads ---------------------------------------------------------------------------------

def test_threads_default_and_flag(corpus, tmp_path, monkeypatch):
    assert cli.default_threads(params=1_000_000) == 1
    monkeypatch.setattr(cli, "available_cores", lambda: 16)
    assert cli.default_threads(params=100_000_000) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cli.default_threads(params=100_000_000) == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    torch.set_num_threads(2)
    assert train_cli.main(["--data", corpus, "--out", str(tmp_path / "a"), "--steps", "1"] + TINY) == 0
    assert torch.get_num_threads() == 1  # a tiny model: one thread
    assert train_cli.main(["--data", corpus, "--out", str(tmp_path / "b"), "--steps", "1",
                           "--threads", "2"] + TINY) == 0
    assert torch.get_num_threads() == 2
    with pytest.raises(SystemExit):
        train_cli.main(["--threads", "0"])


def test_threads_helpers_for_other_commands():
    parser = argparse.ArgumentParser()
    cli.add_threads_argument(parser)
    assert parser.parse_args([]).threads is None and parser.parse_args(["--threads", "3"]).threads == 3
    assert cli.apply_threads(3) == 3 and torch.get_num_threads() == 3
    with pytest.raises(cli.CLIError, match="--threads"):
        cli.apply_threads(0)


def test_resume_rebuilds_a_damaged_token_cache(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(["--data", corpus, "--out", str(out), "--steps", "2"] + TINY) == 0
    shard = out / "data" / "tokens-00000.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(UserWarning, match="tokens-00000.bin holds 100 bytes"):
        rc = train_cli.main(["--out", str(out), "--resume", "--steps", "3", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert (out / "ckpt-0000003").is_dir()
