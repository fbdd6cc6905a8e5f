"""LAVIS / ALBEF / BLIP checkpoint key names → ours, shared by ``ALBEF.from_state_dict`` and
``BLIP.from_state_dict``.

Their state dicts hold a timm-named ViT (``visual_encoder.blocks.N.attn.qkv``, ``cls_token``, ``pos_embed``,
``patch_embed.proj``), BERT-named text transformers (``encoder.layer.N.attention.self.query``, LAVIS'
``med.py`` / ``xbert.py``, with or without a ``bert.`` level and a ``cls.predictions`` head), the ITC
projections and temperature, ``_m`` momentum copies, and the queues stored (embed_dim, queue_size) with
``queue_ptr``. Tied weights (BLIP's encoder / decoder, the MLM / LM decoder and the word embedding) are
saved under every name that shares them.
"""
import re

from mmfast.nn.bert import bert_state_dict_from_hf

_TIMM_BLOCK = {"attn.proj": "attn.out"}
MOMENTUM = (("", ""), ("_m", "momentum_model.ema."))  # (checkpoint suffix, our prefix) of online and momentum


def vision_keys(sd, src, dst):
    """Our ViT's keys under `dst` for the timm-named ViT under `src`."""
    out = {}
    for key, value in sd.items():
        if not key.startswith(src + "."):
            continue
        name = key[len(src) + 1:]
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            out[f"{dst}.patch_embed.{name.removeprefix('patch_embed.')}"] = value
        elif name.startswith("blocks."):
            index, rest = re.match(r"blocks\.(\d+)\.(.+)", name).groups()
            part, _, leaf = rest.rpartition(".")
            out[f"{dst}.encoder.layers.{index}.{_TIMM_BLOCK.get(part, part)}.{leaf}"] = value
        else:
            out[f"{dst}.{name}"] = value
    return out


def text_keys(sd, src, body_dst, head_dst=None):
    """Our BertModel's keys under `body_dst` (and BertLMHead's under `head_dst`) for the BERT under `src`
    (``src.bert.`` + ``src.cls.`` when the checkpoint has that level, else ``src.``)."""
    prefix = f"{src}.bert." if f"{src}.bert.embeddings.word_embeddings.weight" in sd else f"{src}."
    body, head = bert_state_dict_from_hf(sd, prefix, f"{src}.cls." if head_dst is not None else None)
    out = {f"{body_dst}.{k}": v for k, v in body.items()}
    if head_dst is not None:
        out.update({f"{head_dst}.{k}": v for k, v in head.items()})
    return out


def itc_keys(sd, suffix, base):
    """The ITC projections (online or momentum copy)."""
    return {f"{base}{name}.{leaf}": sd[f"{name}{suffix}.{leaf}"]
            for name in ("vision_proj", "text_proj") for leaf in ("weight", "bias")}


def queue_keys(sd):
    """The temperature, the queues ((embed_dim, queue_size) there, (queue_size, embed_dim) here) and their
    pointer."""
    out = {"temp": sd["temp"]}
    for name in ("image", "text"):
        out[f"{name}_queue.queue"] = sd[f"{name}_queue"].t().contiguous()
        out[f"{name}_queue.ptr"] = sd["queue_ptr"].reshape(()).long()
    return out


def load(model, mapped, owner, tied=()):
    """Load `mapped` into `model`; keys missing from it must end with one of `tied` (weights tied to another
    that was loaded), and nothing may be left over."""
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.endswith(tuple(tied))]
    if missing or unexpected:
        raise ValueError(f"{owner}: keys missing {missing[:8]} / unexpected {unexpected[:8]}")
    return model
