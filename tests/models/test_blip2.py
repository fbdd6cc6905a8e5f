"""BLIP-2 (OPT) against transformers' Blip2ForConditionalGeneration: logits and loss on a left-padded batch,
greedy generation, stage-2 freezing, input checks; one tiny model through the Triton interpreter."""
import copy
import inspect

import pytest
import torch
from optional_deps import optional_import, requires

from mmfast.models.blip2 import Blip2, QFormer
from model_helpers import hf_loaded_in
from numerics import assert_close_by_rule, assert_same_greedy_tokens, generator

transformers = optional_import("transformers")
needs_hf = requires("transformers")
Q, V, IMAGE_TOKEN, BOS, PAD, EOS = 4, 100, 99, 2, 1, 2
PROMPT = 5  # text tokens after the image tokens


def _hf(seed=0):
    # image_token_index: 4.5x's Blip2Config drops an image_token_id keyword (its __init__ resets the field
    # the alias maps to); 5.x maps image_token_id to it either way
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=30, patch_size=6),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            cross_attention_frequency=2, encoder_hidden_size=32, vocab_size=V),
        text_config=dict(model_type="opt", vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=PAD,
                         bos_token_id=BOS, eos_token_id=EOS, dropout=0.0),
        num_query_tokens=Q, image_token_index=IMAGE_TOKEN)
    return _randomised(transformers.Blip2ForConditionalGeneration, config, seed)


def _randomised(cls, config, seed):
    torch.manual_seed(seed)
    hf = cls(config).eval()
    with torch.no_grad():  # HF's init leaves norms at 1 / 0 and the query tokens at 0: random, so mappings show
        for name, p in hf.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    return hf


def _inputs(left_pad=(0, 3)):
    g = generator()
    pixels = 3 * torch.randn(len(left_pad), 3, 30, 30, generator=g)  # wide enough that the captions differ
    text = torch.randint(3, IMAGE_TOKEN, (len(left_pad), PROMPT), generator=g)
    ids = torch.cat([torch.full((len(left_pad), Q), IMAGE_TOKEN), torch.full((len(left_pad), 1), BOS), text], 1)
    mask = torch.ones_like(ids)
    for row, n in enumerate(left_pad):  # left padding: shift the row right, pads in front
        if n:
            ids[row] = torch.cat([torch.full((n,), PAD), ids[row, :-n]])
            mask[row, :n] = 0
    return pixels, ids, mask


@needs_hf
def test_logits_loss_and_grads_match_hf_left_padded():
    hf = _hf()
    ours = Blip2.from_hf(hf, backend="reference")
    pixels, ids, mask = _inputs()
    # full length (HF 5.24's loss fails on a shorter labels' non-contiguous logits slice); pads, image tokens
    # and tokens predicted from a pad position (whose output HF fills otherwise) ignored
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE_TOKEN), -100)
    labels[:, 1:].masked_fill_(mask[:, :-1] == 0, -100)
    keep = mask.bool()

    def run(model, dtype, trained):
        out = model(pixels.to(dtype), ids, attention_mask=mask)
        lab = model(pixels.to(dtype), ids, attention_mask=mask, labels=labels)
        grads = torch.autograd.grad(lab.loss, trained(model))
        return (out.logits[keep], lab.loss, lab.logits[keep], *grads)

    # the parameters stage 2 trains: query tokens, a cross-attention query projection, the LM projection
    def theirs(m):
        return m.query_tokens, m.qformer.encoder.layer[0].crossattention.attention.query.weight, \
            m.language_projection.weight

    def mine(m):
        return m.query_tokens, m.qformer.layers[0].cross_attn.q.weight, m.language_projection.weight

    ref64 = copy.deepcopy(hf).double()
    got = run(ours, torch.float32, mine)
    ref, yard = run(ref64, torch.float64, theirs), run(hf, torch.float32, theirs)
    names = ("logits", "loss", "logits with labels", "query_tokens grad", "cross-attn query grad",
             "projection grad")
    for name, a, r, y in zip(names, got, ref, yard, strict=True):
        floor = 1e-6 * max(1.0, r.abs().max().item())
        assert_close_by_rule(a, r, y, factor=3.0 if "grad" in name else 2.0, floor=floor, what=name)


