"""The training entry point for the bridge models (llava, blip2): each stage trains exactly its parts — the
optimiser holds only them, frozen parameters get no gradient and are unchanged after the loop's steps;
the CLI's --stage; the refusals (distributed, --data, unknown stages)."""
import pytest
import torch

from mmfast.training import cli, loop
from mmfast.training.tasks import TASKS, bridge_task, get_task

# every stage of every bridge row (a new row is checked as soon as it is in TASKS), and llava's AnyRes preset
CASES = [(name, "tiny", stage) for name, task in TASKS.items() if task.stages for stage in task.stages]
CASES += [("llava", "tiny-next", 1), ("llava", "tiny-next", 2)]
# (task, preset, stage) -> the top-level submodules / parameters that train, where known here
STAGES = {
    ("llava", "tiny", 1): {"projector"},
    ("llava", "tiny", 2): {"projector", "language_model"},
    ("llava", "tiny-next", 1): {"projector", "image_newline"},
    ("llava", "tiny-next", 2): {"projector", "image_newline", "language_model"},
    ("blip2", "tiny", "stage2"): {"qformer", "query_tokens", "language_projection"},
    ("blip2", "tiny", "stage1"): {"qformer", "query_tokens", "vision_projection", "text_projection", "itm_head",
                                  "lm_head", "temp"},
    ("blip2", "tiny", "all"): {"vision", "qformer", "query_tokens", "language_projection", "language_model"},
}


def _spy(monkeypatch):
    """The loop's model (with its weights before training) and optimiser, as train() builds them."""
    seen = {}
    build, optimizer = loop.build, loop.optimizer

    def spy_build(*args, **kwargs):
        task, model = build(*args, **kwargs)
        seen["model"], seen["before"] = model, {n: p.detach().clone() for n, p in model.named_parameters()}
        return task, model

    def spy_optimizer(model, lr):
        seen["opt"] = optimizer(model, lr)
        return seen["opt"]

    monkeypatch.setattr(loop, "build", spy_build)
    monkeypatch.setattr(loop, "optimizer", spy_optimizer)
    return seen


def test_cases_cover_the_known_stages():
    assert set(STAGES) <= set(CASES)


@pytest.mark.parametrize("task, preset, stage", CASES, ids=["-".join(map(str, k)) for k in CASES])
def test_stage_trains_only_its_parts(task, preset, stage, monkeypatch):
    seen = _spy(monkeypatch)
    losses = loop.train(task, preset=preset, stage=stage, steps=2, batch_size=2, lr=1e-2, backend="reference",
                        progress=False, log=lambda s: None)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    model, before = seen["model"], seen["before"]
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable, "nothing trains"
    if (task, preset, stage) in STAGES:
        assert {n.split(".")[0] for n in trainable} == STAGES[task, preset, stage]
    held = {id(p) for group in seen["opt"].param_groups for p in group["params"]}
    assert held == {id(params[n]) for n in trainable}, "the optimiser must hold exactly the trainable parameters"
    for name, p in params.items():
        if name in trainable:
            assert p.grad is not None, f"{name}: trainable but got no gradient"
        else:
            assert p.grad is None, f"{name}: frozen but has a gradient"
            assert torch.equal(p, before[name]), f"{name}: frozen but changed"
    changed = [n for n in trainable if not torch.equal(params[n], before[n])]
    assert len(changed) >= 0.9 * len(trainable), f"only {len(changed)} of {len(trainable)} trainable tensors moved"


def test_default_stage_is_the_bridge_stage():
    assert loop.build("llava", backend="reference")[1].language_model.embed_tokens.weight.requires_grad is False
    model = loop.build("blip2", backend="reference")[1]
    assert not any(p.requires_grad for p in model.language_model.parameters())
    assert all(p.requires_grad for p in model.qformer.parameters())
    assert [next(iter(TASKS[m].stages)) for m in ("llava", "blip2")] == [1, "stage2"]


@pytest.mark.parametrize("argv, text", [(["llava", "--stage", "2"], "train llava: 1 steps"),
                                        (["blip2", "--stage", "stage1"], "train blip2: 1 steps")],
                         ids=["llava-stage2", "blip2-stage1"])
def test_cli(argv, text, capsys):
    rc = cli.main(argv + ["--steps", "1", "--batch-size", "2", "--backend", "reference", "--no-plot",
                          "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert text in out.out


@pytest.mark.parametrize("kwargs, match", [
    (dict(task_name="llava", parallel="ddp"), "needs torch.distributed initialised"),
    (dict(task_name="blip2", parallel="fsdp", stage="stage1"), "at this stage.*stage 1 runs in one process"),
    (dict(task_name="blip2", parallel="ddp", stage="stage1"), "at this stage.*stage 1 runs in one process"),
    (dict(task_name="llava", stage=3), "stage must be one of"),
    (dict(task_name="blip2", stage=1), "stage must be one of"),
    (dict(task_name="clip", stage=1), "stage applies to the bridge models"),
    (dict(task_name="llava", data={"images": torch.zeros(2, 3, 16, 16)}), "--data is not supported"),
], ids=["llava-ddp-without-torchrun", "blip2-stage1-fsdp", "blip2-stage1-ddp", "llava-stage", "blip2-stage", "clip-stage", "llava-data"])
def test_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        loop.train(steps=1, batch_size=2, backend="reference", progress=False, log=lambda s: None, **kwargs)


def test_a_row_whose_module_is_not_merged_yet_says_so():
    task = bridge_task("later", "mmfast.models._not_merged_yet", "Later", presets=("tiny",), stages={"bridge": "x"})
    with pytest.raises(RuntimeError, match="mmfast.models._not_merged_yet is not in this checkout"):
        task.build("tiny", "reference")


@pytest.mark.parametrize("name, preset, trainable, image", [
    ("mllama", "llama-3.2-11b-vision", (1.7e9, 1.9e9), 560),
    ("flamingo", "openflamingo-9b-llama", (1.1e9, 1.25e9), 224),
    ("llava", "llava-1.5-7b", (20e6, 22e6), 336),  # stage 1: the 2-layer projector, 1024 -> 4096 -> 4096
    ("blip2", "blip2-opt-2.7b", (105e6, 110e6), 224),  # stage 2: Q-Former 105.1M, queries, projection 2.0M
])
def test_paper_size_presets_build_and_draw_batches_on_meta(name, preset, trainable, image):
    """The training rows' paper-size presets (built on the meta device: no memory): the bridge stage trains
    the adapter's share of the parameters, and the batch has the preset's image size."""
    task = get_task(name)
    with torch.device("meta"):
        model = task.build(preset, "reference", None)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable[0] < count < trainable[1]
    batch = task.batch(preset, 2, torch.Generator().manual_seed(0), None, model=model)
    pixels = batch.get("pixel_values", batch.get("vision_x"))
    assert pixels.shape[-1] == image and batch["labels"].shape[0] == 2
