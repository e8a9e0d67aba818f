"""Thin entry-point scripts, one per MLproject entry point."""
