import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import minigpt  # noqa: F401  (registers the Auto classes)
import minigpt.sampling as sampling
from minigpt.model import MiniGPTConfig, MiniGPTForCausalLM, MiniGPTForSequenceClassification, gelu
from minigpt.sampling import (KVCache, SamplingConfig, compile_decoding, decode_step_of, draw, filter_logits, generate,
                              static_cache_length)

torch.manual_seed(0)
CONFIG = MiniGPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, block_size=64, pad_token_id=0)


def model():
    torch.manual_seed(0)
    return MiniGPTForCausalLM(CONFIG).eval()


def context_bound_model():
    """Weights large enough that every token depends on the context: at the small initialisation the
    next token hardly depends on the keys and values, and a cache bug could go unseen."""
    m = model()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(std=0.5)
    return m


def test_logits_shape_and_tied_head():
    m = model()
    x = torch.randint(1, 97, (3, 11))
    assert m(x).logits.shape == (3, 11, 97)
    assert m.lm_head.weight is m.model.wte.weight


def test_a_later_token_never_changes_an_earlier_logit():
    m = model()
    x = torch.randint(1, 97, (2, 12))
    changed = x.clone()
    changed[:, 7:] = torch.randint(1, 97, (2, 5))
    assert torch.allclose(m(x).logits[:, :7], m(changed).logits[:, :7], atol=1e-6)
    assert not torch.allclose(m(x).logits[:, 7:], m(changed).logits[:, 7:])


def test_left_padded_batch_equals_unpadded():
    m = model()
    a, b = torch.randint(1, 97, (1, 9)), torch.randint(1, 97, (1, 5))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, 4:] = a[0], b[0]
    mask = (torch.arange(9) >= torch.tensor([[0], [4]])).long()
    out = m(batch, attention_mask=mask).logits
    assert torch.allclose(out[0], m(a).logits[0], atol=1e-5)
    assert torch.allclose(out[1, 4:], m(b).logits[0], atol=1e-5)
    assert torch.isfinite(out).all()


def test_packed_sequences_equal_separate_ones():
    m = model()
    a, b = torch.randint(1, 97, (6,)), torch.randint(1, 97, (4,))
    packed = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(6), torch.arange(4)])[None]
    out = m(packed, position_ids=positions).logits[0]
    assert torch.allclose(out[:6], m(a[None]).logits[0], atol=1e-5)
    assert torch.allclose(out[6:], m(b[None]).logits[0], atol=1e-5)


