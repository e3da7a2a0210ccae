"""Finished rows: the quality filters, exports and the dataset card."""
