"""The reward, dpo and grpo stages on tiny models: learning, exact resume, rewards from a
callable or a reward checkpoint, and clear errors for bad pairs, rewards and group sizes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from llmkern import checkpoint as ckpt_io
from llmkern.align import (RewardModel, call_reward, frozen_reference, load_reward_model,
                           mean_reward, preference_accuracy, python_reward, row_seeds,
                           sample_completions)
from llmkern.align_data import corrupt, default_pairs, default_prompts
from llmkern.data import DataError, default_corpus_files
from llmkern.model import GPT, GPTConfig
from llmkern.train import ConfigError, Trainer, TrainConfig

TINY = dict(n_layer=1, n_head=2, n_embd=32)
pytestmark = pytest.mark.usefixtures("one_thread")


def toward_a(prompts, completions):
    """A toy reward for "emit the token 'a'": how close the completion's bytes are to 'a'."""
    return [sum(max(0.0, 1.0 - abs(ord(ch) - ord("a")) / 128.0) for ch in c[:8]) / max(1, len(c[:8]))
            for c in completions]


def record_toward_a(prompts, completions):
    """toward_a, each call's prompts, completions and rewards appended to
    $LLMKERN_TEST_RECORD.<rank>."""
    rewards = toward_a(prompts, completions)
    with open(f"{os.environ['LLMKERN_TEST_RECORD']}.{os.environ.get('RANK', '0')}", "a") as f:
        f.write(json.dumps([prompts, completions, rewards]) + "\n")
    return rewards


def raises(prompts, completions):
    raise KeyError("no score for this")


def nan_reward(prompts, completions):
    return [float("nan")] * len(completions)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def pairs(tmp_path):
    words = ["apple", "river", "stone", "cloud", "green", "tiger", "piano", "lemon"]
    return _jsonl(tmp_path / "pairs.jsonl",
                  [{"prompt": f"{w} {i}:", "chosen": " good", "rejected": " bad!"}
                   for i in range(6) for w in words])


@pytest.fixture
def prompts(tmp_path):
    return _jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {i}:"} for i in range(12)])


def config(tmp_path, data, stage, name="run", **kw):
    base = dict(stage=stage, data=data, out=str(tmp_path / name), steps=6, batch_size=8,
                block_size=32, lr=3e-3, warmup=2, eval_every=1000, eval_iters=1, ckpt_every=1000,
                progress=False, seed=5, plot=False, max_new_tokens=6)
    base.update(kw)
    return TrainConfig(**base)


def _metric(out, key):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r[key] for r in rows if r.get(key) is not None]


def test_dpo_reaches_pair_accuracy(tmp_path, pairs):
    trainer = Trainer(config(tmp_path, pairs, "dpo", steps=25, lr=1e-2, beta=0.5), TINY)
    ref = frozen_reference(trainer)
    before = preference_accuracy(trainer.raw_model, trainer.data, "train", 32, ref, 0.5)
    trainer.train()
    acc, margin = preference_accuracy(trainer.raw_model, trainer.data, "val", 32, ref, 0.5)
    assert before[0] == 0.0 or before[1] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert acc > 0.9 and margin > 0, (acc, margin)
    assert _metric(trainer.cfg.out, "accuracy")[-1] > 0.9


def test_reward_model_learns_and_loads_from_a_pretrained_checkpoint(tmp_path, pairs):
    # a plain GPT checkpoint as the start of a reward model: the scalar head starts at zero
    text = tmp_path / "text.txt"
    text.write_text("apple river stone cloud good bad\n" * 200)
    plain = Trainer(TrainConfig(out=str(tmp_path / "lm"), data=str(text), steps=1, batch_size=2,
                                block_size=32, progress=False, plot=False, eval_iters=1), TINY)
    plain.train()
    model, _, _ = load_reward_model(str(tmp_path / "lm"))
    assert isinstance(model, RewardModel) and torch.equal(model.score.weight,
                                                          torch.zeros_like(model.score.weight))
    trainer = Trainer(config(tmp_path, pairs, "reward", steps=25, lr=1e-2,
                             init_from=str(tmp_path / "lm")), TINY)
    trainer.train()
    acc, margin = preference_accuracy(trainer.raw_model, trainer.data, "val", 32)
    assert acc > 0.9 and margin > 0


