"""The lean decoder (sdft_cli.decode) against transformers ``generate`` and brute-force distributions."""

from __future__ import annotations

import math

import pytest
import torch

from sdft_cli.decode import Decoder, decoder_for, sample, supported
from sdft_cli.rollout import Sampling, generate_hf, inference_copy, rollout_copy, sync_weights


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


def _greedy(model, tok, prompts, decoder, n=12, eos=(1,)):
    s = Sampling(max_new_tokens=n, temperature=0, logprobs=True, decoder=decoder)
    return generate_hf(model, tok, prompts, s, list(eos))


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
    own = Decoder.detached(model, torch.float32)  # its own fused, oneDNN-packed copy
    _assert_same(_greedy(own, tok, _prompts(), "auto", eos=eos), ref)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_greedy_decoding_equals_generate_for_qwen_architectures(kind):
    model = _random_model(kind)
    tok = _Tok()
    prompts = _prompts(vocab=211)
    ref = _greedy(model, tok, prompts, "generate", n=10)
    _assert_same(_greedy(Decoder.detached(model, torch.float32), tok, prompts, "auto", n=10), ref)
    frozen = inference_copy(model, torch.float32, always=True)  # frozen: q/k/v and gate/up fused in place
    _assert_same(_greedy(frozen, tok, prompts, "auto", n=10), ref)
    assert decoder_for(frozen).layers[0].qkv_bias is not None or kind == "qwen3"


def test_a_left_padded_batch_decodes_as_each_prompt_alone(tiny_model):
    model, tok = tiny_model
    own = Decoder.detached(model, torch.float32)
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
    sync_weights(copy_, trained)  # a plain parameter copy, into the views
    assert decoder_for(copy_) is dec  # still bound to the same buffers
    ref = _greedy(trained, tok, _prompts(), "generate", eos=[tok.eos_token_id])
    _assert_same(_greedy(copy_, tok, _prompts(), "auto", eos=[tok.eos_token_id]), ref)


def test_an_owned_copy_follows_the_student_through_push(tiny_model):
    model, tok = tiny_model
    student = inference_copy(model, torch.float32, always=True).requires_grad_(True)
    engine = rollout_copy(student, torch.float32, always=True)
    assert isinstance(engine, Decoder)
    old = _greedy(engine, tok, _prompts(), "auto", eos=[tok.eos_token_id])
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stale = _greedy(engine, tok, _prompts(), "auto", eos=[tok.eos_token_id])
    _assert_same(stale, old)
    sync_weights(engine, student)
    ref = _greedy(student, tok, _prompts(), "generate", eos=[tok.eos_token_id])
    _assert_same(_greedy(engine, tok, _prompts(), "auto", eos=[tok.eos_token_id]), ref)
    assert not torch.equal(ref.completion_ids, old.completion_ids)


def test_min_new_tokens_suppresses_eos_and_eos_ends_a_row(tiny_model):
    model, tok = tiny_model
    own = Decoder.detached(model, torch.float32)
    prompts = _prompts()
    free = _greedy(own, tok, prompts, "auto", n=8, eos=[tok.eos_token_id])
    first = int(free.completion_ids[0, 0])  # make the first greedy token an EOS
    ended = _greedy(own, tok, prompts, "auto", n=8, eos=[first])
    assert ended.lengths[0] == 1
    s = Sampling(max_new_tokens=8, min_new_tokens=8, temperature=0, decoder="auto")
    forced = generate_hf(own, tok, prompts, s, [first])
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
    assert not isinstance(rollout_copy(model, torch.bfloat16), Decoder)


def test_bound_decoding_runs_under_bf16_autocast(tiny_model):
    model, tok = tiny_model
    prompts = _prompts()
    s = Sampling(max_new_tokens=6, temperature=0, logprobs=True, decoder="auto")
    fp32 = generate_hf(model, tok, prompts, s, [tok.eos_token_id])
    amp = generate_hf(model, tok, prompts, s, [tok.eos_token_id], autocast_dtype=torch.bfloat16)
    assert amp.completion_ids.shape[0] == len(prompts) and torch.isfinite(amp.logprobs).all()
    first = amp.completion_ids[:, 0] == fp32.completion_ids[:, 0]  # bf16 rounding: close, not equal
    assert torch.allclose(amp.logprobs[first, 0], fp32.logprobs[first, 0], atol=0.1)
