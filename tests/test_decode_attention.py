"""llmkern.attention_with_kvcache: the split-KV decode kernel against a float64 reference with
the tolerance rule (GQA/MQA, Sq 1..16, ragged lengths with 0 and max_len, head dims 16..200,
softcap and window), one split and several (deterministic), in-place appends, paged caches,
bad inputs, opcheck and ahead-of-time compiles for sm_80/sm_90.

On CPU the kernel runs through the Triton interpreter with 16-key tiles, so caches of a few
dozen keys span several tiles and splits.
"""
import dataclasses

import pytest
import torch

import llmkern
from llmkern.kernels.decode_attention import DecodeOptions, decode_attention_fwd, plan
from llmkern.ops.decode_attention import attention_with_kvcache, reference_kvcache
from llmkern.testing import assert_close_to_ref, aot_reports, max_error, poison_
from conftest import DEVICE, DTYPES, HAS_GPU, KERNEL_BACKENDS

pytestmark = pytest.mark.skipif("triton" not in KERNEL_BACKENDS, reason="no Triton backend here")

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
LSE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make(b, h, hkv, sq, max_len, d, dtype):
    q = torch.randn(b, h, sq, d, device=DEVICE, dtype=dtype)
    kc = torch.randn(b, hkv, max_len, d, device=DEVICE, dtype=dtype)
    vc = torch.randn(b, hkv, max_len, d, device=DEVICE, dtype=dtype)
    return q, kc, vc


def check(q, kc, vc, lens, block_table=None, num_splits=0, causal=True, window=None,
          softcap=None):
    """Kernel vs float64 and same-dtype references: out with the tolerance rule, lse, -inf rows."""
    dtype = q.dtype
    out, lse = attention_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=block_table,
                                      causal=causal, window=window, softcap=softcap,
                                      num_splits=num_splits, return_lse=True, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    lens_l = lens.long() if isinstance(lens, torch.Tensor) else torch.full((q.shape[0],), lens)
    scale = q.shape[-1] ** -0.5
    ref, ref_lse = reference_kvcache(q.double(), kc.double(), vc.double(), lens_l.to(q.device),
                                     block_table, scale, causal, window, softcap)
    same, _ = reference_kvcache(q, kc, vc, lens_l.to(q.device), block_table, scale, causal,
                                window, softcap)
    assert_close_to_ref(out, ref, same, ATOL[dtype], "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf rows differ"
    assert max_error(lse[finite], ref_lse[finite]) <= LSE_TOL[dtype], "lse"
    assert torch.all(out[~finite] == 0), "a row that sees no key must give zeros"
    return out, lse


CASES = [  # (B, H, Hkv, Sq, max_len, D): MHA, GQA 2/4, MQA; Sq 1, 3, 16; head dims 16..200
    (3, 2, 2, 1, 40, 16),
    (3, 4, 2, 3, 37, 40),
    (2, 8, 2, 1, 50, 64),
    (2, 4, 1, 3, 33, 128),
    (2, 2, 1, 16, 40, 32),
    (2, 2, 1, 1, 20, 200),  # padded to 256 with masks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "B{}H{}Hkv{}Sq{}L{}D{}".format(*s))
def test_matches_reference(shape, dtype):
    b, h, hkv, sq, max_len, d = shape
    q, kc, vc = make(b, h, hkv, sq, max_len, d, dtype)
    # ragged: an empty row, a full one, one shorter than Sq (its first queries see nothing)
    lens = torch.tensor([0, max_len, 2][:b], dtype=torch.int32, device=DEVICE)
    check(q, kc, vc, lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap_window_and_not_causal(dtype):
    q, kc, vc = make(2, 4, 2, 3, 45, 32, dtype)
    lens = torch.tensor([45, 20], dtype=torch.int64, device=DEVICE)
    check(q, kc, vc, lens, softcap=3.0, window=(9, None))
    check(q, kc, vc, lens, causal=False, window=(5, 1), num_splits=3)
    check(q, kc, vc, 17, causal=False)


def test_splits_agree_and_are_deterministic():
    q, kc, vc = make(1, 4, 1, 2, 70, 32, torch.float32)
    lens = torch.tensor([61], dtype=torch.int32, device=DEVICE)
    # the occupancy rule gives one program per (row, kv head) several splits here
    assert plan(q.shape, 1, 70, True, DEVICE).splits > 1
    outs = {}
    for splits in (1, 4):
        first, lse1 = check(q, kc, vc, lens, num_splits=splits)
        again, lse2 = attention_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=splits,
                                             return_lse=True, backend="triton")
        assert torch.equal(first, again) and torch.equal(lse1, lse2), f"{splits} splits"
        outs[splits] = first
    assert max_error(outs[1], outs[4]) <= 1e-5


def test_non_contiguous_views():
    b, h, hkv, sq, d = 2, 4, 2, 3, 24
    q = torch.randn(b, sq, h, d, device=DEVICE, dtype=torch.float16).transpose(1, 2)
    big_k = torch.randn(b, 40, hkv, d, device=DEVICE, dtype=torch.float16)  # (B, L, Hkv, D)
    big_v = torch.randn(b, hkv, 50, d, device=DEVICE, dtype=torch.float16)
    kc, vc = big_k.transpose(1, 2), big_v[:, :, 5:45]
    assert not q.is_contiguous() and not kc.is_contiguous() and not vc.is_contiguous()
    check(q, kc, vc, torch.tensor([40, 23], dtype=torch.int32, device=DEVICE), num_splits=2)


def test_split_count_follows_occupancy():
    from llmkern.kernels.decode_attention import MAX_SPLITS, choose_splits

    cpu = torch.device("cpu")  # the interpreter's "device" holds 4 programs
    assert choose_splits(cpu, programs=1, key_tiles=100) == 4
    assert choose_splits(cpu, programs=8, key_tiles=100) == 1
    assert choose_splits(cpu, programs=1, key_tiles=2) == 2  # never more splits than key tiles
    assert choose_splits(cpu, programs=1, key_tiles=10**6) <= MAX_SPLITS


def test_every_row_written_with_splits():
    q, kc, vc = make(2, 4, 2, 3, 40, 24, torch.float16)
    lens = torch.tensor([0, 33], dtype=torch.int32, device=DEVICE)
    for splits in (1, 3):
        out = poison_(torch.empty_like(q))
        lse = poison_(torch.empty(q.shape[:3], dtype=torch.float32, device=DEVICE))
        decode_attention_fwd(q, kc, vc, lens, None, 0, DecodeOptions(0.2, num_splits=splits),
                             out=out, lse=lse)
        assert not out.isnan().any() and not lse.isnan().any()
        assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))


