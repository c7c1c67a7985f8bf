"""The rollout engines: the lean decoder (engines/decode.py) against transformers ``generate`` and
brute-force distributions, the engines' push/generate/release, and the factory's choice of engine."""

from __future__ import annotations

import math

import pytest
import torch

from sdft_cli.config import RolloutConfig
from sdft_cli.engines import DecoderEngine, Engines, HFEngine
from sdft_cli.engines.decode import decoder_for, sample, supported
from sdft_cli.engines.hf import copy_weights, inference_copy
from sdft_cli.rollout import Sampling


def _prompts(n_rows=(5, 9, 13, 14), vocab=200, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in n_rows]


def _random_model(kind: str):
    """A small random model of another Llama-family architecture, built locally."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    cfg = Qwen2Config(**common) if kind == "qwen2" else Qwen3Config(head_dim=16, **common)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    if kind == "qwen2":  # biases on q/k/v that are not zero, so dropping them would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


class _Tok:
    pad_token_id = 0

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [" ".join(map(str, s.tolist())) for s in seqs]


def _engine(model, tok, decoder, eos=(1,)):
    """``decoder``: generate / auto (HFEngine on the model in place) or owned (a DecoderEngine's copy)."""
    if decoder == "owned":
        engine = DecoderEngine(torch.float32, tok, list(eos))
        engine.push(model)
        return engine
    return HFEngine(model, tok, list(eos), decoder=decoder)


def _greedy(model, tok, prompts, decoder, n=12, eos=(1,)):
    engine = model if isinstance(model, (HFEngine, DecoderEngine)) else _engine(model, tok, decoder, eos)
    return engine.generate(prompts, Sampling(max_new_tokens=n, temperature=0, logprobs=True))


def _assert_same(a, b, atol=2e-5):
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=atol), (a.logprobs - b.logprobs).abs().max()


def test_greedy_decoding_equals_generate_for_the_tiny_llama(tiny_model):
    model, tok = tiny_model
    assert supported(model)
    eos = [tok.eos_token_id]
    ref = _greedy(model, tok, _prompts(), "generate", eos=eos)
    _assert_same(_greedy(model, tok, _prompts(), "auto", eos=eos), ref)  # bound to the trainable model
    _assert_same(_greedy(model, tok, _prompts(), "owned", eos=eos), ref)  # its own fused, packed copy


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_greedy_decoding_equals_generate_for_qwen_architectures(kind):
    model = _random_model(kind)
    tok = _Tok()
    prompts = _prompts(vocab=211)
    ref = _greedy(model, tok, prompts, "generate", n=10)
    _assert_same(_greedy(model, tok, prompts, "owned", n=10), ref)
    frozen = inference_copy(model, torch.float32, always=True)  # frozen: q/k/v and gate/up fused in place
    _assert_same(_greedy(frozen, tok, prompts, "auto", n=10), ref)
    assert decoder_for(frozen).layers[0].qkv_bias is not None or kind == "qwen3"


def test_a_left_padded_batch_decodes_as_each_prompt_alone(tiny_model):
    model, tok = tiny_model
    own = _engine(model, tok, "owned", eos=[tok.eos_token_id])
    prompts = _prompts((3, 11, 7))
    batch = _greedy(own, tok, prompts, "auto", eos=[tok.eos_token_id])
    for i, p in enumerate(prompts):
        alone = _greedy(own, tok, [p], "auto", eos=[tok.eos_token_id])
        n = alone.completion_ids.shape[1]
        assert torch.equal(batch.completion_ids[i, :n], alone.completion_ids[0])


def test_fused_views_keep_the_model_working_and_syncs_write_through(tiny_model):
    model, tok = tiny_model
    ids = torch.tensor([_prompts()[0]])
    copy_ = inference_copy(model, torch.float32, always=True)
    before = copy_(ids).logits
    dec = decoder_for(copy_)
    assert isinstance(dec.layers[0].qkv, torch.Tensor)  # fused
    assert torch.allclose(copy_(ids).logits, before)  # the transformers forward is unchanged by fusing
    trained = inference_copy(model, torch.float32, always=True)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trained.requires_grad_(True)
    copy_weights(copy_, trained)  # a plain parameter copy, into the views
    assert decoder_for(copy_) is dec  # still bound to the same buffers
    ref = _greedy(trained, tok, _prompts(), "generate", eos=[tok.eos_token_id])
    _assert_same(_greedy(copy_, tok, _prompts(), "auto", eos=[tok.eos_token_id]), ref)


def test_an_owned_copy_follows_the_student_through_push_and_is_dropped_by_release(tiny_model, tmp_path):
    model, tok = tiny_model
    student = inference_copy(model, torch.float32, always=True).requires_grad_(True)
    engines = Engines(RolloutConfig(), tokenizer=tok, eos_ids=[tok.eos_token_id], autocast_dtype=None, seed=0)
    engine = engines.for_training(
        student, device=torch.device("cpu"), work_dir=tmp_path, source_dir=None, whole_copy=True
    )
    assert isinstance(engine, DecoderEngine)
    with pytest.raises(RuntimeError, match="push"):
        _greedy(engine, tok, _prompts(), "owned")
    engine.push(student)
    old = _greedy(engine, tok, _prompts(), "owned")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stale = _greedy(engine, tok, _prompts(), "owned")
    _assert_same(stale, old)
    engine.release()  # the copy is gone until the next push
    assert engine.decoder.layers == [] and engine.decoder.head is None
    engine.push(student)
    ref = _greedy(student, tok, _prompts(), "generate", eos=[tok.eos_token_id])
    _assert_same(_greedy(engine, tok, _prompts(), "owned"), ref)
    assert not torch.equal(ref.completion_ids, old.completion_ids)


