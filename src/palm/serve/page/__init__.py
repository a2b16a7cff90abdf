"""The page of `palm serve` (static/: HTML, script and style, no external file); package data
of its own package, so that only the service, which imports it, depends on it."""
