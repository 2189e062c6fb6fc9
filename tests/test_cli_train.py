"""``llmkern train`` / ``llmkern generate``: the default corpus, end to end, and user mistakes
(a one-line message and exit code 2, no traceback, nothing already written lost)."""
import os
import subprocess
import sys

import pytest
import torch

from llmkern import generate as gen_cli
from llmkern import train_cli

from conftest import TINY_TRAIN_FLAGS as TINY


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run_dir(tmp_path):
    """A finished 2-step run on a small text file."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, hello llmkern.\n" * 200)
    out = tmp_path / "run"
    assert train_cli.main(["--data", str(corpus), "--out", str(out), "--steps", "2"] + TINY) == 0
    return corpus, out


def _error(capsys, code, rc, *needles):
    captured = capsys.readouterr()
    assert rc == code, captured.err
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in captured.err, captured.err
    return captured.err


def test_train_without_data_uses_the_embedded_corpus_then_generate(tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_cli.main(["--out", str(out), "--steps", "3", "--corpus-mb", "0.2", "--eval-every", "3"]
                        + TINY)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "standard library" in captured.out and "checkpoint:" in captured.out
    assert str(out) in captured.out and "llmkern generate --ckpt" in captured.out
    assert (out / "ckpt-0000003" / "model.safetensors").is_file()
    rc = gen_cli.main(["--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "5", "--seed", "1"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out.startswith("def ")
    rc = gen_cli.main(["--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "4", "--beams", "3"])
    assert rc == 0 and capsys.readouterr().out.startswith("def ")


def test_train_bad_inputs(tmp_path, capsys, run_dir):
    corpus, out = run_dir
    capsys.readouterr()
    before = sorted(os.listdir(out))
    ckpt_bytes = (out / "ckpt-0000002" / "model.safetensors").read_bytes()

    rc = train_cli.main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o1")] + TINY)
    _error(capsys, 2, rc, "missing.txt", "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = train_cli.main(["--data", str(empty), "--out", str(tmp_path / "o2")] + TINY)
    _error(capsys, 2, rc, "empty")
    # A checkpoint from another config, an existing run without --resume, a context overrun.
    rc = train_cli.main(["--data", str(corpus), "--out", str(out), "--steps", "4", "--resume"]
                        + TINY + ["--n-embd", "32"])
    _error(capsys, 2, rc, "another model config", "n_embd")
    rc = train_cli.main(["--data", str(corpus), "--out", str(out), "--steps", "4"] + TINY)
    _error(capsys, 2, rc, "already holds checkpoints", "--resume")
    rc = train_cli.main(["--data", str(corpus), "--out", str(tmp_path / "o3"), "--init-from", str(out)]
                        + ["--batch-size", "4", "--block-size", "64", "--no-progress"])
    _error(capsys, 2, rc, "--block-size 64", "context of 16")
    rc = train_cli.main(["--out", str(tmp_path / "o4"), "--resume"] + TINY)
    _error(capsys, 2, rc, "no checkpoint")
    rc = train_cli.main(["--n-embd", "30", "--n-head", "4", "--out", str(tmp_path / "o5")])
    _error(capsys, 2, rc, "n_embd (30)")
    rc = train_cli.main(["--data", str(corpus), "--out", str(tmp_path / "o6"), "--block-size", "5000",
                         "--no-progress"])
    _error(capsys, 2, rc, "too small for --block-size 5000")
    for flags, needle in ((["--steps", "0"], "--steps"), (["--lr", "-1"], "--lr")):
        _error(capsys, 2, train_cli.main(flags), needle)  # checked by TrainConfig: one line
    for flags, needle in ((["--batch-size", "x"], "--batch-size"), (["--dtype", "fp8"], "--dtype")):
        with pytest.raises(SystemExit) as exc:  # not parseable: argparse's usage and message
            train_cli.main(flags)
        _error(capsys, 2, exc.value.code, needle)
    # Nothing already written was lost or changed.
    assert sorted(os.listdir(out)) == before
    assert (out / "ckpt-0000002" / "model.safetensors").read_bytes() == ckpt_bytes


def test_generate_bad_inputs(tmp_path, capsys, run_dir):
    _, out = run_dir
    capsys.readouterr()
    rc = gen_cli.main(["--ckpt", str(tmp_path / "nope")])
    _error(capsys, 2, rc, "does not exist")
    rc = gen_cli.main(["--ckpt", str(tmp_path)])
    _error(capsys, 2, rc, "no llmkern checkpoint")
    for flags, needle in ((["--temperature", "0"], "--temperature"), (["--top-p", "1.5"], "--top-p"),
                          (["--top-k", "0"], "--top-k"), (["--beams", "0"], "--beams")):
        with pytest.raises(SystemExit) as exc:
            gen_cli.main(["--ckpt", str(out)] + flags)
        _error(capsys, 2, exc.value.code, needle)
    long_prompt = "hello " * 20  # over the 16-token context
    rc = gen_cli.main(["--ckpt", str(out), "--prompt", long_prompt, "--max-new-tokens", "3", "--greedy"])
    _error(capsys, 2, rc, "more than the model's context of 16")


def test_console_process_reports_user_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmkern", "train", "--data", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("llmkern train: error:") and "Traceback" not in proc.stderr


def test_resume_takes_the_run_settings_from_its_checkpoint(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh " * 300)
    out = tmp_path / "run"
    flags = ["--data", str(corpus), "--out", str(out), "--lr", "0.01", "--seed", "9"] + TINY
    assert train_cli.main(flags + ["--steps", "2"]) == 0
    # Only --steps again: data, lr, seed, batch and block size come from the checkpoint.
    assert train_cli.main(["--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    from llmkern.checkpoint import read_config, resolve

    saved = read_config(resolve(str(out)))
    assert saved["step"] == 3 and saved["train"]["lr"] == 0.01 and saved["train"]["seed"] == 9
    assert saved["train"]["data"] == str(corpus) and saved["train"]["block_size"] == 16


def test_sft_from_a_pretrained_run_then_generate(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the answer is 42. " * 400)
    base = tmp_path / "base"
    small = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "4",
             "--block-size", "64", "--eval-iters", "1", "--no-progress", "--device", "cpu"]
    assert train_cli.main(["--data", str(corpus), "--out", str(base), "--steps", "2"] + small) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(10)))
    sft = tmp_path / "sft"
    rc = train_cli.main(["--sft", "--data", str(pairs), "--init-from", str(base), "--out", str(sft),
                         "--steps", "2", "--batch-size", "4", "--block-size", "64", "--eval-iters", "1",
                         "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert gen_cli.main(["--ckpt", str(sft), "--prompt", "q3", "--max-new-tokens", "4", "--greedy"]) == 0
    assert capsys.readouterr().out.startswith("q3")
    rc = train_cli.main(["--sft", "--data", str(corpus), "--init-from", str(base), "--out",
                         str(tmp_path / "bad"), "--no-progress"])
    _error(capsys, 2, rc, "--sft needs JSONL")
