"""Trainer: learning, exact resume, checkpoints, metrics, DDP equivalence, instruction tuning."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from llmkern import checkpoint as ckpt_io
from llmkern.checkpoint import CheckpointError
from llmkern.train import ConfigError, Trainer, TrainConfig, lr_at

SMALL = dict(n_layer=2, n_head=2, n_embd=32)
TEXT = "".join(f"{i % 13} times 3 is {3 * (i % 13)}.\n" for i in range(3000))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def config(tmp_path, corpus, **kw):
    base = dict(data=corpus, out=str(tmp_path / "run"), steps=6, batch_size=8, block_size=32,
                lr=3e-3, warmup=2, eval_every=1000, eval_iters=2, ckpt_every=1000, progress=False,
                seed=3, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_fifty_steps_lower_val_loss_and_write_outputs(tmp_path, corpus):
    cfg = config(tmp_path, corpus, steps=50, eval_every=25, ckpt_every=20, keep_last=2, plot=True)
    trainer = Trainer(cfg, SMALL)
    trainer.train()
    vals = trainer.val_losses
    assert sorted(vals) == [0, 25, 50]
    assert vals[50] < vals[0] - 0.5, vals
    out = cfg.out
    # Checkpoints at 20, 40, 50; the last two are kept; 'latest' names the newest.
    assert [os.path.basename(p) for p in ckpt_io.list_checkpoints(out)] == ["ckpt-0000040", "ckpt-0000050"]
    assert ckpt_io.resolve(out).endswith("ckpt-0000050")
    assert not [n for n in os.listdir(out) if ".tmp" in n or ".old" in n]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["loss"] is not None] == list(range(1, 51))
    assert open(os.path.join(out, "metrics.csv")).readline().startswith("step,loss,val_loss")
    pytest.importorskip("matplotlib")
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000


def test_stop_and_resume_equals_unbroken_run(tmp_path, corpus):
    kw = dict(steps=8, grad_accum=2, dropout=0.1)
    unbroken = Trainer(config(tmp_path / "a", corpus, **{k: v for k, v in kw.items() if k != "dropout"}),
                       {**SMALL, "dropout": 0.1}).train()
    cfg = config(tmp_path / "b", corpus, steps=8, grad_accum=2, ckpt_every=3)
    first = Trainer(cfg, {**SMALL, "dropout": 0.1})
    first.train(stop_after=5)  # as if killed after step 5: the last checkpoint is step 3
    assert ckpt_io.resolve(cfg.out).endswith("ckpt-0000003")
    resumed = Trainer(config(tmp_path / "b", corpus, steps=8, grad_accum=2, ckpt_every=3, resume=True),
                      {**SMALL, "dropout": 0.1})
    assert resumed.step == 3
    losses = resumed.train()
    assert losses == unbroken  # bit for bit on CPU: weights, optimizer, data and dropout RNG
    rows = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["loss"] is not None] == list(range(1, 9))


def _interrupt_in_fetch(trainer, at_step, how):
    """Make the data fetch of step ``at_step + 1`` (its second micro-batch: the sampler has
    advanced, one micro-batch has run forward and backward) raise KeyboardInterrupt, or send
    this process SIGTERM and carry on."""
    fetch = trainer.data.batch
    calls = []

    def batch(rows, block_size, device):
        if trainer.step == at_step and trainer.model.training:
            calls.append(1)
            if len(calls) == 2:
                if how == "raise":
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGTERM)
        return fetch(rows, block_size, device)

    trainer.data.batch = batch


@pytest.mark.parametrize("how", ["raise", "sigterm"])
def test_interrupt_in_the_data_fetch_then_resume_equals_unbroken_run(tmp_path, corpus, how):
    model = {**SMALL, "dropout": 0.1}
    kw = dict(steps=7, grad_accum=2, ckpt_every=1000)
    unbroken = Trainer(config(tmp_path / "a", corpus, **kw), model).train()
    first = Trainer(config(tmp_path / "b", corpus, **kw), model)
    _interrupt_in_fetch(first, 3, how)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    # SIGTERM lets step 4 finish; an exception inside it goes back to the boundary of step 3.
    saved = 4 if how == "sigterm" else 3
    assert ckpt_io.resolve(str(tmp_path / "b" / "run")).endswith(f"ckpt-{saved:07d}")
    resumed = Trainer(config(tmp_path / "b", corpus, resume=True, **kw), model)
    assert resumed.step == saved
    assert resumed.train() == unbroken  # the whole curve, bit for bit


def test_resume_and_out_dir_errors(tmp_path, corpus):
    cfg = config(tmp_path, corpus, steps=2)
    Trainer(cfg, SMALL).train()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Trainer(config(tmp_path, corpus, steps=2), SMALL)
    with pytest.raises(CheckpointError, match="another model config.*n_embd"):
        Trainer(config(tmp_path, corpus, steps=4, resume=True), {**SMALL, "n_embd": 64})
    with pytest.raises(ConfigError, match="--steps > 2"):
        Trainer(config(tmp_path, corpus, steps=2, resume=True), SMALL)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(config(tmp_path / "empty", corpus, resume=True), SMALL)
    with pytest.raises(ConfigError, match="multiple of --grad-accum"):
        Trainer(config(tmp_path / "x", corpus, batch_size=6, grad_accum=4), SMALL)


def test_checkpoint_write_is_atomic_and_loadable(tmp_path, corpus):
    cfg = config(tmp_path, corpus, steps=2)
    trainer = Trainer(cfg, SMALL)
    trainer.train()
    model, tok, meta = ckpt_io.load_model(cfg.out)
    assert meta["step"] == 2 and meta["model"]["n_embd"] == 32 and tok.vocab_size == 257
    for a, b in zip(model.state_dict().values(), trainer.raw_model.state_dict().values()):
        assert torch.equal(a, b)
    # A crash mid-write leaves a temporary directory that is never taken for a checkpoint.
    os.makedirs(os.path.join(cfg.out, ".ckpt-0000009.tmp-1"))
    os.makedirs(os.path.join(cfg.out, "ckpt-0000010"))  # no config.json: incomplete
    assert ckpt_io.resolve(cfg.out).endswith("ckpt-0000002")


def test_sft_from_checkpoint_learns_responses_only(tmp_path, corpus):
    base = config(tmp_path / "base", corpus, steps=3, block_size=64)
    Trainer(base, SMALL).train()
    sft_data = tmp_path / "pairs.jsonl"
    sft_data.write_text("\n".join(json.dumps({"prompt": f"double {i}", "response": str(2 * i)})
                                  for i in range(30)))
    cfg = config(tmp_path / "sft", str(sft_data), steps=4, sft=True, init_from=base.out, block_size=64)
    trainer = Trainer(cfg, {})
    assert trainer.data.sft and trainer.model_config.n_embd == 32
    x, y = trainer.data.batch(trainer.data.sample(trainer.rng, 4, "train", 64), 64, torch.device("cpu"))
    tok = trainer.tokenizer
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        prompt_len = len(tok.encode(tok.decode(row_x).split("### Response:\n")[0] + "### Response:\n"))
        assert all(t == -100 for t in row_y[:prompt_len - 1])
        assert any(t != -100 for t in row_y[prompt_len - 1:])
    losses = trainer.train()
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    _, _, meta = ckpt_io.load_model(cfg.out)
    assert meta["train"]["sft"] is True
    with pytest.raises(ConfigError, match="over the model's context"):
        Trainer(config(tmp_path / "sft2", str(sft_data), block_size=128, sft=True, init_from=base.out), {})


def _torchrun(out, corpus, nproc, steps=4):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llmkern", "train", "--data", corpus, "--out", str(out), "--steps", str(steps),
           "--batch-size", "8", "--block-size", "32", "--n-layer", "2", "--n-head", "2",
           "--n-embd", "32", "--eval-every", "2", "--eval-iters", "2", "--no-progress",
           "--device", "cpu", "--seed", "5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return ([r["loss"] for r in rows if r["loss"] is not None],
            [r["val_loss"] for r in rows if r["val_loss"] is not None])


def test_two_process_gloo_ddp_matches_one_process(tmp_path, corpus):
    """torchrun with 2 CPU processes (gloo) against the same run in this process: the global
    batch is the same, so losses and weights agree up to the order of float sums."""
    cfg = TrainConfig(data=corpus, out=str(tmp_path / "one"), steps=4, batch_size=8, block_size=32,
                      eval_every=2, eval_iters=2, progress=False, device="cpu", seed=5, plot=False)
    one = Trainer(cfg, SMALL)
    losses = one.train()
    two = _torchrun(tmp_path / "two", corpus, 2)
    assert len(two[0]) == 4
    assert two[0] == pytest.approx(losses, rel=1e-4)
    assert two[1] == pytest.approx([one.val_losses[s] for s in (0, 2, 4)], rel=1e-4)
    w1 = one.raw_model.state_dict()
    w2 = ckpt_io.load_model(str(tmp_path / "two"))[0].state_dict()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=1e-4), k


def test_bpe_run_and_init_from_hugging_face_directory(tmp_path, corpus):
    transformers = pytest.importorskip("transformers")
    bpe = Trainer(config(tmp_path / "bpe", corpus, steps=2, tokenizer="bpe", vocab_size=320), SMALL)
    bpe.train()
    tok = bpe.tokenizer
    assert tok.kind == "hf" and tok.vocab_size <= 320
    assert ckpt_io.load_model(str(tmp_path / "bpe" / "run"))[1].encode("7 times 3") == tok.encode("7 times 3")
    hf_dir = tmp_path / "hf"
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=tok.vocab_size, n_positions=64, n_layer=1, n_head=2, n_embd=32))
    hf.save_pretrained(hf_dir, safe_serialization=True)
    tok.save(str(hf_dir))  # tokenizer.json beside the weights, as save_pretrained of a tokenizer does
    trainer = Trainer(config(tmp_path / "ft", corpus, steps=2, init_from=str(hf_dir)), {})
    assert trainer.model_config.block_size == 64 and trainer.tokenizer.vocab_size == tok.vocab_size
    assert len(trainer.train()) == 2
    model, _, meta = ckpt_io.load_model(str(hf_dir))  # `llmkern generate --ckpt` takes it too
    assert meta["source"] == "hf" and model.config.n_embd == 32


def test_a_stage_plugs_in_through_the_stages_table(tmp_path, corpus, monkeypatch):
    """The trainer takes its data and loss from STAGES[cfg.stage]: a new stage is one entry."""
    from llmkern.train import STAGES, Stage

    class Scaled(Stage):
        def loss(self, model, batch):
            return 0.5 * super().loss(model, batch)

    monkeypatch.setitem(STAGES, "scaled", Scaled("scaled", "half the pretraining loss"))
    base = Trainer(config(tmp_path / "a", corpus, steps=1), SMALL).train()
    scaled = Trainer(config(tmp_path / "b", corpus, steps=1, stage="scaled"), SMALL)
    assert scaled.train() == pytest.approx([0.5 * base[0]], rel=1e-6)
    _, _, meta = ckpt_io.load_model(str(tmp_path / "b" / "run"))
    assert meta["train"]["stage"] == "scaled" and meta["train"]["sft"] is False
