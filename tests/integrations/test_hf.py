"""attnmem inside Hugging Face transformers, against HF's own ``eager`` on the same weights.

Tiny random-weight models built from config classes (no downloads). Small tiles
(q_tile = kv_tile = 16 at N = 50) make empty, partial and full tiles occur together.
Losses and logits exclude pad positions: a row with nothing to attend is zeros in attnmem and
uniform over the masked keys in eager, and neither reaches a real token.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (the optional extra attnmem[hf])")

import attnmem  # noqa: E402
import attnmem.integrations.hf as amhf  # noqa: E402
from attnmem import masks  # noqa: E402
from attnmem.reference import reference_attention  # noqa: E402

TILES = {"q_tile": 16, "kv_tile": 16}
N, VOCAB = 50, 101
LOGIT_TOL = 1e-5  # the target: |attnmem - eager| on every logit of a real token
GRAD_TOL = 1e-5  # ... and on every gradient, relative to the largest gradient


def _configs():
    t = transformers
    small = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 256}
    return {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**small, num_key_value_heads=2)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**small, num_key_value_heads=2, sliding_window=12)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(
            **{**small, "num_hidden_layers": 3}, num_key_value_heads=2, use_sliding_window=True,
            sliding_window=12, max_window_layers=1)),
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(
            **small, num_key_value_heads=2, head_dim=16, sliding_window=12, attn_logit_softcapping=None)),
        # A cap of 2 bends these small random scores visibly (Gemma 2 itself uses 50).
        "gemma2_softcap": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(
            **small, num_key_value_heads=2, head_dim=16, sliding_window=12, attn_logit_softcapping=2.0)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, scale_attn_by_inverse_layer_idx=True,
            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)),
        "bert": lambda: t.BertForMaskedLM(t.BertConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        "modernbert": lambda: t.ModernBertForMaskedLM(t.ModernBertConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=256, local_attention=16, global_attn_every_n_layers=2, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
    }


CAUSAL = ("llama", "mistral", "qwen2", "gemma2", "gemma2_softcap", "gpt2")
ARCHS = CAUSAL + ("bert", "modernbert")


def _pair(arch: str, **options):
    """(eager model, attnmem model) with identical weights, in eval mode."""
    torch.manual_seed(0)
    ref = _configs()[arch]()
    ref.set_attn_implementation("eager")
    ref.eval()
    ours = copy.deepcopy(ref)
    amhf.use(ours, method="chunked", **{**TILES, **options})
    return ref, ours


def _padding(kind: str, batch: int = 3) -> torch.Tensor | None:
    """(B, N) attention masks: none, left or right padding of different lengths per row
    (row 0 unpadded), so some key tiles are all padding, some partly, some not at all."""
    if kind == "none":
        return None
    valid = torch.ones(batch, N, dtype=torch.long)
    for row, pad in zip(range(1, batch), (19, 5)):
        if kind == "left":
            valid[row, :pad] = 0
        else:
            valid[row, N - pad:] = 0
    return valid


def _logits_and_grads(model, ids, valid):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=valid)
    logits = out.logits
    real = torch.ones(ids.shape, dtype=torch.bool) if valid is None else valid.bool()
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    # Only real tokens enter the loss: pad rows are zeros in attnmem, uniform in eager.
    (logits * weights)[real].sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[real], grads


def _assert_close(ref, ours, ids, valid):
    la, ga = _logits_and_grads(ref, ids, valid)
    lb, gb = _logits_and_grads(ours, ids, valid)
    assert (la - lb).abs().max().item() <= LOGIT_TOL
    assert ga.keys() == gb.keys()
    largest = max(g.abs().max().item() for g in ga.values())
    worst = max((ga[n] - gb[n]).abs().max().item() for n in ga)
    assert worst <= GRAD_TOL * largest, f"gradient error {worst:.3g} vs largest {largest:.3g}"


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_eager(arch, padding):
    ref, ours = _pair(arch)
    ids = torch.randint(3, VOCAB, (3, N), generator=torch.Generator().manual_seed(2))
    _assert_close(ref, ours, ids, _padding(padding))


def test_encoder_decoder_cross_attention_matches_eager():
    t = transformers
    torch.manual_seed(0)
    cfg = t.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=256,
                       dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    ref = t.BartForConditionalGeneration(cfg)
    ref.set_attn_implementation("eager")
    ref.eval()
    ours = copy.deepcopy(ref)
    amhf.use(ours, **TILES)
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randint(3, VOCAB, (3, N), generator=g), torch.randint(3, VOCAB, (3, 37), generator=g)
    src_valid, tgt_valid = _padding("right"), torch.ones(3, 37, dtype=torch.long)
    tgt_valid[2, 30:] = 0

    def run(model):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=src, attention_mask=src_valid, decoder_input_ids=tgt,
                       decoder_attention_mask=tgt_valid).logits
        real = tgt_valid.bool()
        (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(4)))[real].sum().backward()
        return logits.detach()[real], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (la, ga), (lb, gb) = run(ref), run(ours)
    assert (la - lb).abs().max().item() <= LOGIT_TOL
    largest = max(x.abs().max().item() for x in ga.values())
    assert max((ga[n] - gb[n]).abs().max().item() for n in ga) <= GRAD_TOL * largest


def _packed_position_ids(lengths):
    return torch.cat([torch.arange(n) for n in lengths])[None, :]  # (1, N)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_packed_sequences_from_position_ids(arch):
    ref, ours = _pair(arch)
    pos = _packed_position_ids([13, 20, 17])
    ids = torch.randint(3, VOCAB, (1, N), generator=torch.Generator().manual_seed(5))
    a = ref(input_ids=ids, position_ids=pos).logits
    b = ours(input_ids=ids, position_ids=pos).logits
    assert (a - b).abs().max().item() <= LOGIT_TOL
    # The packing matters: without it the logits differ.
    assert (ref(input_ids=ids).logits - a).abs().max().item() > 1e-3


def test_packed_sequences_from_cu_seq_lens():
    amhf.register(**TILES)
    fn = transformers.AttentionInterface._global_mapping["attnmem"]
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, h, N, 16, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    cu = torch.tensor([0, 13, 33, N])
    module = torch.nn.Module()
    out, weights = fn(module, q, k, v, None, is_causal=True, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=20, max_length_k=20)
    assert weights is None and out.shape == (1, N, 4, 16) and out.is_contiguous()
    ids = torch.bucketize(torch.arange(N), cu[1:], right=True)
    want = reference_attention(q, k, v, mask=masks.causal() & masks.document(ids))  # (B, H, N, D)
    assert (out.transpose(1, 2) - want).abs().max().item() <= 1e-12


def _generate(model, ids, valid, cache, steps=8):
    return model.generate(input_ids=ids, attention_mask=valid, max_new_tokens=steps, do_sample=False,
                          cache_implementation=cache, pad_token_id=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_generate_token_identical(arch, cache):
    """Greedy decoding with left padding: dynamic and static caches; Mistral/Qwen2 layers slide
    (window 12 < prompt 20 + 8 new tokens), so their caches are sliding ones."""
    ref, ours = _pair(arch)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(7))
    valid = torch.ones(2, 20, dtype=torch.long)
    valid[1, :6] = 0
    assert torch.equal(_generate(ref, ids, valid, cache), _generate(ours, ids, valid, cache))


def test_output_layout_is_free_for_hf_transpose():
    amhf.register(**TILES)
    fn = transformers.AttentionInterface._global_mapping["attnmem"]
    x = torch.randn(2, N, 4 * 16, requires_grad=True)
    q = x.view(2, N, 4, 16).transpose(1, 2)  # (B, H, N, D) as HF builds it
    kv = torch.randn(2, N, 2, 16).transpose(1, 2)
    desc = amhf.mask_interface(batch_size=2, q_length=N, kv_length=N)
    out, _ = fn(torch.nn.Module(), q, kv, kv, desc)
    assert out.shape == (2, N, 4, 16) and out.is_contiguous()
    out.sum().backward()


# --- the mask description ----------------------------------------------------------------------


def _hf_dense(mask_function, nq, nk, q_offset=0, kv_offset=0, padding=None):
    return transformers.masking_utils.sdpa_mask(
        batch_size=2, q_length=nq, kv_length=nk, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=padding, allow_is_causal_skip=False)


def _ours_dense(desc, nq, nk):
    k = torch.zeros(2, 1, nk, 4)
    mask, k_cut, _ = amhf.structured_mask(desc, k, k, batch=2, nq=nq, is_causal=True)
    nk_cut = k_cut.shape[2]
    got = torch.ones(2, 1, nq, nk_cut, dtype=torch.bool) if mask is None else mask.to_dense(nq, nk_cut, batch=2)
    full = torch.zeros(2, 1, nq, nk, dtype=torch.bool)
    full[..., :nk_cut] = got
    return full, mask


def _mk(name, *args):
    mu = transformers.masking_utils
    return {
        "causal": lambda: mu.causal_mask_function,
        "sliding": lambda: mu.sliding_window_causal_mask_function(*args),
        "bidir": lambda: mu.bidirectional_mask_function,
        "bidir_sliding": lambda: mu.sliding_window_bidirectional_mask_function(*args),
        "chunked": lambda: mu.chunked_causal_mask_function(*args),
    }[name]()


@pytest.mark.parametrize("case", [
    ("causal", (), 30, 30, 0, 0), ("causal", (), 5, 40, 35, 0), ("causal", (), 1, 64, 20, 0),  # static: empty tail
    ("sliding", (7,), 30, 30, 0, 0), ("sliding", (7,), 1, 7, 40, 34), ("sliding", (7,), 4, 10, 40, 34),
    ("bidir", (), 30, 30, 0, 0), ("bidir_sliding", (5,), 30, 30, 0, 0),
    ("chunked", (8, torch.tensor([0, 3])), 30, 30, 0, 0),
])
@pytest.mark.parametrize("padded", [False, True])
def test_recognised_masks_match_hf_dense(case, padded):
    name, args, nq, nk, q_off, kv_off = case
    fn = _mk(name, *args)
    padding = None
    if padded:
        padding = torch.ones(2, kv_off + nk, dtype=torch.bool)
        padding[1, :3 + kv_off] = False
    desc = amhf.mask_interface(batch_size=2, q_length=nq, kv_length=nk, q_offset=q_off, kv_offset=kv_off,
                               mask_function=fn, attention_mask=padding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recognised mask never falls back to from_mod
        got, mask = _ours_dense(desc, nq, nk)
    want = _hf_dense(fn, nq, nk, q_off, kv_off, padding)
    assert torch.equal(got, want)
    assert not isinstance(mask, masks.FromMod)


def test_unrecognised_mask_function_falls_back_with_one_warning():
    mu = transformers.masking_utils

    def every_third(b, h, q_idx, kv_idx):
        return kv_idx % 3 == 0

    fn = mu.and_masks(mu.causal_mask_function, every_third)
    desc = amhf.mask_interface(batch_size=2, q_length=20, kv_length=20, mask_function=fn)
    with pytest.warns(UserWarning, match="O\\(N²\\)"):
        got, _ = _ours_dense(desc, 20, 20)
    assert torch.equal(got, _hf_dense(fn, 20, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        _ours_dense(desc, 20, 20)


def test_description_passes_through_reentry():
    desc = amhf.mask_interface(batch_size=1, q_length=4, kv_length=4)
    assert amhf.mask_interface(batch_size=1, q_length=4, kv_length=9, attention_mask=desc) is desc
    assert desc.ndim == 4 and desc.shape == (1, 1, 4, 4)


def test_mask_build_is_small_at_8192():
    """Building one call's masks and block map at N = 8192 stays far below one N×N bool (64 MiB)."""
    from attnmem.memory.measure import track_peak

    n = 8192
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :300] = False
    pos = _packed_position_ids([3000, 4000, 1192]).expand(2, -1)
    mu = transformers.masking_utils
    packed = mu.packed_sequence_mask_function(mu.find_packed_sequence_indices(pos))
    fns = [mu.causal_mask_function, mu.sliding_window_causal_mask_function(1024),
           mu.and_masks(mu.remap_positions_for_packed_sequence(mu.causal_mask_function, pos), packed)]
    k = torch.zeros(2, 1, n, 1)

    def build(fn, padding):
        desc = amhf.mask_interface(batch_size=2, q_length=n, kv_length=n, mask_function=fn, attention_mask=padding)
        mask, _, _ = amhf.structured_mask(desc, k, k, batch=2, nq=n, is_causal=True)
        mask.block_map(n, n, 256, 256, batch=2, heads=1)

    for fn in fns:
        for padding in (None, valid):
            peak, base = track_peak(build, fn, padding)
            assert peak - base <= 2**20


