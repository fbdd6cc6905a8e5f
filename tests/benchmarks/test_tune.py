"""The tuner (`python -m benchmarks tune`) and the launchers' use of its tables (kernels/_tuned.py).

On the CPU the launchers never see a card, so the tests fake the device name: a table written for exactly
that name must change the tiles the attention launcher picks (and the kernel still computes attention
with them), any other name must leave the static choice.
"""
import json

import pytest
import torch

from mmfast.benchmarks import tune
from mmfast.kernels import _tuned, flash_attention
from mmfast.kernels._common import interpreting
from mmfast.kernels.attention import _configs as C

CARD = "NVIDIA H100 80GB HBM3"
TUNED = C.TileConfig(16, 16, 4, 1)  # divides the interpreter's 32 x 32 mask tile; no static entry uses it

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="the launcher runs on CPU tensors only through "
                                       "Triton's interpreter (on a GPU machine the cuda tests cover the launcher)")


def _write_table(root, card=CARD, keys=None):
    keys = keys or [_tuned.key(p, "bf16", 64, "16-bit", "L<=256") for p in _tuned.TUNED_PASSES["attention"]]
    table = {"schema": _tuned.SCHEMA, "family": "attention", "card": card, "driver": "test", "triton": "test",
             "date": "2026-11-27", "configs": {k: {"config": vars(TUNED).copy()} for k in keys}}
    folder = root / "attention"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / (_tuned.card_slug(card) + ".json")).write_text(json.dumps(table))


@pytest.fixture
def picked(monkeypatch, tmp_path):
    """Runs one bf16 attention forward + backward on a faked card; returns {pass: the tiles it launched}."""
    monkeypatch.setenv("MMFAST_TUNED_DIR", str(tmp_path))
    seen = {}
    real = _tuned.attention_config

    def spy(pass_, *args):
        seen[pass_] = real(pass_, *args)
        return seen[pass_]

    monkeypatch.setattr(_tuned, "attention_config", spy)

    def run(card, head_dim=64, seqlen=20, backward=True):
        monkeypatch.setattr(_tuned, "device_name", lambda device: card)
        seen.clear()
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, seqlen, 1, head_dim, generator=g).bfloat16().requires_grad_() for _ in range(3))
        out = flash_attention(q, k, v, causal=True, backend="triton")
        ref = flash_attention(*(t.detach().double() for t in (q, k, v)), causal=True, backend="reference")
        assert (out.double() - ref).abs().max().item() < 0.05, "the tuned tiles changed the result"
        if backward:
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            assert all(torch.isfinite(gr).all() for gr in grads)
        return dict(seen)

    return run


@needs_interpreter
def test_launcher_uses_the_table_of_this_exact_card(picked, tmp_path):
    _write_table(tmp_path)
    got = picked(CARD)
    assert {p: got[p] for p in ("fwd", "dq", "dkdv")} == {"fwd": TUNED, "dq": TUNED, "dkdv": TUNED}
    assert got["pre"] != TUNED  # the Delta pass is not tuned


@needs_interpreter
@pytest.mark.parametrize("card", ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3e", None],
                         ids=["other-card", "same-slug-prefix", "cpu"])
def test_other_cards_keep_the_static_tiles(picked, tmp_path, card):
    _write_table(tmp_path)
    got = picked(card)
    assert TUNED not in got.values()


@needs_interpreter
def test_a_table_whose_card_field_differs_is_ignored(picked, tmp_path):
    _write_table(tmp_path, card="NVIDIA-H100 80GB HBM3")  # slugs to the same file name as CARD
    assert (tmp_path / "attention" / (_tuned.card_slug(CARD) + ".json")).exists()
    assert TUNED not in picked(CARD).values()


@needs_interpreter
def test_keys_the_table_lacks_keep_the_static_tiles(picked, tmp_path, monkeypatch):
    _write_table(tmp_path)
    assert TUNED not in picked(CARD, head_dim=128, backward=False).values()  # the table has D64 only
    assert TUNED not in picked(CARD, seqlen=260, backward=False).values()  # and the shortest shape class only
    monkeypatch.setenv("MMFAST_TUNED", "0")
    assert TUNED not in picked(CARD).values()


def test_forcing_wins_and_is_undone():
    args = ("fwd", C.KERNELS["fwd"], (torch.zeros(1),), 64, torch.bfloat16, "ieee", True)
    with _tuned.forcing("attention", {"fwd": TUNED}):
        assert _tuned.attention_config(*args) == TUNED
    assert _tuned.attention_config(*args) != TUNED


def test_shape_classes():
    assert [_tuned.shape_class(q, k) for q, k in [(77, 77), (577, 577), (2048, 320), (16384, 16384)]] == \
        ["L<=256", "L<=1024", "L<=4096", "L>4096"]


def _row(shape, cfg, ms):
    return {"key": "k", "shape": shape, "config": {"block_m": cfg, "block_n": 16, "num_warps": 4, "num_stages": 1},
            "ms": ms, "reason": None if ms else "x"}


def test_winner_is_the_best_geometric_mean_among_candidates_timed_everywhere():
    rows = [_row("a", 32, 1.0), _row("b", 32, 10.0),  # static (first)
            _row("a", 64, 0.5), _row("b", 64, 12.0),  # geometric mean 0.77: wins
            _row("a", 16, 0.1), _row("b", 16, None)]  # fastest on a, but untimed on b: cannot win
    best = tune.winners(rows)["k"]
    assert best["config"]["block_m"] == 64 and best["static"]["block_m"] == 32
    assert best["ratio_vs_static"] == pytest.approx((0.5 * 1.2) ** 0.5, rel=1e-3)
    assert best["candidates_timed"] == 2


def test_no_winner_without_a_timed_baseline():
    assert tune.winners([_row("a", 32, None), _row("a", 64, 1.0)]) == {}


def test_unknown_family_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        tune.main(["--family", "attention,nope", "--dry-run"])
    assert exc.value.code == 2 and "no tuner for ['nope']" in capsys.readouterr().err


@needs_interpreter
def test_dry_run_writes_a_table_the_launcher_accepts(tmp_path, capsys):
    assert tune.main(["--family", "attention", "--dry-run", "--tables-dir", str(tmp_path), "--budget-s", "120"]) == 0
    tables = list((tmp_path / "attention").glob("*.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["schema"] == _tuned.SCHEMA and table["family"] == "attention" and table["triton_interpreter"]
    for field in ("card", "driver", "triton", "torch", "date"):
        assert field in table
    assert set(table["configs"]) == {_tuned.key(p, "bf16", 64, "16-bit", "L<=256") for p in ("fwd", "dq", "dkdv")}
    for entry in table["configs"].values():
        C.TileConfig(**entry["config"])  # the launcher's constructor takes it as is
        assert entry["candidates_timed"] == 2 and entry["ratio_vs_static"] <= 1.0
    sweep = json.loads((tmp_path / "tune-attention.json").read_text())
    assert len([r for r in sweep["rows"] if r["ms"]]) == 12  # 3 passes x 2 candidates x 2 shapes
    assert "| key | winner |" in (tmp_path / "tune-attention.md").read_text()
