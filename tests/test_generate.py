"""Generation on the decoder with state, run where torch cannot be imported, against upstream eager.

All runtime work happens in one torch-free subprocess per export; the parent compares its
results with the upstream model's full-recompute decoding (what `AutoregressiveWrapper.generate` does).
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EXAMPLE, eager_greedy, run_without_torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from byte_corpus import load_corpus  # noqa: E402

NEW = 24
LONG_NEW = 600  # past the 256 slots of headroom a short prompt's state keeps
SHORT_LIMIT = 40  # a second export with a small max_seq_len, to reach the limit quickly


@pytest.fixture(scope="module")
def prompts():
    heldout = load_corpus()[1]
    return {n: list(heldout[1000 : 1000 + n]) for n in (1, 17, 300)}


@pytest.fixture(scope="module")
def torch_free(tmp_path_factory, prompts):
    """Export twice (max_seq_len 2048 and 40), then run every generation scenario without torch."""
    from gss_export.checkpoint import load_checkpoint
    from gss_export.export import export_model

    folders = {}
    for limit in (2048, SHORT_LIMIT):
        folders[limit] = tmp_path_factory.mktemp(f"byte_lm_{limit}")
        export_model(load_checkpoint(EXAMPLE, max_seq_len=limit).model, "onnx", folders[limit], validate=False)
    out = tmp_path_factory.mktemp("results")
    script = textwrap.dedent(f"""
        import json, numpy as np
        from gss_runtime.generate import Generator, Sampling
        from gss_runtime.decoder import Decoder
        prompts = {json.dumps({str(k): v for k, v in prompts.items()})}
        gen = Generator({str(folders[2048])!r}, provider="cpu")
        res = {{}}
        res["alone"] = {{k: gen.generate(p, {NEW}).tokens[0] for k, p in prompts.items()}}
        batch = gen.generate(list(prompts.values()), {NEW})
        res["batch"] = batch.tokens
        res["batch_reasons"] = batch.stop_reasons
        hot = Sampling(temperature=0.9, top_k=40, top_p=0.95)
        res["sampled"] = [gen.generate(prompts["17"], {NEW}, sampling=hot, seed=s).tokens[0] for s in (7, 7, 8)]
        res["sampled_batch"] = gen.generate(list(prompts.values()), {NEW}, sampling=hot, seed=7).tokens
        res["sampled_alone"] = {{k: gen.generate(p, {NEW}, sampling=hot, seed=7).tokens[0] for k, p in prompts.items()}}
        res["filter_thres"] = gen.generate(prompts["17"], {NEW}, sampling=Sampling(temperature=1.0, filter_thres=0.9), seed=1).tokens[0]
        streamed = []
        res["streamed_final"] = gen.generate(prompts["17"], {NEW}, on_token=lambda row, t: streamed.append(t)).tokens[0]
        res["streamed"] = streamed
        greedy = res["alone"]["17"]
        res["eos"] = gen.generate(prompts["17"], {NEW}, eos_id=greedy[5]).__dict__
        res["stop"] = gen.generate(prompts["17"], {NEW}, stop_sequences=[greedy[6:8]]).__dict__
        # the state's buffers are allocated once, by the prefill, with room for every token to come: no step,
        # and no row leaving the batch, grows them (each growth copies the whole past)
        from gss_runtime import decoder as decoder_module
        reserve, grown = decoder_module._Slots.reserve, []
        def spy(slots, *args):
            before = slots.arrays[0]
            reserve(slots, *args)
            grown.append(slots.arrays[0] is not before)
        decoder_module._Slots.reserve = spy
        res["growths"] = []
        # sampled (rows draw as they would alone): a stop sequence row "17" makes and row "300" does not
        mine, other = res["sampled_alone"]["17"], res["sampled_alone"]["300"]
        stop = next(mine[i:i + 2] for i in range(len(mine) - 1)
                    if all(other[j:j + 2] != mine[i:i + 2] for j in range(len(other) - 1)))
        for batch_prompts, stops in (([prompts["300"]], []), ([prompts["17"], prompts["300"]], [stop])):
            grown.clear()
            ended = gen.generate(batch_prompts, {NEW}, stop_sequences=stops, sampling=hot, seed=7)
            res["growths"].append([sum(grown), len(grown), ended.stop_reasons])
        # a generation past the headroom: u's room, which every step multiplies, stays within it as the state grows
        def watch(slots, needed, *args):
            reserve(slots, needed, *args)
            res["long_capacities"].append([needed, slots.capacity])
        decoder_module._Slots.reserve, res["long_capacities"] = watch, []
        res["long"] = gen.generate(prompts["17"], {LONG_NEW}).tokens[0]
        decoder_module._Slots.reserve = reserve
        streamed_stop = []
        gen.generate(prompts["17"], {NEW}, stop_sequences=[greedy[6:8]], on_token=lambda row, t: streamed_stop.append(t))
        res["streamed_stop"] = streamed_stop
        # the step path's logits at every position: a 200-token prefill, then one token at a time
        dec = Decoder({str(folders[2048])!r}, provider="cpu")
        seq = np.array(prompts["300"])
        logits, state = dec.feed(seq[None, :200], dec.empty_state([0]))
        rows = list(logits[0])
        for t in range(200, 300):
            step, state = dec.step(seq[t:t + 1], state)
            rows.append(step[0])
        np.save({str(out / "step_logits.npy")!r}, np.stack(rows))
        res["state_bytes_300"] = int(state.nbytes)
        short = Generator({str(folders[SHORT_LIMIT])!r}, provider="cpu")
        res["limit_stop"] = short.generate(prompts["300"][:30], 20).__dict__
        res["limit_slide"] = short.generate(prompts["300"][:30], 20, on_limit="slide").__dict__
        for key in ("eos", "stop", "limit_stop", "limit_slide"):
            res[key] = {{k: v for k, v in res[key].items() if k in ("tokens", "stop_reasons")}}
        print(json.dumps(res))
    """)
    done = run_without_torch(script, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), out


@pytest.mark.parametrize("length", [1, 17, 300])
def test_greedy_equals_upstream_full_recompute(torch_free, example_upstream, prompts, length):
    res, _ = torch_free
    assert res["alone"][str(length)] == eager_greedy(example_upstream, prompts[length], NEW)


def test_step_logits_equal_full_forward_at_every_position(torch_free, example_upstream, prompts):
    _, out = torch_free
    got = np.load(out / "step_logits.npy")
    with torch.no_grad():
        want = example_upstream(torch.tensor([prompts[300]]))[0].numpy()
    assert got.shape == want.shape == (300, 256)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-4, rel


def test_ragged_batch_equals_single_prompts(torch_free):
    res, _ = torch_free
    assert res["batch"] == list(res["alone"].values())
    assert res["batch_reasons"] == ["max_new_tokens"] * 3
    assert res["sampled_batch"] == list(res["sampled_alone"].values())


def test_seeded_sampling_is_reproducible(torch_free):
    res, _ = torch_free
    first, again, other = res["sampled"]
    assert first == again and first != other
    assert len(res["filter_thres"]) == NEW and all(0 <= t < 256 for t in res["filter_thres"])


def test_streaming_eos_and_stop_sequences(torch_free):
    res, _ = torch_free
    greedy = res["alone"]["17"]
    assert res["streamed"] == res["streamed_final"] == greedy
    first_eos = greedy.index(greedy[5])
    assert res["eos"] == {"tokens": [greedy[:first_eos]], "stop_reasons": ["eos"]}
    stop = greedy[6:8]
    at = next(i for i in range(len(greedy)) if greedy[i:i + 2] == stop)
    assert res["stop"] == {"tokens": [greedy[:at]], "stop_reasons": ["stop_sequence"]}
    assert res["streamed_stop"] == greedy[:at]  # the stop sequence is never streamed


def test_max_seq_len_stops_or_slides_like_upstream(torch_free, example_upstream, prompts):
    res, _ = torch_free
    prompt = prompts[300][:30]
    # 30 prompt tokens + 11 generated: the 11th would have to be fed at position 40
    assert res["limit_stop"]["stop_reasons"] == ["max_seq_len"]
    assert res["limit_stop"]["tokens"][0] == eager_greedy(example_upstream, prompt, 11)
    assert res["limit_slide"]["stop_reasons"] == ["max_new_tokens"]
    assert res["limit_slide"]["tokens"][0] == eager_greedy(example_upstream, prompt, 20, window=SHORT_LIMIT)


def test_a_long_generation_keeps_little_room_and_stays_exact(torch_free, example_upstream, prompts):
    """Steps multiply u's whole buffer, room included, so a generation reserves at most `headroom` (256 slots
    here, an eighth of longer states) and grows by as much when it runs out: a few copies, never a step over
    thousands of empty slots. The tokens are upstream's."""
    from gss_runtime.decoder import headroom

    res, _ = torch_free
    capacities = res["long_capacities"]
    assert len(capacities) == LONG_NEW  # the prefill, then a step per token but the last
    assert all(needed <= capacity <= needed + headroom(needed) for needed, capacity in capacities), capacities
    grown = sorted({capacity for _, capacity in capacities})
    assert grown == [18 + 256, 275 + 256, 532 + 256], grown  # 17 tokens and the padding slot, then twice past it
    assert res["long"] == eager_greedy(example_upstream, prompts[17], LONG_NEW)


def test_state_memory_per_token(torch_free):
    res, _ = torch_free
    # depth 3 x (dim_dsconv 128 + heads 4) float32 per token, plus the one padding slot every state starts with
    assert res["state_bytes_300"] == (300 + 1) * 3 * (128 + 4) * 4


def test_steps_never_grow_the_state(torch_free):
    """A generation's state buffers are allocated by its prefill alone, with room for every token to come:
    the first step after a long prompt copies nothing (it used to copy the whole past), nor does a row's leaving."""
    res, _ = torch_free
    (one_growth, one_calls, _), (batch_growth, batch_calls, reasons) = res["growths"]
    assert one_growth == 1 and one_calls == NEW  # the prefill, then NEW - 1 steps
    assert "stop_sequence" in reasons and "max_new_tokens" in reasons  # a row left the batch early, the others went on
    assert batch_growth == 1 and batch_calls == NEW
