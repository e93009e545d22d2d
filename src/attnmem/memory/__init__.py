"""Measuring and predicting memory: measure (run for real), estimate and plan (predict)."""
