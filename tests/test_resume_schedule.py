"""Resume rules shared by both phases (issue 13 failure 4 and its "Also", issue 15): a resumed run follows the lr
schedule of its *current* config at its step (warning which schedule keys changed), `--resume` and `key=value`
overrides work in any order, and `resume=auto` without a checkpoint starts fresh in phase 2 as in phase 1. Also the
learnable temperature's own optimizer group (issue 14)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.state import AcceleratorState, GradientState

from test_phase1 import _config, corpus, fresh_accelerate_state, one_thread, tokenizer_dir  # noqa: F401 (fixtures)
from test_phase2 import read_log, tiny_config, workspace  # noqa: F401 (fixture)
from train import phase1
from train import common
from train.common import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def warmup_cosine_lr(step: int, peak: float, low: float, warmup: int, total: int) -> float:
    """The lr of 0-based optimizer step `step`: linear warmup to `peak`, then a half cosine down to `low` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_phase1_resume_rebuilds_the_schedule_from_the_current_config(tokenizer_dir, corpus, tmp_path, caplog):
    """6 steps, then resumed to 12 with every schedule key changed: steps 7-12 run at exactly the lrs of a fresh
    12-step run with the new keys (the checkpoint's schedule would keep them all at the old minimum 3e-4)."""
    schedule = {"max_steps": 12, "warmup_steps": 2, "learning_rate": 2e-3, "min_learning_rate": 1e-4}
    fresh = phase1.run(_config(tokenizer_dir, corpus, tmp_path / "fresh", **schedule))
    _reset_accelerate()
    short = _config(tokenizer_dir, corpus, tmp_path / "short", max_steps=6)
    phase1.run(short)
    _reset_accelerate()
    with caplog.at_level(logging.WARNING, logger="train.common"):
        resumed = phase1.run({**short, **schedule, "resume": "auto"})

    assert resumed.first_step == 6
    assert resumed.learning_rates == fresh.learning_rates[6:]
    expected = [warmup_cosine_lr(step, 2e-3, 1e-4, 2, 12) for step in range(12)]
    assert fresh.learning_rates == pytest.approx(expected, rel=1e-12, abs=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "train.common"]
    assert len(warnings) == 1
    assert "['max_steps', 'warmup_steps', 'learning_rate', 'min_learning_rate']" in warnings[0]
    assert "max_steps: 6 -> 12" in warnings[0] and "learning_rate: 0.003 -> 0.002" in warnings[0]


def test_phase1_resume_auto_without_a_checkpoint_starts_fresh(tokenizer_dir, corpus, tmp_path):
    """`resume=auto` into an empty output_dir trains from step 1 exactly like a fresh run (both phases: issue 15)."""
    fresh = phase1.run(_config(tokenizer_dir, corpus, tmp_path / "fresh", max_steps=4))
    _reset_accelerate()
    auto = phase1.run(_config(tokenizer_dir, corpus, tmp_path / "auto", max_steps=4, resume="auto"))
    assert auto.first_step == 0 and len(auto.losses) == 4
    assert auto.losses == fresh.losses and auto.learning_rates == fresh.learning_rates
    assert [json.loads(line)["step"] for line in (tmp_path / "auto" / "train_log.jsonl").read_text().splitlines()] == [4]


def test_phase1_resume_refuses_a_max_steps_that_moves_upcycling_back(tokenizer_dir, corpus, tmp_path, phase1_killer):
    """Dense until step 4 of 8 (upcycle_at 0.5), killed after its step-3 checkpoint: with max_steps=4 upcycling would be
    at step 2, already passed, so the resume is refused naming the keys."""
    Killed = phase1_killer.Killed
    phase1_killer.arm()
    config = _config(tokenizer_dir, corpus, tmp_path / "run", upcycle_at=0.5, checkpoint_every=3)
    with pytest.raises(Killed):
        phase1.run(config)
    _reset_accelerate()
    message = (
        r"cannot resume .*checkpoint-00000003 \(dense, step 3\): config key 'max_steps'=4 moves upcycling "
        r"\(upcycle_at=0.5\) to step 2, which this run has passed"
    )
    with pytest.raises(ConfigError, match=message):
        phase1.run({**config, "max_steps": 4, "warmup_steps": 1, "resume": "auto"})