def test_pretraining_forward_compiles_to_a_single_graph():
    """A graph break (e.g. a data-dependent check that needs a tensor's value) splits a torch.compile'd
    model into pieces compiled apart: the pretraining forward (no mask, no positions) must have none."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model().train())(input_ids=torch.randint(1, 97, (2, 16)))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_the_compiled_graphs_gelu_is_the_tanh_gelu_written_with_a_sigmoid(monkeypatch):
    """Compiled, the MLP's GELU takes another form (for speed): it must stay the function it replaces."""
    x = torch.linspace(-8, 8, 4001, requires_grad=True)
    eager = gelu(x)
    assert torch.equal(eager, torch.nn.functional.gelu(x, approximate="tanh"))
    (eager_grad,) = torch.autograd.grad(eager.sum(), x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    as_compiled = gelu(x)
    (as_compiled_grad,) = torch.autograd.grad(as_compiled.sum(), x)
    assert not torch.equal(as_compiled, eager)  # the other form did run
    assert torch.allclose(as_compiled, eager, rtol=0, atol=2e-6)
    assert torch.allclose(as_compiled_grad, eager_grad, rtol=0, atol=2e-5)


def test_cached_decoding_matches_uncached():
    m = model()
    prompt = torch.randint(1, 97, (2, 5))
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    cached = generate(m, prompt.tolist(), greedy).tokens
    sequence = prompt.clone()
    for _ in range(12):  # uncached: the whole sequence every step
        sequence = torch.cat([sequence, m(sequence).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert cached == sequence[:, 5:].tolist()


def test_cached_decoding_of_a_left_padded_batch_matches_each_prompt_alone():
    m = model()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0)
    together = generate(m, prompts, greedy).tokens
    alone = [generate(m, [p], greedy).tokens[0] for p in prompts]
    assert together == alone


def test_a_batch_shrinks_to_its_unfinished_rows_without_changing_any_rows_tokens(monkeypatch):
    """Rows that emitted their stop token leave the batch; every row's tokens, sampled from a seeded
    generator, stay what they are when no row stops early (one random number per row and step)."""
    m = context_bound_model()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13], [14, 15, 16]]
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0)
    run_on = generate(m, prompts, sampled, generator=torch.Generator().manual_seed(3)).tokens
    stop = run_on[0][2]  # row 0 ends at its third token
    shrinks = []
    monkeypatch.setattr(KVCache, "keep_rows", lambda self, rows, keep=KVCache.keep_rows: (
        shrinks.append(len(rows)), keep(self, rows))[1])
    out = generate(m, prompts, sampled, stop_ids=[stop], generator=torch.Generator().manual_seed(3))
    for row, tokens in enumerate(run_on):
        ends = tokens.index(stop) if stop in tokens else len(tokens)
        assert out.tokens[row] == tokens[:ends]
        assert out.finished[row] == (stop in tokens)
    assert max(len(t) for t in out.tokens) > 3  # some row went on after row 0 ended ...
    assert shrinks and shrinks[0] < len(prompts)  # ... in a smaller batch


def test_prompts_are_grouped_by_length_longest_first():
    from minigpt.sampling import length_groups

    lengths = [10, 80, 79, 12, 40, 78, 11, 41]
    assert length_groups(lengths, min_rows=2) == [[1, 2, 5], [7, 4], [3, 6, 0]]
    assert length_groups(lengths, min_rows=4) == [[1, 2, 5, 7], [4, 3, 6, 0]]  # a group fills to min_rows first
    assert length_groups(lengths, min_rows=8) == [[1, 2, 5, 7, 4, 3, 6, 0]]
    assert length_groups([]) == []


def test_prompts_prefilled_in_length_groups_decode_as_each_prompt_alone(monkeypatch):
    original = sampling.length_groups
    monkeypatch.setattr(sampling, "length_groups", lambda lengths: original(lengths, min_rows=1))
    m = model()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [15, 16], [17, 18, 19, 20, 21, 22, 23, 24, 25], [26]]
    assert len(original([len(p) for p in prompts], min_rows=1)) == 3  # three passes, not one
    ids, mask = sampling.left_pad(prompts, 0, "cpu")
    whole = KVCache(CONFIG, 4, ids.shape[1], "cpu", torch.float32)  # one padded pass, for reference
    with torch.no_grad():
        expected = m(input_ids=ids, attention_mask=mask, cache=whole, use_cache=True).logits[:, -1]
        grouped = KVCache(CONFIG, 4, ids.shape[1], "cpu", torch.float32)
        assert torch.allclose(sampling.prefill(m, prompts, ids, mask, grouped, 0), expected, atol=1e-5)
    assert grouped.length == whole.length == ids.shape[1]
    for row, real in enumerate(mask.bool()):  # every row's keys and values where its prompt is
        for mine, reference in zip(grouped.keys + grouped.values, whole.keys + whole.values):
            assert torch.allclose(mine[row][:, real], reference[row][:, real], atol=1e-5)
    for config in (SamplingConfig(max_new_tokens=8, temperature=0), SamplingConfig(max_new_tokens=8, seed=1)):
        together = generate(m, prompts, config).tokens
        alone = [generate(m, [p], config).tokens[0] for p in prompts]
        if config.temperature == 0:
            assert together == alone
        else:  # sampled: the same random numbers per row as one padded pass would draw
            monkeypatch.setattr(sampling, "length_groups", lambda lengths: [list(range(len(lengths)))])
            assert generate(m, prompts, config).tokens == together


