"""Counterfactual engine (SPEC 4-5): saliency partition, references and candidates, the batched
``lax.while_loop`` search, and the methods that drive it (one file each in :mod:`.methods`)."""
from fgvce_jax.counterfactual.config import CounterfactualConfig
from fgvce_jax.counterfactual.explain import Explanations, FeatureBatch, explain
from fgvce_jax.counterfactual.partition import Regions, partition
from fgvce_jax.counterfactual.references import CandidateBank, select_references
from fgvce_jax.counterfactual.search import REASONS

__all__ = ["CandidateBank", "CounterfactualConfig", "Explanations", "FeatureBatch", "REASONS",
           "Regions", "explain", "partition", "select_references"]
