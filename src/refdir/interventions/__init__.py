"""Interventions on the residual stream: the :class:`~refdir.interventions.intervention.Intervention`
value (ablate a direction everywhere, or add it at a layer) applied as a scope, or per row of a
batch (:mod:`~refdir.interventions.rows`); the same ablation written into the weights
(:mod:`~refdir.interventions.orthogonalization`) and exported as a checkpoint
(:mod:`~refdir.interventions.export`)."""
