"""Named presets built on the meta device (no memory, fast) report the papers' parameter counts, and the
same count as the reference implementation's model of that size (also built on meta)."""
import pytest
import torch
from optional_deps import optional_import, requires

from mmfast.models import PRESETS, create_model
from mmfast.models._common import parameter_count

timm = optional_import("timm")
transformers = optional_import("transformers")


def hf_clip(vision, text, projection_dim):
    return transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                          projection_dim=projection_dim))


L14_VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14)
L14_TEXT = dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072)

def hf_llava_7b(next_=False):  # llava-hf/llava-1.5-7b-hf's and llava-v1.6-vicuna-7b-hf's config.json
    config = transformers.LlavaNextConfig if next_ else transformers.LlavaConfig
    model = transformers.LlavaNextForConditionalGeneration if next_ else transformers.LlavaForConditionalGeneration
    return model(config(
        vision_config=transformers.CLIPVisionConfig(**L14_VISION, image_size=336, projection_dim=768),
        text_config=transformers.LlamaConfig(vocab_size=32064, hidden_size=4096, num_hidden_layers=32,
                                             num_attention_heads=32, intermediate_size=11008, rms_norm_eps=1e-5),
        image_token_id=32000, projector_hidden_act="gelu"))


def hf_blip2_opt_2_7b():  # Salesforce/blip2-opt-2.7b's config.json: ViT-g and Q-Former defaults, OPT-2.7b
    opt = transformers.OPTConfig(vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                                 num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560)
    return transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(text_config=opt, num_query_tokens=32,
                                                                               image_token_id=50265))


def hf_mllama_11b():  # meta-llama/Llama-3.2-11B-Vision's config.json: the defaults, with 560px tiles
    return transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(vision_config=dict(image_size=560)))


def open_flamingo_9b():  # open_flamingo's factory.py for OpenFlamingo-9B (v1), without the downloads
    import open_clip
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    cfg = open_clip.get_model_config("ViT-L-14")
    clip = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    lang = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32003, hidden_size=4096,
                                                                  num_hidden_layers=32, num_attention_heads=32,
                                                                  intermediate_size=11008))
    extend_instance(lang, FlamingoLMMixin)
    lang.set_decoder_layers_attr_name("model.layers")
    model = Flamingo(clip, lang, 32000, 32001, vis_dim=1024, cross_attn_every_n_layers=4)
    model.vision_encoder.proj = None  # the image-embedding projection: open_flamingo uses the tokens only
    return model


# preset -> (the paper's / model card's count, the reference implementation's package, a builder of its model)
CASES = {
    "vit-b/16": (86e6, "timm", lambda: timm.create_model("vit_base_patch16_224", pretrained=False)),
    "vit-l/16": (304e6, "timm", lambda: timm.create_model("vit_large_patch16_224", pretrained=False)),
    "vit-h/14": (632e6, "timm", lambda: timm.create_model("vit_huge_patch14_224", pretrained=False, num_classes=1000)),
    "clip-vit-b/32": (151e6, "transformers", lambda: hf_clip({}, {}, 512)),
    "clip-vit-b/16": (150e6, "transformers", lambda: hf_clip(dict(patch_size=16), {}, 512)),
    "clip-vit-l/14": (428e6, "transformers", lambda: hf_clip(L14_VISION, L14_TEXT, 768)),
    "clip-vit-l/14-336": (428e6, "transformers", lambda: hf_clip(dict(L14_VISION, image_size=336), L14_TEXT, 768)),
    "llava-1.5-7b": (7.06e9, "transformers", hf_llava_7b),
    "llava-next-vicuna-7b": (7.06e9, "transformers", lambda: hf_llava_7b(next_=True)),
    "llama-3.2-11b-vision": (10.6e9, "transformers", hf_mllama_11b),
    "blip2-opt-2.7b": (3.74e9, "transformers", hf_blip2_opt_2_7b),
    "openflamingo-9b-llama": (8.22e9, "open_flamingo", open_flamingo_9b),
    "siglip-b/16-224": (203e6, "transformers", lambda: transformers.SiglipModel(transformers.SiglipConfig())),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_paper_sizes_on_meta(name):
    stated = CASES[name][0]
    with torch.device("meta"):
        ours = create_model(name)
    assert all(p.is_meta for p in ours.parameters())
    n = parameter_count(ours)
    assert abs(n - stated) / stated < 0.01, f"{name}: {n / 1e6:.1f}M, the paper states {stated / 1e6:.0f}M"


@pytest.mark.parametrize("name", [pytest.param(name, marks=requires(CASES[name][1])) for name in sorted(CASES)])
def test_same_count_as_the_reference_implementation(name):
    with torch.device("meta"):
        n, theirs = parameter_count(create_model(name)), parameter_count(CASES[name][2]())
    assert n == theirs, f"{name}: {n} vs the reference implementation's {theirs}"


def test_every_preset_is_covered_or_tiny():
    assert set(PRESETS) - set(CASES) == {"vit-tiny-test", "clip-tiny-test"}


def test_unknown_preset():
    with pytest.raises(ValueError, match="name"):
        create_model("vit-giant")
