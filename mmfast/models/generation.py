"""Autoregressive decoding over a KV cache: greedy, beam search (Hugging Face's algorithm), nucleus sampling.

Every function takes ``step(tokens) -> logits``: it feeds the new tokens (N, T) to the decoder, which
extends its KV cache, and returns the next-token logits (N, V) of the last position; and, for beam
search, ``reorder(index)`` which gathers the cache rows along the batch. The first call gets the prompt.
Sequences returned include the prompt; finished rows are padded with `pad_token_id`, as ``generate`` does.
`eos_token_id` is one id or several (Llama 3's [128001, 128008, 128009]): a row ends on any of them, as
Hugging Face's list; a negative id matches no token.
"""
import torch
from torch.nn import functional as F

from mmfast.kernels._common import check_int, check_scalar


def _check(op, input_ids, max_length, min_length):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"{op}: input_ids must be a (N, T) int64 tensor, got {getattr(input_ids, 'shape', input_ids)}")
    check_int(op, "max_length", max_length, lo=input_ids.shape[1] + 1)
    check_int(op, "min_length", min_length, lo=0)


def eos_ids(op, eos_token_id, device=None):
    """`eos_token_id` (an int, or a non-empty list / tuple / 1-D tensor of ints) as a 1-D int64 tensor."""
    ids = eos_token_id
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.numel() == 0:
            raise ValueError(f"{op}: eos_token_id must be an int or a non-empty 1-D integer tensor, got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        return ids.reshape(-1).to(device=device, dtype=torch.long)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"{op}: eos_token_id must be an int or a non-empty list of ints, got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.long, device=device)


def _min_length(logits, length, min_length, eos):
    # Hugging Face's MinLengthLogitsProcessor (lengths count the prompt): every EOS id masked
    if length < min_length:
        logits = logits.clone()
        logits[:, eos[eos >= 0]] = -float("inf")
    return logits


def _decode(op, step, input_ids, choose, *, max_length, eos_token_id, pad_token_id, min_length):
    """The loop greedy search and sampling share: `choose(logits)` picks each row's next token until every row
    emitted one of `eos_token_id` (finished rows get `pad_token_id`) or the sequences reach `max_length`."""
    _check(op, input_ids, max_length, min_length)
    eos = eos_ids(op, eos_token_id, input_ids.device)
    seqs, tokens = input_ids, input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    while True:
        logits = _min_length(step(tokens).float(), seqs.shape[1], min_length, eos)
        nxt = torch.where(unfinished, choose(logits), pad_token_id)
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        unfinished &= ~torch.isin(nxt, eos)
        if not unfinished.any() or seqs.shape[1] >= max_length:
            return seqs
        tokens = nxt[:, None]


def greedy_search(step, input_ids, *, max_length, eos_token_id, pad_token_id, min_length=0):
    """Arg-max decoding until every row emitted one of `eos_token_id` or the sequences reach `max_length`."""
    return _decode("greedy_search", step, input_ids, lambda logits: logits.argmax(-1), max_length=max_length,
                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, min_length=min_length)


def nucleus_filter(logits, top_p, top_k=0, temperature=1.0):
    """Logits with everything outside the nucleus set to -inf: the smallest set of most likely tokens whose
    probability reaches `top_p` (after `temperature`, and `top_k` if > 0), as Hugging Face's warpers."""
    check_scalar("nucleus_filter", "top_p", top_p, lo=0.0, hi=1.0, lo_open=True)
    check_scalar("nucleus_filter", "temperature", temperature, lo=0.0, lo_open=True)
    check_int("nucleus_filter", "top_k", top_k, lo=0)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    sorted_logits, order = logits.sort(dim=-1)
    outside = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
    outside[..., -1] = False  # the most likely token always stays
    return logits.masked_fill(outside.scatter(-1, order, outside), -float("inf"))


def nucleus_sampling(step, input_ids, *, max_length, eos_token_id, pad_token_id, top_p=0.9, top_k=0,
                     temperature=1.0, min_length=0, generator=None):
    """Top-p sampling (BLIP's CapFilt captioner: top_p = 0.9) with greedy's stopping and padding."""
    def sample(logits):
        probs = nucleus_filter(logits, top_p, top_k, temperature).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    return _decode("nucleus_sampling", step, input_ids, sample, max_length=max_length, eos_token_id=eos_token_id,
                   pad_token_id=pad_token_id, min_length=min_length)


