"""fgvce-jax: fine-grained counterfactual explanations of classifier mistakes (FG-VCE) in JAX/Flax."""

__version__ = "0.1.0"
