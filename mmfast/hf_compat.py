"""Where transformers 4.5x and 5.x lay the same model out differently: each helper asks the object for the
4.x form (hasattr / getattr), never the version number, and returns the 5.x form the converters read."""


def hf_tower(model, name):
    """The tower inside a transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` (`name` "vision_model") or
    ``CLIPTextModel`` (`name` "text_model"). 4.x wraps a ``*Transformer`` holding ``embeddings`` /
    ``encoder`` in ``model.<name>``; 5.x puts those on the model itself. Anything else (a two-tower CLIPModel
    included: converters refuse it themselves) comes back as given."""
    inner = getattr(model, name, None)
    two_towers = hasattr(model, "vision_model") and hasattr(model, "text_model")
    if not hasattr(model, "embeddings") and not two_towers and inner is not None and hasattr(inner, "embeddings"):
        return inner
    return model


# 4.x ViTLayer: BERT-style attention.attention.{query,key,value}, attention.output.dense,
# intermediate.dense / output.dense; 5.x ViTLayer: attention.{q,k,v,o}_proj, mlp.fc1 / fc2
_VIT_LAYER_4X = {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
                 "out": "attention.output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after",
                 "fc1": "intermediate.dense", "fc2": "output.dense"}
_VIT_LAYER_5X = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "out": "attention.o_proj",
                 "norm1": "layernorm_before", "norm2": "layernorm_after", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def hf_vit_layers(vit):
    """(layers, names for ``layer_pairs``) of a transformers ``ViTModel``: 5.x ``vit.layers``, 4.x
    ``vit.encoder.layer``; None when `vit` has neither."""
    if hasattr(vit, "layers"):
        return vit.layers, _VIT_LAYER_5X
    layers = getattr(getattr(vit, "encoder", None), "layer", None)
    return (layers, _VIT_LAYER_4X) if layers is not None else None


def hf_rope_parameters(config, default_theta=10000.0):
    """The 5.x ``config.rope_parameters`` dict ({"rope_theta", "rope_type", scaling fields}) of a transformers
    text config. 4.x keeps ``config.rope_theta`` (absent in Idefics, whose rotary base is fixed at 10000) and
    ``config.rope_scaling`` (None: plain RoPE) apart."""
    rope = getattr(config, "rope_parameters", None)
    if rope is not None:
        return dict(rope)
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    return {**scaling, "rope_theta": getattr(config, "rope_theta", default_theta)}
