"""``refdir optimize``: edits searched on a refusals-versus-KL Pareto front."""