@needs_hf
def test_query_output_is_fp32_and_features_match_hf():
    hf = _hf()
    ours = Blip2.from_hf(hf, backend="reference")
    pixels, _, _ = _inputs()
    image, query, features = ours.get_image_features(pixels)
    if "return_dict" in inspect.signature(hf.get_image_features).parameters:
        # 4.5x: (projected features, vision outputs, Q-Former outputs) with return_dict=True
        projected, vision_out, qformer_out = hf.get_image_features(pixels, return_dict=True)
    else:  # 5.x: one output, the Q-Former's inside, the projected features as pooler_output
        vision_out = hf.get_image_features(pixels)
        qformer_out, projected = vision_out.qformer_outputs, vision_out.pooler_output
    torch.testing.assert_close(image, vision_out.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(query, qformer_out.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features, projected, rtol=1e-5, atol=1e-5)
    # cast follows from_pretrained(dtype=): the Q-Former fp32 in fp16 only, unless asked to keep it
    for dtype, keep, qformer_dtype in ((torch.float16, None, torch.float32), (torch.bfloat16, True, torch.float32),
                                       (torch.bfloat16, None, torch.bfloat16)):
        ours = Blip2.from_hf(hf, backend="reference").cast(dtype, keep_qformer_fp32=keep)
        assert ours.qformer.layernorm.weight.dtype == ours.query_tokens.dtype == qformer_dtype
        assert ours.language_model.lm_head.weight.dtype == dtype
        image, query, features = ours.get_image_features(pixels.to(dtype))
        assert query.dtype == qformer_dtype and features.dtype == image.dtype == dtype
    with pytest.raises(ValueError, match="dtype"):
        ours.cast(torch.int8)


@pytest.mark.parametrize("prompt", ["none", "left_padded"])
@needs_hf
def test_greedy_generation_equals_hf(prompt):
    hf = _hf()
    ours = Blip2.from_hf(hf, backend="reference")
    pixels, ids, mask = _inputs()
    kw = dict(max_new_tokens=5, do_sample=False)
    if prompt == "none":
        expected = hf.generate(pixels, **kw)
        got = ours.generate(pixels, **kw)
        # the prompt is the same for both rows: the first step's logits differ only through the image
        first = ours(pixels, got[:, :Q + 1]).logits[:, -1]
        assert not torch.allclose(first[0], first[1], atol=1e-3)
    else:
        expected = hf.generate(pixels, ids, attention_mask=mask, **kw)
        got = ours.generate(pixels, ids, attention_mask=mask, **kw)
    assert got.shape[1] == expected.shape[1] > 5
    prompt_mask = mask if prompt != "none" else torch.ones_like(expected[:, :-5])

    def next_logits(prefix):
        full = torch.cat([prompt_mask, torch.ones_like(prefix[:, prompt_mask.shape[1]:])], 1)
        with torch.no_grad():
            return hf(pixel_values=pixels, input_ids=prefix, attention_mask=full).logits[:, -1]
    assert_same_greedy_tokens(got, expected, next_logits)


@needs_hf
def test_generation_stops_on_the_hf_configs_eos_list():
    """from_hf keeps a list of EOS ids from the generation config of HF's language model (HF's generate hands
    over to ``language_model.generate``); generate ends rows on any of them as HF's (the later id: what row 0
    emits at step 1, the first id one it never emits)."""
    hf = _hf().double()  # float64: no near-ties between the two implementations' greedy picks
    pixels, ids, mask = _inputs()
    P = ids.shape[1]
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    probe = Blip2.from_hf(hf, backend="reference").generate(pixels.double(), ids, eos_token_id=-1, **kw)
    row = probe[0, P:].tolist()
    eos = [min(set(range(3, IMAGE_TOKEN)) - set(probe[:, P:].flatten().tolist())), row[1]]
    hf.language_model.generation_config.eos_token_id = eos
    ours = Blip2.from_hf(hf, backend="reference")
    assert ours.language_model.eos_token_id == eos
    expected = hf.generate(pixels.double(), ids, **kw)
    assert torch.equal(ours.generate(pixels.double(), ids, **kw), expected)
    end = row.index(eos[1])  # step 1, or step 0 when row 0 emits that token twice
    assert int(expected[0, P + end]) == eos[1] and (expected[0, P + end + 1:] == PAD).all(), expected


@needs_hf
def test_stage2_trains_only_qformer_queries_and_projection():
    ours = Blip2.from_hf(_hf(), backend="reference").set_stage("stage2").train()
    trainable = {n.split(".")[0] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"qformer", "query_tokens", "language_projection"}
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    pixels, ids, mask = _inputs()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ours(pixels, ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    opt.step()
    for n, p in ours.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == p.requires_grad or (p.requires_grad and "k_bias" in n), n
    assert all(p.grad is None for p in ours.vision.parameters())
    assert all(p.grad is None for p in ours.language_model.parameters())


@needs_hf
def test_triton_interpreter_matches_reference():
    hf = _hf()
    pixels, ids, mask = _inputs()
    ref = Blip2.from_hf(hf, backend="reference")(pixels, ids, attention_mask=mask).logits
    got = Blip2.from_hf(hf, backend="triton")(pixels, ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-4, atol=1e-4)


@needs_hf
def test_input_checks():
    hf = _hf()
    ours = Blip2.from_hf(hf, backend="reference")
    pixels, ids, mask = _inputs()
    with pytest.raises(ValueError, match="image tokens"):
        ours(pixels, ids[:, 1:], attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="attention_mask"):
        ours(pixels, ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="labels"):
        ours(pixels, ids, labels=torch.zeros(2, ids.shape[1] + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="pixel_values"):
        ours(pixels[0], ids)
    with pytest.raises(ValueError, match="stage"):
        ours.set_stage("stage3")
    with pytest.raises(ValueError, match="query_tokens"):
        Blip2(ours.vision, ours.qformer, torch.zeros(1, Q, 8), ours.language_projection, ours.language_model,
              image_token_id=IMAGE_TOKEN)
    with pytest.raises(ValueError, match="cross_attention_frequency"):
        QFormer(32, 2, 2, 32, cross_attention_frequency=0)
    with pytest.raises(ValueError, match="Blip2ForConditionalGeneration"):
        Blip2.from_hf(hf.language_model)


@needs_hf
def test_t5_language_model_is_refused():
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=30, patch_size=6),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            encoder_hidden_size=32),
        text_config=dict(model_type="t5", vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2),
        num_query_tokens=Q, image_token_index=IMAGE_TOKEN)
    with pytest.raises(ValueError, match="encoder-decoder"):
        Blip2.from_hf(transformers.Blip2ForConditionalGeneration(config))