def test_compiled_decoding_gives_the_same_tokens_as_eager_greedy_sampled_and_stopped():
    m = context_bound_model()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13]]  # left-padded: the static cache's mask at work
    greedy = SamplingConfig(max_new_tokens=10, temperature=0)
    sampled = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=20, seed=3)
    eager = {name: generate(m, prompts, config) for name, config in (("greedy", greedy), ("sampled", sampled))}
    # a stop token that one row emits early: that row ends (pad from then on), the others go on
    stop = eager["greedy"].tokens[0][2]
    eager["stopped"] = generate(m, prompts, greedy, stop_ids=[stop], pad_id=0)
    assert eager["stopped"].finished[0] and not all(eager["stopped"].finished)
    compiled = copy.deepcopy(m)
    choice = compile_decoding(compiled, attention="auto")
    # "auto" timed both kernels compiled and left the model on the one it chose
    assert set(choice["ms_per_token"]) == {"sdpa", "eager"} and all(t > 0 for t in choice["ms_per_token"].values())
    assert compiled.config._attn_implementation == choice["attention"]
    for attention in ("sdpa", "eager"):
        compile_decoding(compiled, attention=attention)
        assert generate(compiled, prompts, greedy).tokens == eager["greedy"].tokens, attention
        assert generate(compiled, prompts, sampled).tokens == eager["sampled"].tokens, attention
        stopped = generate(compiled, prompts, greedy, stop_ids=[stop], pad_id=0)
        assert (stopped.tokens, stopped.finished) == (eager["stopped"].tokens, eager["stopped"].finished), attention


def test_a_compiled_step_takes_new_sampling_settings_without_compiling_again():
    from torch._dynamo.utils import counters

    m = model()
    compile_decoding(m, attention="sdpa")
    generate(m, [[1, 2, 3]], SamplingConfig(max_new_tokens=4, temperature=0.7, top_k=50, top_p=0.9, seed=0))
    graphs = counters["stats"]["unique_graphs"]
    for temperature, top_p in ((0.9, 0.95), (1.0, 0.5), (0.5, 0.8)):  # chat's /temp and /topp
        generate(m, [[1, 2, 3]], SamplingConfig(max_new_tokens=4, temperature=temperature, top_k=50, top_p=top_p,
                                                seed=0))
    assert counters["stats"]["unique_graphs"] == graphs


def test_filter_logits_keeps_the_top_k_and_the_nucleus_with_top_p_a_number_or_a_tensor():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]]).log_softmax(-1)
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept[0].tolist() == [True, False, False, False, True] and kept[1].all()  # ties at the k-th all stay
    probs = logits[0].exp()  # 0.23, 0.03, 0.09, 0.01, 0.64: the nucleus of 0.8 is the two largest
    assert filter_logits(logits, top_p=0.8)[0].isfinite().tolist() == [True, False, False, False, True]
    assert filter_logits(logits, top_p=float(probs[4]) - 0.01)[0].isfinite().sum() == 1
    assert filter_logits(logits).isfinite().all()  # both off
    for top_k, top_p in ((2, 1.0), (0, 0.8), (3, 0.9), (0, 1.0), (99, 0.5)):
        assert torch.equal(filter_logits(logits, top_k, top_p), filter_logits(logits, top_k, torch.tensor(top_p)))


def test_compile_decoding_rejects_an_unknown_attention_kernel():
    with pytest.raises(ValueError, match="flash"):
        compile_decoding(model(), attention="flash")


def test_a_compiled_step_reads_the_whole_context_for_one_row_and_a_fitted_cache_for_a_batch():
    assert static_cache_length(20, rows=1, block_size=256) == 256  # a conversation: one graph for every turn
    assert static_cache_length(20, rows=64, block_size=256) == 64  # short rollouts: no empty slots to read
    assert static_cache_length(65, rows=64, block_size=256) == 128
    assert static_cache_length(250, rows=64, block_size=256) == 256
    assert static_cache_length(300, rows=8, block_size=256) == 300  # never shorter than what is generated