# --- refusals -----------------------------------------------------------------------------------


def test_dropout_in_training_is_routed():
    """HF passes the attention dropout rate only in training: attnmem applies it (its own
    pattern, drawn from torch's generator), so a fixed seed repeats the step and eval has none."""
    t = transformers
    torch.manual_seed(0)
    model = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=1, num_attention_heads=2, attention_dropout=0.3))
    amhf.use(model)
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(9))
    model.eval()
    plain = model(input_ids=ids).logits
    model.train()
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(model(input_ids=ids).logits)
    assert torch.equal(runs[0], runs[1])
    assert (runs[0] - plain).abs().max().item() > 1e-3


def test_sinks_are_routed():
    """gpt-oss's ``s_aux``: one logit per head joins each row's softmax denominator (eager
    appends it as an extra column and drops it after the softmax)."""
    amhf.register()
    fn = transformers.AttentionInterface._global_mapping["attnmem"]
    g = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, h, 12, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    module = torch.nn.Module()
    desc = amhf.mask_interface(batch_size=1, q_length=12, kv_length=12)
    out, _ = fn(module, q, k, v, desc, s_aux=sinks, scaling=0.3)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)  # (B, Hq, N, D)
    s = (q @ kr.transpose(-1, -2) * 0.3).masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), -torch.inf)
    s = torch.cat([s, sinks.view(1, 4, 1, 1).expand(1, 4, 12, 1)], -1).softmax(-1)[..., :-1]
    assert (out.transpose(1, 2) - s @ vr).abs().max().item() <= 1e-12


