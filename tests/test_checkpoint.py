"""Checkpoints: files load without running code, damaged files are named, killed runs leave no
debris, and a checkpoint is whole or gone."""
import os
import subprocess
import sys

import pytest
import torch

from llmkern import checkpoint as ckpt_io
from llmkern import train_cli
from llmkern.checkpoint import CheckpointError
from llmkern.train import Trainer, TrainConfig

SMALL = dict(n_layer=1, n_head=2, n_embd=16)
from conftest import TINY_TRAIN_FLAGS as TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tmp_path):
    """A finished 2-step run: (corpus, run directory, its checkpoint)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("checkpoints are whole or gone.\n" * 200)
    out = tmp_path / "run"
    cfg = TrainConfig(data=str(corpus), out=str(out), steps=2, batch_size=4, block_size=16,
                      eval_iters=1, progress=False, plot=False, device="cpu")
    Trainer(cfg, SMALL).train()
    return corpus, out, out / "ckpt-0000002"


def _resume(out, steps=3):
    return ["--out", str(out), "--resume", "--steps", str(steps), "--no-progress"]


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("llmkern train: error: ")
    for needle in needles:
        assert needle in err, err


class _RunsCode:
    """Unpickling this calls os.system: what a hostile state.pt can hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_state_loads_without_running_code(run, tmp_path, capsys):
    _, out, ckpt = run
    state = ckpt_io.load_state(str(ckpt))  # a genuine state loads with weights_only=True
    assert state["step"] == 2 and "state" in state["optimizer"] and state["data_rng"]["state"]
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "optimizer": _RunsCode(marker)}, ckpt / ckpt_io.STATE)
    with pytest.raises(CheckpointError, match="state.pt"):
        ckpt_io.load_state(str(ckpt))
    capsys.readouterr()
    rc = train_cli.main(_resume(out))
    _one_line_error(capsys, rc, str(ckpt / "state.pt"))
    assert not marker.exists()


@pytest.mark.parametrize("name,damage", [("model.safetensors", "truncate"), ("model.safetensors", "empty"),
                                         ("state.pt", "truncate"), ("state.pt", "empty"),
                                         ("config.json", "truncate")])
def test_damaged_checkpoint_file_is_named(run, capsys, name, damage):
    _, out, ckpt = run
    path = ckpt / name
    path.write_bytes(b"" if damage == "empty" else path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    rc = train_cli.main(_resume(out))
    _one_line_error(capsys, rc, str(path))


def test_broken_config_is_named_when_loading_a_checkpoint_directory(run):
    _, _, ckpt = run
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        ckpt_io.load_model(str(ckpt))


def test_killed_runs_debris_is_cleaned_on_start(run):
    corpus, out, _ = run
    dead = _dead_pid()
    debris = [out / f".ckpt-0000003.tmp-{dead}", out / f".ckpt-0000001.del-{dead}",
              out / f"ckpt-0000002.old-{dead}"]
    for d in debris:
        d.mkdir()
        (d / "config.json").write_text("{}")
    (out / f"latest.tmp-{dead}").write_text("ckpt-0000003\n")
    alive = out / f".ckpt-0000004.tmp-{os.getppid()}"  # a writer that is still running
    alive.mkdir()
    cfg = TrainConfig(data=str(corpus), out=str(out), steps=3, batch_size=4, block_size=16,
                      eval_iters=1, progress=False, plot=False, device="cpu", resume=True)
    Trainer(cfg, SMALL)
    assert sorted(os.listdir(out)) == sorted([alive.name, "ckpt-0000002", "data", "latest",
                                              "metrics.csv", "metrics.jsonl"])


def test_a_checkpoint_is_whole_or_gone(run, monkeypatch):
    corpus, out, ckpt = run
    # A kill during pruning stops rmtree half way: the checkpoint was renamed first, so it no
    # longer lists, and the next start removes the rest.
    monkeypatch.setattr(ckpt_io.shutil, "rmtree", lambda path, ignore_errors=False: None)
    ckpt_io._remove(str(ckpt))
    monkeypatch.undo()
    assert ckpt_io.list_checkpoints(str(out)) == []
    with pytest.raises(CheckpointError):
        ckpt_io.resolve(str(out))
    leftover = [n for n in os.listdir(out) if n.startswith(".ckpt-0000002.del-")]
    assert len(leftover) == 1
    # The pid in the name is this process, which has not started writing: stale.
    assert ckpt_io.clean_stale(str(out)) == [str(out / leftover[0])]
    # A directory missing its weights (deleted by an older version, or by hand) is not a
    # checkpoint even though its config.json is there.
    (out / "ckpt-0000005").mkdir()
    (out / "ckpt-0000005" / "config.json").write_text('{"llmkern": 1}')
    assert ckpt_io.list_checkpoints(str(out)) == []


def test_sigkilled_run_leaves_a_resumable_directory(tmp_path):
    """A run killed while it writes checkpoints every step: what it leaves resumes cleanly."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("killed runs leave no debris.\n" * 300)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "llmkern", "train", "--data", str(corpus), "--out", str(out),
           "--steps", "100000", "--ckpt-every", "1", "--keep-last", "1", "--eval-every", "100000"] + TINY
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait_for(lambda: len(ckpt_io.list_checkpoints(str(out))) >= 1 and
                  int(ckpt_io.list_checkpoints(str(out))[-1][-7:]) >= 3, proc)
    finally:
        proc.kill()
        proc.wait()
    step = int(ckpt_io.resolve(str(out))[-7:])
    rc = train_cli.main(["--out", str(out), "--resume", "--steps", str(step + 1), "--no-progress"])
    assert rc == 0
    names = os.listdir(out)
    assert not [n for n in names if ".tmp-" in n or ".del-" in n or ".old-" in n], names
    assert [os.path.basename(p) for p in ckpt_io.list_checkpoints(str(out))] == [f"ckpt-{step + 1:07d}"]


def _wait_for(condition, proc, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the training process exited early ({proc.returncode})")
        try:
            if condition():
                return
        except (OSError, ValueError):
            pass  # a directory renamed while it was listed
        time.sleep(0.05)
    raise AssertionError("timed out")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_hidden_save_and_prune_names_never_list(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    for name in (".ckpt-0000001.tmp-1", ".ckpt-0000001.del-1"):
        (out / name).mkdir()
        (out / name / "config.json").write_text('{"llmkern": 1}')
        (out / name / "model.safetensors").write_bytes(b"x")
    assert ckpt_io.list_checkpoints(str(out)) == []