def _write_reference(kc, vc, k, v, lens):
    kc, vc = kc.clone(), vc.clone()
    for b in range(k.shape[0]):
        start = int(lens[b])
        kc[b, :, start:start + k.shape[2]] = k[b]
        vc[b, :, start:start + k.shape[2]] = v[b]
    return kc, vc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_append_writes_the_cache_in_place(dtype):
    q, kc, vc = make(3, 4, 2, 2, 30, 16, dtype)
    k = torch.randn(3, 2, 2, 16, device=DEVICE, dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.tensor([0, 11, 28], dtype=torch.int32, device=DEVICE)
    want_k, want_v = _write_reference(kc, vc, k, v, lens)
    out = attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, backend="triton")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert torch.equal(lens, torch.tensor([0, 11, 28], dtype=torch.int32, device=DEVICE))
    ref = attention_with_kvcache(q.double(), want_k.double(), want_v.double(),
                                 cache_seqlens=lens + 2, backend="torch")
    same = attention_with_kvcache(q, want_k, want_v, cache_seqlens=lens + 2, backend="torch")
    assert_close_to_ref(out, ref, same, ATOL[dtype])
    # the torch backend appends alike
    kc2, vc2 = make(3, 4, 2, 2, 30, 16, dtype)[1:]
    want_k2, want_v2 = _write_reference(kc2, vc2, k, v, lens)
    attention_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=lens, backend="torch")
    assert torch.equal(kc2, want_k2) and torch.equal(vc2, want_v2)


def _paged(cache, page, perm):
    """A paged copy of a dense (B, Hkv, L, D) cache: blocks shuffled by ``perm``, plus a table."""
    b, hkv, length, d = cache.shape
    nb = length // page
    blocks = cache.view(b, hkv, nb, page, d).permute(0, 2, 1, 3, 4).reshape(b * nb, hkv, page, d)
    paged = torch.empty_like(blocks)
    paged[perm] = blocks
    return paged, perm.view(b, nb).to(torch.int32)


