"""Phase 2 with a teacher: a crashed-and-resumed run equals one run, the teacher embeds each text once over both at
`teacher_max_seq_length`, and the distillation terms are logged."""

import math

import pytest

from train.common import ConfigError

from test_phase2 import read_log, tiny_config, train_crashing_in_step_3, workspace  # noqa: F401 (a fixture)


def test_phase2_with_teacher_resumes_exactly_and_encodes_each_text_once(workspace, tmp_path, monkeypatch):
    import train.distill as distill
    import train.phase2 as phase2

    encoded: list[str] = []
    lengths: set[int] = set()
    real_load = distill.load_teacher

    def counting_teacher(teacher, device=None):
        model = real_load(teacher, device)
        real_encode = model.encode

        def encode(texts, **kwargs):
            encoded.extend(texts)
            lengths.add(model.max_seq_length)
            return real_encode(texts, **kwargs)

        model.encode = encode
        return model

    monkeypatch.setattr(distill, "load_teacher", counting_teacher)
    cache = tmp_path / "teacher_cache"
    teacher = ["teacher=all-MiniLM-L6-v2", f"teacher_cache_dir={cache}", "distill_similarity_weight=5.0",
               "teacher_max_seq_length=16"]
    full = tmp_path / "full"
    phase2.train(tiny_config(workspace, full, *teacher))
    expected = read_log(full)
    first = list(encoded)
    assert first and len(first) == len(set(first))
    assert lengths == {16}, "the teacher read past teacher_max_seq_length"

    crashed = tmp_path / "crashed"
    train_crashing_in_step_3(monkeypatch, workspace, crashed, *teacher)
    phase2.train(tiny_config(workspace, crashed, "resume=auto", *teacher))
    resumed = read_log(crashed)
    assert encoded == first, "the shared cache was re-encoded"
    for a, b in zip(expected, resumed, strict=True):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-6), (a, b)
        assert math.isclose(a["train/distill_score"], b["train/distill_score"], rel_tol=1e-6), (a, b)
    with pytest.raises(ConfigError, match=r"^config key 'teacher_max_seq_length'=0: must be > 0 or null$"):
        tiny_config(workspace, tmp_path / "zero", *teacher[:-1], "teacher_max_seq_length=0")
    assert all(r["train/distill_similarity"] > 0 and r["train/distill_score"] > 0 for r in expected)

