"""Past one GPU on a CPU: activation checkpointing, FSDP2 over gloo with two processes, sharded
checkpoints (torn saves, resume on another number of processes), export and its errors."""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from llmkern import checkpoint as ckpt_io
from llmkern import dcp, parallel
from llmkern.cli import main as cli_main
from llmkern.model import GPT, GPTConfig
from llmkern.train import ConfigError, Trainer, TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# warmup longer than any run: the learning rate of a step does not depend on --steps, so a
# killed run and its resumption can be compared with one uninterrupted reference
RUN = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--batch-size", "4",
       "--block-size", "16", "--eval-iters", "1", "--eval-every", "1000", "--no-progress",
       "--no-plot", "--device", "cpu", "--backend", "torch", "--warmup", "1000",
       "--keep-last", "0"]


def _gpt(dropout=0.0, n_layer=3, backend="torch"):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=2, n_embd=32,
                         dropout=dropout, backend=backend))


def _grads_and_saved(model, x, seed=5):
    """(loss, gradients, number of tensors saved for backward) of one training step."""
    saved = [0]

    def pack(t):
        saved[0] += 1
        return t

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, x)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()], saved[0]


# ---- activation checkpointing ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_activation_checkpointing_same_gradients_with_dropout(backend):
    if backend not in __import__("llmkern").available_backends(torch.device("cpu")):
        pytest.skip("triton cannot run on CPU tensors here")
    n_layer = 3 if backend == "torch" else 1
    plain = _gpt(dropout=0.3, n_layer=n_layer, backend=backend)
    ac = copy.deepcopy(plain)
    assert parallel.set_activation_checkpointing(ac, 1) == n_layer
    x = torch.randint(0, 64, (2, 16 if backend == "torch" else 8))
    loss0, g0, saved0 = _grads_and_saved(plain, x)
    loss1, g1, saved1 = _grads_and_saved(ac, x)
    assert saved1 < saved0  # only block inputs are kept: it really recomputes
    assert loss0 == loss1
    for a, b in zip(g0, g1):  # recompute replays the dropout masks and attention-dropout seeds
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a different seed draws different masks: the comparison above can tell them apart
    _, g2, _ = _grads_and_saved(copy.deepcopy(plain), x, seed=6)
    assert any(not torch.equal(a, b) for a, b in zip(g0, g2))


def test_activation_checkpointing_every_kth_block_and_copies():
    model = _gpt(n_layer=5)
    assert parallel.set_activation_checkpointing(model, 2) == 3  # blocks 0, 2, 4
    marked = [getattr(b, "_llmkern_checkpointed", False) for b in model.transformer.h]
    assert marked == [True, False, True, False, True]
    twin = copy.deepcopy(model)  # a frozen reference copy runs its own weights
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    assert twin.transformer.h[0].forward.__self__ is twin.transformer.h[0]
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert not torch.equal(model(x)[0], twin(x)[0])
    assert list(model.state_dict()) == list(_gpt(n_layer=5).state_dict())  # names unchanged
    with pytest.raises(ValueError, match="every must be an int >= 0"):
        parallel.set_activation_checkpointing(model, -1)


# ---- options and launch errors -------------------------------------------------------------

def _cfg(tmp_path, **kw):
    return TrainConfig(out=str(tmp_path / "run"), steps=2, batch_size=4, block_size=16,
                       eval_iters=1, progress=False, plot=False, device="cpu", **kw)