@pytest.mark.parametrize("splits", [1, 3])
def test_paged_cache_equals_contiguous(splits):
    b, page = 3, 8
    q, kc, vc = make(b, 4, 2, 2, 48, 32, torch.float16)
    perm = torch.randperm(b * 48 // page, device=DEVICE)
    kp, table = _paged(kc, page, perm)
    vp, _ = _paged(vc, page, perm)
    lens = torch.tensor([5, 48 - 3, 17], dtype=torch.int32, device=DEVICE)
    k = torch.randn(b, 2, 3, 32, device=DEVICE, dtype=torch.float16)
    v = torch.randn_like(k)
    dense = attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, num_splits=splits,
                                   backend="triton")
    paged = attention_with_kvcache(q, kp, vp, k, v, cache_seqlens=lens, block_table=table,
                                   num_splits=splits, backend="triton")
    assert torch.equal(dense, paged)
    assert torch.equal(_paged(kc, page, perm)[0], kp) and torch.equal(_paged(vc, page, perm)[0], vp)
    check(q, kp, vp, lens + 3, block_table=table, num_splits=splits)


def _tables(rows, r2, dtype=torch.float32):
    angles = torch.rand(rows, r2, device=DEVICE, dtype=torch.float64) * 6.0
    return angles.cos().to(dtype), angles.sin().to(dtype)


ROTARY_CASES = [  # (B, H, Hkv, Sq, max_len, D, R/2, paged): GQA, MQA, partial rotary, odd dims
    (3, 4, 2, 2, 32, 32, 16, False),
    (3, 4, 1, 1, 40, 40, 12, False),   # partial: 24 of 40 dims rotated
    (2, 2, 2, 3, 48, 16, 8, True),
    (3, 6, 2, 2, 32, 24, 6, True),    # partial, paged, GQA 3
    (2, 2, 1, 1, 16, 136, 60, False),  # 256-column tiles: the gather form for both layouts
]


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ROTARY_CASES,
                         ids=lambda c: "B{}H{}Hkv{}Sq{}L{}D{}R{}{}".format(*c[:6], 2 * c[6],
                                                                         "paged" if c[7] else ""))
