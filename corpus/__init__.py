"""Data: SemEval-2025 Task 4 loaders and the built-in miniature task."""
