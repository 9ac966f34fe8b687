"""Data: the embedded shapes world and LAION-layout WebDataset streams."""