def test_fused_rotary_equals_rotary_then_attention(case, dtype, interleaved):
    """rotary_cos/sin inside the kernels (k rotated as it is written, q as it is loaded) equal
    llmkern.rotary at positions cache_seqlens + i followed by the plain call: the same out and
    the same cache, for both layouts, partial rotary dims, GQA, ragged lengths and paged caches."""
    b, h, hkv, sq, max_len, d, r2, paged = case
    q, kc, vc = make(b, h, hkv, sq, max_len, d, dtype)
    k = torch.randn(b, hkv, sq, d, device=DEVICE, dtype=dtype)
    v = torch.randn_like(k)
    cos, sin = _tables(max_len, r2)
    lens = torch.tensor([0, max_len - sq, 11][:b], dtype=torch.int32, device=DEVICE)
    table = None
    if paged:
        page = 8
        perm = torch.randperm(b * max_len // page, device=DEVICE)
        kc, table = _paged(kc, page, perm)
        vc, _ = _paged(vc, page, perm)
    pos = lens.long()[:, None] + torch.arange(sq, device=DEVICE)
    qr, kr = llmkern.rotary(q, k, cos, sin, pos, interleaved=interleaved, backend="torch")
    want_k, want_v = kc.clone(), vc.clone()
    want = attention_with_kvcache(qr, want_k, want_v, kr, v, cache_seqlens=lens,
                                  block_table=table, backend="triton")
    outs = {}
    for backend in ("triton", "torch"):
        kc2, vc2 = kc.clone(), vc.clone()
        outs[backend] = poison_(torch.empty_like(q))
        outs[backend].copy_(attention_with_kvcache(
            q, kc2, vc2, k, v, cache_seqlens=lens, block_table=table, backend=backend,
            rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved))
        assert torch.equal(kc2, want_k) and torch.equal(vc2, want_v), f"{backend}: cache"
    # the kernel rotates in fp32 and rounds once, as llmkern.rotary does
    assert max_error(outs["triton"], want) <= ATOL[dtype]
    ref = attention_with_kvcache(qr.double(), want_k.double(), want_v.double(),
                                 cache_seqlens=lens + sq, block_table=table, backend="torch")
    same = attention_with_kvcache(qr, want_k, want_v, cache_seqlens=lens + sq, block_table=table,
                                  backend="torch")
    assert_close_to_ref(outs["triton"], ref, same, ATOL[dtype], "fused rotary")
    assert_close_to_ref(outs["torch"], ref, same, ATOL[dtype], "torch fused rotary")


def test_fused_rotary_positions_without_causal_and_fp64_tables():
    """Not causal, no window: every query is rotated at cache_seqlens (flash-attention's rule);
    float64 tables serve the kernel too (rotated in fp32)."""
    q, kc, vc = make(2, 4, 2, 3, 24, 16, torch.float32)
    k = torch.randn(2, 2, 3, 16, device=DEVICE)
    cos, sin = _tables(24, 8, torch.float64)
    lens = torch.tensor([5, 21], dtype=torch.int32, device=DEVICE)
    pos = lens.long()[:, None].expand(2, 3)
    qr, _ = llmkern.rotary(q, q[:, :2], cos, sin, pos, backend="torch")
    _, kr = llmkern.rotary(k, k, cos, sin, lens.long()[:, None] + torch.arange(3, device=DEVICE),
                           backend="torch")
    want_k, want_v = kc.clone(), vc.clone()
    want = attention_with_kvcache(qr, want_k, want_v, kr, k, cache_seqlens=lens, causal=False,
                                  backend="torch")
    for backend in ("triton", "torch"):
        kc2, vc2 = kc.clone(), vc.clone()
        out = attention_with_kvcache(q, kc2, vc2, k, k, cache_seqlens=lens, causal=False,
                                     rotary_cos=cos, rotary_sin=sin, backend=backend)
        assert max_error(out, want) <= 1e-5, backend
        assert max_error(kc2, want_k) <= 1e-6, backend


def test_fused_rotary_bad_tables():
    q, kc, vc = make(2, 4, 2, 1, 16, 8, torch.float32)
    k = torch.randn(2, 2, 1, 8, device=DEVICE)
    cos, sin = _tables(16, 4)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=DEVICE)
    base = dict(q=q, k_cache=kc, v_cache=vc, k=k, v=k, cache_seqlens=lens, backend="triton")
    bad = [
        (dict(rotary_cos=cos), "both rotary_cos and rotary_sin"),
        (dict(k=None, v=None, rotary_cos=cos, rotary_sin=sin), "pass k and v too"),
        (dict(rotary_cos=cos[None], rotary_sin=sin[None]), "rotary_cos must have 2 dimensions"),
        (dict(rotary_cos=cos.int(), rotary_sin=sin.int()), "rotary_cos has unsupported dtype"),
        (dict(rotary_cos=cos, rotary_sin=sin[:, :2]), "one shape and dtype"),
        (dict(rotary_cos=cos.half(), rotary_sin=sin), "one shape and dtype"),
        (dict(rotary_cos=_tables(16, 5)[0], rotary_sin=_tables(16, 5)[1]), "rotary_dim <= head_dim 8"),
        (dict(rotary_cos=cos[:15], rotary_sin=sin[:15]), "at least 16 rows"),
        (dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=1), "rotary_interleaved must be a bool"),
        (dict(rotary_cos=cos.clone().requires_grad_(), rotary_sin=sin), "forward only"),
    ]
    for change, match in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            attention_with_kvcache(**dict(base, **change))