def test_grpo_raises_the_mean_reward(tmp_path, prompts):
    cfg = config(tmp_path, prompts, "grpo", steps=12, lr=1e-2, batch_size=4, group_size=6,
                 reward="test_align:toward_a", beta=0.01, eval_every=12)
    trainer = Trainer(cfg, TINY)
    trainer.train()
    assert -1 <= trainer.val_losses[12] < 0  # evaluation: minus the mean held-out reward
    rewards = _metric(cfg.out, "reward")
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards
    assert all(k >= 0 for k in _metric(cfg.out, "kl"))
    after = mean_reward(trainer.raw_model, trainer.data, trainer.tokenizer, toward_a, "train",
                        prompts=4, samples=6, max_new_tokens=6)
    assert after == mean_reward(trainer.raw_model, trainer.data, trainer.tokenizer, toward_a,
                                "train", prompts=4, samples=6, max_new_tokens=6)  # seeded
    assert after > sum(rewards[:3]) / 3 + 0.05


@pytest.mark.parametrize("stage", ["reward", "dpo", "grpo"])
def test_resume_is_bit_exact(tmp_path, pairs, prompts, stage):
    data = prompts if stage == "grpo" else pairs
    kw = dict(steps=4, reward="test_align:toward_a", batch_size=4)
    unbroken = Trainer(config(tmp_path, data, stage, name="a", **kw), TINY)
    losses = unbroken.train()
    first = Trainer(config(tmp_path, data, stage, name="b", ckpt_every=2, **kw), TINY)
    first.train(stop_after=2)
    resumed = Trainer(config(tmp_path, data, stage, name="b", resume=True, **kw), TINY)
    assert resumed.step == 2
    assert resumed.train() == losses
    for (name, p), q in zip(unbroken.raw_model.state_dict().items(),
                            resumed.raw_model.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_rows_sample_depends_on_its_prompt_and_seed_alone():
    """Row-seeded sampling: a row's completion is the same in any batch (ragged prompts, any
    neighbours), and the draw follows softmax(logits / T)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, **TINY)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11], [12, 13, 14, 15]]
    seeds = row_seeds([123, 456, 789], 2)[:5]
    together = sample_completions(model, prompts, 8, 0.8, None, seeds)
    alone = [sample_completions(model, [p], 8, 0.8, None, [s])[0] for p, s in zip(prompts, seeds)]
    assert together == alone and len(set(map(tuple, together))) == 5
    assert sample_completions(model, prompts[3:], 8, 0.8, None, seeds[3:]) == together[3:]
    assert sample_completions(model, prompts, 8, 0.8, None, seeds[::-1]) != together
    with pytest.raises(ValueError, match="pass the context of 32 tokens"):
        sample_completions(model, [[1] * 30], 3, 0.8, None, [1])


def test_grpo_samples_the_same_on_two_processes(tmp_path, prompts, monkeypatch):
    """torchrun with 2 gloo processes against 1 process whose micro-batches are the same rows
    (grad_accum 2): the same completions and rewards, the same losses and weights."""
    record = str(tmp_path / "record")
    monkeypatch.setenv("LLMKERN_TEST_RECORD", record)
    kw = dict(steps=3, batch_size=4, group_size=3, reward="test_align:record_toward_a",
              device="cpu")
    one = Trainer(config(tmp_path, prompts, "grpo", name="one", grad_accum=2, eval_iters=2, **kw),
                  TINY)
    losses = one.train()
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    here = os.path.dirname(os.path.abspath(__file__))
    env.update(OMP_NUM_THREADS="1", LLMKERN_TEST_RECORD=record + "-two",
               PYTHONPATH=os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")])))
    out = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "llmkern", "train", "--stage", "grpo", "--data", prompts, "--out", out,
           "--steps", "3", "--batch-size", "4", "--group-size", "3", "--block-size", "32",
           "--lr", "3e-3", "--warmup", "2", "--eval-every", "1000", "--eval-iters", "1",
           "--max-new-tokens", "6", "--reward", "test_align:record_toward_a", "--seed", "5",
           "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--no-progress", "--no-plot",
           "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def calls(path):
        with open(path) as f:
            return [json.loads(line) for line in f]
    mine, rank0, rank1 = calls(record + ".0"), calls(record + "-two.0"), calls(record + "-two.1")
    # the 1-process run's micro-batches alternate between the two processes' batches
    assert len(mine) == 2 * len(rank0) == 2 * len(rank1) == 2 * (3 + 2)  # steps + 2 evaluations
    assert mine[0::2] == rank0 and mine[1::2] == rank1
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["loss"] for r in rows if r.get("loss") is not None] == pytest.approx(losses, abs=1e-5)
    assert [r["val_loss"] for r in rows if r.get("val_loss") is not None] == pytest.approx(
        [one.val_losses[s] for s in (0, 3)], abs=1e-5)
    two = ckpt_io.load_model(out)[0].state_dict()
    for name, p in one.raw_model.state_dict().items():
        assert torch.allclose(p, two[name], atol=1e-5, rtol=1e-4), name


def test_grpo_with_a_reward_checkpoint(tmp_path, pairs, prompts):
    Trainer(config(tmp_path, pairs, "reward", name="rm", steps=1), TINY).train()
    trainer = Trainer(config(tmp_path, prompts, "grpo", steps=1, batch_size=2,
                             reward=str(tmp_path / "rm")), TINY)
    trainer.train()
    assert len(_metric(trainer.cfg.out, "reward")) == 1


def test_bad_inputs(tmp_path, prompts):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*missing rejected"):
        Trainer(config(tmp_path, bad, "dpo"), TINY)
    with pytest.raises(ConfigError, match="--group-size must be an integer >= 2"):
        config(tmp_path, prompts, "grpo", group_size=1)
    with pytest.raises(ValueError, match="--reward must be 'python', 'module:function'"):
        Trainer(config(tmp_path, prompts, "grpo", name="r0", reward="nothing"), TINY)
    # a failing reward stops the run with a clear error, and the checkpoint before it survives
    good = Trainer(config(tmp_path, prompts, "grpo", name="r1", steps=2, ckpt_every=1,
                          batch_size=2, reward="test_align:toward_a"), TINY)
    good.train(stop_after=1)
    saved = ckpt_io.list_checkpoints(good.cfg.out)
    for spec, err, match in (("test_align:raises", RuntimeError, "raised KeyError: 'no score"),
                             ("test_align:nan_reward", ValueError, "returned nan for completion 0")):
        t = Trainer(config(tmp_path, prompts, "grpo", name="r1", steps=2, ckpt_every=1,
                           batch_size=2, reward=spec, resume=True), TINY)
        with pytest.raises(err, match=match):
            t.train()
        assert ckpt_io.list_checkpoints(good.cfg.out) == saved
    with pytest.raises(ValueError, match="returned 1 rewards for 2 completions"):
        call_reward(lambda p, c: [1.0], "fn", ["a", "b"], ["x", "y"])


def test_default_pairs_and_prompts_from_the_stdlib():
    files = default_corpus_files(200_000)
    pairs = default_pairs(files, 0, limit=50)
    assert len(pairs) == 50 and all(p["chosen"] != p["rejected"] for p in pairs)
    prompts = default_prompts(files, 0, limit=50)
    assert len(prompts) == 50
    assert python_reward([p["prompt"] for p in prompts], [""] * 50) == [0.0] * 50
    assert python_reward(["print(1"], [")\nmore"]) == [1.0]
    import random
    assert corrupt("    x = f(a)", random.Random(0)) != "    x = f(a)"


def test_command_line_stages_and_one_line_errors(tmp_path, pairs, capsys):
    from llmkern import train_cli
    from conftest import TINY_TRAIN_FLAGS

    out = str(tmp_path / "cli")
    flags = TINY_TRAIN_FLAGS + ["--block-size", "32", "--batch-size", "4"]
    assert train_cli.main(["--stage", "dpo", "--data", pairs, "--out", out, "--steps", "2"]
                          + flags) == 0
    assert os.path.isfile(os.path.join(out, "reference.safetensors"))
    assert train_cli.main(["--stage", "dpo", "--out", out, "--resume", "--steps", "3"] + flags) == 0
    capsys.readouterr()
    rc = train_cli.main(["--stage", "grpo", "--group-size", "1", "--out", str(tmp_path / "g")]
                        + flags)
    err = capsys.readouterr().err
    assert rc == 2 and "--group-size must be an integer >= 2" in err and "Traceback" not in err
