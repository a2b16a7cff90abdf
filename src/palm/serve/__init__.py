"""Serving: the fast inference engine, its export, photograph decoding and quality, and `palm predict`."""
