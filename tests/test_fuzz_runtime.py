"""Property-based: the runtime's input checks take ids of any dtype, shape and range, and prompts and
sampling options of every kind; each case is a correct result or a RuntimeInputError, never anything else."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event, given, strategies as st
from hypothesis.extra import numpy as hnp

from tiny import TINY, TINY_MAX_LEN, fuzz, tiny_onnx

from gss_runtime import Decoder, Generator, GSSRunner, RuntimeInputError, Sampling
from gss_runtime.runner import check_ids

CONFIG = {"num_tokens": TINY["num_tokens"], "max_seq_len": TINY_MAX_LEN}
FUZZ = fuzz(150)
VOCAB = TINY["num_tokens"]

DTYPES = st.one_of(hnp.integer_dtypes(), hnp.unsigned_integer_dtypes(), hnp.floating_dtypes(), hnp.boolean_dtypes(),
                   hnp.complex_number_dtypes(), hnp.datetime64_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes())
ARRAYS = DTYPES.flatmap(lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40)))
# near the edges of the vocabulary and of int64, and python ints no numpy integer holds
INTS = st.one_of(st.integers(-3, VOCAB + 3), st.integers(0, VOCAB - 1), st.integers(-2**70, 2**70))
ATOMS = st.one_of(INTS, st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=3), st.binary(max_size=3))
NESTED = st.one_of(st.lists(INTS, max_size=40), st.lists(st.lists(INTS, max_size=40), max_size=4),
                   st.lists(ATOMS, max_size=5), st.lists(st.lists(ATOMS, max_size=3), max_size=3),
                   st.recursive(ATOMS, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner), max_leaves=8),
                   st.dictionaries(st.text(max_size=2), INTS, max_size=2), st.text(max_size=5), ATOMS)
INT_DTYPES = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
LIKELY = st.one_of(  # mostly valid: every integer dtype, lengths across max_seq_len
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=TINY_MAX_LEN + 2),
    hnp.arrays(INT_DTYPES, hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=TINY_MAX_LEN + 1), elements=st.integers(0, 127)))
IDS = st.one_of(LIKELY, LIKELY, ARRAYS, NESTED)


def valid(ids) -> bool:
    """What check_ids must accept, judged independently of it."""
    try:
        a = np.asarray(ids)
    except Exception:
        return False
    return (a.ndim in (1, 2) and a.size > 0 and a.dtype.kind in "iu" and a.shape[-1] <= TINY_MAX_LEN
            and bool(((a >= 0) & (a < VOCAB)).all()))


@FUZZ
@given(ids=IDS)
def test_check_ids(ids):
    try:
        got = check_ids(ids, CONFIG)
    except RuntimeInputError as e:
        event("refused")
        assert not valid(ids), f"refused valid ids: {e}"
        assert str(e) and len(str(e)) < 400
        return
    event("accepted")
    assert valid(ids)
    want = np.atleast_2d(np.asarray(ids))
    assert got.dtype == np.int64 and got.flags.c_contiguous and got.shape == want.shape and (got == want).all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_onnx(tmp_path_factory)
    return GSSRunner(folder, provider="cpu"), Decoder(folder, provider="cpu"), Generator(folder, provider="cpu")


@pytest.fixture(scope="module")
def recurrent(family_exports):
    """A recurrent state's decoder (GatedStateSpacesLM): its prompts are not limited by max_seq_len."""
    return Decoder(family_exports("gss", "onnx"), provider="cpu")


