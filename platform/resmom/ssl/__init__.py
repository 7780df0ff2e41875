"""Momentum SSL methods: losses, the residual-momentum term, the EMA teacher, gap metrics.

Nothing here imports MLflow or Ray: methods take tensors and modules and
return tensors, so they run and are tested in one CPU process.
"""