def test_refuses_output_attentions():
    _, ours = _pair("llama")
    with pytest.raises(ValueError, match="output_attentions"):
        ours(input_ids=torch.randint(0, VOCAB, (1, 8)), output_attentions=True)


def test_refuses_position_bias():
    t = transformers
    model = t.T5ForConditionalGeneration(t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                                    num_heads=2, dropout_rate=0.0))
    amhf.use(model)
    with pytest.raises(ValueError, match="position_bias"):
        model(input_ids=torch.randint(0, VOCAB, (1, 8)), decoder_input_ids=torch.randint(0, VOCAB, (1, 4)))


@pytest.mark.parametrize("kwarg, match, error", [
    ({"head_mask": torch.ones(2)}, "head_mask", ValueError),
    ({"layer_head_mask": torch.ones(2)}, "layer_head_mask", ValueError),
    ({"position_bias": torch.zeros(1, 2, 8, 8)}, "position_bias", ValueError),
    ({"output_attentions": True}, "output_attentions", ValueError),
    ({"some_new_feature": 1}, "some_new_feature", TypeError),
])
def test_refuses_each_unsupported_keyword(kwarg, match, error):
    amhf.register()
    fn = transformers.AttentionInterface._global_mapping["attnmem"]
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(error, match=match):
        fn(torch.nn.Module(), q, q, q, None, **kwarg)


