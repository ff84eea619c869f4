"""Sweep driver, search, tracking, selection and the command line."""