def _gather(t, index):
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def beam_search(step, reorder, input_ids, *, num_beams, max_length, eos_token_id, pad_token_id, length_penalty=1.0,
                early_stopping=False, min_length=0):
    """Beam search exactly as Hugging Face's ``generate(num_beams=...)`` (transformers 5.x ``_beam_search``):
    keep the max(2, 1 + number of EOS ids)·num_beams best continuations (so num_beams go on even when the
    best ones all end in an EOS), hypotheses that end in an EOS (or reach `max_length`) among the
    first num_beams join the finished set scored by sum log p / generated_length ** length_penalty, the
    best num_beams unfinished ones continue; stop when no running beam can beat the worst finished one
    (HF's heuristic for ``early_stopping=False``), or when every beam finished (``early_stopping=True``).

    input_ids: (B·num_beams, T), each prompt repeated num_beams times (the step function's batch).
    Returns the best finished sequence per prompt, (B, T + generated), padded with `pad_token_id` (with
    EOS when pad_token_id is 0 or None, as Hugging Face).
    """
    _check("beam_search", input_ids, max_length, min_length)
    check_int("beam_search", "num_beams", num_beams, lo=1)
    check_scalar("beam_search", "length_penalty", length_penalty)
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"beam_search: early_stopping must be True, False or 'never', got {early_stopping!r}")
    if input_ids.shape[0] % num_beams:
        raise ValueError(f"beam_search: input_ids rows ({input_ids.shape[0]}) must be a multiple of num_beams")
    device, (flat, prompt_len) = input_ids.device, input_ids.shape
    eos = eos_ids("beam_search", eos_token_id, device)
    B, K, cur = flat // num_beams, max(2, 1 + eos.numel()) * num_beams, prompt_len
    # HF fills with `pad_token_id or eos_token_id[0]`: a pad id of 0 falls back to EOS, kept for equal outputs
    fill = pad_token_id if pad_token_id else int(eos[0])
    running = torch.full((B, num_beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :cur] = input_ids.view(B, num_beams, cur)
    finished = running.clone()
    running_scores = torch.zeros(B, num_beams, device=device)
    running_scores[:, 1:] = -1e9  # the beams start identical: only the first one expands
    finished_scores = torch.full((B, num_beams), -1e9, device=device)
    finished_lengths = torch.zeros(B, num_beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    top_mask = torch.arange(K, device=device) < num_beams
    batch_offset = torch.arange(B, device=device)[:, None] * num_beams
    tokens = input_ids
    while True:
        # HF applies its logits processors to the log-probabilities (min_length does not renormalise)
        log_probs = _min_length(F.log_softmax(step(tokens).float(), -1), cur, min_length, eos)
        log_probs = log_probs.view(B, num_beams, -1) + running_scores[..., None]
        V = log_probs.shape[-1]
        top_scores, top_index = log_probs.view(B, -1).topk(K)
        source = top_index // V
        candidates = _gather(running, source)
        candidates[:, :, cur] = top_index % V
        hits = torch.isin(candidates[:, :, cur], eos) | (cur + 1 >= max_length)
        # the beams that go on: the best num_beams candidates that did not stop
        keep = (top_scores - hits.float() * 1e9).topk(num_beams).indices
        running = _gather(candidates, keep)
        running_scores = _gather(top_scores - hits.float() * 1e9, keep)
        beam_source = _gather(source, keep) + batch_offset
        # the finished set: merge candidates that stopped among the first num_beams
        new = hits & top_mask[None]
        scored = top_scores / ((cur + 1 - prompt_len) ** length_penalty)
        scored = scored - (is_finished.all(-1, keepdim=True) & (early_stopping is True)).float() * 1e9
        scored = scored - (~improvable).float() * 1e9 - (~new).float() * 1e9
        merged = torch.cat([finished_scores, scored], 1).topk(num_beams).indices
        finished = _gather(torch.cat([finished, candidates], 1), merged)
        finished_scores = _gather(torch.cat([finished_scores, scored], 1), merged)
        lengths = torch.full_like(top_scores, cur + 1 - prompt_len, dtype=torch.long)
        finished_lengths = _gather(torch.cat([finished_lengths, lengths], 1), merged)
        is_finished = _gather(torch.cat([is_finished, new], 1), merged)
        cur += 1
        best_len = (max_length if early_stopping == "never" and length_penalty > 0 else cur) - prompt_len
        worst = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, -1e9)
        improvable = improvable & (running_scores[:, :1] / best_len ** length_penalty > worst).any(-1, keepdim=True)
        done = (~improvable.any()) | (is_finished.all() & (early_stopping is True)) | hits.all()
        if done:
            break
        reorder(beam_source.view(-1))
        tokens = running[:, :, cur - 1].reshape(-1, 1)
    out_len = prompt_len + int(finished_lengths[:, 0].max())
    return finished[:, 0, :out_len]