def test_refuses_additive_float_bias_but_takes_bool_and_blocking_masks():
    amhf.register()
    fn = transformers.AttentionInterface._global_mapping["attnmem"]
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 8, 16, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="additive float bias"):
        fn(torch.nn.Module(), q, q, q, torch.randn(1, 1, 8, 8, dtype=torch.float64))
    allowed = torch.rand(1, 1, 8, 8, generator=g) > 0.3
    want = reference_attention(q, q, q, mask=masks.dense(allowed))
    for m in (allowed, torch.zeros(1, 1, 8, 8, dtype=torch.float64).masked_fill(~allowed, torch.finfo(q.dtype).min)):
        out, _ = fn(torch.nn.Module(), q, q, q, m)
        assert (out.transpose(1, 2) - want).abs().max().item() <= 1e-12


# --- registration misuse -------------------------------------------------------------------------


@pytest.mark.parametrize("name, error", [
    ("my_sdpa", ValueError), ("flash_mine", ValueError), ("flex_attention_x", ValueError),
    ("paged_x", ValueError), ("eager2", ValueError), ("org/repo", ValueError), ("", ValueError),
    ("1abc", ValueError), (3, TypeError),
])
def test_register_refuses_names_hf_routes_elsewhere(name, error):
    with pytest.raises(error, match="name"):
        amhf.register(name=name)


