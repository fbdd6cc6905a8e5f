"""`python -m mmfast verify MODEL_OR_CONFIG`: build a model (random weights unless a checkpoint is given), then
`mmfast.verify` it: unpatched vs patched vs float64, forward and backward, and what ran where. Lives outside
mmfast.swap (which imports torch) so that `--help` imports nothing heavy.

MODEL_OR_CONFIG is, in this order: a local directory (a Hugging Face config, with or without weights), a timm
model name (``timm.list_models()``), an open_clip model name (``open_clip.list_models()``), or a Hugging Face
Hub id (``org/name``, needs the network). Prefix ``timm:``, ``open_clip:`` or ``hf:`` to choose explicitly.
"""
import ast
import os

from ._cli import prepare_device

KINDS = ("timm", "open_clip", "hf")


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmfast verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL_OR_CONFIG")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable; dots reach nested configs (timm: depth=1; open_clip: "
                        "vision_cfg.layers=1; Hugging Face: vision_config.num_hidden_layers=1); values are Python "
                        "literals, else strings. A Hugging Face checkpoint with overrides is built from its "
                        "config (random weights)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="the kernels' backend in the patched run (auto: Triton on CUDA, reference on CPU)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="cast the model (default: as built, float32)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, inputs and backward weights")
    parser.add_argument("--train", action="store_true", help="run in training mode (dropout active)")
    return parser


def parse_overrides(items):
    """["a.b=1", "c=x"] -> {"a": {"b": 1}, "c": "x"}; ValueError naming a malformed item."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set: {key!r} sets inside a value that is not a config")
        node[leaf] = value
    return out


def _optional(name):
    """The package `name`, or None where it does not import (not installed): it only rules out its kind."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _kind(spec):
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in KINDS:
        return prefix, rest
    if os.path.isdir(spec):
        return "hf", spec
    timm = _optional("timm")
    if timm is not None and timm.is_model(spec):
        return "timm", spec
    open_clip = _optional("open_clip")
    if open_clip is not None and spec in open_clip.list_models():
        return "open_clip", spec
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return "hf", spec
    missing = [name for name, module in (("timm", timm), ("open_clip", open_clip)) if module is None]
    raise ValueError(f"unknown model {spec!r}: not a local directory, not a timm model name (timm.list_models()), "
                     "not an open_clip model name (open_clip.list_models()), not a Hugging Face Hub id (org/name)"
                     + (f"; {' and '.join(missing)} did not import here, so their names were not checked"
                        if missing else ""))


def _merge(base, overrides):
    merged = dict(base)
    for k, v in overrides.items():
        merged[k] = _merge(merged.get(k) or {}, v) if isinstance(v, dict) else v
    return merged


def _set_config(config, overrides, where="config"):
    for k, v in overrides.items():
        if not hasattr(config, k):
            raise ValueError(f"--set: {where} has no field {k!r}")
        if isinstance(v, dict):
            _set_config(getattr(config, k), v, f"{where}.{k}")
        else:
            setattr(config, k, v)


def load_model(spec, overrides=None):
    """The model MODEL_OR_CONFIG names (see the module docstring), with `overrides` applied to its config."""
    overrides = overrides or {}
    kind, name = _kind(spec)
    if kind == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **overrides)
    if kind == "open_clip":
        import open_clip

        config = open_clip.get_model_config(name)
        if config is None:
            raise ValueError(f"unknown open_clip model {name!r}")
        merged = _merge(config, overrides)
        return open_clip.create_model(name, pretrained=None, pretrained_text=False,
                                      **{k: merged[k] for k in overrides})
    import transformers

    config = transformers.AutoConfig.from_pretrained(name)
    _set_config(config, overrides)
    weights = not overrides and (not os.path.isdir(name) or any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(name)))
    if weights:
        return transformers.AutoModel.from_pretrained(name)
    return transformers.AutoModel.from_config(config)


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)  # before torch is imported: --help answers at once
    import torch

    prepare_device(parser, args.device)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    torch.manual_seed(args.seed)
    try:
        model = load_model(args.model, overrides)
    except (ValueError, TypeError, OSError) as exc:
        print(f"python -m mmfast verify: {exc}")
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device=device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    from .swap.verify import verify

    try:
        result = verify(model, backend=args.backend, seed=args.seed, train=args.train)
    except ValueError as exc:
        print(f"python -m mmfast verify: {exc}")
        return 2
    if not result.report.integration:
        return 2
    return 0 if result.passed else 1
