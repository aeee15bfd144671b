"""Phase 2 with a teacher: a crashed-and-resumed run equals one run, the teacher embeds each text once over both, and
the distillation terms are logged."""

import math

from test_phase2 import read_log, tiny_config, train_crashing_in_step_3, workspace  # noqa: F401 (a fixture)


def test_phase2_with_teacher_resumes_exactly_and_encodes_each_text_once(workspace, tmp_path, monkeypatch):
    import train.distill as distill
    import train.phase2 as phase2

    encoded: list[str] = []
    real_load = distill.load_teacher

    def counting_teacher(teacher, device=None):
        model = real_load(teacher, device)
        real_encode = model.encode

        def encode(texts, **kwargs):
            encoded.extend(texts)
            return real_encode(texts, **kwargs)

        model.encode = encode
        return model

    monkeypatch.setattr(distill, "load_teacher", counting_teacher)
    cache = tmp_path / "teacher_cache"
    teacher = ["teacher=all-MiniLM-L6-v2", f"teacher_cache_dir={cache}", "distill_similarity_weight=5.0"]
    full = tmp_path / "full"
    phase2.train(tiny_config(workspace, full, *teacher))
    expected = read_log(full)
    first = list(encoded)
    assert first and len(first) == len(set(first))

    crashed = tmp_path / "crashed"
    train_crashing_in_step_3(monkeypatch, workspace, crashed, *teacher)
    phase2.train(tiny_config(workspace, crashed, "resume=auto", *teacher))
    resumed = read_log(crashed)
    assert encoded == first, "the shared cache was re-encoded"
    for a, b in zip(expected, resumed, strict=True):
        assert math.isclose(a["train/loss"], b["train/loss"], rel_tol=1e-6), (a, b)
        assert math.isclose(a["train/distill_score"], b["train/distill_score"], rel_tol=1e-6), (a, b)
    assert all(r["train/distill_similarity"] > 0 and r["train/distill_score"] > 0 for r in expected)