def test_register_refuses_bad_methods_and_options_and_taken_names():
    with pytest.raises(ValueError, match="nope"):
        amhf.register(method="nope")
    with pytest.raises(ValueError, match="state"):
        amhf.register(method="linformer")
    with pytest.raises(TypeError):
        amhf.register(method="chunked", no_such_option=1)
    transformers.AttentionInterface.register("someone_elses", lambda *a, **k: None)
    with pytest.raises(ValueError, match="someone else"):
        amhf.register(name="someone_elses")
    with pytest.raises(TypeError, match="model"):
        amhf.use(object())


def test_register_names_both_interfaces_and_can_be_replaced():
    assert amhf.register(name="attnmem_test", q_tile=32) == "attnmem_test"
    assert "attnmem_test" in transformers.AttentionInterface._global_mapping
    assert "attnmem_test" in transformers.masking_utils.AttentionMaskInterface._global_mapping
    amhf.register(name="attnmem_test", q_tile=64)
    assert amhf.registered()["attnmem_test"] == ("chunked", {"q_tile": 64})


# --- memory of a step ---------------------------------------------------------------------------


def test_models_prepared_from_one_config_keep_their_own_attention_and_leave_the_config_alone():
    # from_config keeps the config object and set_attn_implementation writes into it: without a
    # copy, preparing an sdpa model switched an attnmem model built earlier to sdpa as well (a
    # benchmark then timed sdpa against itself) and changed the caller's config.
    amhf.register()
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    before = cfg._attn_implementation
    ours, _, _ = amhf.prepare_step(cfg, "attnmem", 16, 1)
    theirs, _, _ = amhf.prepare_step(cfg, "sdpa", 16, 1)
    assert ours.config._attn_implementation == "attnmem"
    assert theirs.config._attn_implementation == "sdpa"
    assert cfg._attn_implementation == before
    amhf.estimate_step(cfg, 16, attn_implementation="sdpa")
    assert cfg._attn_implementation == before


@pytest.mark.parametrize("impl, pad", [("sdpa", 0), ("attnmem", 0), ("attnmem", 9), ("eager", 9)])
def test_estimate_step_equals_measured_peak(impl, pad):
    from attnmem.memory.measure import track_peak

    amhf.register()
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    est = amhf.estimate_step(cfg, 96, batch=2, attn_implementation=impl, pad=pad)
    torch.manual_seed(0)
    model, opt, inputs = amhf.prepare_step(cfg, impl, 96, 2, pad=pad)
    peak, base = track_peak(lambda state, inp: amhf.train_step(model, opt, inp), amhf.state_tensors(model, opt),
                            inputs)
    assert est.state_bytes == base
    assert abs(est.peak_bytes - peak) <= 0.02 * peak


def test_estimate_step_of_a_sliding_window_model_is_its_measured_peak(monkeypatch):
    """Mistral's window runs banded (kernels.banded: one fused call per query segment over the
    keys it sees), in the trace and in the real step; with left padding (segments with and
    without padded keys) the traced step allocates what the real one does, to the byte."""
    import attnmem.kernels.tiled as tiled
    from attnmem.memory.measure import track_peak

    calls = []
    banded_forward = tiled.banded_forward
    monkeypatch.setattr(tiled, "banded_forward", lambda *a, **k: calls.append(1) or banded_forward(*a, **k))
    amhf.register(name="attnmem_band", q_tile=16)
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     sliding_window=24)
    est = amhf.estimate_step(cfg, 96, batch=2, attn_implementation="attnmem_band", pad=9)
    traced = len(calls)
    torch.manual_seed(0)
    model, opt, inputs = amhf.prepare_step(cfg, "attnmem_band", 96, 2, pad=9)
    peak, base = track_peak(lambda state, inp: amhf.train_step(model, opt, inp), amhf.state_tensors(model, opt),
                            inputs)
    assert traced and len(calls) > traced  # both ran the banded path
    assert est.state_bytes == base
    assert est.peak_bytes == peak