def test_draw_picks_each_token_as_often_as_its_probability_and_never_an_impossible_one():
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0]).repeat(50_000, 1)
    frequency = torch.bincount(draw(probs, generator), minlength=6) / 50_000
    assert frequency[[0, 2, 5]].sum() == 0  # zero probability, at the start, between and at the end
    assert torch.allclose(frequency, probs[0], atol=0.01)
    edges = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).repeat(1000, 1)
    assert draw(edges, generator).view(-1, 2).eq(torch.tensor([0, 2])).all()


def test_the_sampler_decodes_through_peft_lora_layers():
    from peft import LoraConfig, get_peft_model

    m = model()
    wrapped = get_peft_model(copy.deepcopy(m), LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "proj", "fc"]))
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # LoRA starts as a no-op: make it change the model
    prompt = torch.randint(1, 97, (1, 5))
    greedy = SamplingConfig(max_new_tokens=8, temperature=0)
    sequence = prompt.clone()
    for _ in range(8):  # uncached, through PEFT's own forward
        sequence = torch.cat([sequence, wrapped(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert generate(wrapped, prompt.tolist(), greedy).tokens == sequence[:, 5:].tolist()
    assert generate(m, prompt.tolist(), greedy).tokens != sequence[:, 5:].tolist()  # the LoRA layers were used


def test_generate_of_transformers_works_with_our_model():
    m = model()
    out = m.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=6, do_sample=False)
    ours = generate(m, [[3, 4, 5]], SamplingConfig(max_new_tokens=6, temperature=0)).tokens[0]
    assert out[0, 3:].tolist() == ours


def test_generate_of_transformers_keeps_its_cache_on_a_left_padded_batch():
    # Transformers 5 passes the cache as `cache=`; dropping it would decode each new token without context.
    m = model()
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10, 11]]
    ids = torch.tensor([[0, 0, 0, 3, 4, 5], prompts[1]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ours = generate(m, prompts, SamplingConfig(max_new_tokens=8, temperature=0)).tokens
    assert out[:, 6:].tolist() == ours


def test_from_pretrained_round_trip(tmp_path):
    m = model()
    m.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is MiniGPTForCausalLM
    x = torch.randint(1, 97, (2, 7))
    assert torch.equal(loaded(x).logits, m(x).logits)


def test_sequence_classifier_reads_the_last_real_token(tmp_path):
    model().save_pretrained(tmp_path)
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    assert type(scorer) is MiniGPTForSequenceClassification
    x = torch.randint(1, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1).long()
    assert torch.allclose(scorer(x).logits, scorer(padded, attention_mask=mask).logits, atol=1e-5)
    right = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1)
    assert torch.allclose(scorer(x).logits, scorer(right, attention_mask=mask.flip(1)).logits, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(1, 97, (2, 10))
    grads = []
    for checkpointing in (False, True):
        m = model().train()
        if checkpointing:
            m.gradient_checkpointing_enable()  # the spelling TRL and PEFT call
        m(x, labels=x).loss.backward()
        grads.append(m.model.blocks[0].attn.qkv.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_kv_cache_prefill_in_chunks_matches_whole():
    m = model()
    x = torch.randint(1, 97, (1, 10))
    cache = KVCache(CONFIG, 1, 10, "cpu", torch.float32)
    first = m(x[:, :6], cache=cache, use_cache=True).logits
    second = m(x[:, 6:], cache=cache, use_cache=True).logits
    assert torch.allclose(torch.cat([first, second], 1), m(x).logits, atol=1e-5)


def test_written_out_attention_gives_sdpas_logits_and_gradients_in_every_mask_case():
    """attn_implementation="eager" (model.explicit_attention) must compute what SDPA computes: plain causal,
    left padding, packed sequences, a chunk after a cache and one cached token; and the same gradients."""
    sdpa, written = context_bound_model(), context_bound_model()
    written.config = copy.deepcopy(written.config)  # not the module-level CONFIG the other model shares
    for module in written.modules():
        if hasattr(module, "config"):
            module.config = written.config
    written.config._attn_implementation = "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    x = torch.randint(1, 97, (2, 9))
    mask = (torch.arange(9) >= torch.tensor([[0], [4]])).long()
    packed, positions = x[:1], torch.cat([torch.arange(5), torch.arange(4)])[None]
    for kwargs in (dict(input_ids=x), dict(input_ids=x, attention_mask=mask),
                   dict(input_ids=packed, position_ids=positions)):
        assert torch.allclose(sdpa(**kwargs).logits, written(**kwargs).logits, atol=1e-4), kwargs
    cached = {}
    for m in (sdpa, written):  # a chunk of four after a cache of five, then one token
        cache = KVCache(CONFIG, 2, 10, "cpu", torch.float32)
        m(x[:, :5], cache=cache, use_cache=True)
        cached[m] = [m(x[:, 5:], cache=cache, use_cache=True).logits, m(x[:, :1], cache=cache, use_cache=True).logits]
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(cached[sdpa], cached[written]))
    for m in (sdpa.train(), written.train()):
        m(input_ids=x, attention_mask=mask, labels=x).loss.backward()
    for (name, a), b in zip(sdpa.named_parameters(), written.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-4), name


def test_the_attention_choice_is_not_saved_with_the_model(tmp_path):
    m = model()
    m.config._attn_implementation = "eager"
    m.save_pretrained(tmp_path)
    m.config._attn_implementation = "sdpa"
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
    asked = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert asked.config._attn_implementation == "eager"
    x = torch.randint(1, 97, (2, 7))
    assert torch.allclose(asked(x).logits, m(x).logits, atol=1e-5)


def test_decoding_falls_back_to_eager_when_the_compiler_fails(monkeypatch):
    m = model()
    prompts, greedy = [[1, 2, 3], [4]], SamplingConfig(max_new_tokens=6, temperature=0)
    sampled = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=20, seed=1)
    eager = [generate(m, prompts, config).tokens for config in (greedy, sampled)]

    def broken_compile(function, **options):
        def fails(*args, **kwargs):
            raise RuntimeError("InductorError: no C++ compiler found\nmore lines")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(sampling, "measure", lambda *a, **k: pytest.fail("eager decoding is not timed for a choice"))
    for attention in ("auto", "sdpa"):
        compiled, messages = copy.deepcopy(m), []
        choice = compile_decoding(compiled, attention=attention, notify=messages.append)
        # the failure shows at the first compiled step ("auto" times decoding at once, a kernel forced at first use)
        assert [generate(compiled, prompts, config).tokens for config in (greedy, sampled)] == eager, attention
        assert messages == ["decoding not compiled (RuntimeError: InductorError: no C++ compiler found): eager"]
        assert not decode_step_of(compiled)[1]  # the eager loop from then on
        assert choice["compiled"] is (attention != "auto")  # "auto" knew before it returned
    with pytest.warns(UserWarning, match="decoding not compiled"):  # said even when nobody listens
        compiled = copy.deepcopy(m)
        compile_decoding(compiled, attention="eager")
        assert generate(compiled, prompts, greedy).tokens == eager[0]


def test_the_loss_from_aligned_targets_is_the_shifted_labels_loss_without_the_logits():
    m = model()
    x = torch.randint(0, m.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    out = m(input_ids=x[:, :-1], targets=x[:, 1:])
    assert out.logits is None  # only the loss: what lets a compiled model fuse it with the head
    # the same predictions as Transformers' labels, which the model shifts itself (one fewer a row)
    assert torch.allclose(m(input_ids=x[:, :-1], targets=x[:, 1:].clone().index_fill_(1, torch.tensor([7]), -100)).loss,
                          m(input_ids=x[:, :-1], labels=x[:, :-1]).loss)
    logits = m(input_ids=x[:, :-1]).logits
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                                      x[:, 1:].reshape(-1)))
