"""Contrastive losses of CLIPModel / SiglipModel through `contrastive_loss` / `siglip_loss`.

Both losses are computed inline in the model's ``forward``, after the (returned) logits. The swapped
forward runs the original one with ``return_loss=False`` and computes the loss from the normalised
embeddings it returns and the model's ``logit_scale`` (and ``logit_bias``): the same value and gradients
(for the embeddings, hence every weight, and the scale / bias), without the loss's own N x N passes.

BLIP-2 has no image-text contrastive loss in transformers (``Blip2ForImageTextRetrieval`` returns
similarity logits only, with no temperature), so there is nothing of it to swap.
"""
from mmfast.kernels import contrastive_loss, siglip_loss

from .. import _core


def _wrap(loss_fn):
    def factory(backend):
        def forward(self, *args, return_loss=None, **kwargs):
            if len(args) > 4 or kwargs.get("return_dict") is False:  # return_loss positional, or tuple outputs
                return _core.original(self)(*args, return_loss=return_loss, **kwargs)
            out = _core.original(self)(*args, return_loss=False, **kwargs)
            if not return_loss:
                return out
            text, image = out.text_embeds, out.image_embeds
            if text.shape[0] != image.shape[0]:  # unpaired batches: the original loss decides what that means
                return _core.original(self)(*args, return_loss=True, **kwargs)
            loss = loss_fn(self, text, image.to(text.device), backend)
            out.loss = loss.to(out.logits_per_text.dtype)
            return out
        return forward
    return factory


def _clip(model, text, image, backend):
    # rows = texts: HF's (caption_loss + image_loss) / 2 over logits_per_text; scale = logit_scale.exp(), no clamp
    return contrastive_loss(text, image, model.logit_scale.to(text.device), max_scale=None, backend=backend)


def _siglip(model, text, image, backend):
    return siglip_loss(text, image, model.logit_scale.to(text.device), model.logit_bias.to(text.device),
                       max_scale=None, backend=backend)


TABLE = {
    "CLIPModel": (_wrap(_clip), "modeling_clip.image_text_contrastive_loss", "mmfast.kernels.contrastive_loss", {}),
    "SiglipModel": (_wrap(_siglip), "SiglipModel sigmoid loss", "mmfast.kernels.siglip_loss", {}),
}


def patch(model, options, state):
    _core.replace_forwards_by_class(model, TABLE, options.backend, state.report, "transformers")