def test_fused_rotary_opcheck_and_compile():
    import llmkern.ops.decode_attention  # noqa: F401  (registers the ops)

    q, kc, vc = make(2, 4, 2, 2, 20, 16, torch.float32)
    k = torch.randn(2, 2, 2, 16, device=DEVICE)
    cos, sin = _tables(20, 6)
    lens = torch.tensor([3, 9], dtype=torch.int32, device=DEVICE)
    fwd = torch.ops.llmkern.attention_with_kvcache_fwd.default
    torch.library.opcheck(fwd, (q, kc, vc, lens, None, 2, 0.25, True, None, None, 0.0, 2, "triton",
                                cos, sin, True))
    append = torch.ops.llmkern.kvcache_append_rotary.default
    torch.library.opcheck(append, (kc.clone(), vc.clone(), k, k, lens, None, cos, sin, False,
                                   "triton"))

    def step(q, kc, vc, k, v, lens, cos, sin):
        return attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, backend="triton",
                                      check=False, rotary_cos=cos, rotary_sin=sin)

    kc2, vc2 = kc.clone(), vc.clone()
    want = step(q, kc, vc, k, k, lens, cos, sin)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc2, vc2, k, k, lens, cos, sin)
    assert torch.equal(got, want) and torch.equal(kc2, kc) and torch.equal(vc2, vc)


def test_auto_and_torch_backends():
    q, kc, vc = make(2, 2, 1, 17, 40, 16, torch.float32)
    lens = torch.tensor([40, 30], dtype=torch.int32, device=DEVICE)
    with pytest.raises(RuntimeError, match="at most 16 query rows"):
        attention_with_kvcache(q, kc, vc, cache_seqlens=lens, backend="triton")
    out = attention_with_kvcache(q, kc, vc, cache_seqlens=lens, backend="torch")
    ref, _ = reference_kvcache(q.double(), kc.double(), vc.double(), lens.long(), None,
                               16 ** -0.5, True, None, None)
    assert max_error(out, ref) <= 1e-5
    # float64 runs on the reference under auto and by name
    out64 = attention_with_kvcache(q.double(), kc.double(), vc.double(), cache_seqlens=lens)
    assert out64.dtype == torch.float64 and max_error(out64, ref) <= 1e-12
    # no cache_seqlens: the whole cache
    full = attention_with_kvcache(q[:, :, :3], kc, vc, backend="triton")
    whole = attention_with_kvcache(q[:, :, :3], kc, vc, cache_seqlens=40, backend="torch")
    assert max_error(full, whole) <= 1e-5


def _bad_calls():
    f32, i32 = torch.float32, torch.int32
    q, kc, vc = make(2, 4, 2, 1, 16, 8, f32)
    lens = torch.tensor([3, 4], dtype=i32, device=DEVICE)
    k = torch.randn(2, 2, 1, 8, device=DEVICE)
    table = torch.zeros(2, 2, dtype=i32, device=DEVICE)
    return [
        (dict(q=q[0]), "q must have 4 dimensions"),
        (dict(k_cache=kc[..., :4], v_cache=vc[..., :4]), "head_dim of q"),
        (dict(v_cache=vc[:, :, :8]), "same shape"),
        (dict(q=torch.randn(2, 3, 1, 8, device=DEVICE)), "must be a multiple of"),
        (dict(k_cache=kc[:1], v_cache=vc[:1]), "batch size"),
        (dict(q=q.half()), "dtype"),
        (dict(cache_seqlens=lens.float()), "cache_seqlens has unsupported dtype"),
        (dict(cache_seqlens=lens[:1]), "one length per batch row"),
        (dict(cache_seqlens=torch.tensor([3, 17], dtype=i32, device=DEVICE)), r"\[0, 16\]"),
        (dict(cache_seqlens=torch.tensor([-1, 2], dtype=i32, device=DEVICE)), "cache_seqlens must"),
        (dict(k=k, v=k, cache_seqlens=torch.tensor([16, 0], dtype=i32, device=DEVICE)), r"\[0, 15\]"),
        (dict(k=k), "both k and v"),
        (dict(k=k[:, :1], v=k[:, :1]), "kv_heads"),
        (dict(k=k, v=k, cache_seqlens=None), "cache_seqlens is required"),
        (dict(block_table=table.long()), "block_table has unsupported dtype"),
        (dict(block_table=table[:1]), "block_table"),
        (dict(k_cache=kc[:, :, :8], v_cache=vc[:, :, :8], block_table=table + 9),
         "block ids outside"),
        (dict(window=(1, 2, 3)), "window"),
        (dict(softcap=-1.0), "softcap"),
        (dict(num_splits=-2), "num_splits"),
        (dict(q=q.clone().requires_grad_()), "forward only"),
        (dict(q=torch.randn(2, 4, 1, 300, device=DEVICE), k_cache=torch.randn(2, 2, 4, 300),
              v_cache=torch.randn(2, 2, 4, 300)), "exceeds the supported maximum"),
    ], dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=lens)