@pytest.mark.parametrize("arch, pad", [("llama", 9), ("qwen2", 0)])
def test_estimate_step_replay_equals_tracing_every_layer(arch, pad):
    """Each distinct attention call traced once and replayed in every layer gives the bytes of
    tracing every layer: GQA with left padding (a mask description per call); hybrid layers,
    one full and two sliding-window (two kinds of call, the second one replayed)."""
    amhf.register(name="attnmem_replay", **TILES)
    t = transformers
    small = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    cfg = {"llama": lambda: t.LlamaConfig(**small),
           "qwen2": lambda: t.Qwen2Config(**small, use_sliding_window=True, sliding_window=12, max_window_layers=1),
           }[arch]()
    peaks = {replay: amhf.estimate_step(cfg, 48, batch=2, attn_implementation="attnmem_replay", pad=pad,
                                        replay=replay).peak_bytes for replay in (False, True)}
    assert peaks[True] == peaks[False]


def test_estimate_step_refuses_bad_arguments():
    with pytest.raises(TypeError, match="model_or_config"):
        amhf.estimate_step("llama", 128)
    with pytest.raises(ValueError, match="seq_len"):
        amhf.estimate_step(transformers.LlamaConfig(), 0)


def test_key_padding_composes_without_n_squared():
    """The block map of causal & key_padding lists only tiles that hold a real, reachable key."""
    valid = torch.ones(2, 64, dtype=torch.bool)
    valid[:, 48:] = False
    bm = (masks.causal() & masks.key_padding(valid)).block_map(64, 64, 16, 16, batch=2)
    states = bm.dense_states()
    assert states[:, 3].eq(0).all()  # the last key tile is padding only: empty everywhere
    assert states[3, 0] == 2 and states[0, 0] == 1  # below the diagonal full, on it partial
    q = torch.randn(2, 2, 64, 8, dtype=torch.float64)
    mask = masks.causal() & masks.key_padding(valid)
    out = attnmem.attention(q, q, q, method="chunked", mask=mask, q_tile=16, kv_tile=16)
    assert (out - reference_attention(q, q, q, mask=mask)).abs().max().item() <= 1e-12


def test_plan_hf_config_on_the_command_line(tmp_path):
    """``attnmem plan --hf-config``: a row per implementation whose peak is estimate_step's,
    and a longest N whose own predicted peak fits the budget."""
    import json

    from click.testing import CliRunner

    from attnmem.cli import main

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192)
    cfg.save_pretrained(tmp_path)
    budget = 64 * 2**20
    res = CliRunner().invoke(main, ["plan", "--hf-config", str(tmp_path / "config.json"), "--budget", "64MiB",
                                    "--seq-len", "128", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["method"]: r for r in json.loads(res.output)["methods"]}
    assert set(rows) == {"eager", "sdpa", "attnmem:chunked"}
    impls = {"eager": "eager", "sdpa": "sdpa", "attnmem:chunked": "attnmem_plan0"}
    for label, r in rows.items():
        assert r["status"] == "ok"
        assert r["peak_bytes"] == amhf.estimate_step(cfg, 128, attn_implementation=impls[label]).peak_bytes
    longest = rows["attnmem:chunked"]["max_seq_len"]
    assert amhf.estimate_step(cfg, longest, attn_implementation="attnmem_plan0").peak_bytes <= budget
    assert rows["eager"]["max_seq_len"] < rows["attnmem:chunked"]["max_seq_len"]
    bad = CliRunner().invoke(main, ["plan", "--hf-config", str(tmp_path / "missing.json"), "--budget", "1GiB"])
    assert bad.exit_code != 0 and "config.json" in bad.output
