"""States that can always be saved again (issue 11) and saved next-token logits (issue 10).

- Magnitudes: `state_bounds(model)` bounds every (layer, head) state norm and every logit; the codec
  refuses states beyond them (FLT_MAX states imported before and then failed every save), and real
  states of the shipped model (prompts up to 4k tokens, fp32 / bf16 / fp16 storage, averages) pass.
- Positions: written below 2^53, read below 2^52 (room to read 2^52 more tokens and save again).
- Checksum: a flipped byte anywhere (length prefix, header, any tensor) is refused.
- Logits: stored exactly as float32 in the same blob, validated like the rest.
"""

from __future__ import annotations

import functools
import json
import math
import random
import struct
from pathlib import Path

import pytest
import torch

from model.checkpoint import from_pretrained
from model.config import preset
from model.retnet import RetNet
from model.state import RetentionState
from state_store import (
    MAX_POSITION,
    MAX_READ_POSITION,
    ChecksumError,
    CorruptStateError,
    MemoryStateStore,
    RedisStateStore,
    SessionStates,
    StateBounds,
    StateBoundsError,
    StateCodec,
    StateCodecError,
    model_fingerprint,
    state_bounds,
)
from state_store.header import CHECKSUM_KEY
from tests.support.state import (
    REDIS_URL,
    blob_parts,
    craft_blob,
    new_prefix,
    redis_cleanup,
    require_redis,
    run,
    tiny_codec,
    tiny_model,
    tiny_state,
)

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "retserve-small"
FLT_MAX = torch.finfo(torch.float32).max
V = 8192  # the shipped model's vocabulary


@functools.cache
def shipped() -> tuple[RetNet, StateBounds, str]:
    model = from_pretrained(SHIPPED).eval()
    return model, state_bounds(model), model_fingerprint(model)


def codec(bounded: bool = True, **kw: object) -> StateCodec:
    model, bounds, fp = shipped()
    return StateCodec(model.config, fp, bounds=bounds if bounded else None, **kw)  # type: ignore[arg-type]


