"""The vision-language pre-training objectives ALBEF and BLIP share (LAVIS' code, on mmfast's kernels):
momentum ITC with queues and distillation, ITM hard-negative sampling, BERT masking and distilled MLM."""
import torch
from torch import nn
from torch.nn import functional as F

from mmfast.kernels import contrastive_loss
from mmfast.kernels._common import check_scalar
from mmfast.nn.contrastive import MoCoQueue
from mmfast.nn.momentum import MomentumEncoder


def add_momentum_model(model, embed_dim, queue_size, momentum, backend, **towers):
    """Give `model` LAVIS' momentum machinery: ``momentum_model`` (an EMA copy of `towers`, reachable as
    ``momentum_model.ema[name]``) and the feature queues ``image_queue`` / ``text_queue``."""
    model.momentum_model = MomentumEncoder(nn.ModuleDict(towers), momentum, backend=backend)
    model.image_queue = MoCoQueue(embed_dim, queue_size)
    model.text_queue = MoCoQueue(embed_dim, queue_size)


def check_group(owner, group):
    """`group` of ALBEF / BLIP: None, "local" or a torch.distributed ProcessGroup (see resolve_group)."""
    if group is None or (isinstance(group, str) and group == "local"):
        return group
    import torch.distributed as dist

    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise ValueError(f"{owner}: group must be None, 'local' or a torch.distributed ProcessGroup, got {group!r}")
    return group


def resolve_group(group):
    """The process group the momentum queues gather over. None: the default group whenever torch.distributed
    is initialised with several ranks — what ALBEF's / BLIP's ``_dequeue_and_enqueue`` does
    (``concat_all_gather`` on the default group); "local": no gathering (each rank keeps its own queues);
    a ProcessGroup: that group."""
    if isinstance(group, str):
        return None
    if group is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
    return group


def enqueue_momentum_features(model, image_feat_m, text_feat_m):
    """ALBEF / BLIP ``_dequeue_and_enqueue``: push the momentum features of every rank of the model's group
    (gathered in rank order, so W ranks fill the queues as one process on the concatenated batch)."""
    group = resolve_group(model.group)
    for queue, feats in ((model.image_queue, image_feat_m), (model.text_queue, text_feat_m)):
        queue.group = group
        queue.enqueue(feats)


def momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, *, alpha=0.4,
                      backend="auto"):
    """ALBEF / BLIP ITC with momentum distillation, as LAVIS (features L2-normalised by the caller):

        sim_i2t = image_feat · [text_feat_m; text_queue]ᵀ / temp,   targets = α·softmax(sim_i2t_m) + (1−α)·onehot
        loss = (CE(sim_i2t, targets_i2t) + CE(sim_t2i, targets_t2i)) / 2

    with sim_m from the momentum features — two ``contrastive_loss`` calls (symmetric=False, the queues as
    extra columns, the momentum features as teachers). `image_queue` / `text_queue` are :class:`MoCoQueue`;
    call their ``enqueue`` after this. Across ranks each rank's loss is this one on its own batch (its
    momentum features + the queues), as ALBEF / BLIP: only the queues are shared (enqueue_momentum_features).
    `temp` is a tensor (gradient flows to it through 1/temp)."""
    check_scalar("momentum_itc_loss", "alpha", alpha, lo=0.0, hi=1.0)
    scale = 1.0 / temp
    text_all, image_all = text_queue.with_keys(text_feat_m), image_queue.with_keys(image_feat_m)
    common = dict(symmetric=False, log_scale=False, max_scale=None, alpha=alpha, backend=backend)
    i2t = contrastive_loss(image_feat, text_all, scale, a_teacher=image_feat_m, b_teacher=text_all, **common)
    t2i = contrastive_loss(text_feat, image_all, scale, a_teacher=text_feat_m, b_teacher=image_all, **common)
    return (i2t + t2i) / 2


@torch.no_grad()
def sample_hard_negatives(sim_i2t, sim_t2i, generator=None):
    """For each image a negative text and for each text a negative image of the batch, drawn with
    probability ∝ softmax of the ITC similarity (BLIP adds 1e-4 so every other pair stays possible);
    the positive (diagonal) has probability exactly 0. sim_*: (B, ≥B), the first B columns the batch.
    Returns (negative text index per image, negative image index per text), each (B,) int64."""
    B = sim_i2t.shape[0]
    if B < 2:
        raise ValueError(f"hard negatives need a batch of at least 2 pairs, got {B}")
    if tuple(sim_t2i.shape[:1]) != (B,) or sim_i2t.shape[1] < B or sim_t2i.shape[1] < B:
        raise ValueError(f"sim_i2t / sim_t2i must be (B, >=B) with the same B, got {tuple(sim_i2t.shape)}, "
                         f"{tuple(sim_t2i.shape)}")
    picks = []
    for sim in (sim_i2t, sim_t2i):
        weights = F.softmax(sim[:, :B].float(), dim=1) + 1e-4
        weights.fill_diagonal_(0)
        picks.append(torch.multinomial(weights, 1, generator=generator)[:, 0])
    return picks[0], picks[1]


def itm_pairs(image_embeds, text, neg_text, neg_image):
    """ITM batch of 3B pairs, LAVIS' order: B positives, B (text, hard-negative image), B (hard-negative text,
    image); `text` is any per-pair tensor (ids, masks, hidden states). Returns (images, texts, labels)."""
    images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
    texts = torch.cat([text, text, text[neg_text]])
    B = image_embeds.shape[0]
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(images.device)
    return images, texts, labels


def mask_tokens(input_ids, *, vocab_size, mask_token_id, special_ids, probability=0.15, generator=None):
    """BERT masking (ALBEF's ``mask``): each token but the special ones is chosen with `probability`; of the
    chosen, 80% become [MASK], 10% a random token, 10% stay. Returns (masked ids, labels with -100 where not
    chosen)."""
    check_scalar("mask_tokens", "probability", probability, lo=0.0, hi=1.0)
    device = input_ids.device

    def draw(p):
        return torch.rand(input_ids.shape, generator=generator, device=device) < p

    chosen = draw(probability)
    for special in special_ids:
        chosen &= input_ids != special
    labels = input_ids.masked_fill(~chosen, -100)
    to_mask = chosen & draw(0.8)
    to_random = chosen & ~to_mask & draw(0.5)
    ids = input_ids.masked_fill(to_mask, mask_token_id)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    return torch.where(to_random, random_ids, ids), labels


def distilled_mlm_loss(logits, labels, logits_m=None, alpha=0.4):
    """(1−α)·CE(logits, labels) + α·CE(logits, softmax(logits_m)) over the masked positions (ALBEF's MLM
    with momentum distillation); plain CE without `logits_m`; 0 (with a gradient path) when no token is masked."""
    chosen = labels != -100
    if not chosen.any():  # a small batch with no token drawn: CE's mean over nothing would be NaN
        return logits.sum() * 0.0
    logits = logits[chosen].float()
    loss = F.cross_entropy(logits, labels[chosen])
    if logits_m is None or alpha == 0:
        return loss
    soft = F.softmax(logits_m[chosen].float(), -1)
    distill = -(F.log_softmax(logits, -1) * soft).sum(-1).mean()
    return (1 - alpha) * loss + alpha * distill
