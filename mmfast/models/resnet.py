"""CLIP's ResNet image tower (OpenAI CLIP RN50 / RN101 / RN50x4 ...; open_clip's ``ModifiedResNet``): a
3-convolution stem with an average pool, anti-aliased bottlenecks (an average pool before every strided
step instead of a strided convolution) and an attention pool over the final feature map whose attention
runs on mmfast's ``flash_attention``. Module names follow open_clip, so its ``visual`` state dict loads
(the attention pool's q / k / v projections land in one fused weight)."""
from collections import OrderedDict

import torch
from torch import nn

from mmfast.kernels._common import check_choice, check_int
from mmfast.nn.attention import MultiheadAttention

from ._common import BaseModelOutputWithPooling, check_output_attentions, copy_weights, hf_return

_OP = "ModifiedResNet"


def _conv_bn(cin, cout, k, stride=1):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> [avgpool(stride)] -> 1x1 (x4 channels), ReLU after each, residual through
    avgpool + 1x1 + BN when the shape changes (open_clip's ``Bottleneck``)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(inplanes, planes, 1)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = _conv_bn(planes, planes * self.expansion, 1)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            conv, bn = _conv_bn(inplanes, planes * self.expansion, 1)
            self.downsample = nn.Sequential(OrderedDict([("-1", nn.AvgPool2d(stride)), ("0", conv), ("1", bn)]))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(torch.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    """CLIP's attention pool: the mean of the feature map's cells, prepended to them, plus a learned
    position table, attends to all of them; the output projection ``c_proj`` maps to `output_dim`. Only
    the mean token's query is computed (the other queries' outputs are discarded by CLIP anyway)."""

    def __init__(self, grid, embed_dim, num_heads, output_dim=None, *, backend="auto"):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, embed_dim) / embed_dim ** 0.5)
        self.attn = MultiheadAttention(embed_dim, num_heads, backend=backend)
        self.attn.out = nn.Linear(embed_dim, output_dim or embed_dim)  # open_clip's c_proj
        self.grid = grid

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        if tokens.shape[1] + 1 != self.positional_embedding.shape[0]:
            raise ValueError(f"{_OP}: the feature map has {tokens.shape[1]} cells but the attention pool's table "
                             f"covers {self.grid}x{self.grid} (CLIP's ResNet takes one image size)")
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + self.positional_embedding.to(tokens.dtype)
        return self.attn(tokens[:, :1], tokens)[:, 0]


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower.

    Args:
        layers: bottlenecks per stage (RN50: (3, 4, 6, 3)); width: stem width (64); image_size: input size
            (a multiple of 32); heads: attention-pool heads; output_dim: the embedding width (c_proj's);
        backend: forwarded to flash_attention (the convolutions and BatchNorms are PyTorch's).

    ``forward(pixel_values)`` -> ``last_hidden_state`` (the final feature map, (B, 32·width, H/32, W/32)),
    ``pooler_output`` (the attention pool's (B, output_dim): CLIP's image embedding before normalisation),
    ``hidden_states`` when asked (the stem's output and each stage's, feature maps)."""

    def __init__(self, layers=(3, 4, 6, 3), output_dim=1024, heads=32, image_size=224, width=64, *, backend="auto"):
        super().__init__()
        if not (isinstance(layers, (tuple, list)) and len(layers) == 4):
            raise ValueError(f"{_OP}: layers must be 4 stage depths, got {layers!r}")
        for i, n in enumerate(layers):
            check_int(_OP, f"layers[{i}]", n, lo=1)
        check_int(_OP, "output_dim", output_dim, lo=1)
        check_int(_OP, "heads", heads, lo=1)
        check_int(_OP, "width", width, lo=2)
        check_int(_OP, "image_size", image_size, lo=32)
        check_choice(_OP, "backend", backend, ("auto", "triton", "reference"))
        if image_size % 32:
            raise ValueError(f"{_OP}: image_size must be a multiple of 32, got {image_size}")
        self.conv1, self.bn1 = _conv_bn(3, width // 2, 3, stride=2)
        self.conv2, self.bn2 = _conv_bn(width // 2, width // 2, 3)
        self.conv3, self.bn3 = _conv_bn(width // 2, width, 3)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            blocks = [Bottleneck(inplanes, planes, 1 if i == 0 else 2)]
            blocks += [Bottleneck(planes * 4, planes) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes * 4
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim, backend=backend)
        self.image_size, self.output_dim = image_size, output_dim

    def stem(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.avgpool(torch.relu(self.bn3(self.conv3(x))))

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, *, output_hidden_states=None,
                output_attentions=None, return_dict=None):
        check_output_attentions(_OP, output_attentions)
        if interpolate_pos_encoding:
            raise ValueError(f"{_OP}: interpolate_pos_encoding is not supported (CLIP's ResNet has one image size)")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"{_OP}: pixel_values must be a (B, 3, H, W) tensor")
        x = self.stem(pixel_values.to(self.conv1.weight.dtype))
        states = [x]
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            states.append(x)
        out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=self.attnpool(x),
                                         hidden_states=tuple(states) if output_hidden_states else None)
        return hf_return(out, return_dict)

    @classmethod
    def from_open_clip(cls, visual, *, backend="auto"):
        """From open_clip's ``ModifiedResNet`` (``model.visual`` of an RN CLIP), weights and BatchNorm
        statistics copied."""
        import open_clip

        if not isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
            raise ValueError(f"{_OP}.from_open_clip expects open_clip's ModifiedResNet, got {type(visual).__name__}")
        layers = tuple(len(getattr(visual, f"layer{i}")) for i in range(1, 5))
        pool = visual.attnpool
        model = cls(layers, visual.output_dim, pool.num_heads, visual.image_size, visual.conv1.out_channels * 2,
                    backend=backend)
        ref = visual.conv1.weight
        model = model.to(dtype=ref.dtype, device=ref.device)
        state = {k: v for k, v in visual.state_dict().items() if not k.startswith("attnpool.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("attnpool.") for k in missing):
            raise ValueError(f"{_OP}.from_open_clip: keys missing {missing[:8]} / unexpected {unexpected[:8]}")
        mine = model.attnpool
        copy_weights([("attnpool.positional_embedding", mine.positional_embedding, pool.positional_embedding),
                      ("attnpool.qkv.weight", mine.attn.qkv.weight,
                       torch.cat([pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight])),
                      ("attnpool.qkv.bias", mine.attn.qkv.bias,
                       torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias])),
                      ("attnpool.c_proj.weight", mine.attn.out.weight, pool.c_proj.weight),
                      ("attnpool.c_proj.bias", mine.attn.out.bias, pool.c_proj.bias)], f"{_OP}.from_open_clip")
        return model.train(visual.training)