@FUZZ
@given(ids=IDS, top=st.one_of(st.integers(-2, VOCAB + 2), st.floats(), st.none(), st.booleans(), st.text(max_size=2)))
def test_runner_and_decoder_inputs(tiny, recurrent, ids, top):
    runner, decoder, _ = tiny
    calls = [lambda: runner.logits(ids), lambda: runner.next_token_distribution(ids, top=top),
             lambda: decoder.prefill([ids]), lambda: decoder.check_prompt(ids)]
    if not (isinstance(ids, np.ndarray) and ids.ndim == 0):  # test_recurrent_check_prompt_of_a_0d_array
        calls += [lambda: recurrent.prefill([ids]), lambda: recurrent.check_prompt(ids)]
    for call in calls:
        try:
            out = call()
        except RuntimeInputError as e:
            event("refused")
            assert str(e)
            continue
        event("accepted")
        if isinstance(out, np.ndarray):  # logits or a checked prompt
            assert np.isfinite(out).all() if out.dtype.kind == "f" else out.dtype == np.int64
        elif isinstance(out, list):  # next-token odds
            assert 1 <= len(out) <= VOCAB and all(0 <= i < VOCAB and 0 <= p <= 1 for i, p in out)
        else:
            assert np.isfinite(out[0]).all() and out[0].shape == (1, VOCAB)


NUMBERS = st.one_of(st.none(), st.none(), st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 300))


@FUZZ
@given(temperature=st.floats(0, 1e3), top_k=st.one_of(st.none(), st.none(), st.integers(-2, VOCAB + 5)), top_p=NUMBERS,
       filter_thres=NUMBERS, seed=st.one_of(st.none(), st.integers(0, 2**64)), eos_id=st.one_of(st.none(), st.integers(-2, VOCAB + 2)),
       stops=st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=3), max_size=3), on_limit=st.sampled_from(["stop", "slide"] * 3 + ["wrap", ""]),
       new=st.integers(0, 40), prompts=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40), min_size=1, max_size=3))
def test_generation_options(tiny, temperature, top_k, top_p, filter_thres, seed, eos_id, stops, on_limit, new, prompts):
    """Sampling options of every kind (numbers, that is: the library is typed; the CLI takes text, test_fuzz_cli.py)."""
    _, _, generator = tiny
    try:
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, filter_thres=filter_thres)
        result = generator.generate(prompts, new, sampling=sampling, seed=seed, eos_id=eos_id, stop_sequences=stops, on_limit=on_limit)
    except RuntimeInputError as e:
        event("refused")
        assert str(e)
        return
    event("generated")
    assert len(result.tokens) == len(prompts) and all(0 <= t < VOCAB for row in result.tokens for t in row)
    assert all(len(row) <= new for row in result.tokens) and all(result.stop_reasons)
    if eos_id is not None:
        assert all(eos_id not in row for row in result.tokens)


def test_recurrent_check_prompt_of_a_0d_array(recurrent):
    with pytest.raises(RuntimeInputError):
        recurrent.check_prompt(np.array(5))


# options of the wrong type are refused by the library's own checks, not left to fail inside numpy
WRONG_TYPES = [
    ("top_k 2.5", dict(sampling=Sampling(temperature=1.0, top_k=2.5))),
    ("temperature '1'", dict(sampling=Sampling(temperature="1"))),
    ("top_p '0.5'", dict(sampling=Sampling(temperature=1.0, top_p="0.5"))),
    ("seed -1", dict(seed=-1)),
    ("seed 1.5", dict(seed=1.5)),
    ("eos_id 2.5", dict(eos_id=2.5)),
    ("stop_sequences 'ab'", dict(stop_sequences="ab")),
]


@pytest.mark.parametrize("options", [o for _, o in WRONG_TYPES], ids=[n for n, _ in WRONG_TYPES])
def test_generator_options_of_the_wrong_type(tiny, options):
    with pytest.raises(RuntimeInputError):
        tiny[2].generate([1, 2, 3], 4, **options)


def test_tiny_temperature_is_greedy():
    from gss_runtime.generate import choose

    logits = np.array([[1.0, 3.0, 2.0]], np.float32)
    with np.errstate(all="ignore"):
        assert choose(logits, Sampling(temperature=1e-310), [np.random.default_rng(0)]).tolist() == [1]
