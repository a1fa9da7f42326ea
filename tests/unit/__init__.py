"""The unit layer: no root, no subprocess, no users; seconds in total.

A package on purpose: pytest then imports ``unit.conftest`` instead of a second
module named ``conftest``, which would hide tests/conftest.py from the end-to-end
tests' ``from conftest import ...`` whenever both directories are collected together.
"""