def _hf_retrieval(seed=0, image_token_id=None):
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=30, patch_size=6),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            cross_attention_frequency=2, encoder_hidden_size=32, vocab_size=V,
                            max_position_embeddings=32, use_qformer_text_input=True),
        text_config=dict(model_type="opt", vocab_size=V, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         ffn_dim=128),
        num_query_tokens=Q, image_text_hidden_size=16, image_token_index=image_token_id)
    return _randomised(transformers.Blip2ForImageTextRetrieval, config, seed)


@pytest.mark.parametrize("image_tokens", [False, True], ids=["text_only", "image_tokens"])
@pytest.mark.parametrize("head", ["itc", "itm"])
@needs_hf
def test_retrieval_matches_hf(head, image_tokens):
    """HF's two layouts: plain text, or Q image tokens in front (image_token_id set) that the Q-Former drops
    (ITM then takes the full mask, its first Q columns covering the queries)."""
    from mmfast.models.blip2 import Blip2ForImageTextRetrieval

    hf = _hf_retrieval(image_token_id=IMAGE_TOKEN if image_tokens else None)
    ours = Blip2ForImageTextRetrieval.from_hf(hf, backend="reference")
    g = generator()
    pixels = 3 * torch.randn(3, 3, 30, 30, generator=g)
    ids = torch.randint(3, V, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:], mask[2, 3:] = 0, 0  # right padding
    if image_tokens:
        ids = torch.cat([torch.full((3, Q), IMAGE_TOKEN), ids], 1)
        mask = torch.cat([torch.ones(3, Q, dtype=torch.long), mask], 1)
    kw = dict(attention_mask=mask, use_image_text_matching_head=head == "itm")
    got = ours(pixels, ids, **kw).logits_per_image
    ref = copy.deepcopy(hf).double()(pixels.double(), ids, **kw).logits_per_image
    yard = hf(pixels, ids, **kw).logits_per_image
    assert got.shape == ((3, 2) if head == "itm" else (3, 3))
    assert_close_by_rule(got, ref, yard, factor=2.0, floor=1e-6 * max(1.0, ref.abs().max().item()), what=head)


