"""Graph passes: plan, propagate, rewrite (installed as fxtp.passes)."""
