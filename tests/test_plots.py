"""`curves.png`'s KL panel: KL to the reference when there is one, else the policy's drift."""

from gradflow.plots import kl_curve, plot_curves

ON_POLICY = [{"step": s, "loss/approx_kl": 0.0, "reward/mean": 0.1 * s} for s in range(1, 4)]
DRIFTING = [{"step": s, "loss/approx_kl": 0.01 * s} for s in range(1, 4)]
WITH_REFERENCE = [{"step": s, "loss/kl_ref": 0.02 * s, **r} for s, r in enumerate(DRIFTING, 1)]


def test_kl_panel_picks_the_reference_then_the_drift_then_nothing(tmp_path):
    assert kl_curve(WITH_REFERENCE)[0] == "loss/kl_ref"
    assert "reference" in kl_curve(WITH_REFERENCE)[1]
    assert kl_curve(DRIFTING)[0] == "loss/approx_kl"
    assert "drift" in kl_curve(DRIFTING)[1]
    # one update per step: approx_kl is 0 by construction, not a flat curve worth drawing
    assert kl_curve(ON_POLICY) is None
    for i, history in enumerate((WITH_REFERENCE, DRIFTING, ON_POLICY)):
        plot_curves(history, tmp_path / f"{i}.png", title="t")
        assert (tmp_path / f"{i}.png").stat().st_size > 0