@pytest.mark.parametrize("index", range(len(_bad_calls()[0])))
def test_bad_inputs_name_the_argument(index):
    calls, base = _bad_calls()
    change, match = calls[index]
    with pytest.raises((ValueError, TypeError), match=match):
        attention_with_kvcache(**dict(base, **change), backend="triton")


def test_opcheck():
    import llmkern.ops.decode_attention  # noqa: F401  (registers the op)

    q, kc, vc = make(2, 4, 2, 2, 20, 16, torch.float32)
    lens = torch.tensor([3, 9], dtype=torch.int32, device=DEVICE)
    op = torch.ops.llmkern.attention_with_kvcache_fwd.default
    torch.library.opcheck(op, (q, kc, vc, lens, None, 2, 0.25, True, None, None, 0.0, 2, "triton"))
    table = torch.tensor([[1, 0, 3], [2, 4, 5]], dtype=torch.int32, device=DEVICE)
    paged = torch.randn(6, 2, 8, 16, device=DEVICE)
    torch.library.opcheck(op, (q, paged, paged.clone(), lens, table, 0, 0.25, False, 3, None, 2.0,
                               0, "triton"))


def test_compiles_fullgraph():
    q, kc, vc = make(1, 2, 1, 1, 24, 16, torch.float32)
    k = torch.randn(1, 1, 1, 16, device=DEVICE)
    lens = torch.tensor([7], dtype=torch.int32, device=DEVICE)
    kc2, vc2 = kc.clone(), vc.clone()

    def step(q, kc, vc, k, v, lens):
        return attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, backend="triton",
                                      check=False)

    want = step(q, kc, vc, k, k, lens)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc2, vc2, k, k, lens)
    assert torch.equal(got, want) and torch.equal(kc2, kc) and torch.equal(vc2, vc)


@pytest.mark.gpu
def test_bf16_and_large_shapes_on_gpu():
    dtype = torch.bfloat16
    q, kc, vc = make(2, 32, 8, 1, 4096, 128, dtype)
    lens = torch.tensor([4096, 1000], dtype=torch.int32, device=DEVICE)
    check(q, kc, vc, lens)
    q, kc, vc = make(1, 8, 1, 4, 2048, 256, torch.float16)
    check(q, kc, vc, torch.tensor([2048], dtype=torch.int32, device=DEVICE), softcap=30.0)
    assert DTYPES[-1] == torch.bfloat16 and HAS_GPU


@pytest.mark.gpu
def test_auto_routes_decode_shaped_attention():
    import llmkern

    q, k, v = make(2, 8, 2, 1, 1000, 64, torch.float16)
    with torch.no_grad():
        routed, lse = llmkern.attention(q, k, v, causal=True, return_lse=True)
        split, split_lse = llmkern.attention_with_kvcache(q, k, v, return_lse=True, backend="triton")
        prefill = llmkern.attention(q, k, v, causal=True, backend="triton")
    assert torch.equal(routed, split) and torch.equal(lse, split_lse)
    assert max_error(routed, prefill) <= 2e-3
    # a gradient, a mask, few keys or a named backend keep the prefill kernel
    from llmkern.ops.attention import _decode_shaped

    assert _decode_shaped(q, k, v, None, None, 0.0)
    assert not _decode_shaped(q, k[:, :, :100], v[:, :, :100], None, None, 0.0)
    assert not _decode_shaped(q, k, v, "triton", None, 0.0)
    assert not _decode_shaped(q, k, v, None, torch.ones(1000, dtype=torch.bool, device=DEVICE), 0.0)
    q.requires_grad_()
    assert not _decode_shaped(q, k, v, None, None, 0.0)
    assert llmkern.attention(q, k, v, causal=True).requires_grad


@pytest.mark.parametrize("arch", [80, 90])
def test_shipped_configs_compile(arch):
    reports = aot_reports("llmkern.kernels.decode_attention", archs=(arch,))
    names = [r.name for r in reports]
    assert any("decode_split-fp16" in n for n in names) and any("decode_merge" in n for n in names)
    problems = [p for r in reports for p in r.problems()]
    assert problems == [], "\n".join(problems + [str(dataclasses.asdict(r)) for r in reports])
