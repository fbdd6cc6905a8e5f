"""Several end-of-sequence ids (Llama 3's [128001, 128008, 128009]): greedy, beam search and sampling stop a
row on any of them exactly as Hugging Face's ``generate`` on a tiny random LlamaForCausalLM, with the list
kept from the HF config by ``from_hf``; the ids' checks."""
import pytest
import torch
from optional_deps import optional_import, requires

from mmfast.models import generation
from mmfast.nn.decoder import DecoderLM
from numerics import generator, randomise_norms_

transformers = optional_import("transformers")
V, L, NEW = 97, 7, 8
MODES = {"greedy": dict(do_sample=False), "beam3": dict(num_beams=3, do_sample=False),
         "sample": dict(do_sample=True, top_p=0.9, top_k=30, temperature=0.8)}


def _hf():
    torch.manual_seed(generator().initial_seed() % 2**31)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    # float64: the two implementations pick the same tokens without fp32 near-ties
    return randomise_norms_(transformers.LlamaForCausalLM(config).eval()).double()


def _prompts():
    ids = torch.randint(3, V, (2, L), generator=generator())
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # row 1 left-padded
    return ids, mask


def _generate(model, ids, mask, mode, seed, **kw):
    torch.manual_seed(seed)  # sampling: HF and ours draw one torch.multinomial per step from the global RNG
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, **MODES[mode], **kw)


@pytest.mark.parametrize("mode, pick", [("greedy", "step2"), ("beam3", "step1"), ("beam3", "top4"),
                                        ("sample", "step2")],
                         ids=["greedy", "beam3", "beam3-eos-crowded", "sample"])
@requires("transformers")
def test_several_eos_ids_stop_as_hf(mode, pick):
    """The extra EOS ids are the tokens each row emits at step 2 (beam search: step 1 of the best beam)
    without any EOS, so greedy and sampled rows end by step 2 on an id that is not the first of the list; or
    (top4) row 0's four likeliest first tokens, so that most of the best continuations end (HF keeps
    (1 + number of EOS ids) * num_beams candidates) and, under length_penalty -1 (short hypotheses win),
    row 0's best is its likeliest first token alone. Any session seed: the cases are built from the probe."""
    hf = _hf()
    ours = DecoderLM.from_hf(hf, backend="reference")
    ids, mask = _prompts()
    seed = generator().initial_seed() % 2**31
    probe = _generate(ours, ids, mask, mode, seed, eos_token_id=-1)[:, L:]
    assert probe.shape[1] == NEW
    if pick == "top4":
        with torch.no_grad():
            extra = ours(ids, mask).logits[0, -1].topk(4).indices.tolist()
    else:
        extra = probe[:, 1 if pick == "step1" else 2].tolist()
    unused = min(set(range(3, V)) - set(probe.flatten().tolist()) - set(extra))
    eos = [unused] + sorted(set(extra))
    hf.generation_config.eos_token_id = hf.config.eos_token_id = eos  # as a Llama 3 config.json holds it
    ours = DecoderLM.from_hf(hf, backend="reference")
    assert ours.eos_token_id == eos
    kw = dict(length_penalty=-1.0) if pick == "top4" else {}
    expected = _generate(hf, ids, mask, mode, seed, **kw)  # both take the list from their config
    got = _generate(ours, ids, mask, mode, seed, **kw)
    assert torch.equal(got, expected), f"{got}\n{expected}"
    if pick == "top4":  # row 0: [its likeliest first token], then filled with eos[0] as HF
        assert int(expected[0, L]) == extra[0] and (expected[0, L + 1:] == eos[0]).all(), expected
    elif mode != "beam3":  # every row ended by step 2 on a later id of the list
        assert expected.shape[1] <= L + 3
        for row in expected[:, L:].tolist():
            assert next(t for t in row if t in eos) in eos[1:], f"{row} does not end on one of {eos[1:]}"


def test_min_length_masks_every_eos_id():
    logits = torch.zeros(2, 10)
    out = generation._min_length(logits, 3, 5, generation.eos_ids("t", [4, 7, -1]))
    assert torch.isinf(out[:, [4, 7]]).all() and torch.isfinite(out[:, [0, 1, 2, 3, 5, 6, 8, 9]]).all()


def test_greedy_ends_each_row_on_any_eos_id():
    # row 0 emits 5 then 6, row 1 emits 6: both end on the second step's / first step's EOS
    script = iter([torch.tensor([5, 6]), torch.tensor([6, 9])])

    def step(tokens):
        return torch.nn.functional.one_hot(next(script), 10).float()

    out = generation.greedy_search(step, torch.ones(2, 1, dtype=torch.long), max_length=6, eos_token_id=[6, 3],
                                   pad_token_id=0)
    assert out.tolist() == [[1, 5, 6], [1, 6, 0]]


@pytest.mark.parametrize("eos", [[], [2, 1.5], True, torch.tensor([[1, 2]]), torch.tensor([1.0])],
                         ids=["empty", "float-in-list", "bool", "2-d", "float-tensor"])
def test_invalid_eos_ids_raise(eos):
    model = DecoderLM.from_preset("tiny-llama", backend="reference")
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(torch.randint(3, 90, (2, 4)), eos_token_id=eos, max_new_tokens=2)


def test_beam_search_keeps_num_beams_running_when_the_best_are_eos():
    """HF keeps max(2, 1 + number of EOS ids) * num_beams candidates (``beams_to_keep``). Here the first step's
    likeliest tokens are 1, then the three EOS ids, then 2; only 2 leads on to a likely EOS, so [2, 7]
    (score (log .1 + log .99) / 2) beats [7] (log .2): with 2 * num_beams candidates 2 would be cut."""
    def dist(spec):
        p = torch.full((10,), (1 - sum(spec.values())) / (10 - len(spec)))
        p[list(spec)] = torch.tensor(list(spec.values()))
        return p.log()

    after = {0: dist({1: 0.22, 7: 0.2, 8: 0.2, 9: 0.2, 2: 0.1}), 2: dist({7: 0.99})}

    def step(tokens):
        return torch.stack([after.get(int(t), torch.full((10,), 0.1).log()) for t in tokens[:, -1]])

    out = generation.beam_search(step, lambda index: None, torch.zeros(2, 1, dtype=torch.long), num_beams=2,
                                 max_length=5, eos_token_id=[7, 8, 9], pad_token_id=0)
    assert out.tolist() == [[0, 2, 7]]