def test_the_factory_picks_the_engine_the_settings_ask_for(tiny_model, tmp_path):
    """In place for an fp32 student (no copy), a packed copy for another dtype or for every rank of a
    distributed run, an inference copy with transformers generate for rollout.decoder=generate."""
    model, tok = tiny_model
    cpu = torch.device("cpu")

    def build(**rollout):
        engines = Engines(RolloutConfig(**rollout), tokenizer=tok, eos_ids=[1], autocast_dtype=None, seed=0)
        return engines.for_training(model, device=cpu, work_dir=tmp_path, source_dir=None)

    in_place = build(dtype="float32")
    assert isinstance(in_place, HFEngine) and in_place.model is model
    assert isinstance(build(dtype="bfloat16"), DecoderEngine)
    copy_ = build(dtype="bfloat16", decoder="generate")
    assert isinstance(copy_, HFEngine) and copy_.model is not model and copy_.decoder == "generate"
    assert next(copy_.model.parameters()).dtype == torch.bfloat16


def test_min_new_tokens_suppresses_eos_and_eos_ends_a_row(tiny_model):
    model, tok = tiny_model
    prompts = _prompts()
    free = _greedy(model, tok, prompts, "owned", n=8, eos=[tok.eos_token_id])
    first = int(free.completion_ids[0, 0])  # make the first greedy token an EOS
    ended = _greedy(model, tok, prompts, "owned", n=8, eos=[first])
    assert ended.lengths[0] == 1
    s = Sampling(max_new_tokens=8, min_new_tokens=8, temperature=0)
    forced = _engine(model, tok, "owned", eos=[first]).generate(prompts, s)
    assert forced.lengths == [8] * len(prompts)
    assert first not in forced.completion_ids[0].tolist()


def _reference_probs(logits: torch.Tensor, t: float, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution, written out token by token (temperature, then top-k, then top-p)."""
    z = [float(v) / t for v in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = set(order[:top_k]) if top_k else set(order)
    m = max(z)
    w = {i: math.exp(z[i] - m) for i in keep}
    total = sum(w.values())
    kept, mass = set(), 0.0
    for i in order:
        if i in keep and mass < top_p:
            kept.add(i)
            mass += w[i] / total
    total = sum(w[i] for i in kept)
    return torch.tensor([w[i] / total if i in kept else 0.0 for i in range(len(z))], dtype=torch.float64)


@pytest.mark.parametrize("t,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 6, 0.7)])
def test_sampling_draws_from_the_truncated_tempered_distribution(t, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(12) * 2
    expect = _reference_probs(logits, t, top_k, top_p)
    n = 40_000
    tokens, lp = sample(logits.expand(n, -1).clone(), t, top_p, top_k, True)
    freq = torch.bincount(tokens, minlength=12).double() / n
    assert torch.all(freq[expect == 0] == 0)  # never a truncated token
    sd = torch.sqrt(expect * (1 - expect) / n)
    assert torch.all((freq - expect).abs() <= 5 * sd + 1e-9), (freq, expect)
    ref_lp = torch.log_softmax(logits.double() / t, -1)[tokens]  # before truncation, as Rollouts says
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5)


def test_greedy_sampling_is_the_argmax():
    logits = torch.randn(6, 30)
    tokens, _ = sample(logits, 0.0, 1.0, 0, False)
    assert torch.equal(tokens, logits.argmax(-1))


def test_other_architectures_fall_back_to_generate():
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert not supported(model) and decoder_for(model) is None
    engines = Engines(
        RolloutConfig(dtype="bfloat16"), tokenizer=_Tok(), eos_ids=[1], autocast_dtype=None, seed=0
    )
    engine = engines.for_training(model, device=torch.device("cpu"), work_dir=None, source_dir=None)
    assert isinstance(engine, HFEngine) and engine.model is not model  # a bf16 copy, decoded by generate
    out = engine.generate(_prompts(vocab=50), Sampling(max_new_tokens=3, temperature=0))
    assert out.completion_ids.shape == (4, 3)


def test_bound_decoding_runs_under_bf16_autocast(tiny_model):
    model, tok = tiny_model
    prompts = _prompts()
    s = Sampling(max_new_tokens=6, temperature=0, logprobs=True)
    fp32 = HFEngine(model, tok, [tok.eos_token_id]).generate(prompts, s)
    amp = HFEngine(model, tok, [tok.eos_token_id], autocast_dtype=torch.bfloat16).generate(prompts, s)
    assert amp.completion_ids.shape[0] == len(prompts) and torch.isfinite(amp.logprobs).all()
    first = amp.completion_ids[:, 0] == fp32.completion_ids[:, 0]  # bf16 rounding: close, not equal
    assert torch.allclose(amp.logprobs[first, 0], fp32.logprobs[first, 0], atol=0.1)
