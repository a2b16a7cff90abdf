"""Data: the PALM download and a clinic's folder, labels, splits, image decoding, shards and the loader; the synthetic PALM generator."""
