"""Callbacks own evaluation and side effects: EMA, image grids, exports, FID and alignment."""