@needs_hf
def test_stage1_losses_match_hf_scores():
    """ITC and ITM from HF's retrieval scores (the LAVIS formulas on them); ITG: a text token's logits do
    not depend on later text, the queries' outputs not on any text."""
    from torch.nn import functional as F

    from mmfast.models.blip2 import Blip2ForImageTextRetrieval
    from mmfast.nn.bert import BertLMHead

    hf = _hf_retrieval()
    ours = Blip2ForImageTextRetrieval.from_hf(hf, backend="reference")
    ours.lm_head, ours.bos_token_id = BertLMHead(32, V), 3
    g = generator()
    pixels = 3 * torch.randn(3, 3, 30, 30, generator=g)
    ids = torch.randint(4, V, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    seed = int(torch.randint(0, 2**31, (1,), generator=g))
    got = ours.stage1_loss(pixels, ids, mask, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sim = hf(pixels, ids, attention_mask=mask).logits_per_image / 0.07
        target = torch.arange(3)
        itc = (F.cross_entropy(sim, target, label_smoothing=0.1) + F.cross_entropy(sim.t(), target,
                                                                                 label_smoothing=0.1)) / 2
        weights = [F.softmax(s, 1) + 1e-4 for s in (sim, sim.t())]
        draws = torch.Generator().manual_seed(seed)
        neg = []
        for w in weights:
            neg.append(torch.multinomial(w.fill_diagonal_(0), 1, generator=draws)[:, 0])
        images = torch.cat([pixels, pixels[neg[1]], pixels])
        texts, masks_ = torch.cat([ids, ids, ids[neg[0]]]), torch.cat([mask, mask, mask[neg[0]]])
        itm_logits = hf(images, texts, attention_mask=masks_, use_image_text_matching_head=True).logits_per_image
        itm = F.cross_entropy(itm_logits, torch.tensor([1] * 3 + [0] * 6))
    torch.testing.assert_close(got["itc"], itc, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["itm"], itm, rtol=1e-4, atol=1e-5)
    assert set(got) == {"itc", "itm", "itg", "loss"} and torch.isfinite(got["itg"])
    torch.testing.assert_close(got["loss"], got["itc"] + got["itm"] + got["itg"])

    from mmfast.kernels.attention import masks

    image = ours.vision(pixels).last_hidden_state
    queries = ours.query_tokens.expand(3, -1, -1)
    itg = masks.qformer_masks(Q, 7).itg
    h = ours.qformer(queries, image, input_ids=ids, intervals=itg)
    changed = ids.clone()
    changed[:, 4:] = 3
    h2 = ours.qformer(queries, image, input_ids=changed, intervals=itg)
    torch.testing.assert_close(h[:, :Q + 4], h2[:, :Q + 4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h[:, :Q], ours.qformer(queries, image), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(h[:, Q + 4:], h2[:, Q + 4:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@needs_hf
def test_half_checkpoint_matches_hf(dtype):
    """HF's model as from_pretrained(dtype=) loads it (hf_loaded_in): the Q-Former and query tokens
    (_keep_in_fp32_modules) stay fp32 in fp16 only; in bf16 transformers loads them bf16 too (it keeps only
    _keep_in_fp32_modules_strict fp32 there). from_hf keeps each part's dtype; logits within the rule of HF's
    own run in that layout."""
    hf = _hf()
    pixels, ids, mask = _inputs()
    ref = copy.deepcopy(hf).double()(pixels.double(), ids, attention_mask=mask).logits
    hf = hf_loaded_in(hf, dtype)
    qformer_dtype = torch.float32 if dtype == torch.float16 else dtype
    assert hf.qformer.layernorm.weight.dtype == hf.query_tokens.dtype == qformer_dtype
    ours = Blip2.from_hf(hf, backend="reference")
    assert ours.qformer.layers[0].fc1.weight.dtype == ours.query_tokens.dtype == qformer_dtype
    assert ours.vision.norm.weight.dtype == ours.language_model.lm_head.weight.dtype == dtype
    got = ours(pixels.to(dtype), ids, attention_mask=mask).logits
    yard = hf(pixels.to(dtype), ids, attention_mask=mask).logits
    keep = mask.bool()
    assert got.dtype == yard.dtype == dtype
    assert_close_by_rule(got[keep], ref[keep], yard[keep], factor=2.0, what=f"{dtype} logits")
