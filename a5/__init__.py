"""Provided machinery behind ``a5_helper.py`` and the detector chapters (see the README's layout)."""