def test_bad_parallel_options(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--parallel must be one of auto, ddp, fsdp"):
        _cfg(tmp_path, parallel="zero3")
    with pytest.raises(ConfigError, match="--activation-checkpointing must be an integer >= 0"):
        _cfg(tmp_path, activation_checkpointing=-2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(parallel.ParallelError, match="not started by torchrun.*--nproc_per_node"):
        Trainer(_cfg(tmp_path, parallel="fsdp"))
    with pytest.raises(parallel.ParallelError, match="--cpu-offload .* needs --parallel fsdp"):
        Trainer(_cfg(tmp_path, cpu_offload=True))
    # checked from the launch's environment, before any process group exists
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(parallel.ParallelError, match="--cpu-offload .* this run is on cpu"):
        Trainer(_cfg(tmp_path, parallel="fsdp", cpu_offload=True))
    with pytest.raises(parallel.ParallelError, match="--stage dpo"):
        Trainer(_cfg(tmp_path, parallel="fsdp", stage="dpo"))
    with pytest.raises(ConfigError, match=r"--batch-size 4 must be a multiple .* processes \(3\)"):
        _cfg(tmp_path).validate(3)
    assert parallel.choose("auto", _gpt(), torch.device("cpu"), 2) == "ddp"


def test_fsdp_without_torchrun_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc = cli_main(["train", "--out", str(tmp_path / "r"), "--parallel", "fsdp"] + RUN)
    err = capsys.readouterr().err
    assert rc == 2 and "torchrun" in err and "Traceback" not in err, err


# ---- two processes over gloo -----------------------------------------------------------------

def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train(out, *extra, procs=1, torchrun=None, **popen):
    """``llmkern train`` in a subprocess: under torchrun with ``procs`` > 1 (or ``torchrun``)."""
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc_per_node={procs}"] if torchrun or procs > 1 else [sys.executable])
    cmd = head + ["-m", "llmkern", "train", "--out", str(out)] + list(extra)
    if popen:
        return subprocess.Popen(cmd, env=_env(), start_new_session=True, **popen)
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _kill_tree(pid):
    """SIGKILL a torchrun agent and its workers (they do not share its process group)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    doomed, todo = [], [pid]
    while todo:
        p = todo.pop()
        doomed.append(p)
        todo += children.get(p, [])
    for p in reversed(doomed):  # workers first: none of them outlives its agent
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


def _step(ckpt):
    return int(os.path.basename(ckpt).split("-")[1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("every rank writes its shards; rank zero renames.\n" * 300)
    return path


def test_fsdp_kill_resume_reshard_export(corpus, tmp_path, capsys):
    data = ["--data", str(corpus)]
    # a 2-process FSDP run (every block checkpointed), killed once a checkpoint exists
    run = tmp_path / "fsdp"
    proc = _train(run, *data, *RUN, "--steps", "1000", "--ckpt-every", "2", "--parallel", "fsdp",
                  "--activation-checkpointing", "1", procs=2,
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not os.path.isfile(run / "latest") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    _kill_tree(proc.pid)
    _, err = proc.communicate()
    assert os.path.isfile(run / "latest"), err.decode()[-3000:]
    ckpt = ckpt_io.resolve(str(run))
    start, end = _step(ckpt), _step(ckpt) + 2
    assert dcp.is_sharded(ckpt) and not os.path.exists(os.path.join(ckpt, ckpt_io.WEIGHTS))
    ref = tmp_path / "ref"  # one process, the same global batch, never interrupted
    _train(ref, *data, *RUN, "--steps", str(end + 2), "--ckpt-every", "1000")
    want = _losses(ref)
    got = _losses(run)
    for step in range(1, start + 1):  # FSDP over 2 processes == one process, in fp32
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step

    # a torn save of a later step: shards without DCP's index, under a dead writer's name
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    torn = run / f".ckpt-{start + 2:07d}.tmp-{dead}" / dcp.SHARDED
    torn.mkdir(parents=True)
    (torn / "__0_0.distcp").write_bytes(b"half")
    os.makedirs(run / f"ckpt-{start + 4:07d}" / dcp.SHARDED)  # no config, no index: not listed
    assert ckpt_io.resolve(str(run)) == ckpt

    two = tmp_path / "two"
    shutil.copytree(run, two)
    # resume on one process (DCP reshards), then on two: the loss continues exactly
    _train(run, "--resume", "--steps", str(end), "--no-progress")
    _train(two, "--resume", "--steps", str(end), "--no-progress", "--parallel", "fsdp", procs=2)
    assert not torn.parent.exists()  # the torn save was cleaned, never resumed
    one_l, two_l = _losses(run), _losses(two)
    for step in range(start + 1, end + 1):
        assert one_l[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
        assert two_l[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    resumed = ckpt_io.resolve(str(two))
    assert _step(resumed) == end and dcp.is_sharded(resumed)
    assert not dcp.is_sharded(ckpt_io.resolve(str(run)))  # one process writes consolidated
    # ... which two FSDP processes resume, each taking its shard of the optimizer state
    _train(run, "--resume", "--steps", str(end + 2), "--no-progress", "--parallel", "fsdp",
           procs=2)
    one_l = _losses(run)
    for step in (end + 1, end + 2):
        assert one_l[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    assert dcp.is_sharded(ckpt_io.resolve(str(run)))

    # another architecture cannot resume it
    rc = cli_main(["train", "--out", str(two), "--resume", "--steps", str(end + 1),
                   "--n-layer", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "another model config" in err and "n_layer" in err, err

    # export: one safetensors file, the same weights and the same text as the sharded original
    exported = tmp_path / "exported"
    assert cli_main(["export", "--ckpt", str(two), "--out", str(exported)]) == 0
    assert sorted(os.listdir(exported)) == ["config.json", "model.safetensors"]
    a, _, _ = ckpt_io.load_model(str(two))
    b, _, _ = ckpt_io.load_model(str(exported))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    texts = []
    for src in (two, exported):
        capsys.readouterr()
        assert cli_main(["generate", "--ckpt", str(src), "--prompt", "every", "--seed", "3",
                         "--max-new-tokens", "12", "--device", "cpu"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("every")
    # bad exports: byte tokenizer to a GPT-2 folder, a non-empty target
    for argv, needle in ((["--out", str(tmp_path / "hf"), "--format", "hf"], "BPE tokenizer"),
                         (["--out", str(exported)], "not an empty directory")):
        assert cli_main(["export", "--ckpt", str(two)] + argv) == 2
        assert needle in capsys.readouterr().err


def test_export_hf_gpt2_folder(corpus, tmp_path, capsys):
    run = tmp_path / "bpe"
    cfg = TrainConfig(data=str(corpus), out=str(run), steps=1, batch_size=2, block_size=16,
                      eval_iters=1, progress=False, plot=False, device="cpu", tokenizer="bpe",
                      vocab_size=300)
    Trainer(cfg, dict(n_layer=1, n_head=2, n_embd=16)).train()
    hf = tmp_path / "hf"
    assert cli_main(["export", "--ckpt", str(run), "--out", str(hf), "--format", "hf"]) == 0
    ours, _, _ = ckpt_io.load_model(str(run))
    back = GPT.from_hf(str(hf))  # names and Conv1D layout undone exactly
    for (name, x), (_, y) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(x, y), name
    texts = []
    for src in (run, hf):  # generate reads the folder as it reads the checkpoint
        capsys.readouterr()
        assert cli_main(["generate", "--ckpt", str(src), "--prompt", "every", "--seed", "3",
                         "--max-new-tokens", "8", "--device", "cpu"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(str(hf)).eval()
    x = torch.randint(0, ours.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ours.eval()(x)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_fsdp_bf16_on_one_gpu(corpus, tmp_path):
    """FSDP2's bf16 policy with llmkern's kernels inside (a process group of one), AC on."""
    run = tmp_path / "gpu"
    flags = [f for f in RUN if f not in ("cpu", "torch")]
    flags = [f for f in flags if f not in ("--device", "--backend")]
    _train(run, "--data", str(corpus), *flags, "--device", "cuda", "--steps", "4",
           "--ckpt-every", "2", "--parallel", "fsdp", "--activation-checkpointing", "1",
           "--dtype", "bf16", procs=1, torchrun=True)
    losses = _losses(run)
    assert len(losses) == 4 and all(0 < v < 10 for v in losses.values()), losses
    assert dcp.is_sharded(ckpt_io.resolve(str(run)))
    model, _, _ = ckpt_io.load_model(str(run))  # the bf16 run keeps fp32 master weights
    assert all(p.dtype == torch.float32 for p in model.parameters())