def test_phase2_resume_auto_starts_fresh_and_a_resume_rebuilds_both_schedules(workspace, tmp_path, caplog):
    """`resume=auto` with no checkpoint trains from step 1 (issue 15); 2 steps resumed to 4 give steps 3-4 the model and
    temperature lrs of the fresh 4-step run, with a warning naming max_steps."""
    import train.phase2 as phase2

    fresh = tmp_path / "fresh"
    phase2.train(tiny_config(workspace, fresh, "resume=auto"))
    expected = read_log(fresh)
    assert [r["step"] for r in expected] == [1, 2, 3, 4]
    config = tiny_config(workspace, fresh)  # learning_rate 1e-3 -> 1e-4, warmup 1, temperature_learning_rate 1e-2
    for record in expected:
        ratio = warmup_cosine_lr(record["step"] - 1, 1.0, config.min_learning_rate / config.learning_rate, 1, 4)
        assert record["train/lr"] == pytest.approx(config.learning_rate * ratio, rel=1e-12)
        assert record["train/temperature_lr"] == pytest.approx(config.temperature_learning_rate * ratio, rel=1e-12)

    short = tmp_path / "short"
    phase2.train(tiny_config(workspace, short, "max_steps=2"))
    with caplog.at_level(logging.WARNING, logger="train.common"):
        phase2.train(tiny_config(workspace, short, "resume=auto"))
    resumed = read_log(short)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for key in ("train/lr", "train/temperature_lr"):
        assert [r[key] for r in resumed[2:]] == [r[key] for r in expected[2:]], key
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "train.common"]
    assert len(warnings) == 1 and "['max_steps']" in warnings[0] and "max_steps: 2 -> 4" in warnings[0]


def test_temperature_has_its_own_group_and_moves(workspace, tmp_path, monkeypatch):
    """The temperature's AdamW group holds log τ alone, at `temperature_learning_rate`, without weight decay; on the
    same 4 steps it moves several times further than at the model's lr (which left it at 0.050)."""
    import train.phase2 as phase2

    optimizers = []
    real_build = common.build_optimizer

    def spy(*args, **kwargs):
        optimizers.append(real_build(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(common, "build_optimizer", spy)
    moved = {}
    for name, extra in (("own", ()), ("shared", ("temperature_learning_rate=1e-3",))):
        phase2.train(tiny_config(workspace, tmp_path / name, *extra))
        moved[name] = abs(read_log(tmp_path / name)[-1]["train/temperature"] - 0.05)
    group = optimizers[0].param_groups[-1]
    assert len(group["params"]) == 1 and group["params"][0].ndim == 0
    assert group["initial_lr"] == 1e-2 and group["weight_decay"] == 0.0
    assert [g["initial_lr"] for g in optimizers[0].param_groups[:-1]] == [1e-3, 1e-3]
    assert all(p.ndim > 0 for g in optimizers[0].param_groups[:-1] for p in g["params"])  # log τ is in no other group
    assert moved["own"] > 5 * moved["shared"] > 0, moved


@pytest.mark.parametrize(
    ("argv", "resume", "overrides"),
    [
        (["--resume", "max_steps=12"], "auto", {"max_steps": 12}),
        (["--resume", "max_steps=12", "seed=3"], "auto", {"max_steps": 12, "seed": 3}),
        (["seed=3", "--resume", "max_steps=12"], "auto", {"max_steps": 12, "seed": 3}),
        (["max_steps=12", "--resume"], "auto", {"max_steps": 12}),
        (["seed=3", "--resume", "runs/lr=1e-3/checkpoints/checkpoint-00000006", "max_steps=12"],
         "runs/lr=1e-3/checkpoints/checkpoint-00000006", {"max_steps": 12, "seed": 3}),  # fmt: skip
        (["max_steps=12", "seed=3", "max_steps=20"], None, {"max_steps": 20, "seed": 3}),  # in order: the last wins
    ],
)
@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_overrides_and_resume_in_any_order(phase, argv, resume, overrides, monkeypatch):
    """`--config X --resume key=value` used to take key=value as the checkpoint path (issue 13, "Also")."""
    import train.phase2 as phase2

    captured = []
    if phase == "phase1":
        monkeypatch.setattr(phase1, "run", lambda cfg: captured.append(cfg) or SimpleNamespace(losses=[]))
        phase1.main(["--config", str(REPO / "train/configs/phase1_tiny.yaml"), *argv])
    else:
        monkeypatch.setattr(phase2, "train", lambda cfg: captured.append(cfg) or {})
        phase2.main(["--config", str(REPO / "train/configs/phase2_tiny.yaml"), *argv])
    (config,) = captured
    assert config.resume == resume
    assert {key: getattr(config, key) for key in overrides} == overrides
