"""GLANCE-style twin-surrogate explanations (a reconstruction from the abstract; docs/glance.md, SPEC 9).

One module per thing computed: :mod:`.context` (context tables), :mod:`.surrogate` (the concept
encoder/decoder), :mod:`.causal` (the causal graph and its linear structural model), :mod:`.explain`
(local explanations by interventions on concepts).
"""