@functools.cache
def read(tokens: int, seed: int = 0) -> tuple[RetentionState, torch.Tensor]:
    """The shipped model after `tokens` random tokens: (state, next-token logits (1, V))."""
    ids = torch.randint(0, V, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        logits, state = shipped()[0](ids, logits_to_keep=1)
    return state, logits[:, -1]


def _state_like(s: RetentionState, fill: float | None = None, position: int | None = None) -> RetentionState:
    layers = [t.clone() if fill is None else torch.full_like(t, fill) for t in s.layers]
    pos = s.position.clone() if position is None else torch.full_like(s.position, position)
    return RetentionState(layers, pos, s.config)


# ---- magnitudes ---------------------------------------------------------------------------------
def test_flt_max_state_is_refused_on_decode_and_encode() -> None:
    """The outside probe's blob: every value FLT_MAX (finite, so the old codec imported it)."""
    s = _state_like(read(16)[0], fill=FLT_MAX)
    blob = codec(bounded=False).encode(s)  # what a client can upload: finite, well framed
    with pytest.raises(StateBoundsError, match=r"layer 0 head 0 \(row 0\).*beyond") as e:
        codec().decode(blob)
    assert "x" in str(e.value) and isinstance(e.value, CorruptStateError)
    with pytest.raises(StateBoundsError, match="cannot encode: layer 0 head 0"):
        codec().encode(s)
    half = _state_like(read(16)[0], fill=FLT_MAX / 2)
    with pytest.raises(StateBoundsError):
        codec().decode(codec(bounded=False).encode(half, storage_dtype="bfloat16"))


def test_one_head_beyond_its_bound_is_named() -> None:
    _, bounds, _ = shipped()
    s = _state_like(read(64)[0])
    t = s.layers[2][0, 3]
    t.mul_(1.5 * float(bounds.state_norm[2, 3]) / float(t.double().norm()))  # 1.5x this head's bound
    blob = codec(bounded=False).encode(s)
    with pytest.raises(StateBoundsError, match=r"layer 2 head 3 \(row 0\).*\(x1\.5\)"):
        codec().decode(blob)
    t.mul_(0.99 / 1.5)  # just inside: accepted
    assert codec().decode(codec().encode(s)).state.equal(s)


@pytest.mark.parametrize("tokens", [1, 100, 1000, 4096])
def test_real_states_of_the_shipped_model_pass_the_bounds(tokens: int) -> None:
    _, bounds, _ = shipped()
    s, logits = read(tokens, seed=tokens)
    ratio = max(bounds.check_layer(i, t) for i, t in enumerate(s.layers))
    lratio = bounds.check_logits(logits)
    print(f"{tokens} tokens: largest state norm / bound {ratio:.3g}, largest |logit| / bound {lratio:.3g}")
    assert ratio < 0.1 and lratio < 0.5  # far inside: the bound is loose, never a false refusal
    for storage in (None, "bfloat16", "float16"):
        for compression in ("none", "zlib"):
            c = codec(storage_dtype=storage, compression=compression)
            out = c.decode(c.encode(s, logits=logits))
            assert out.logits is not None and torch.equal(out.logits, logits)
            if storage is None:
                assert out.state.equal(s)


def test_batches_averages_and_continuations_pass_the_bounds() -> None:
    model = shipped()[0]
    a, b = read(100, seed=100)[0], read(1000, seed=1000)[0]  # cached by the test above
    avg = RetentionState(
        [(x + y) / 2 for x, y in zip(a.layers, b.layers, strict=True)],
        torch.maximum(a.position, b.position),
        a.config,
    )
    both = RetentionState.stack([a, b, avg])
    c = codec(storage_dtype="bfloat16")
    assert c.decode(c.encode(both)).state.batch_size == 3
    ids = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        logits, after = model(ids, state=both, mode="recurrent")
    out = codec().decode(codec().encode(after, logits=logits[:, -1]))
    assert out.state.equal(after) and torch.equal(out.logits, logits[:, -1])  # type: ignore[arg-type]


def test_a_state_at_its_bound_can_always_be_saved_again() -> None:
    """The bound is closed under the model's update: a state accepted at 99% of it, after more tokens
    (recurrent steps and a chunked prompt), still encodes, with finite logits within their bound."""
    model, bounds, _ = shipped()
    s = _state_like(read(50)[0], position=MAX_READ_POSITION - 1000)
    for i, t in enumerate(s.layers):
        norms = t.double().norm(dim=(-2, -1))  # (B, H)
        t.mul_((0.99 * bounds.state_norm[i] / norms).float()[..., None, None])
    s = codec().decode(codec().encode(s)).state  # imported
    gen = torch.Generator().manual_seed(4)
    with torch.inference_mode():
        for _ in range(3):
            logits, s = model(torch.randint(0, V, (1, 1), generator=gen), state=s)
        logits, s = model(torch.randint(0, V, (1, 70), generator=gen), state=s, logits_to_keep=1)
    assert bool(torch.isfinite(logits).all())
    out = codec().decode(codec().encode(s, logits=logits[:, -1]))
    assert out.meta.positions == (MAX_READ_POSITION - 1000 + 73,)


def test_encode_refuses_nan_and_infinite_states() -> None:
    s = _state_like(read(16)[0])
    s.layers[3][0, 1, 2, 3] = float("nan")
    with pytest.raises(CorruptStateError, match=r"cannot encode: layer 3 .*NaN"):
        codec().encode(s)
    s.layers[3][0, 1, 2, 3] = float("inf")
    with pytest.raises(CorruptStateError, match=r"cannot encode: layer 3 .*infinite"):
        codec(bounded=False).encode(s)


def test_bounds_must_match_the_model() -> None:
    model, bounds, fp = shipped()
    with pytest.raises(ValueError, match="layers, heads"):
        StateCodec(tiny_model().config, tiny_codec().fingerprint, bounds=bounds)
    with pytest.raises(TypeError, match="StateBounds"):
        StateCodec(model.config, fp, bounds={"layer": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="RetNet"):
        state_bounds(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="safety"):
        state_bounds(model, safety=0.5)
    # bounds scale with the weights: 2x the k projection of a layer doubles that layer's bounds
    doubled = from_pretrained(SHIPPED).eval()
    with torch.no_grad():
        doubled.model.layers[1].attn.k_proj.weight.mul_(2)
    b2 = state_bounds(doubled)
    assert torch.allclose(b2.state_norm[1], 2 * bounds.state_norm[1])
    assert torch.equal(b2.state_norm[0], bounds.state_norm[0])
    assert math.isclose(bounds.safety, 1.1)


# ---- positions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("position", [2**62 - 1, MAX_POSITION, -1])
def test_positions_out_of_range_are_refused(position: int) -> None:
    s = read(16)[0]
    with pytest.raises(CorruptStateError, match=r"row 0 has position .* 2\^53"):
        codec().encode(_state_like(s, position=position))
    meta, tensors = blob_parts(codec().encode(s))
    blob = craft_blob({**meta, "positions": [position]}, {**tensors, "position": torch.tensor([position])})
    with pytest.raises(CorruptStateError, match="position"):
        codec().decode(blob)


def test_states_are_read_below_2_52_and_written_below_2_53() -> None:
    """An imported state at the read limit can read 2^52 more tokens and still be saved."""
    s = read(16)[0]
    top = _state_like(s, position=MAX_READ_POSITION - 1)
    assert codec().decode(codec().encode(top)).meta.positions == (2**52 - 1,)
    far = codec().encode(_state_like(s, position=MAX_POSITION - 1))  # written (after 2^52 more tokens)
    with pytest.raises(CorruptStateError, match=r"row 0 has position 4503599627370496, .* < 2\^52"):
        codec().decode(codec().encode(_state_like(s, position=MAX_READ_POSITION)))
    with pytest.raises(CorruptStateError, match="2\\^52"):
        codec().decode(far)


# ---- checksum ---------------------------------------------------------------------------------
def test_every_flipped_byte_of_a_small_blob_is_refused() -> None:
    """Every byte of a tiny model's blob (length prefix, JSON header, position, layers), one bit each."""
    data = tiny_codec().encode(tiny_state())
    rng = random.Random(0)
    (hlen,) = struct.unpack("<Q", data[:8])
    kinds: dict[str, int] = {}
    for pos in range(len(data)):
        b = bytearray(data)
        b[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(StateCodecError) as e:
            tiny_codec().decode(bytes(b))
        kinds[type(e.value).__name__] = kinds.get(type(e.value).__name__, 0) + 1
        if pos >= 8 + hlen:  # tensor bytes: always the checksum
            assert isinstance(e.value, ChecksumError) and "checksum mismatch" in str(e.value)
    print(f"{len(data)} bytes ({hlen} of JSON header), refusals by kind: {kinds}")


@pytest.mark.parametrize("where", ["header", "position", "layers", "logits", "checksum"])
def test_flipped_bytes_in_a_real_blob_are_refused(where: str) -> None:
    s, logits = read(100)
    data = codec().encode(s, logits=logits)
    (hlen,) = struct.unpack("<Q", data[:8])
    start = 8 + hlen
    header = data[8:start].decode()
    entries = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
    if where == "header":
        offsets = [8, 9, 20, start - 1, *random.Random(1).sample(range(8, start), 30)]
    elif where == "checksum":
        at = 8 + header.index(f'"{CHECKSUM_KEY}":"') + len(CHECKSUM_KEY) + 4
        offsets = list(range(at - 3, at + 8))
    else:
        name = "layers.2" if where == "layers" else where
        a, b = entries[name]["data_offsets"]
        offsets = [
            start + a,
            start + b - 1,
            *random.Random(2).sample(range(start + a, start + b), min(20, b - a)),
        ]
    for pos in offsets:
        for bit in (0, 7):
            b = bytearray(data)
            b[pos] ^= 1 << bit
            with pytest.raises(StateCodecError):
                codec().decode(bytes(b))
    assert codec().decode(data).state.equal(s)


def test_a_version_2_blob_without_its_checksum_is_refused() -> None:
    meta, tensors = blob_parts(codec().encode(read(16)[0]))
    with pytest.raises(ChecksumError, match="no 'retserve_crc32' checksum"):
        codec().decode(craft_blob(meta, tensors, checksum=False))


def test_version_1_blobs_are_still_read_with_every_other_check() -> None:
    """Decision: version 1 (no checksum, no logits) is still decoded; the bounds and positions apply."""
    s = read(16)[0]
    meta, tensors = blob_parts(codec().encode(s))
    v1 = {k: v for k, v in meta.items() if k != "logits"} | {"version": 1}
    out = codec().decode(craft_blob(v1, tensors, checksum=False))
    assert out.state.equal(s) and out.meta.format_version == 1 and out.logits is None
    assert '"version":1' in out.meta.dumps() and "logits" not in out.meta.dumps()  # stores keep v1 meta
    big = {k: torch.full_like(t, FLT_MAX) if k.startswith("layers") else t for k, t in tensors.items()}
    with pytest.raises(StateBoundsError):
        codec().decode(craft_blob(v1, big, checksum=False))
    with pytest.raises(CorruptStateError, match="missing or unexpected"):
        codec().decode(craft_blob({**v1, "logits": False}, tensors, checksum=False))


# ---- logits -------------------------------------------------------------------------------------
def test_logits_round_trip_exactly() -> None:
    s, logits = read(200)
    c = codec()
    plain = c.decode(c.encode(s))
    assert plain.logits is None and not plain.meta.logits
    blob = c.encode(s, logits=logits)
    out = c.decode(blob)
    assert out.meta.logits and c.read_meta(blob).logits
    assert out.logits is not None and out.logits.dtype == torch.float32 and out.logits.shape == (1, V)
    assert torch.equal(out.logits.view(torch.int32), logits.view(torch.int32))
    assert torch.equal(c.decode(c.encode(s, logits=logits[0])).logits, logits)  # (V,) for one row
    bf = c.decode(c.encode(s, logits=logits, storage_dtype="bfloat16"))  # lossy state, exact logits
    assert torch.equal(bf.logits, logits) and bf.meta.lossy  # type: ignore[arg-type]
    added = len(blob) - len(c.encode(s))
    print(f"logits add {added} bytes to a {len(blob) - added}-byte blob ({added / (len(blob) - added):.1%})")
    assert V * 4 <= added < V * 4 + 200
    with torch.inference_mode():  # the saved logits are the ones the model gives after the last token
        again, _ = shipped()[0](torch.tensor([[5]]), state=out.state)
        ref, _ = shipped()[0](torch.tensor([[5]]), state=s)
    assert torch.equal(again, ref)


def test_bad_logits_are_refused_on_encode() -> None:
    s, logits = read(16)
    two = RetentionState.stack([s, s])
    cases: list[tuple[RetentionState, object, type[Exception], str]] = [
        (s, logits[:, :-1], StateCodecError, r"shape \(1, 8191\); this state needs \(1, 8192\)"),
        (s, logits.repeat(2, 1), StateCodecError, "shape"),
        (two, logits[0], StateCodecError, r"needs \(2, 8192\)"),
        (s, logits.long(), StateCodecError, "floating point"),
        (s, logits.numpy(), TypeError, "torch.Tensor"),
        (s, torch.full_like(logits, float("nan")), CorruptStateError, "row 0 of the logits has NaN"),
        (s, torch.full_like(logits, -float("inf")), CorruptStateError, "infinite"),
        (s, torch.full_like(logits, 1e30), StateBoundsError, "logit of magnitude 1e\\+30"),
    ]
    for state, bad, err, msg in cases:
        with pytest.raises(err, match=msg):
            codec().encode(state, logits=bad)  # type: ignore[arg-type]
    assert torch.equal(codec().decode(codec().encode(s, logits=logits.double())).logits, logits)


def test_bad_logits_are_refused_on_decode() -> None:
    s, logits = read(16)
    meta, tensors = blob_parts(codec().encode(s, logits=logits))
    bad = logits.clone()
    bad[0, 17] = float("nan")
    variants = {
        "NaN": (meta, {**tensors, "logits": bad}),
        "F64": (meta, {**tensors, "logits": logits.double()}),
        "F32 (1, 8191)": (meta, {**tensors, "logits": logits[:, :-1].contiguous()}),
        "expected": (meta, {k: v for k, v in tensors.items() if k != "logits"}),
        "beyond": (meta, {**tensors, "logits": torch.full_like(logits, -1e6)}),
    }
    for msg, (m, t) in variants.items():
        with pytest.raises(StateCodecError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            codec().decode(craft_blob(m, t))
    with pytest.raises(CorruptStateError, match="expected"):  # a logits tensor the header does not list
        codec().decode(craft_blob({**meta, "logits": False}, tensors))
    with pytest.raises(CorruptStateError, match="logits must be true or false"):
        codec().decode(craft_blob({**meta, "logits": "yes"}, tensors))


def test_sessions_save_and_load_logits_memory_and_redis() -> None:
    s, logits = read(40)
    require_redis()
    prefix = new_prefix()

    async def go() -> None:
        async with RedisStateStore.from_url(REDIS_URL, prefix=prefix) as redis_store:
            for store in (MemoryStateStore(), redis_store):
                sessions = SessionStates(store, codec())
                await sessions.save("t", "with", s, logits=logits[0])
                await sessions.save("t", "without", s)
                got = await sessions.load("t", "with")
                assert got is not None and got.logits is not None and torch.equal(got.logits, logits)
                assert got.state.equal(s) and got.meta.logits
                plain = await sessions.load("t", "without")
                assert plain is not None and plain.logits is None
                with pytest.raises(CorruptStateError, match="NaN"):
                    await sessions.save("t", "bad", s, logits=torch.full_like(logits, float("nan")))

    try:
        run(go())
    finally:
        redis_cleanup(prefix)


@pytest.mark.parametrize(
    "overrides",
    [{"num_heads": 4, "num_kv_heads": 2}, {"tie_word_embeddings": True}, {"num_heads": 1}],
    ids=["gqa", "tied", "one-head"],
)
def test_bounds_hold_for_other_shapes(overrides: dict) -> None:
    """GQA (a kv head serves several query heads), tied embeddings, float64: real states pass, and the
    bound is not absurdly loose for a random model either."""
    torch.manual_seed(0)
    model = RetNet(preset("tiny", **overrides)).eval()
    with torch.no_grad():  # norm gains away from 1, so the diag(g) factor matters
        for layer in model.model.layers:
            layer.attn_norm.weight.uniform_(0.5, 3.0)
    bounds = state_bounds(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.float64):
        with torch.inference_mode():
            logits, s = model.to(dtype)(ids, logits_to_keep=1)
        ratio = max(bounds.check_layer(i, t) for i, t in enumerate(s.layers))
        assert 1e-4 < ratio < 1 and bounds.check_logits(logits[:, -1]) < 1
        c = StateCodec(model.config, model_fingerprint(model), bounds=bounds)
        assert c.decode(c.encode(s, logits=logits[:, -1])).state.equal(s)
