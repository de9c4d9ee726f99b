"""Benchmark and reproduction scripts of ``tclora``; a package so that tests import them."""
